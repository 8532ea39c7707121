/**
 * The chunk index: the sha256 of every 4 KiB chunk of a file (a raw disk or a memory image), so an
 * overlay can say "chunk i of the launch VM equals chunk j of the base" without shipping it.
 *
 * Building streams the file with large sequential reads and hashes the chunks on worker threads
 * (one-shot `crypto.hash` per chunk), so a 1 GiB file is indexed near SHA-256 speed. The on-disk
 * format is documented in docs/chunk-index.md.
 */
import { createHash, hash as oneShotHash } from 'node:crypto';
import { availableParallelism } from 'node:os';
import { open, readFile, rename, writeFile, unlink } from 'node:fs/promises';
import { Worker } from 'node:worker_threads';
import { CloudletError } from './errors';

export const CHUNK_SIZE = 4096;
export const DIGEST_SIZE = 32;

export interface ChunkIndex {
  readonly byteLength: number;
  readonly chunkCount: number;
  /** 32-byte sha256 of chunk i (the last partial chunk zero-padded to CHUNK_SIZE). */
  digestAt(i: number): Buffer;
  /** Lowest chunk number whose content has digest d, or undefined. */
  findByDigest(d: Buffer): number | undefined;
  equalAt(i: number, d: Buffer): boolean;
}

export interface BuildChunkIndexOptions {
  onProgress?(done: number, total: number): void;
  /** Hashing threads (default: min(2, available cores)); 0 hashes on the calling thread (as do files of one read or less). */
  threads?: number;
}

/** Bytes read per I/O (and hashed per worker task). */
const READ_SIZE = 8 * 1024 * 1024;

/** The ChunkIndex over a flat list of digests (32 bytes each, chunk order). */
export class DigestList implements ChunkIndex {
  readonly chunkCount: number;
  private table: Int32Array | undefined;

  constructor(
    readonly byteLength: number,
    /** chunkCount * 32 bytes. */
    readonly digests: Buffer,
  ) {
    this.chunkCount = chunkCountFor(byteLength);
    if (digests.length !== this.chunkCount * DIGEST_SIZE) {
      throw new CloudletError('BAD_INPUT', `chunk digest list holds ${digests.length} bytes, expected ${this.chunkCount * DIGEST_SIZE} for ${byteLength} bytes of data`);
    }
  }

  digestAt(i: number): Buffer {
    this.check(i);
    return this.digests.subarray(i * DIGEST_SIZE, (i + 1) * DIGEST_SIZE);
  }

  equalAt(i: number, d: Buffer): boolean {
    this.check(i);
    return d.length === DIGEST_SIZE && this.digests.compare(d, 0, DIGEST_SIZE, i * DIGEST_SIZE, (i + 1) * DIGEST_SIZE) === 0;
  }

  findByDigest(d: Buffer): number | undefined {
    if (d.length !== DIGEST_SIZE) return undefined;
    const table = (this.table ??= this.buildTable());
    const mask = table.length - 1;
    for (let slot = d.readUInt32LE(0) & mask; ; slot = (slot + 1) & mask) {
      const entry = table[slot] ?? 0;
      if (entry === 0) return undefined;
      const i = entry - 1;
      if (this.digests.compare(d, 0, DIGEST_SIZE, i * DIGEST_SIZE, (i + 1) * DIGEST_SIZE) === 0) return i;
    }
  }

  /** Open-addressing table (chunk number + 1, 0 = empty) keyed by the digest's first 4 bytes. */
  private buildTable(): Int32Array {
    let size = 16;
    while (size < this.chunkCount * 2) size *= 2;
    const table = new Int32Array(size);
    const mask = size - 1;
    const dg = this.digests;
    for (let i = 0; i < this.chunkCount; i++) {
      const at = i * DIGEST_SIZE;
      for (let slot = dg.readUInt32LE(at) & mask; ; slot = (slot + 1) & mask) {
        const entry = table[slot] ?? 0;
        if (entry === 0) {
          table[slot] = i + 1;
          break;
        }
        const j = entry - 1;
        if (dg.compare(dg, at, at + DIGEST_SIZE, j * DIGEST_SIZE, (j + 1) * DIGEST_SIZE) === 0) break; // keep the lowest
      }
    }
    return table;
  }

  private check(i: number): void {
    if (!Number.isInteger(i) || i < 0 || i >= this.chunkCount) {
      throw new CloudletError('BAD_INPUT', `chunk ${i} is outside the index (0..${this.chunkCount - 1})`);
    }
  }
}

export function chunkCountFor(byteLength: number): number {
  return Math.ceil(byteLength / CHUNK_SIZE);
}

