/**
 * The chunk index: the sha256 of every 4 KiB chunk of a file (a raw disk or a memory image), so an
 * overlay can say "chunk i of the launch VM equals chunk j of the base" without shipping it.
 *
 * Building asks the file system where the file's data is (extents.ts) and gives chunks inside holes
 * the digest of a zero chunk without reading them; the data is read in 8 MiB positional reads by
 * worker threads (one per core), which hash each chunk (one-shot `crypto.hash`; chunks of zeros are
 * recognized, not hashed). A sparse 16 GiB disk with 1 GiB of data is indexed like a 1 GiB file.
 * The on-disk format and the measurements are in docs/chunk-index.md.
 */
import { createHash, hash as oneShotHash } from 'node:crypto';
import { availableParallelism } from 'node:os';
import { open, readFile, rename, writeFile, unlink } from 'node:fs/promises';
import { Worker } from 'node:worker_threads';
import { CloudletError } from './errors';
import { dataExtentsOrWhole } from './extents';
import type { Extent } from './extents';

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
  /**
   * Reading and hashing threads (default: the available cores, at most 8); 0 works on the calling
   * thread, as do files with at most one read (8 MiB) of data.
   */
  threads?: number;
  /**
   * 'skip' (the default for files larger than 8 MiB): ask the file system where the data is
   * (`qemu-img map`, i.e. SEEK_DATA/SEEK_HOLE) and give each chunk inside a hole the zero digest
   * without reading it; if qemu-img is missing or fails, the whole file is read (same digests,
   * slower) and a warning is logged. 'read': read every byte (the default for smaller files).
   */
  holes?: 'skip' | 'read';
}

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

/** Bytes read per I/O, and the most data one worker task reads and hashes. */
const READ_SIZE = 8 * 1024 * 1024;
const TASK_CHUNKS = READ_SIZE / CHUNK_SIZE;
/** Worker threads at most, whatever the core count (each holds a READ_SIZE buffer). */
const MAX_THREADS = 8;

const ZERO_CHUNK = Buffer.alloc(CHUNK_SIZE);
/** sha256 of a chunk of zeros: the digest of every chunk inside a hole. */
export const ZERO_CHUNK_DIGEST: Buffer = oneShotHash('sha256', ZERO_CHUNK, 'buffer');

/** Chunks [first, first + count) of a file. */
export interface ChunkRun {
  first: number;
  count: number;
}

/**
 * The chunk runs that must be read to index a file whose non-zero bytes all lie in `extents`
 * (sorted): every chunk touching an extent, even partly, is read whole; every other chunk is
 * all zeros.
 */
export function chunkRunsOf(extents: readonly Extent[]): ChunkRun[] {
  const runs: ChunkRun[] = [];
  for (const e of extents) {
    if (e.end <= e.start) continue;
    const first = Math.floor(e.start / CHUNK_SIZE);
    const end = Math.ceil(e.end / CHUNK_SIZE);
    const last = runs[runs.length - 1];
    if (last && first <= last.first + last.count) last.count = Math.max(last.count, end - last.first);
    else runs.push({ first, count: end - first });
  }
  return runs;
}

/** Groups runs into tasks of at most TASK_CHUNKS chunks (long runs are split, short ones packed). */
function packTasks(runs: readonly ChunkRun[]): ChunkRun[][] {
  const tasks: ChunkRun[][] = [];
  let task: ChunkRun[] = [];
  let size = 0;
  for (const r of runs) {
    for (let first = r.first, left = r.count; left > 0; ) {
      if (size === TASK_CHUNKS) {
        tasks.push(task);
        task = [];
        size = 0;
      }
      const count = Math.min(left, TASK_CHUNKS - size);
      task.push({ first, count });
      size += count;
      first += count;
      left -= count;
    }
  }
  if (task.length > 0) tasks.push(task);
  return tasks;
}

/** Digests of the `chunks` whole chunks at the start of `buf` into `out` at `outAt`; zero chunks are recognized, not hashed. */
function hashInto(buf: Buffer, chunks: number, out: Buffer, outAt: number): void {
  for (let i = 0; i < chunks; i++) {
    const off = i * CHUNK_SIZE;
    const d = buf.compare(ZERO_CHUNK, 0, CHUNK_SIZE, off, off + CHUNK_SIZE) === 0 ? ZERO_CHUNK_DIGEST : oneShotHash('sha256', buf.subarray(off, off + CHUNK_SIZE), 'buffer');
    d.copy(out, outAt + i * DIGEST_SIZE);
  }
}

function shrank(path: string, at: number, byteLength: number): CloudletError {
  return new CloudletError('CORRUPT', `${path} shrank while it was being indexed (at byte ${at} of ${byteLength})`, { fix: 'do not modify a file while it is indexed' });
}

