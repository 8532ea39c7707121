/**
 * Whole-file work on sparse files (a base VM's raw disk is mostly holes): a sha256 that does not
 * read the holes, a copy that keeps them, and a writer that leaves runs of zero chunks as holes.
 *
 * A sha256 of the whole file (what a base id is made of) must still process every byte: SHA-256
 * has no shortcut over runs of zeros, so the holes are fed to the hash from a buffer of zeros. That
 * saves reading them (the kernel fills page-cache pages with zeros for every hole that is read:
 * 0.3-0.8 s of CPU and 1 GiB of page cache per GiB of hole here), not hashing them (~0.85 s of
 * CPU per GiB, on one core). docs/base-package.md has the figures.
 */
import { createHash } from 'node:crypto';
import type { Hash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { CloudletError } from './errors';
import { dataExtentsOrWhole } from './extents';
import { openOrThrow } from './store/files';

const C = 4096;
/** Bytes per read and per hash update. */
const BLOCK = 8 * 1024 * 1024;
const ZERO_CHUNK = Buffer.alloc(C);
let zeroBlock: Buffer | undefined;

/**
 * Walks the open file in order: `onData` for each read of data (the buffer is reused, consume it
 * before returning) and `onZeros` for each run of bytes that reads as zeros (a hole), without
 * reading those.
 */
async function walk(fh: fsp.FileHandle, size: number, file: string, onData: (data: Buffer, position: number) => Promise<void> | void, onZeros: (length: number, position: number) => void): Promise<void> {
  const extents = await dataExtentsOrWhole(fh.fd, size, file);
  const buf = Buffer.allocUnsafe(BLOCK);
  let at = 0;
  for (const e of [...extents, { start: size, end: size }]) {
    if (e.start > at) onZeros(e.start - at, at);
    for (let pos = e.start; pos < e.end; ) {
      const { bytesRead } = await fh.read(buf, 0, Math.min(BLOCK, e.end - pos), pos);
      if (bytesRead === 0) throw new CloudletError('CORRUPT', `${file} shrank while it was read (at byte ${pos} of ${size})`, { fix: 'do not modify a file while it is read' });
      await onData(buf.subarray(0, bytesRead), pos);
      pos += bytesRead;
    }
    at = e.end;
  }
}

/** sha256 (hex) and size of a whole file, like `sha256File`, without reading its holes. */
export async function sha256Sparse(file: string, onProgress?: (done: number, total: number) => void): Promise<{ sha256: string; size: number }> {
  const fh = await openOrThrow(file, 'r');
  try {
    const size = (await fh.stat()).size;
    const hash = createHash('sha256');
    let done = 0;
    await walk(
      fh,
      size,
      file,
      (data) => {
        hash.update(data);
        done += data.length;
        onProgress?.(done, size);
      },
      (length) => {
        done = hashHole(hash, length, done, size, onProgress);
      },
    );
    return { sha256: hash.digest('hex'), size };
  } finally {
    await fh.close();
  }
}

/**
 * The parts of `data` (which sits at byte `position` of a file) that are not whole all-zero 4 KiB
 * chunks (aligned in the file), as [from, to) offsets into `data`, in order, merged. A zero chunk
 * costs one memcmp (~12 GB/s), not a hash.
 */
export function nonZeroRuns(data: Buffer, position: number): Array<[number, number]> {
  const runs: Array<[number, number]> = [];
  let from = -1;
  for (let off = 0; off < data.length; ) {
    const next = Math.min(data.length, (Math.floor((position + off) / C) + 1) * C - position);
    const zero = next - off === C && data.compare(ZERO_CHUNK, 0, C, off, next) === 0;
    if (zero && from >= 0) {
      runs.push([from, off]);
      from = -1;
    } else if (!zero && from < 0) {
      from = off;
    }
    off = next;
  }
  if (from >= 0) runs.push([from, data.length]);
  return runs;
}

/**
 * Writes a new, empty file at given positions, leaving every whole 4 KiB chunk (aligned in the
 * file) that is all zeros as a hole; `finish(size)` sets the file's length (a trailing hole).
 */
export class SparseWriter {
  constructor(private readonly fh: fsp.FileHandle) {}

  /** Returns the parts of `data` it wrote ([from, to) offsets into `data`); the rest are holes. */
  async write(data: Buffer, position: number): Promise<Array<[number, number]>> {
    const runs = nonZeroRuns(data, position);
    for (const [from, to] of runs) await this.writeAt(data.subarray(from, to), position + from);
    return runs;
  }

  async finish(size: number): Promise<void> {
    await this.fh.truncate(size);
  }

  private async writeAt(data: Buffer, position: number): Promise<void> {
    for (let off = 0; off < data.length; ) {
      const { bytesWritten } = await this.fh.write(data, off, data.length - off, position + off);
      off += bytesWritten;
    }
  }
}

/**
 * Copies `source` to the new file `target` (created, never overwritten) keeping it sparse: holes of
 * the source are not read, and they and every other all-zero 4 KiB chunk stay holes in the copy.
 * Returns the sha256 and size of what was written (every byte, holes as zeros); the target is
 * fsynced.
 */
export async function copySparse(source: string, target: string, onProgress?: (done: number, total: number) => void): Promise<{ sha256: string; size: number }> {
  const src = await openOrThrow(source, 'r');
  try {
    const size = (await src.stat()).size;
    const out = await fsp.open(target, 'wx');
    try {
      const writer = new SparseWriter(out);
      const hash = createHash('sha256');
      let done = 0;
      await walk(
        src,
        size,
        source,
        async (data, position) => {
          hash.update(data);
          await writer.write(data, position);
          done += data.length;
          onProgress?.(done, size);
        },
        (length) => {
          done = hashHole(hash, length, done, size, onProgress);
        },
      );
      await writer.finish(size);
      await out.sync();
      return { sha256: hash.digest('hex'), size };
    } finally {
      await out.close();
    }
  } finally {
    await src.close();
  }
}

/**
 * A sha256 fed in order with data and with runs of zeros (the holes of a sparse member), for
 * `update`/`zeros` callers that do not need the digest at once. `inThreadSha256` hashes on the
 * calling thread. `workerSha256` hashes on a worker thread: for a mostly-hole disk most of the
 * work is hashing zeros (~0.85 s of CPU per GiB, one core, no shortcut), and the caller can
 * meanwhile do something else on the other core (a base import splits the memory and rebuilds the
 * indexes).
 */
export interface Sha256Sink {
  /**
   * Hash `data`, the bytes at `position` of the member. The caller may reuse `data` once the
   * promise resolves. A sink that reads back a file (`workerSha256(file)`) reads them there
   * instead: they must be written to it first.
   */
  update(data: Buffer, position: number): Promise<void> | void;
  /** Hash `length` zero bytes. */
  zeros(length: number): void;
  /** The hex digest of everything fed; the sink is finished. */
  digest(): Promise<string>;
  /** Stop without a digest (after a failure); safe to call after `digest`. */
  abort(): Promise<void>;
}

/** Hashes a hole of `length` zeros in steps, so progress moves during a long hole; the new count done. */
function hashHole(hash: Hash, length: number, done: number, size: number, onProgress?: (done: number, total: number) => void): number {
  for (let left = length; left > 0; left -= BLOCK) {
    const step = Math.min(left, BLOCK);
    updateZeros(hash, step);
    done += step;
    onProgress?.(done, size);
  }
  return done;
}

export function updateZeros(hash: Hash, length: number): void {
  const zeros = (zeroBlock ??= Buffer.alloc(BLOCK));
  for (let left = length; left > 0; left -= BLOCK) hash.update(left >= BLOCK ? zeros : zeros.subarray(0, left));
}

export function inThreadSha256(): Sha256Sink {
  const hash = createHash('sha256');
  return {
    update: (data) => {
      hash.update(data);
    },
    zeros: (length) => updateZeros(hash, length),
    digest: () => Promise.resolve(hash.digest('hex')),
    abort: () => Promise.resolve(),
  };
}

// Worker body (plain JS, evaluated, so it runs the same under ts-jest, tsx and compiled code).
// Messages, in order: {data} (an ArrayBuffer to hash, acknowledged), {zeros}, {read: [position,
// length]} (hash those bytes of workerData.file), {digest}. The first failure is reported once and
// everything after it is ignored.
const HASH_WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const { openSync, readSync } = require('node:fs');
const { createHash } = require('node:crypto');
const hash = createHash('sha256');
const zeros = Buffer.alloc(${BLOCK});
let buf;
let fd;
let failed = false;
parentPort.on('message', (m) => {
  if (failed) return;
  try {
    if (m.data) {
      hash.update(Buffer.from(m.data));
      parentPort.postMessage({ done: m.data.byteLength });
    } else if (m.zeros !== undefined) {
      for (let left = m.zeros; left > 0; left -= zeros.length) hash.update(left >= zeros.length ? zeros : zeros.subarray(0, left));
    } else if (m.read) {
      if (fd === undefined) fd = openSync(workerData.file, 'r');
      buf ??= Buffer.allocUnsafe(${BLOCK});
      const [position, length] = m.read;
      for (let at = 0; at < length; ) {
        const n = readSync(fd, buf, 0, Math.min(buf.length, length - at), position + at);
        if (n === 0) throw new Error(workerData.file + ' ends at byte ' + (position + at) + ' while it was hashed');
        hash.update(buf.subarray(0, n));
        at += n;
      }
    } else if (m.digest) {
      parentPort.postMessage({ digest: hash.digest('hex') });
    }
  } catch (e) {
    failed = true;
    parentPort.postMessage({ error: String((e && e.message) || e) });
  }
});
`;

/** Data handed to the hashing thread and not yet hashed, at most (the caller waits beyond it). */
const WORKER_BACKLOG = 64 * 1024 * 1024;

/**
 * A sha256 on a worker thread. Without `file`, `update` hands the thread a copy of the data, and
 * waits while more than 64 MiB of it is not hashed yet. With `file`, `update` only tells the
 * thread which bytes of `file` to read and hash (the caller has just written them there, so they
 * come from the page cache): the caller never waits, however far behind the hashing of the zeros
 * is, and the digest covers what is in the file.
 */
export function workerSha256(file?: string): Sha256Sink {
  const worker = new Worker(HASH_WORKER_SOURCE, { eval: true, workerData: { file } });
  let backlog = 0;
  let failure: Error | undefined;
  let waiting: (() => void) | undefined;
  let onDigest: ((d: string) => void) | undefined;
  let onFail: ((e: Error) => void) | undefined;
  const fail = (e: Error): void => {
    failure ??= e;
    waiting?.();
    onFail?.(failure);
  };
  worker.on('message', (m: { done?: number; digest?: string; error?: string }) => {
    if (m.done !== undefined) {
      backlog -= m.done;
      if (backlog <= WORKER_BACKLOG) waiting?.();
    } else if (m.digest !== undefined) onDigest?.(m.digest);
    else if (m.error !== undefined) fail(new Error(`the sha256 thread failed: ${m.error}`));
  });
  worker.on('error', fail);
  worker.on('exit', () => fail(new Error('the sha256 thread stopped')));
  return {
    async update(data, position) {
      if (failure) throw failure;
      if (file !== undefined) {
        if (data.length > 0) worker.postMessage({ read: [position, data.length] });
        return;
      }
      const copy = new ArrayBuffer(data.length);
      data.copy(Buffer.from(copy));
      backlog += data.length;
      worker.postMessage({ data: copy }, [copy]);
      while (backlog > WORKER_BACKLOG && !failure) await new Promise<void>((r) => (waiting = r));
      waiting = undefined;
      if (failure) throw failure;
    },
    zeros(length) {
      if (length > 0 && !failure) worker.postMessage({ zeros: length });
    },
    async digest() {
      if (failure) throw failure;
      try {
        return await new Promise<string>((resolve, reject) => {
          onDigest = resolve;
          onFail = reject;
          worker.postMessage({ digest: true });
        });
      } finally {
        await worker.terminate();
      }
    },
    async abort() {
      failure ??= new Error('aborted');
      await worker.terminate();
    },
  };
}