/** sha256 of one chunk; a short chunk is hashed as if zero-padded to CHUNK_SIZE. */
export function chunkDigest(chunk: Buffer): Buffer {
  if (chunk.length === CHUNK_SIZE) return oneShotHash('sha256', chunk, 'buffer');
  if (chunk.length > CHUNK_SIZE) throw new CloudletError('BAD_INPUT', `a chunk is at most ${CHUNK_SIZE} bytes, got ${chunk.length}`);
  const padded = Buffer.alloc(CHUNK_SIZE);
  chunk.copy(padded);
  return oneShotHash('sha256', padded, 'buffer');
}

/** Digests of consecutive chunks of `data` (its last partial chunk zero-padded). */
export function hashChunks(data: Buffer): Buffer {
  const n = chunkCountFor(data.length);
  const out = Buffer.allocUnsafe(n * DIGEST_SIZE);
  for (let i = 0; i < n; i++) {
    chunkDigest(data.subarray(i * CHUNK_SIZE, Math.min(data.length, (i + 1) * CHUNK_SIZE))).copy(out, i * DIGEST_SIZE);
  }
  return out;
}

// Worker body (plain JS, evaluated, so it runs the same under ts-jest, tsx and compiled code).
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { hash } = require('node:crypto');
parentPort.on('message', ({ id, buf, len }) => {
  const data = Buffer.from(buf, 0, len);
  const n = Math.ceil(len / ${CHUNK_SIZE});
  const out = Buffer.allocUnsafe(n * 32);
  for (let i = 0; i < n; i++) {
    let c = data.subarray(i * ${CHUNK_SIZE}, Math.min(len, (i + 1) * ${CHUNK_SIZE}));
    if (c.length < ${CHUNK_SIZE}) { const p = Buffer.alloc(${CHUNK_SIZE}); c.copy(p); c = p; }
    hash('sha256', c, 'buffer').copy(out, i * 32);
  }
  parentPort.postMessage({ id, buf, out: out.buffer, outOffset: out.byteOffset, outLen: out.length }, [buf]);
});
`;

interface HashResult {
  buf: ArrayBuffer;
  digests: Buffer;
}

class HashPool {
  private readonly workers: Worker[];
  private readonly pending = new Map<number, { resolve(r: HashResult): void; reject(e: unknown): void }>();
  private nextId = 0;
  private failure: unknown;

  constructor(threads: number) {
    this.workers = Array.from({ length: threads }, () => {
      const w = new Worker(WORKER_SOURCE, { eval: true });
      w.on('message', (m: { id: number; buf: ArrayBuffer; out: ArrayBuffer; outOffset: number; outLen: number }) => {
        const p = this.pending.get(m.id);
        this.pending.delete(m.id);
        p?.resolve({ buf: m.buf, digests: Buffer.from(m.out, m.outOffset, m.outLen) });
      });
      w.on('error', (e) => this.fail(e));
      return w;
    });
  }

  hash(buf: ArrayBuffer, len: number): Promise<HashResult> {
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    const worker = this.workers[id % this.workers.length] as Worker;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      worker.postMessage({ id, buf, len }, [buf]);
    });
  }

  private fail(e: unknown): void {
    this.failure = e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}

/** Streams `path` and returns the sha256 of each 4 KiB chunk. */
export async function buildChunkIndex(path: string, opts: BuildChunkIndexOptions = {}): Promise<ChunkIndex> {
  const fh = await open(path, 'r').catch((e: unknown) => {
    throw new CloudletError('NOT_FOUND', `cannot open ${path} to index its chunks: ${(e as Error).message}`, { cause: e });
  });
  try {
    const byteLength = (await fh.stat()).size;
    const digests = Buffer.allocUnsafe(chunkCountFor(byteLength) * DIGEST_SIZE);
    const threads = opts.threads ?? Math.min(2, availableParallelism());
    const readAt = async (buf: ArrayBuffer, position: number): Promise<number> => {
      const want = Math.min(READ_SIZE, byteLength - position);
      let got = 0;
      while (got < want) {
        const { bytesRead } = await fh.read(new Uint8Array(buf), got, want - got, position + got);
        if (bytesRead === 0) throw new CloudletError('CORRUPT', `${path} shrank while it was being indexed (at byte ${position + got} of ${byteLength})`, { fix: 'do not modify a file while it is indexed' });
        got += bytesRead;
      }
      return got;
    };
    if (threads <= 0 || byteLength <= READ_SIZE) {
      const buf = new ArrayBuffer(READ_SIZE);
      for (let pos = 0; pos < byteLength; ) {
        const n = await readAt(buf, pos);
        hashChunks(Buffer.from(buf, 0, n)).copy(digests, (pos / CHUNK_SIZE) * DIGEST_SIZE);
        pos += n;
        opts.onProgress?.(pos, byteLength);
      }
    } else {
      // Pipeline: keep `threads + 1` buffers in flight (reading or hashing); results land by position.
      const pool = new HashPool(threads);
      try {
        const free: ArrayBuffer[] = Array.from({ length: threads + 1 }, () => new ArrayBuffer(READ_SIZE));
        const inFlight: Promise<void>[] = [];
        let done = 0;
        for (let pos = 0; pos < byteLength; pos += READ_SIZE) {
          while (free.length === 0) await Promise.race(inFlight);
          const buf = free.pop() as ArrayBuffer;
          const n = await readAt(buf, pos);
          const at = pos;
          const task = pool.hash(buf, n).then((r) => {
            r.digests.copy(digests, (at / CHUNK_SIZE) * DIGEST_SIZE);
            free.push(r.buf);
            done += n;
            opts.onProgress?.(done, byteLength);
          });
          const tracked: Promise<void> = task.finally(() => inFlight.splice(inFlight.indexOf(tracked), 1));
          inFlight.push(tracked);
        }
        await Promise.all(inFlight);
      } finally {
        await pool.close();
      }
    }
    return new DigestList(byteLength, digests);
  } finally {
    await fh.close();
  }
}

// ---- on-disk format (docs/chunk-index.md) ----

const INDEX_MAGIC = Buffer.from('CLDCHIDX', 'ascii');
const INDEX_VERSION = 1;
const INDEX_HEADER_SIZE = 64;

function encodeIndex(ix: ChunkIndex): Buffer {
  const digests = ix instanceof DigestList ? ix.digests : Buffer.concat(Array.from({ length: ix.chunkCount }, (_, i) => ix.digestAt(i)));
  const header = Buffer.alloc(INDEX_HEADER_SIZE);
  INDEX_MAGIC.copy(header, 0);
  header.writeUInt32LE(INDEX_VERSION, 8);
  header.writeUInt32LE(CHUNK_SIZE, 12);
  header.writeBigUInt64LE(BigInt(ix.byteLength), 16);
  header.writeBigUInt64LE(BigInt(ix.chunkCount), 24);
  createHash('sha256').update(digests).digest().copy(header, 32);
  return Buffer.concat([header, digests]);
}

/** Writes the index to `path` atomically (temp name, then rename). */
export async function writeChunkIndex(ix: ChunkIndex, path: string): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}`;
  try {
    await writeFile(tmp, encodeIndex(ix));
    await rename(tmp, path);
  } catch (e) {
    await unlink(tmp).catch(() => undefined);
    throw e;
  }
}