// Worker body (plain JS, evaluated, so it runs the same under ts-jest, tsx and compiled code). It
// reads its own runs from the file descriptor it was given (positional reads, no copy through the
// main thread), pads the file's short last chunk with zeros, and does what hashInto does.
const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const { readSync } = require('node:fs');
const { hash } = require('node:crypto');
const { fd, byteLength } = workerData;
const C = ${CHUNK_SIZE};
const buf = Buffer.allocUnsafe(${READ_SIZE});
const zero = Buffer.alloc(C);
const zeroDigest = hash('sha256', zero, 'buffer');
parentPort.on('message', ({ id, runs }) => {
  try {
    let at = 0;
    for (let k = 0; k < runs.length; k += 2) {
      const start = runs[k] * C;
      const want = Math.min(byteLength, (runs[k] + runs[k + 1]) * C) - start;
      for (let got = 0; got < want; ) {
        const n = readSync(fd, buf, at + got, want - got, start + got);
        if (n === 0) { parentPort.postMessage({ id, shrankAt: start + got }); return; }
        got += n;
      }
      const padded = runs[k + 1] * C;
      if (want < padded) buf.fill(0, at + want, at + padded);
      at += padded;
    }
    const chunks = at / C;
    const out = Buffer.from(new ArrayBuffer(chunks * 32));
    for (let i = 0; i < chunks; i++) {
      const off = i * C;
      (buf.compare(zero, 0, C, off, off + C) === 0 ? zeroDigest : hash('sha256', buf.subarray(off, off + C), 'buffer')).copy(out, i * 32);
    }
    parentPort.postMessage({ id, out: out.buffer }, [out.buffer]);
  } catch (e) {
    parentPort.postMessage({ id, error: String((e && e.message) || e) });
  }
});
`;

interface WorkerReply {
  id: number;
  out?: ArrayBuffer;
  shrankAt?: number;
  error?: string;
}

/**
 * Reads and hashes `tasks` on `threads` workers that read the file `fd` themselves; each finished
 * task's digests (32 bytes per chunk, in run order) go to `onTask`. Each worker has two tasks in
 * hand, so it never waits for the main thread.
 */
async function hashOnWorkers(fd: number, path: string, byteLength: number, tasks: readonly ChunkRun[][], threads: number, onTask: (task: readonly ChunkRun[], digests: Buffer) => void): Promise<void> {
  const workers = Array.from({ length: Math.min(threads, tasks.length) }, () => new Worker(WORKER_SOURCE, { eval: true, workerData: { fd, byteLength } }));
  try {
    await new Promise<void>((resolve, reject) => {
      let next = 0;
      let finished = 0;
      let failed = false;
      const fail = (e: unknown): void => {
        if (!failed) reject(e);
        failed = true;
      };
      const send = (w: Worker): void => {
        if (next >= tasks.length) return;
        const id = next++;
        w.postMessage({ id, runs: (tasks[id] as ChunkRun[]).flatMap((r) => [r.first, r.count]) });
      };
      for (const w of workers) {
        w.on('message', (m: WorkerReply) => {
          if (failed) return;
          try {
            if (m.shrankAt !== undefined) throw shrank(path, m.shrankAt, byteLength);
            if (m.out === undefined) throw new Error(`cannot read ${path} to index its chunks: ${m.error ?? 'no reply'}`);
            onTask(tasks[m.id] as ChunkRun[], Buffer.from(m.out));
          } catch (e) {
            fail(e);
            return;
          }
          if (++finished === tasks.length) resolve();
          else send(w);
        });
        w.on('error', fail);
        w.on('exit', () => {
          if (finished < tasks.length) fail(new Error(`a chunk hashing thread stopped while indexing ${path}`));
        });
        send(w);
        send(w);
      }
    });
  } finally {
    await Promise.all(workers.map((w) => w.terminate()));
  }
}

/**
 * Reads `path` and returns the sha256 of each 4 KiB chunk. Holes are not read (see `holes`), nor
 * are chunks of zeros hashed; the data is read and hashed by worker threads, each reading its own
 * ranges of the file.
 */
export async function buildChunkIndex(path: string, opts: BuildChunkIndexOptions = {}): Promise<ChunkIndex> {
  const fh = await open(path, 'r').catch((e: unknown) => {
    throw new CloudletError('NOT_FOUND', `cannot open ${path} to index its chunks: ${(e as Error).message}`, { cause: e });
  });
  try {
    const byteLength = (await fh.stat()).size;
    const holes = opts.holes ?? (byteLength > READ_SIZE ? 'skip' : 'read');
    const found = holes === 'skip' ? dataExtentsOrWhole(fh.fd, byteLength, path) : Promise.resolve([{ start: 0, end: byteLength }]);
    // While qemu-img looks for the holes: every chunk gets the zero digest; read chunks overwrite theirs.
    const digests = Buffer.allocUnsafe(chunkCountFor(byteLength) * DIGEST_SIZE);
    if (holes === 'skip') digests.fill(ZERO_CHUNK_DIGEST);
    const runs = chunkRunsOf(await found);
    const dataChunks = runs.reduce((s, r) => s + r.count, 0);
    const runBytes = (r: ChunkRun): number => Math.min(byteLength, (r.first + r.count) * CHUNK_SIZE) - r.first * CHUNK_SIZE;
    let done = byteLength - runs.reduce((s, r) => s + runBytes(r), 0);
    if (done > 0) opts.onProgress?.(done, byteLength);

    const tasks = packTasks(runs);
    const threads = opts.threads ?? Math.min(MAX_THREADS, availableParallelism());
    if (threads <= 0 || dataChunks <= TASK_CHUNKS) {
      const buf = Buffer.allocUnsafe(READ_SIZE);
      for (const task of tasks) {
        for (const r of task) {
          const start = r.first * CHUNK_SIZE;
          const want = runBytes(r);
          for (let got = 0; got < want; ) {
            const { bytesRead } = await fh.read(buf, got, want - got, start + got);
            if (bytesRead === 0) throw shrank(path, start + got, byteLength);
            got += bytesRead;
          }
          buf.fill(0, want, r.count * CHUNK_SIZE);
          hashInto(buf, r.count, digests, r.first * DIGEST_SIZE);
          done += want;
          opts.onProgress?.(done, byteLength);
        }
      }
    } else {
      await hashOnWorkers(fh.fd, path, byteLength, tasks, threads, (task, out) => {
        let at = 0;
        for (const r of task) {
          out.copy(digests, r.first * DIGEST_SIZE, at, at + r.count * DIGEST_SIZE);
          at += r.count * DIGEST_SIZE;
          done += runBytes(r);
        }
        opts.onProgress?.(done, byteLength);
      });
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
