/**
 * joinSnapshot: rebuilds a save file byte for byte from its skeleton and memory image, streaming
 * (large reads of the image, large writes of the output), and checks the result's sha256 against
 * the one recorded in the skeleton. Writes to a temp name and renames at the end.
 */
import { createHash, type Hash } from 'node:crypto';
import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
import { CloudletError } from '../errors';
import * as F from './format';
import { PassThroughHasher } from './hasher';
import { openImageFile, type MemoryImageSource } from './image-source';
import { decodeSkeleton } from './skeleton';
import { TeeOut, type SaveTee, type TeeOptions } from './tee';

export type { SaveTee, TeeOptions };

const IO_SIZE = 8 * 1024 * 1024;
/** Zero-record gaps up to this many pages are read through rather than split into two reads. */
const MAX_ZERO_READ = 64;

/** Outputs shorter than this are hashed inline (a worker costs ~30 ms to start). */
const HASH_IN_WORKER_FROM = 32 * 1024 * 1024;
/** Output buffers in rotation (filling, hashing, writing). */
const POOL = 4;
/**
 * I/O buffers kept between joins: fresh memory costs a page fault per 4 KiB on first touch, which
 * on a small VM is as slow as the copy itself. At most POOL + 1 buffers (40 MiB) stay allocated.
 */
const spare: ArrayBuffer[] = [];
function takeBuffer(): ArrayBuffer {
  return spare.pop() ?? new ArrayBuffer(IO_SIZE);
}
/** A buffer transferred away (detached) has byteLength 0 and is not kept. */
function giveBack(b: ArrayBuffer): void {
  if (b.byteLength === IO_SIZE && spare.length <= POOL) spare.push(b);
}
// Locals, not module property reads, in the per-page loop.
const PAGE_SIZE = F.PAGE_SIZE;
const RAM_FLAG_ZERO = F.RAM_FLAG_ZERO;
const RAM_FLAG_PAGE = F.RAM_FLAG_PAGE;
const RAM_FLAG_CONTINUE = F.RAM_FLAG_CONTINUE;

/**
 * Buffered, hashing output. Large outputs: a full buffer is transferred to a hashing thread, then
 * written, then reused; up to POOL buffers are in flight, so building, hashing and writing overlap
 * and no byte is copied for hashing.
 */
class OutWriter {
  private buf: Buffer;
  private readonly free: Buffer[] = [];
  private freeWaiter: (() => void) | undefined;
  private allocated = 1;
  private len = 0;
  private pos = 0;
  private readonly pending = new Set<Promise<void>>();
  private failure: unknown;
  private readonly inline: Hash | undefined;
  private readonly worker: PassThroughHasher | undefined;

  constructor(
    /** undefined: hash only (verification), write nothing. */
    private readonly fh: FileHandle | undefined,
    expectedSize: number,
  ) {
    this.buf = Buffer.from(takeBuffer());
    if (expectedSize >= HASH_IN_WORKER_FROM) this.worker = PassThroughHasher.acquire();
    else this.inline = createHash('sha256');
  }

  get size(): number {
    return this.pos + this.len;
  }

  /** True when n more bytes fit in the buffer without a flush. */
  fits(n: number): boolean {
    return this.len + n <= this.buf.length;
  }

  /** Reserves n bytes (call fits/flush first); returns the offset in `buffer` to write them at. */
  reserve(n: number): number {
    const at = this.len;
    this.len += n;
    return at;
  }

  /** Bytes left in the buffer. */
  get room(): number {
    return this.buf.length - this.len;
  }

  get buffer(): Buffer {
    return this.buf;
  }

  async write(data: Buffer): Promise<void> {
    for (let off = 0; off < data.length; ) {
      if (!this.fits(1)) await this.flush();
      const n = Math.min(data.length - off, this.buf.length - this.len);
      data.copy(this.buf, this.reserve(n), off, off + n);
      off += n;
    }
  }

  private async nextBuffer(): Promise<Buffer> {
    for (;;) {
      if (this.failure) throw this.failure;
      const b = this.free.pop();
      if (b) return b;
      if (this.allocated < POOL) {
        this.allocated++;
        return Buffer.from(takeBuffer());
      }
      await new Promise<void>((resolve) => (this.freeWaiter = resolve));
    }
  }

  private release(b: Buffer): void {
    this.free.push(b);
    const w = this.freeWaiter;
    this.freeWaiter = undefined;
    w?.();
  }

  async flush(): Promise<void> {
    if (this.failure) throw this.failure;
    if (this.len === 0) return;
    const full = this.buf;
    const len = this.len;
    const at = this.pos;
    this.pos += len;
    this.len = 0;
    if (this.inline) {
      this.inline.update(full.subarray(0, len));
      if (this.fh) await this.fh.write(full, 0, len, at);
      return;
    }
    const worker = this.worker as PassThroughHasher;
    const job = worker
      .submit(full.buffer as ArrayBuffer, len)
      .then(async (ab) => {
        const b = Buffer.from(ab);
        if (this.fh) await this.fh.write(b, 0, len, at);
        this.release(b);
      })
      .catch((e: unknown) => {
        this.failure ??= e;
        this.freeWaiter?.();
      });
    this.pending.add(job);
    void job.finally(() => this.pending.delete(job));
    this.buf = await this.nextBuffer();
  }

