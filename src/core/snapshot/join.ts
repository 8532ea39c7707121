/**
 * joinSnapshot: rebuilds a save file byte for byte from its skeleton and memory image, streaming
 * (large reads of the image, large writes of the output), and checks the result's sha256 against
 * the one recorded in the skeleton. Writes to a temp name and renames at the end.
 */
import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
import { CloudletError } from '../errors';
import * as F from './format';
import { createStreamHasher, type StreamHasher } from './hasher';
import { decodeSkeleton } from './skeleton';

const IO_SIZE = 8 * 1024 * 1024;

/** Buffered, hashing, double-buffered output. */
class OutWriter {
  private buf = Buffer.allocUnsafe(IO_SIZE);
  private spare = Buffer.allocUnsafe(IO_SIZE);
  private len = 0;
  private pos = 0;
  private inFlight: Promise<unknown> = Promise.resolve();
  readonly hash: StreamHasher;

  constructor(
    /** undefined: hash only (verification), write nothing. */
    private readonly fh: FileHandle | undefined,
    expectedSize: number,
  ) {
    this.hash = createStreamHasher(expectedSize);
  }

  get size(): number {
    return this.pos + this.len;
  }

  /** Room for n bytes (n <= IO_SIZE); returns the buffer and the offset to write at. */
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

  get buffer(): Buffer {
    return this.buf;
  }

  async write(data: Buffer): Promise<void> {
    for (let off = 0; off < data.length; ) {
      if (this.fits(1) === false) await this.flush();
      const n = Math.min(data.length - off, this.buf.length - this.len);
      data.copy(this.buf, this.reserve(n), off, off + n);
      off += n;
    }
  }

  async flush(): Promise<void> {
    await this.inFlight;
    if (this.len === 0) return;
    const full = this.buf;
    const hashing = this.hash.update(full.subarray(0, this.len));
    if (hashing) await hashing;
    if (this.fh) this.inFlight = this.fh.write(full, 0, this.len, this.pos);
    this.pos += this.len;
    this.len = 0;
    this.buf = this.spare;
    this.spare = full;
  }

  async close(): Promise<void> {
    await this.flush();
    await this.inFlight;
  }
}

async function readFully(fh: FileHandle, buf: Buffer, len: number, position: number, what: string): Promise<void> {
  for (let got = 0; got < len; ) {
    const { bytesRead } = await fh.read(buf, got, len - got, position + got);
    if (bytesRead === 0) {
      throw new CloudletError('CORRUPT', `${what} is truncated: nothing to read at offset ${position + got}`, { fix: 'rebuild the memory image (applyOverlay / splitSnapshot)', details: { offset: position + got } });
    }
    got += bytesRead;
  }
}

/** Streams the save file that `skeleton` + memory image describe into `w`. */
async function rebuild(skeleton: Buffer, memImagePath: string, outFh: FileHandle | undefined): Promise<{ size: number; sha256: string }> {
  const { header, ops } = decodeSkeleton(skeleton);
  const what = `memory image ${memImagePath}`;
  const img = await open(memImagePath, 'r').catch((e: unknown) => {
    throw new CloudletError('NOT_FOUND', `cannot open ${what}: ${(e as Error).message}`, { cause: e });
  });
  const w = new OutWriter(outFh, header.saveFileSize);
  try {
    const imgSize = (await img.stat()).size;
    if (imgSize !== header.memImageSize) {
      throw new CloudletError('CORRUPT', `${what} has ${imgSize} bytes; its skeleton expects ${header.memImageSize}`, { fix: 'use the memory image that belongs to this skeleton' });
    }
    const readBuf = Buffer.allocUnsafe(IO_SIZE);
    if (header.mode === 'opaque') {
      for (let pos = 0; pos < imgSize; ) {
        const n = Math.min(IO_SIZE, imgSize - pos);
        await readFully(img, readBuf, n, pos, what);
        await w.write(readBuf.subarray(0, n));
        pos += n;
      }
    } else {
      const names = header.blocks.map((b) => Buffer.from(b.name, 'latin1'));
      for (const o of ops) {
        if (o.op === 'lit') {
          await w.write(o.data);
          continue;
        }
        const b = header.blocks[o.block];
        const name = names[o.block];
        if (!b || !name) throw new CloudletError('CORRUPT', `skeleton names RAM block ${o.block}, which it does not list`);
        const pagesPerRead = IO_SIZE / F.PAGE_SIZE;
        for (let done = 0; done < o.count; ) {
          const n = Math.min(pagesPerRead, o.count - done);
          await readFully(img, readBuf, n * F.PAGE_SIZE, b.imageOffset + (o.firstPage + done) * F.PAGE_SIZE, what);
          for (let k = 0; k < n; k++) {
            const i = done + k;
            const zero = ((o.zeroBits[i >> 3] as number) >> (i & 7)) & 1;
            const withName = i === 0 && o.named;
            const len = 8 + (withName ? 1 + name.length : 0) + (zero ? 1 : F.PAGE_SIZE);
            if (!w.fits(len)) await w.flush();
            const buf = w.buffer;
            const at = w.reserve(len);
            const addr = (o.firstPage + i) * F.PAGE_SIZE;
            const flags = (zero ? F.RAM_FLAG_ZERO : F.RAM_FLAG_PAGE) | (withName ? 0 : F.RAM_FLAG_CONTINUE);
            buf.writeUInt32BE(Math.floor(addr / 2 ** 32), at);
            buf.writeUInt32BE((addr % 2 ** 32) + flags, at + 4);
            let p = at + 8;
            if (withName) {
              buf[p++] = name.length;
              name.copy(buf, p);
              p += name.length;
            }
            if (zero) buf[p] = readBuf[k * F.PAGE_SIZE] as number;
            else readBuf.copy(buf, p, k * F.PAGE_SIZE, (k + 1) * F.PAGE_SIZE);
          }
          done += n;
        }
      }
    }
    await w.close();
    const size = w.size;
    const sha256 = await w.hash.digest();
    if (size !== header.saveFileSize || sha256 !== header.saveFileSha256) {
      throw new CloudletError('DIGEST_MISMATCH', `rebuilt save file has ${size} bytes and sha256 ${sha256}; the skeleton expects ${header.saveFileSize} bytes and ${header.saveFileSha256}`, {
        fix: 'the memory image does not match this skeleton (wrong base or damaged overlay); rebuild it',
      });
    }
    return { size, sha256 };
  } finally {
    w.hash.close();
    await img.close();
  }
}

/** Rebuilds the save file byte for byte into outSavePath (temp name + rename; nothing left on error). */
export async function joinSnapshot(skeleton: Buffer, memImagePath: string, outSavePath: string): Promise<{ size: number; sha256: string }> {
  decodeSkeleton(skeleton); // fail on a bad skeleton before creating anything
  const tmp = `${outSavePath}.tmp-${process.pid}`;
  const out = await open(tmp, 'w');
  try {
    let result: { size: number; sha256: string };
    try {
      result = await rebuild(skeleton, memImagePath, out);
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
export async function verifySnapshot(skeleton: Buffer, memImagePath: string): Promise<{ size: number; sha256: string }> {
  return rebuild(skeleton, memImagePath, undefined);
}
