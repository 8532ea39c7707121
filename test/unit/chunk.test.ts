import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildChunkIndex, CHUNK_SIZE, DigestList, hashChunks, readChunkIndex, writeChunkIndex } from '../../src/core/chunk';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'sc-chunk-unit-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Reference digests, computed the obvious way. */
function reference(data: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let off = 0; off < data.length; off += CHUNK_SIZE) {
    const chunk = Buffer.alloc(CHUNK_SIZE);
    data.copy(chunk, 0, off, Math.min(data.length, off + CHUNK_SIZE));
    out.push(createHash('sha256').update(chunk).digest());
  }
  return out;
}

/** 20 MiB + a partial chunk: spans several 8 MiB reads; has repeated and zero chunks. */
function sample(): Buffer {
  const data = Buffer.alloc(20 * 1024 * 1024 + 1000);
  randomBytes(3 * 1024 * 1024).copy(data, 0);
  data.copy(data, 5 * 1024 * 1024, 0, 1024 * 1024); // chunks 1280.. repeat chunks 0..
  randomBytes(1000).copy(data, 20 * 1024 * 1024);
  return data;
}

describe('buildChunkIndex', () => {
  let data: Buffer;
  let path: string;
  beforeAll(async () => {
    data = sample();
    path = join(dir, 'sample.bin');
    await writeFile(path, data);
  });

  test.each([0, 1, 2])('hashes every 4 KiB chunk (last one zero-padded) with %i hashing threads', async (threads) => {
    const progress: number[] = [];
    const ix = await buildChunkIndex(path, { threads, onProgress: (done, total) => progress.push(done / total) });
    const ref = reference(data);
    expect(ix.byteLength).toBe(data.length);
    expect(ix.chunkCount).toBe(ref.length);
    ref.forEach((d, i) => {
      if (!ix.digestAt(i).equals(d)) throw new Error(`chunk ${i} differs`);
    });
    expect(progress.at(-1)).toBe(1);
  });

  test('findByDigest returns the lowest chunk with that content; equalAt compares', async () => {
    const ix = await buildChunkIndex(path);
    const ref = reference(data);
    expect(ix.findByDigest(ref[1280 + 7] as Buffer)).toBe(7); // copy of chunk 7
    const zero = createHash('sha256').update(Buffer.alloc(CHUNK_SIZE)).digest();
    expect(ix.findByDigest(zero)).toBe(3 * 256); // first all-zero chunk after the 3 MiB of random bytes
    expect(ix.findByDigest(randomBytes(32))).toBeUndefined();
    expect(ix.findByDigest(Buffer.alloc(5))).toBeUndefined();
    expect(ix.equalAt(1280, ref[0] as Buffer)).toBe(true);
    expect(ix.equalAt(1, ref[0] as Buffer)).toBe(false);
    expect(() => ix.digestAt(ix.chunkCount)).toThrow(expect.objectContaining({ code: 'BAD_INPUT' }));
  });

  test('an empty file has no chunks; a missing file is NOT_FOUND', async () => {
    const empty = join(dir, 'empty.bin');
    await writeFile(empty, Buffer.alloc(0));
    const ix = await buildChunkIndex(empty);
    expect([ix.byteLength, ix.chunkCount]).toEqual([0, 0]);
    expect(ix.findByDigest(randomBytes(32))).toBeUndefined();
    await expect(buildChunkIndex(join(dir, 'missing.bin'))).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });

  test('hashChunks agrees with the file index', () => {
    const small = randomBytes(3 * CHUNK_SIZE + 17);
    const digests = hashChunks(small);
    const ref = reference(small);
    expect(digests.length).toBe(4 * 32);
    ref.forEach((d, i) => expect(digests.subarray(i * 32, (i + 1) * 32).equals(d)).toBe(true));
  });
});

describe('chunk index file', () => {
  const ix = new DigestList(5 * CHUNK_SIZE - 3, hashChunks(randomBytes(5 * CHUNK_SIZE - 3)));

  test('round trips', async () => {
    const p = join(dir, 'a.idx');
    await writeChunkIndex(ix, p);
    const back = await readChunkIndex(p);
    expect(back.byteLength).toBe(ix.byteLength);
    expect(back.chunkCount).toBe(5);
    for (let i = 0; i < 5; i++) expect(back.digestAt(i).equals(ix.digestAt(i))).toBe(true);
    expect(back.findByDigest(ix.digestAt(4))).toBe(4);
    expect((await readFile(p)).length).toBe(64 + 5 * 32);
  });

  test('truncated, damaged, foreign or future files are typed errors', async () => {
    const p = join(dir, 'b.idx');
    await writeChunkIndex(ix, p);
    const good = await readFile(p);
    const cases: [string, Buffer, string][] = [
      ['truncated digests', good.subarray(0, good.length - 1), 'CORRUPT'],
      ['truncated header', good.subarray(0, 30), 'CORRUPT'],
      ['trailing bytes', Buffer.concat([good, Buffer.alloc(1)]), 'CORRUPT'],
      ['bad magic', Buffer.concat([Buffer.from('NOTANIDX'), good.subarray(8)]), 'CORRUPT'],
    ];
    const flipped = Buffer.from(good);
    flipped[64 + 40] = (flipped[64 + 40] as number) ^ 0x80;
    cases.push(['flipped digest bit', flipped, 'CORRUPT']);
    const future = Buffer.from(good);
    future.writeUInt32LE(2, 8);
    cases.push(['version 2', future, 'UNSUPPORTED_VERSION']);
    const chunk8k = Buffer.from(good);
    chunk8k.writeUInt32LE(8192, 12);
    cases.push(['8 KiB chunks', chunk8k, 'UNSUPPORTED_VERSION']);
    const count = Buffer.from(good);
    count.writeBigUInt64LE(6n, 24);
    cases.push(['wrong chunk count', count, 'CORRUPT']);
    for (const [what, bytes, code] of cases) {
      await writeFile(p, bytes);
      await expect(readChunkIndex(p)).rejects.toMatchObject({ code, message: expect.stringContaining(p) });
      expect(what).toBeTruthy();
    }
    await expect(readChunkIndex(join(dir, 'nope.idx'))).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });
});