  /** Flushes, waits for every write, returns the sha256 (hex) of everything written. */
  async finish(): Promise<string> {
    await this.flush();
    await Promise.all([...this.pending]);
    if (this.failure) throw this.failure;
    if (this.inline) return this.inline.digest('hex');
    const hex = await (this.worker as PassThroughHasher).digest();
    this.digested = true;
    return hex;
  }

  private digested = false;

  /** Returns the hashing thread and the buffers to their pools when all went well; stops the thread otherwise. */
  close(): void {
    if (this.digested) this.worker?.release();
    else this.worker?.close();
    if (this.pending.size === 0) {
      giveBack(this.buf.buffer as ArrayBuffer);
      for (const b of this.free.splice(0)) giveBack(b.buffer as ArrayBuffer);
    }
  }
}

/**
 * Readies what every join of a large save file uses (the hashing thread and the I/O buffers, their
 * pages touched), so the first synthesis of a long-running host process does not pay for it.
 */
export async function prewarmJoin(): Promise<void> {
  const hasher = PassThroughHasher.acquire();
  const taken = Array.from({ length: POOL + 1 }, () => takeBuffer());
  for (const b of taken) new Uint8Array(b).fill(0);
  const back = await hasher.submit(taken.pop() as ArrayBuffer, 0);
  await hasher.digest();
  hasher.release();
  for (const b of [...taken, back]) giveBack(b);
}

/** A memory image path or a source; path-opened files are closed by `withImage`. */
export type MemoryImageInput = string | MemoryImageSource;

async function withImage<T>(image: MemoryImageInput, f: (src: MemoryImageSource) => Promise<T>): Promise<T> {
  if (typeof image !== 'string') return f(image);
  const src = await openImageFile(image);
  try {
    return await f(src);
  } finally {
    await src.close();
  }
}

