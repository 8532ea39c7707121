/**
 * Fills a domain's shared RAM file (a fresh, zero file QEMU mapped with share=on) from a memory
 * image: only pages that are not zero are written, so the file stays as sparse as the guest's
 * memory (a tmpfs under memory_backing_dir holds only what is written).
 */
import { open } from 'node:fs/promises';
import { CloudletError } from '../core/errors';
import type { RamImage } from './types';

const PAGE = 4096;
const STEP = 8 * 1024 * 1024;

const ZERO_PAGE = Buffer.alloc(PAGE);

function isZero(b: Buffer, from: number, to: number): boolean {
  return ZERO_PAGE.compare(b, from, to, 0, to - from) === 0;
}

export async function fillRamFile(ramPath: string, image: RamImage): Promise<{ bytesWritten: number }> {
  const src = await open(image.path, 'r');
  const dst = await open(ramPath, 'r+');
  let bytesWritten = 0;
  try {
    const size = (await dst.stat()).size;
    if (size < image.length) {
      throw new CloudletError('HYPERVISOR', `the guest RAM file ${ramPath} has ${size} bytes, the memory image ${image.length}`, { fix: 'the domain XML must give the VM the memory size its image was made with' });
    }
    const buf = Buffer.alloc(STEP);
    for (let off = 0; off < image.length; off += STEP) {
      const want = Math.min(STEP, image.length - off);
      let got = 0;
      while (got < want) {
        const { bytesRead } = await src.read(buf, got, want - got, image.offset + off + got);
        if (bytesRead === 0) break;
        got += bytesRead;
      }
      buf.fill(0, got, want);
      // Write runs of non-zero pages.
      let p = 0;
      while (p < want) {
        while (p < want && isZero(buf, p, Math.min(p + PAGE, want))) p += PAGE;
        const start = p;
        while (p < want && !isZero(buf, p, Math.min(p + PAGE, want))) p += PAGE;
        const end = Math.min(p, want);
        if (end > start) {
          let w = 0;
          while (w < end - start) w += (await dst.write(buf, start + w, end - start - w, off + start + w)).bytesWritten;
          bytesWritten += end - start;
        }
      }
    }
  } finally {
    await src.close();
    await dst.close();
  }
  return { bytesWritten };
}
