/**
 * Fills a domain's shared RAM file (a fresh, zero file QEMU mapped with share=on) from a memory
 * image. Only the image's data extents are read (its holes are zeros already). Runs of zero pages longer than GAP_PAGES are skipped, so the file stays about as sparse
 * as the guest's memory (a tmpfs under memory_backing_dir holds only what is written), while
 * short zero gaps are written through to keep the number of writes small. Synchronous reads and
 * writes in 8 MiB steps (page-cache and tmpfs copies: a thread-pool round trip per write would
 * cost more than the copy), yielding to the event loop between steps.
 */
import { closeSync, fstatSync, openSync, readSync, writeSync } from 'node:fs';
import { CloudletError } from '../core/errors';
import { dataExtentsOrWhole } from '../core/extents';
import type { RamImage } from './types';

const PAGE = 4096;
const STEP = 8 * 1024 * 1024;
/** Zero gaps up to this many pages are written rather than skipped. */
const GAP_PAGES = 16;
const ZERO_PAGE = Buffer.alloc(PAGE);

function isZeroPage(b: Buffer, at: number, len: number): boolean {
  return ZERO_PAGE.compare(b, at, at + len, 0, len) === 0;
}

const yieldToLoop = (): Promise<void> => new Promise((r) => setImmediate(r));

function writeFully(fd: number, buf: Buffer, from: number, to: number, pos: number): void {
  let w = 0;
  while (w < to - from) w += writeSync(fd, buf, from + w, to - from - w, pos + w);
}

/** Reads `want` bytes of the image at `from` and writes their non-zero runs to the RAM file at `to`. */
function copyStep(src: number, dst: number, buf: Buffer, from: number, want: number, to: number): number {
  let got = 0;
  while (got < want) {
    const n = readSync(src, buf, got, want - got, from + got);
    if (n === 0) break;
    got += n;
  }
  buf.fill(0, got, want);
  let written = 0;
  // Runs of non-zero pages, joined across zero gaps of at most GAP_PAGES.
  let runStart = -1;
  let runEnd = -1;
  for (let p = 0; p < want; p += PAGE) {
    const len = Math.min(PAGE, want - p);
    if (isZeroPage(buf, p, len)) continue;
    if (runStart >= 0 && p - runEnd <= GAP_PAGES * PAGE) {
      runEnd = p + len;
      continue;
    }
    if (runStart >= 0) {
      writeFully(dst, buf, runStart, runEnd, to + runStart);
      written += runEnd - runStart;
    }
    runStart = p;
    runEnd = p + len;
  }
  if (runStart >= 0) {
    writeFully(dst, buf, runStart, runEnd, to + runStart);
    written += runEnd - runStart;
  }
  return written;
}

export async function fillRamFile(ramPath: string, image: RamImage): Promise<{ bytesWritten: number }> {
  const src = openSync(image.path, 'r');
  let dst = -1;
  let bytesWritten = 0;
  try {
    dst = openSync(ramPath, 'r+');
    const size = fstatSync(dst).size;
    if (size < image.length) {
      throw new CloudletError('HYPERVISOR', `the guest RAM file ${ramPath} has ${size} bytes, the memory image ${image.length}`, { fix: 'the domain XML must give the VM the memory size its image was made with' });
    }
    const buf = Buffer.alloc(STEP);
    const end = image.offset + image.length;
    for (const e of await dataExtentsOrWhole(src, fstatSync(src).size, image.path)) {
      // The extent's part inside the region, widened to whole pages of the region.
      const from = Math.max(e.start, image.offset);
      const to = Math.min(e.end, end);
      if (to <= from) continue;
      const first = image.offset + Math.floor((from - image.offset) / PAGE) * PAGE;
      const last = Math.min(end, image.offset + Math.ceil((to - image.offset) / PAGE) * PAGE);
      for (let at = first; at < last; at += STEP) {
        bytesWritten += copyStep(src, dst, buf, at, Math.min(STEP, last - at), at - image.offset);
        await yieldToLoop();
      }
    }
  } finally {
    closeSync(src);
    if (dst >= 0) closeSync(dst);
  }
  return { bytesWritten };
}
