/**
 * The launch VM's memory image during synthesis, without copying the base: the chunks the overlay
 * writes go to a sparse patch file at their own offsets (a bitmap says which), every other chunk
 * reads from the base's memory image (zero past its end). Writing costs what the overlay changes;
 * reading is what joinSnapshot does once to build the save file. Created `growing`, reads wait
 * until the writer has declared the chunks they cover final (`advance`, `complete`), so the save
 * file can be built while later segments are still being decompressed.
 */
import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { CloudletError } from '../errors';
import type { MemoryImageSource } from '../snapshot/image-source';
import { CHUNK } from './format';
import { preadFully } from './create';

export class PatchedMemoryImage implements MemoryImageSource {
  readonly name: string;
  private readonly changed: Uint8Array;
  private readonly patchFd: number;
  /** Chunks [0, final) will not change any more. */
  private final: number;
  private failure: { error: unknown } | undefined;
  private waiters: Array<{ chunk: number; resolve(): void; reject(e: unknown): void }> = [];

  private constructor(
    private readonly basePath: string,
    private readonly baseFd: number,
    private readonly baseSize: number,
    private readonly patchPath: string,
    readonly size: number,
    growing: boolean,
  ) {
    this.final = growing ? 0 : Number.POSITIVE_INFINITY;
    this.name = `memory image rebuilt from ${basePath}`;
    this.changed = new Uint8Array(Math.ceil(Math.ceil(size / CHUNK) / 8));
    this.patchFd = openSync(patchPath, 'wx+');
    try {
      ftruncateSync(this.patchFd, size);
    } catch (e) {
      closeSync(this.patchFd);
      throw e;
    }
  }

  /**
   * Creates the patch file (which must not exist) for an image of `size` bytes over `basePath`.
   * `growing`: reads wait for `advance`/`complete` (chunks are written in increasing order).
   */
  static create(basePath: string, baseSize: number, patchPath: string, size: number, options: { growing?: boolean } = {}): PatchedMemoryImage {
    const baseFd = openSync(basePath, 'r');
    try {
      return new PatchedMemoryImage(basePath, baseFd, baseSize, patchPath, size, options.growing ?? false);
    } catch (e) {
      closeSync(baseFd);
      throw e;
    }
  }

  /** Chunks below `chunk` are final: reads of them may proceed. */
  advance(chunk: number): void {
    if (chunk <= this.final) return;
    this.final = chunk;
    const ready = this.waiters.filter((w) => w.chunk <= chunk);
    this.waiters = this.waiters.filter((w) => w.chunk > chunk);
    for (const w of ready) w.resolve();
  }

  /** Every chunk is final. */
  complete(): void {
    this.advance(Number.POSITIVE_INFINITY);
  }

  /** The writer gave up: pending and later reads fail with `error`. */
  fail(error: unknown): void {
    this.failure ??= { error };
    for (const w of this.waiters.splice(0)) w.reject(error);
  }

  private available(endChunk: number): Promise<void> | undefined {
    if (this.failure) return Promise.reject(this.failure.error);
    if (endChunk <= this.final) return undefined;
    return new Promise((resolve, reject) => this.waiters.push({ chunk: endChunk, resolve, reject }));
  }

  /**
   * Whether chunk `chunk` is the base's and will stay so (final and not written by the overlay).
   * False while it may still change.
   */
  isBaseChunk(chunk: number): boolean {
    return chunk < this.final && !this.isChanged(chunk);
  }

  isChanged(chunk: number): boolean {
    return (((this.changed[chunk >> 3] ?? 0) >> (chunk & 7)) & 1) === 1;
  }

  private mark(chunk: number, count: number): void {
    for (let c = chunk; c < chunk + count; c++) this.changed[c >> 3] = (this.changed[c >> 3] ?? 0) | (1 << (c & 7));
  }

  /** Chunks from `chunk` on become `data` (a whole number of chunks). */
  writeChunks(chunk: number, data: Buffer): void {
    let done = 0;
    while (done < data.length) done += writeSync(this.patchFd, data, done, data.length - done, chunk * CHUNK + done);
    this.mark(chunk, data.length / CHUNK);
  }

  /** `count` chunks from `chunk` on become zero; each chunk is written once, so the patch file still has a hole there. */
  zeroChunks(chunk: number, count: number): void {
    this.mark(chunk, count);
  }

  /** Synchronous read of whole chunks (for records that copy earlier chunks of this image). */
  readChunksSync(chunk: number, out: Buffer): void {
    this.readRange(out, out.length, chunk * CHUNK);
  }

  /**
   * Synchronous preads, run by run: the runs alternate between two hot files, often a few chunks
   * long; a thread-pool round trip per run would cost more than the copy.
   */
  private readRange(buf: Buffer, len: number, position: number): void {
    let done = 0;
    while (done < len) {
      const at = position + done;
      const chunk = Math.floor(at / CHUNK);
      const changed = this.isChanged(chunk);
      // Extend the run while the chunks stay on the same side.
      let end = Math.min(position + len, (chunk + 1) * CHUNK);
      while (end < position + len && this.isChanged(Math.floor(end / CHUNK)) === changed) end = Math.min(position + len, end + CHUNK);
      const n = end - at;
      if (changed) preadFully(this.patchFd, buf, done, n, at, this.name);
      else this.readBaseSync(buf, done, n, at);
      done += n;
    }
  }

  private readBaseSync(out: Buffer, offset: number, len: number, position: number): void {
    const have = Math.max(0, Math.min(len, this.baseSize - position));
    if (have > 0) preadFully(this.baseFd, out, offset, have, position, this.basePath);
    out.fill(0, offset + have, offset + len);
  }

  async read(buf: Buffer, len: number, position: number): Promise<void> {
    if (position + len > this.size) {
      throw new CloudletError('CORRUPT', `${this.name}: read of ${len} bytes at ${position} is past its end (${this.size} bytes)`, { fix: 'the skeleton does not belong to this memory image; fetch the overlay again' });
    }
    const wait = this.available(Math.ceil((position + len) / CHUNK));
    if (wait) await wait;
    this.readRange(buf, len, position);
  }

  private closed = false;

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    closeSync(this.baseFd);
    closeSync(this.patchFd);
  }
}
