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

function updateZeros(hash: Hash, length: number): void {
  const zeros = (zeroBlock ??= Buffer.alloc(BLOCK));
  for (let left = length; left > 0; left -= BLOCK) hash.update(left >= BLOCK ? zeros : zeros.subarray(0, left));
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
        // In steps, so progress moves during a long hole.
        for (let left = length; left > 0; left -= BLOCK) {
          updateZeros(hash, Math.min(left, BLOCK));
          done += Math.min(left, BLOCK);
          onProgress?.(done, size);
        }
      },
    );
    return { sha256: hash.digest('hex'), size };
  } finally {
    await fh.close();
  }
}

/**
 * Writes a new, empty file at given positions, leaving every whole 4 KiB chunk (aligned in the
 * file) that is all zeros as a hole; `finish(size)` sets the file's length (a trailing hole).
 */
export class SparseWriter {
  constructor(private readonly fh: fsp.FileHandle) {}

  async write(data: Buffer, position: number): Promise<void> {
    let from = -1;
    for (let off = 0; off < data.length; ) {
      const next = Math.min(data.length, (Math.floor((position + off) / C) + 1) * C - position);
      const zero = next - off === C && data.compare(ZERO_CHUNK, 0, C, off, next) === 0;
      if (zero && from >= 0) {
        await this.writeAt(data.subarray(from, off), position + from);
        from = -1;
      } else if (!zero && from < 0) {
        from = off;
      }
      off = next;
    }
    if (from >= 0) await this.writeAt(data.subarray(from), position + from);
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
          for (let left = length; left > 0; left -= BLOCK) {
            updateZeros(hash, Math.min(left, BLOCK));
            done += Math.min(left, BLOCK);
            onProgress?.(done, size);
          }
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
