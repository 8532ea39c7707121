import { randomFillSync } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { PatchedMemoryImage } from '../../src/core/overlay/patched-image';

const CHUNK = 4096;

describe('PatchedMemoryImage', () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(path.join(tmpdir(), 'patched-'));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it('reads changed chunks from the patch, the rest from the base, zero past the base, at any offset', async () => {
    const base = randomFillSync(Buffer.alloc(10 * CHUNK));
    const basePath = path.join(dir, 'base.mem');
    writeFileSync(basePath, base);
    // The launch image is 4 chunks longer than the base.
    const size = 14 * CHUNK;
    const img = PatchedMemoryImage.create(basePath, base.length, path.join(dir, 'patch'), size);
    const expected = Buffer.alloc(size);
    base.copy(expected);
    const a = randomFillSync(Buffer.alloc(2 * CHUNK));
    img.writeChunks(2, a);
    a.copy(expected, 2 * CHUNK);
    img.zeroChunks(5, 2);
    expected.fill(0, 5 * CHUNK, 7 * CHUNK);
    const b = randomFillSync(Buffer.alloc(CHUNK));
    img.writeChunks(12, b);
    b.copy(expected, 12 * CHUNK);

    const all = Buffer.alloc(size);
    await img.read(all, size, 0);
    expect(all.equals(expected)).toBe(true);
    // Unaligned windows that cross runs of both kinds.
    for (const [pos, len] of [[100, 3 * CHUNK], [2 * CHUNK - 7, CHUNK + 14], [9 * CHUNK + 1, 4 * CHUNK]] as const) {
      const part = Buffer.alloc(len);
      await img.read(part, len, pos);
      expect(part.equals(expected.subarray(pos, pos + len))).toBe(true);
    }
    const sync = Buffer.alloc(6 * CHUNK);
    img.readChunksSync(1, sync);
    expect(sync.equals(expected.subarray(CHUNK, 7 * CHUNK))).toBe(true);
    expect([2, 3, 5, 6, 12].every((c) => img.isChanged(c))).toBe(true);
    expect([0, 1, 4, 7, 13].some((c) => img.isChanged(c))).toBe(false);
    await expect(img.read(Buffer.alloc(CHUNK), CHUNK, size - 10)).rejects.toMatchObject({ code: 'CORRUPT' });
    await img.close();
    await img.close();
  });

  it('growing: a read waits until the chunks it covers are final, and fails when the writer fails', async () => {
    const basePath = path.join(dir, 'base.mem');
    writeFileSync(basePath, Buffer.alloc(4 * CHUNK, 1));
    const img = PatchedMemoryImage.create(basePath, 4 * CHUNK, path.join(dir, 'patch'), 4 * CHUNK, { growing: true });
    const out = Buffer.alloc(2 * CHUNK);
    let done = false;
    const reading = img.read(out, 2 * CHUNK, 0).then(() => (done = true));
    img.writeChunks(0, Buffer.alloc(CHUNK, 7));
    img.advance(1);
    await new Promise((r) => setImmediate(r));
    expect(done).toBe(false);
    img.advance(2);
    await reading;
    expect(out.subarray(0, CHUNK).every((b) => b === 7) && out.subarray(CHUNK).every((b) => b === 1)).toBe(true);
    const late = img.read(Buffer.alloc(CHUNK), CHUNK, 3 * CHUNK);
    img.fail(new Error('segment 2 is corrupt'));
    await expect(late).rejects.toThrow('segment 2 is corrupt');
    await expect(img.read(Buffer.alloc(CHUNK), CHUNK, 0)).rejects.toThrow('segment 2 is corrupt');
    await img.close();
  });

  it('refuses a patch file that already exists and leaves it alone', () => {
    const basePath = path.join(dir, 'base.mem');
    writeFileSync(basePath, Buffer.alloc(CHUNK));
    const patch = path.join(dir, 'patch');
    writeFileSync(patch, 'keep me');
    expect(() => PatchedMemoryImage.create(basePath, CHUNK, patch, CHUNK)).toThrow(/EEXIST/);
    expect(existsSync(patch)).toBe(true);
  });
});
