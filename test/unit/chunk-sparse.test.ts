/**
 * Chunk indexes of sparse files: holes are skipped (not read), data is read by the workers, and
 * every digest equals the straightforward full read, whatever the layout: holes at the start, in
 * the middle, at the end, data extents not aligned to 4 KiB, a file that is all hole, one without
 * holes, and many small extents.
 */
import { createHash, randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildChunkIndex, CHUNK_SIZE, chunkRunsOf, ZERO_CHUNK_DIGEST } from '../../src/core/chunk';
import type { ChunkIndex } from '../../src/core/chunk';
import * as extents from '../../src/core/extents';

const MiB = 1024 * 1024;
let dir: string;
beforeAll(async () => {
  dir = await fsp.mkdtemp(join(tmpdir(), 'sc-chunk-sparse-'));
});
afterAll(async () => {
  await fsp.rm(dir, { recursive: true, force: true });
});
afterEach(() => jest.restoreAllMocks());

/** A file of `size` bytes holding `parts` (position, bytes) and holes everywhere else. */
async function sparseFile(name: string, size: number, parts: [number, Buffer][]): Promise<string> {
  const file = join(dir, name);
  const fh = await fsp.open(file, 'w');
  try {
    await fh.truncate(size);
    for (const [pos, data] of parts) await fh.write(data, 0, data.length, pos);
  } finally {
    await fh.close();
  }
  return file;
}

/** Random bytes with a few all-zero chunks inside (data that is allocated but zero). */
function data(bytes: number): Buffer {
  const b = randomBytes(bytes);
  for (let off = CHUNK_SIZE; off + 2 * CHUNK_SIZE <= bytes; off += 64 * CHUNK_SIZE) b.fill(0, off, off + 2 * CHUNK_SIZE);
  return b;
}

/** The straightforward index: the whole file read into memory, each chunk zero-padded and hashed. */
async function reference(file: string): Promise<Buffer> {
  const bytes = await fsp.readFile(file);
  const out: Buffer[] = [];
  for (let off = 0; off < bytes.length; off += CHUNK_SIZE) {
    const chunk = Buffer.alloc(CHUNK_SIZE);
    bytes.copy(chunk, 0, off, Math.min(bytes.length, off + CHUNK_SIZE));
    out.push(createHash('sha256').update(chunk).digest());
  }
  return Buffer.concat(out);
}

function expectSame(ix: ChunkIndex, ref: Buffer, size: number): void {
  expect(ix.byteLength).toBe(size);
  expect(ix.chunkCount * 32).toBe(ref.length);
  for (let i = 0; i < ix.chunkCount; i++) {
    if (!ix.digestAt(i).equals(ref.subarray(i * 32, (i + 1) * 32))) throw new Error(`chunk ${i} differs from the full read`);
  }
}

/** Bytes the file system reports as data (what qemu-img map finds). */
async function dataBytes(file: string): Promise<number> {
  const fh = await fsp.open(file, 'r');
  try {
    const ext = await extents.dataExtents(fh.fd, (await fh.stat()).size, file);
    return ext.reduce((s, e) => s + e.end - e.start, 0);
  } finally {
    await fh.close();
  }
}

const cases: [string, number, () => [number, Buffer][]][] = [
  ['a hole at the start', 26 * MiB, () => [[16 * MiB, data(10 * MiB)]]],
  ['a hole in the middle, unaligned size ending in data', 30 * MiB - 100, () => [[0, data(5 * MiB)], [20 * MiB, data(10 * MiB - 100)]]],
  ['a hole at the end, unaligned size ending in a hole', 40 * MiB + 123, () => [[0, data(12 * MiB + 5)]]],
  ['data at unaligned offsets', 24 * MiB + 7, () => [[1000, data(3 * MiB)], [9 * MiB + 4095, data(9 * MiB + 2)], [24 * MiB + 1, randomBytes(6)]]],
  ['all hole', 48 * MiB + 1, () => []],
  ['no hole', 20 * MiB + 1000, () => [[0, data(20 * MiB + 1000)]]],
  // 2,500 extents of 1-3 chunks: several runs per worker task.
  ['2,500 small extents', 40 * MiB, () => Array.from({ length: 2500 }, (_, i): [number, Buffer] => [i * 16 * 1024 + (i % 3) * 1000, randomBytes(1 + (i % 3) * 4096)])],
];

describe.each(cases)('a file with %s', (name, size, parts) => {
  let file: string;
  let ref: Buffer;
  beforeAll(async () => {
    file = await sparseFile(`${name.replace(/\W+/g, '-')}.raw`, size, parts());
    ref = await reference(file);
  });

  test('the file system reports its holes (so the test skips them)', async () => {
    const expected = parts().reduce((s, [, b]) => s + b.length, 0);
    const found = await dataBytes(file);
    expect(found).toBeGreaterThanOrEqual(expected);
    if (expected < size / 2) expect(found).toBeLessThan(size / 2);
  });

  test.each([0, 1, 2, undefined])('skipping holes gives the digests of a full read (threads %s)', async (threads) => {
    const progress: number[] = [];
    const ix = await buildChunkIndex(file, { holes: 'skip', ...(threads === undefined ? {} : { threads }), onProgress: (d, t) => progress.push(d / t) });
    expectSame(ix, ref, size);
    expect(progress.at(-1)).toBe(1);
    expect(progress.every((p, i) => i === 0 || p >= (progress[i - 1] as number))).toBe(true);
  });

  test('reading every byte gives the same digests', async () => {
    expectSame(await buildChunkIndex(file, { holes: 'read', threads: 2 }), ref, size);
  });
});

