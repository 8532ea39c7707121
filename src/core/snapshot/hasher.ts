/**
 * sha256 of a byte stream, computed on a worker thread for large streams so hashing runs beside
 * parsing and I/O (two cores: ~2x the throughput of hashing inline). Bounded: at most
 * MAX_IN_FLIGHT bytes are queued; `update` returns a promise to await when the queue is full.
 */
import { createHash, type Hash } from 'node:crypto';
import { Worker } from 'node:worker_threads';

const MAX_IN_FLIGHT = 64 * 1024 * 1024;
/** Size of the recycled transfer buffers. */
const SLAB = 8 * 1024 * 1024;
/** Streams shorter than this are hashed inline (a worker costs ~30 ms to start). */
const WORKER_THRESHOLD = 32 * 1024 * 1024;

const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const h = createHash('sha256');
parentPort.on('message', (m) => {
  if (m === 'digest') { parentPort.postMessage({ digest: h.digest('hex') }); return; }
  h.update(new Uint8Array(m.buf, 0, m.len));
  parentPort.postMessage({ ack: m.len, buf: m.buf }, [m.buf]);
});
`;

export interface StreamHasher {
  /** Hashes a copy of `data`; await the result when it is a promise (back-pressure). */
  update(data: Buffer): Promise<void> | undefined;
  digest(): Promise<string>;
  /** Stops the worker (error paths); safe to call twice. */
  close(): void;
}

class InlineHasher implements StreamHasher {
  private readonly h: Hash = createHash('sha256');
  update(data: Buffer): undefined {
    this.h.update(data);
    return undefined;
  }
  digest(): Promise<string> {
    return Promise.resolve(this.h.digest('hex'));
  }
  close(): void {}
}

class WorkerHasher implements StreamHasher {
  private readonly worker = new Worker(WORKER_SOURCE, { eval: true });
  private inFlight = 0;
  /** Transfer buffers the worker gave back (recycled: no allocation per update). */
  private readonly free: ArrayBuffer[] = [];
  private waiters: (() => void)[] = [];
  private onDigest: ((hex: string) => void) | undefined;
  private failure: Error | undefined;
  private onFailure: ((e: Error) => void) | undefined;

  constructor() {
    this.worker.on('message', (m: { ack?: number; buf?: ArrayBuffer; digest?: string }) => {
      if (m.ack !== undefined) {
        this.inFlight -= m.ack;
        if (m.buf) this.free.push(m.buf);
        if (this.inFlight <= MAX_IN_FLIGHT / 2) for (const w of this.waiters.splice(0)) w();
      } else if (m.digest !== undefined) this.onDigest?.(m.digest);
    });
    this.worker.on('error', (e) => {
      this.failure = e;
      this.onFailure?.(e);
      for (const w of this.waiters.splice(0)) w();
    });
  }

  update(data: Buffer): Promise<void> | undefined {
    if (this.failure) return Promise.reject(this.failure);
    for (let off = 0; off < data.length; off += SLAB) {
      const len = Math.min(SLAB, data.length - off);
      const buf = this.free.pop() ?? new ArrayBuffer(SLAB);
      new Uint8Array(buf).set(data.subarray(off, off + len));
      this.inFlight += len;
      this.worker.postMessage({ buf, len }, [buf]);
    }
    if (this.inFlight <= MAX_IN_FLIGHT) return undefined;
    return new Promise<void>((resolve) => this.waiters.push(resolve)).then(() => {
      if (this.failure) throw this.failure;
    });
  }

  digest(): Promise<string> {
    return new Promise<string>((resolve, reject) => {
      if (this.failure) return reject(this.failure);
      this.onFailure = reject;
      this.onDigest = (hex) => {
        this.close();
        resolve(hex);
      };
      this.worker.postMessage('digest');
    });
  }

  close(): void {
    void this.worker.terminate();
  }
}

export function createStreamHasher(expectedBytes: number): StreamHasher {
  return expectedBytes >= WORKER_THRESHOLD ? new WorkerHasher() : new InlineHasher();
}

const FILE_WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const { openSync, readSync, closeSync } = require('node:fs');
const { createHash } = require('node:crypto');
const fd = openSync(workerData.path, 'r');
try {
  const buf = Buffer.allocUnsafe(8 * 1024 * 1024);
  const h = createHash('sha256');
  let size = 0;
  for (let n; (n = readSync(fd, buf, 0, buf.length, null)) > 0; size += n) h.update(buf.subarray(0, n));
  parentPort.postMessage({ digest: h.digest('hex'), size });
} finally {
  closeSync(fd);
}
`;