export function decodeChunkIndex(data: Buffer, what = 'chunk index'): ChunkIndex {
  const corrupt = (why: string): CloudletError =>
    new CloudletError('CORRUPT', `${what} is not a valid chunk index: ${why}`, { fix: 'rebuild it from its file with buildChunkIndex' });
  if (data.length < INDEX_HEADER_SIZE) throw corrupt(`${data.length} bytes is shorter than the ${INDEX_HEADER_SIZE}-byte header (truncated)`);
  if (!data.subarray(0, 8).equals(INDEX_MAGIC)) throw corrupt('bad magic (expected CLDCHIDX at offset 0)');
  const version = data.readUInt32LE(8);
  if (version !== INDEX_VERSION) {
    throw new CloudletError('UNSUPPORTED_VERSION', `${what} has format version ${version}; this build reads version ${INDEX_VERSION}`, { fix: 'rebuild the index with this version of cloudlet' });
  }
  const chunkSize = data.readUInt32LE(12);
  if (chunkSize !== CHUNK_SIZE) throw new CloudletError('UNSUPPORTED_VERSION', `${what} uses ${chunkSize}-byte chunks; this build uses ${CHUNK_SIZE}`, { fix: 'rebuild the index' });
  const byteLength = Number(data.readBigUInt64LE(16));
  const chunkCount = Number(data.readBigUInt64LE(24));
  if (chunkCount !== chunkCountFor(byteLength)) throw corrupt(`header says ${chunkCount} chunks for ${byteLength} bytes (offset 24)`);
  const expected = INDEX_HEADER_SIZE + chunkCount * DIGEST_SIZE;
  if (data.length !== expected) throw corrupt(`${data.length} bytes, expected ${expected} (${data.length < expected ? 'truncated' : 'trailing bytes'})`);
  const digests = data.subarray(INDEX_HEADER_SIZE);
  if (!createHash('sha256').update(digests).digest().equals(data.subarray(32, 64))) throw corrupt('the digest list does not match its checksum (offset 32)');
  return new DigestList(byteLength, digests);
}

export async function readChunkIndex(path: string): Promise<ChunkIndex> {
  const data = await readFile(path).catch((e: unknown) => {
    throw new CloudletError('NOT_FOUND', `cannot read chunk index ${path}: ${(e as Error).message}`, { cause: e });
  });
  return decodeChunkIndex(data, `chunk index ${path}`);
}