describe('holes', () => {
  test('chunks in holes are not read: the digests of a hole are those of zeros even when the map is told so', async () => {
    // A file with data where the (mocked) map claims a hole: that chunk gets the zero digest,
    // which proves holes are filled in without reading them.
    const file = await sparseFile('lie.raw', 16 * MiB, [[0, randomBytes(16 * MiB)]]);
    jest.spyOn(extents, 'dataExtentsOrWhole').mockResolvedValue([{ start: 0, end: 4 * MiB }, { start: 8 * MiB + 1, end: 16 * MiB }]);
    const ix = await buildChunkIndex(file, { holes: 'skip', threads: 2 });
    const ref = await reference(file);
    const chunkOf = (byte: number): number => Math.floor(byte / CHUNK_SIZE);
    for (let i = 0; i < ix.chunkCount; i++) {
      const inHole = i >= chunkOf(4 * MiB) && i < chunkOf(8 * MiB);
      expect(ix.digestAt(i).equals(inHole ? ZERO_CHUNK_DIGEST : ref.subarray(i * 32, (i + 1) * 32))).toBe(true);
    }
  });

  test('a chunk only partly inside a data extent is read and hashed whole', async () => {
    // Data bytes 5000..9000 and 12287..12289 (a 512-byte-block file system would report such
    // unaligned extents): chunks 1, 2 and 3 are read whole.
    const file = await sparseFile('partial.raw', 9 * MiB, [[5000, randomBytes(4000)], [12287, randomBytes(3)]]);
    jest.spyOn(extents, 'dataExtentsOrWhole').mockResolvedValue([{ start: 5000, end: 9000 }, { start: 12287, end: 12290 }]);
    expectSame(await buildChunkIndex(file, { holes: 'skip', threads: 0 }), await reference(file), 9 * MiB);
  });

  test('without qemu-img the whole file is read (same digests)', async () => {
    const file = await sparseFile('nomap.raw', 20 * MiB, [[3 * MiB, randomBytes(MiB)]]);
    const fh = await fsp.open(file, 'r');
    const path = process.env.PATH;
    process.env.PATH = dir; // no qemu-img here
    try {
      await expect(extents.dataExtents(fh.fd, 20 * MiB, file)).rejects.toMatchObject({ code: 'BAD_INPUT', message: expect.stringContaining('install qemu-utils') });
      await expect(extents.dataExtentsOrWhole(fh.fd, 20 * MiB, file)).resolves.toEqual([{ start: 0, end: 20 * MiB }]);
      expectSame(await buildChunkIndex(file, { threads: 2 }), await reference(file), 20 * MiB);
    } finally {
      process.env.PATH = path;
      await fh.close();
    }
  });

  test('chunkRunsOf: every chunk touching an extent, merged', () => {
    expect(chunkRunsOf([])).toEqual([]);
    expect(chunkRunsOf([{ start: 0, end: 0 }])).toEqual([]);
    expect(chunkRunsOf([{ start: 1000, end: 5000 }])).toEqual([{ first: 0, count: 2 }]);
    expect(chunkRunsOf([{ start: 4096, end: 4097 }, { start: 8191, end: 8193 }])).toEqual([{ first: 1, count: 2 }]);
    expect(chunkRunsOf([{ start: 0, end: 4096 }, { start: 4096 * 3, end: 4096 * 4 + 1 }])).toEqual([{ first: 0, count: 1 }, { first: 3, count: 2 }]);
  });
});

describe('dataExtentsOfMap', () => {
  const e = (start: number, length: number, zero: boolean): { start: number; length: number; zero: boolean; data: boolean } => ({ start, length, zero, data: !zero });
  test('keeps what is not known to be zero, merged and clipped to the file', () => {
    expect(extents.dataExtentsOfMap([e(0, 4096, false), e(4096, 4096, false), e(8192, 8192, true), e(16384, 512, false)], 16384 + 100, 'f')).toEqual([
      { start: 0, end: 8192 },
      { start: 16384, end: 16484 },
    ]);
    expect(extents.dataExtentsOfMap([e(0, 1 << 20, true)], 1 << 20, 'f')).toEqual([]);
  });
  test('a map with a gap, or that does not cover the file, is refused', () => {
    expect(() => extents.dataExtentsOfMap([e(0, 4096, false), e(8192, 4096, true)], 12288, 'f')).toThrow(expect.objectContaining({ code: 'BAD_INPUT' }));
    expect(() => extents.dataExtentsOfMap([e(0, 4096, false)], 8192, 'f')).toThrow(/ends at byte 4096/);
    expect(() => extents.dataExtentsOfMap([e(0, 8192, false)], 4096, 'f')).toThrow(/ends at byte 8192/);
  });
});
