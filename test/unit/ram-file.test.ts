/**
 * fillRamFile: a shared RAM file filled from a region of a memory image is byte-identical to that
 * region, and long zero runs stay holes (the file holds about what the guest's memory holds).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fillRamFile } from '../../src/hypervisor/ram-file';
import { prng } from './overlay-fixture';

const PAGE = 4096;

describe('fillRamFile', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ram-file-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('copies the region exactly, skipping long zero runs and writing short gaps', async () => {
    const pages = 5000; // not a multiple of the 8 MiB step
    const offset = 3 * PAGE;
    const rnd = prng(7);
    const region = Buffer.alloc(pages * PAGE);
    for (let p = 0; p < pages; p++) {
      // Data in the first and last 400 pages, a few isolated pages between, zero elsewhere.
      if (p < 400 || p >= pages - 400 || p % 997 === 0) region.fill(1 + Math.floor(rnd() * 255), p * PAGE, (p + 1) * PAGE);
      if (p === 10) region.fill(0, p * PAGE, (p + 1) * PAGE); // a zero page inside a run
    }
    const image = path.join(dir, 'mem.img');
    fs.writeFileSync(image, Buffer.concat([Buffer.alloc(offset, 0xee), region, Buffer.alloc(PAGE, 0xee)]));
    const ram = path.join(dir, 'pc.ram');
    fs.writeFileSync(ram, Buffer.alloc(0));
    fs.truncateSync(ram, pages * PAGE + PAGE); // QEMU's file may be larger than the block

    const r = await fillRamFile(ram, { path: image, offset, length: pages * PAGE });
    const out = fs.readFileSync(ram);
    expect(out.subarray(0, pages * PAGE).equals(region)).toBe(true);
    expect(out.subarray(pages * PAGE).equals(Buffer.alloc(PAGE))).toBe(true);
    // 800 data pages, a few isolated ones, one short gap: far less than the whole region.
    expect(r.bytesWritten).toBeGreaterThanOrEqual(800 * PAGE);
    expect(r.bytesWritten).toBeLessThan(900 * PAGE);
  });

  it('refuses a RAM file smaller than the region (wrong memory size)', async () => {
    const image = path.join(dir, 'mem.img');
    fs.writeFileSync(image, Buffer.alloc(4 * PAGE, 1));
    const ram = path.join(dir, 'pc.ram');
    fs.writeFileSync(ram, Buffer.alloc(2 * PAGE));
    await expect(fillRamFile(ram, { path: image, offset: 0, length: 4 * PAGE })).rejects.toMatchObject({ code: 'HYPERVISOR' });
  });
});