/** Streams the save file that `skeleton` + memory image describe into `w`. */
async function rebuild(skeleton: Buffer, img: MemoryImageSource, outFh: FileHandle | undefined, teeOpts?: TeeOptions): Promise<{ size: number; sha256: string; teeDropped: number }> {
  const { header, ops } = decodeSkeleton(skeleton);
  const what = img.name;
  const w = new OutWriter(outFh, header.saveFileSize);
  const t = teeOpts ? new TeeOut(teeOpts.tee) : undefined;
  // The prefilled block, when the image lays it out where the receiver's copy came from.
  const pre = teeOpts?.prefilled;
  // Pages are left out only when each was sent once: an earlier copy of a page sent again is a
  // literal, which the receiver loads; leaving out the final copy would leave it that one.
  const preIndex = pre && header.resentRecords === 0 ? header.blocks.findIndex((b) => b.name === pre.block && b.imageOffset === pre.imageOffset && b.size === pre.size) : -1;
  const lastOp = ops[ops.length - 1];
  let readAb: ArrayBuffer | undefined;
  try {
    const imgSize = img.size;
    if (imgSize !== header.memImageSize) {
      throw new CloudletError('CORRUPT', `${what} has ${imgSize} bytes; its skeleton expects ${header.memImageSize}`, { fix: 'use the memory image that belongs to this skeleton' });
    }
    if (header.mode === 'opaque') {
      // Straight into the output buffer: no copy.
      for (let pos = 0; pos < imgSize; ) {
        if (!w.fits(PAGE_SIZE)) await w.flush();
        const n = Math.min(w.room, imgSize - pos);
        const at = w.reserve(n);
        await img.read(w.buffer.subarray(at, at + n), n, pos);
        if (t) await t.write(w.buffer.subarray(at, at + n));
        pos += n;
      }
    } else {
      readAb = takeBuffer();
      const readBuf = Buffer.from(readAb);
      const names = header.blocks.map((b) => Buffer.from(b.name, 'latin1'));
      for (const o of ops) {
        if (o.op === 'lit') {
          await w.write(o.data);
          if (t) {
            if (o === lastOp) await t.last(o.data);
            else await t.write(o.data);
            // A literal may hold page records (earlier copies) that name another block.
            t.lastBlock = -1;
          }
          continue;
        }
        const b = header.blocks[o.block];
        const name = names[o.block];
        if (!b || !name) throw new CloudletError('CORRUPT', `skeleton names RAM block ${o.block}, which it does not list`);
        const pagesPerRead = IO_SIZE / PAGE_SIZE;
        const isZero = (i: number): number => ((o.zeroBits[i >> 3] as number) >> (i & 7)) & 1;
        for (let done = 0; done < o.count; ) {
          const n = Math.min(pagesPerRead, o.count - done);
          const windowAt = b.imageOffset + (o.firstPage + done) * PAGE_SIZE;
          if (o.fills === undefined) await img.read(readBuf, n * PAGE_SIZE, windowAt);
          else {
            // Read only the pages of PAGE records (runs of ZERO records longer than MAX_ZERO_READ are skipped).
            for (let k = 0; k < n; ) {
              while (k < n && isZero(done + k)) k++;
              if (k >= n) break;
              const first = k;
              let last = k;
              for (k++; k < n && k - last <= MAX_ZERO_READ; k++) if (!isZero(done + k)) last = k;
              await img.read(readBuf.subarray(first * PAGE_SIZE), (last - first + 1) * PAGE_SIZE, windowAt + first * PAGE_SIZE);
              k = last + 1;
            }
          }
          for (let k = 0; k < n; k++) {
            const i = done + k;
            const zero = isZero(i);
            const withName = i === 0 && o.named;
            const len = 8 + (withName ? 1 + name.length : 0) + (zero ? 1 : PAGE_SIZE);
            if (!w.fits(len)) await w.flush();
            const buf = w.buffer;
            const at = w.reserve(len);
            const addr = (o.firstPage + i) * PAGE_SIZE;
            const flags = (zero ? RAM_FLAG_ZERO : RAM_FLAG_PAGE) | (withName ? 0 : RAM_FLAG_CONTINUE);
            buf.writeUInt32BE(Math.floor(addr / 2 ** 32), at);
            buf.writeUInt32BE((addr % 2 ** 32) + flags, at + 4);
            let p = at + 8;
            if (withName) {
              buf[p++] = name.length;
              name.copy(buf, p);
              p += name.length;
            }
            if (zero) buf[p] = o.fills ? (o.fills.get(i) ?? 0) : (readBuf[k * PAGE_SIZE] as number);
            else readBuf.copy(buf, p, k * PAGE_SIZE, (k + 1) * PAGE_SIZE);
            if (t) {
              if (o.block === preIndex && pre?.isBase(b.imageOffset + addr)) {
                t.dropped++;
              } else {
                const payload = buf.subarray(p, p + (zero ? 1 : PAGE_SIZE));
                if (withName || t.lastBlock === o.block) await t.record(addr, flags, withName ? name : undefined, payload);
                else await t.record(addr, flags & ~RAM_FLAG_CONTINUE, name, payload);
                t.lastBlock = o.block;
              }
            }
          }
          done += n;
        }
      }
    }
    if (t) await t.flush();
    const sha256 = await w.finish();
    const size = w.size;
    if (size !== header.saveFileSize || sha256 !== header.saveFileSha256) {
      throw new CloudletError('DIGEST_MISMATCH', `rebuilt save file has ${size} bytes and sha256 ${sha256}; the skeleton expects ${header.saveFileSize} bytes and ${header.saveFileSha256}`, {
        fix: 'the memory image does not match this skeleton (wrong base or damaged overlay); rebuild it',
      });
    }
    return { size, sha256, teeDropped: t?.dropped ?? 0 };
  } finally {
    w.close();
    if (readAb) giveBack(readAb);
  }
}

/**
 * Rebuilds the save file byte for byte into outSavePath (temp name + rename; nothing left on
 * error). A tee (opts) also gets the file as it is written, less the page records its receiver
 * holds already (TeeOptions.prefilled); the digest is checked only at the end, so whatever the tee
 * feeds must not be used before the join returned.
 */
export async function joinSnapshot(skeleton: Buffer, image: MemoryImageInput, outSavePath: string, opts: Partial<TeeOptions> = {}): Promise<{ size: number; sha256: string; teeDropped?: number }> {
  decodeSkeleton(skeleton); // fail on a bad skeleton before creating anything
  const tmp = `${outSavePath}.tmp-${process.pid}`;
  const out = await open(tmp, 'w');
  try {
    let result: { size: number; sha256: string; teeDropped?: number };
    try {
      const tee = opts.tee ? { tee: opts.tee, ...(opts.prefilled ? { prefilled: opts.prefilled } : {}) } : undefined;
      const r = await withImage(image, (img) => rebuild(skeleton, img, out, tee));
      result = { size: r.size, sha256: r.sha256, ...(tee ? { teeDropped: r.teeDropped } : {}) };
    } finally {
      await out.close();
    }
    await rename(tmp, outSavePath);
    return result;
  } catch (e) {
    await unlink(tmp).catch(() => undefined);
    throw e;
  }
}

/**
 * Checks that skeleton + memory image rebuild the save file they were split from (same size and
 * sha256) without writing it; throws DIGEST_MISMATCH / CORRUPT otherwise.
 */
export async function verifySnapshot(skeleton: Buffer, image: MemoryImageInput): Promise<{ size: number; sha256: string }> {
  return withImage(image, async (img) => {
    const { size, sha256 } = await rebuild(skeleton, img, undefined);
    return { size, sha256 };
  });
}