/**
 * sha256 of a whole file, read and hashed by a worker thread on its own (no copies through the
 * main thread): used while the main thread parses the same file. Resolves to undefined when the
 * file's size is not `expectedSize` (it changed while being read).
 */
export function hashFileInWorker(path: string, expectedSize: number): { digest: Promise<string | undefined>; close(): void } {
  const worker = new Worker(FILE_WORKER_SOURCE, { eval: true, workerData: { path } });
  const digest = new Promise<string | undefined>((resolve, reject) => {
    worker.once('message', (m: { digest: string; size: number }) => resolve(m.size === expectedSize ? m.digest : undefined));
    worker.once('error', reject);
    worker.once('exit', (code) => reject(new Error(`the hashing thread for ${path} exited (code ${code})`)));
  });
  digest.catch(() => undefined).finally(() => void worker.terminate());
  return { digest, close: () => void worker.terminate() };
}

const PASS_WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
let h = createHash('sha256');
parentPort.on('message', (m) => {
  if (m === 'digest') { parentPort.postMessage({ digest: h.digest('hex') }); h = createHash('sha256'); return; }
  h.update(new Uint8Array(m.buf, 0, m.len));
  parentPort.postMessage({ buf: m.buf }, [m.buf]);
});
`;

/** Idle pass-through hashers kept for the next stream (a thread costs ~30 ms to start). */
const idle: PassThroughHasher[] = [];
const MAX_IDLE = 2;

/**
 * Hashes buffers in order on a worker thread without copying them: each buffer is transferred to
 * the worker and handed back once hashed (the caller then writes it out and reuses it). Get one
 * with `acquire`; after `digest`, `release` returns its thread to a small pool (an idle thread
 * does not keep the process alive), `close` stops it.
 */
export class PassThroughHasher {
  private readonly worker = new Worker(PASS_WORKER_SOURCE, { eval: true });

  static acquire(): PassThroughHasher {
    let h = idle.pop();
    while (h && h.failure !== undefined) {
      h.close();
      h = idle.pop();
    }
    h ??= new PassThroughHasher();
    h.worker.ref();
    return h;
  }

  /** Back to the pool once its digest was read (anything else: closes it). */
  release(): void {
    if (this.failure !== undefined || this.waiting.length > 0 || idle.length >= MAX_IDLE || this.onDigest !== undefined) {
      this.close();
      return;
    }
    this.worker.unref();
    idle.push(this);
  }

  private readonly waiting: { resolve(b: ArrayBuffer): void; reject(e: unknown): void }[] = [];
  private onDigest: { resolve(hex: string): void; reject(e: unknown): void } | undefined;
  private failure: unknown;

  constructor() {
    this.worker.on('message', (m: { buf?: ArrayBuffer; digest?: string }) => {
      if (m.buf) this.waiting.shift()?.resolve(m.buf);
      else if (m.digest !== undefined) this.onDigest?.resolve(m.digest);
    });
    this.worker.on('error', (e) => {
      this.failure = e;
      for (const w of this.waiting.splice(0)) w.reject(e);
      this.onDigest?.reject(e);
    });
  }

  /** Transfers `buf` (detached until the promise resolves with it) to be hashed after the previous ones. */
  submit(buf: ArrayBuffer, len: number): Promise<ArrayBuffer> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.waiting.push({ resolve, reject });
      this.worker.postMessage({ buf, len }, [buf]);
    });
  }

  digest(): Promise<string> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise<string>((resolve, reject) => {
      this.onDigest = { resolve, reject };
      this.worker.postMessage('digest');
    }).finally(() => (this.onDigest = undefined));
  }

  close(): void {
    void this.worker.terminate();
  }
}
