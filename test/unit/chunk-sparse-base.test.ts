/**
 * Sparse base disks: the whole-file sha256 that does not read holes, the copy and the writer that
 * keep holes, and a base created from a sparse disk, exported and imported, whose stored disk stays
 * sparse with the same digests (so its chunk index skips the holes on every host).
 *
 * The memory snapshot codec is replaced by a fake, as in base-package.test.ts.
 */
import { createHash, randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type * as NodeCrypto from 'node:crypto';
import type * as NodeFs from 'node:fs';

jest.mock('../../src/core/snapshot', () => {
  const { promises: fs } = jest.requireActual<typeof NodeFs>('node:fs');
  const { createHash: hash } = jest.requireActual<typeof NodeCrypto>('node:crypto');
  return {
    splitSnapshot: async (savePath: string, memImagePath: string) => {
      const data = await fs.readFile(savePath);
      await fs.writeFile(memImagePath, data);
      return {
        mode: 'opaque',
        skeleton: Buffer.from('fake skeleton'),
        domainXml: '<domain type="qemu"><name>sparse-test</name></domain>',
        cpuModel: 'qemu64',
        blocks: [],
        memImageSize: data.length,
        saveFileSize: data.length,
        saveFileSha256: hash('sha256').update(data).digest('hex'),
      };
    },
  };
});

import { createBase, exportBase, importBase, openBase, verifyBase } from '../../src/core/base';
import { buildChunkIndex, CHUNK_SIZE } from '../../src/core/chunk';
import { dataExtentsOrWhole } from '../../src/core/extents';
import { copySparse, inThreadSha256, nonZeroRuns, sha256Sparse, SparseWriter, workerSha256 } from '../../src/core/sparse';
import { CloudletError } from '../../src/core/errors';

const MiB = 1024 * 1024;
let dir: string;
beforeAll(async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'sc-sparse-base-'));
});
afterAll(async () => {
  await fsp.rm(dir, { recursive: true, force: true });
});

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

async function sparseFile(name: string, size: number, parts: [number, Buffer][]): Promise<string> {
  const file = path.join(dir, name);
  const fh = await fsp.open(file, 'w');
  try {
    await fh.truncate(size);
    for (const [pos, data] of parts) await fh.write(data, 0, data.length, pos);
  } finally {
    await fh.close();
  }
  return file;
}

/** Bytes the file system reports as data. */
async function dataBytes(file: string): Promise<number> {
  const fh = await fsp.open(file, 'r');
  try {
    const ext = await dataExtentsOrWhole(fh.fd, (await fh.stat()).size, file);
    return ext.reduce((s, e) => s + e.end - e.start, 0);
  } finally {
    await fh.close();
  }
}

/** 40 MiB + 5 bytes: holes at the start and end, data with zero chunks inside, an unaligned tail. */
function layout(): [number, Buffer][] {
  const a = randomBytes(3 * MiB + 100);
  a.fill(0, MiB, 2 * MiB); // allocated zeros: become holes in a sparse copy
  return [
    [8 * MiB + 1000, a],
    [30 * MiB, randomBytes(MiB)],
    [40 * MiB, randomBytes(5)],
  ];
}
const SIZE = 40 * MiB + 5;

describe('sparse files', () => {
  test('sha256Sparse equals the sha256 of every byte; copySparse keeps the content and the holes', async () => {
    const src = await sparseFile('src.raw', SIZE, layout());
    const bytes = await fsp.readFile(src);
    const progress: number[] = [];
    expect(await sha256Sparse(src, (d) => progress.push(d))).toEqual({ sha256: sha(bytes), size: SIZE });
    expect(progress.at(-1)).toBe(SIZE);
    const copy = path.join(dir, 'copy.raw');
    expect(await copySparse(src, copy)).toEqual({ sha256: sha(bytes), size: SIZE });
    expect((await fsp.readFile(copy)).equals(bytes)).toBe(true);
    // The source's data was 4 MiB + 5 bytes, 1 MiB of it zeros: the copy holds ~3 MiB of data.
    expect(await dataBytes(copy)).toBeLessThan(3.2 * MiB);
    await expect(copySparse(src, copy)).rejects.toMatchObject({ code: 'EEXIST' });
    await expect(sha256Sparse(path.join(dir, 'missing'))).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });

  test('an empty file and a file that is all hole', async () => {
    const empty = await sparseFile('empty.raw', 0, []);
    expect(await sha256Sparse(empty)).toEqual({ sha256: sha(Buffer.alloc(0)), size: 0 });
    const hole = await sparseFile('hole.raw', 20 * MiB + 1, []);
    expect(await sha256Sparse(hole)).toEqual({ sha256: sha(Buffer.alloc(20 * MiB + 1)), size: 20 * MiB + 1 });
    const copy = path.join(dir, 'hole-copy.raw');
    await copySparse(hole, copy);
    expect((await fsp.stat(copy)).size).toBe(20 * MiB + 1);
    expect(await dataBytes(copy)).toBe(0);
  });

  test('SparseWriter writes unaligned pieces exactly and leaves whole zero chunks as holes', async () => {
    const file = path.join(dir, 'writer.raw');
    const expected = Buffer.alloc(5 * MiB + 3);
    const fh = await fsp.open(file, 'wx');
    try {
      const w = new SparseWriter(fh);
      const pieces: [number, Buffer][] = [
        [100, randomBytes(5000)], // unaligned start and end
        [CHUNK_SIZE * 10, Buffer.concat([randomBytes(CHUNK_SIZE), Buffer.alloc(MiB), randomBytes(10)])],
        [3 * MiB - 7, Buffer.alloc(CHUNK_SIZE * 3)], // zeros, partly unaligned: nothing to see
        [4 * MiB + 1, Buffer.concat([Buffer.alloc(CHUNK_SIZE * 2), randomBytes(1)])],
      ];
      for (const [pos, b] of pieces) {
        await w.write(b, pos);
        b.copy(expected, pos);
      }
      await w.finish(expected.length);
    } finally {
      await fh.close();
    }
    expect((await fsp.readFile(file)).equals(expected)).toBe(true);
    expect(await dataBytes(file)).toBeLessThan(6 * CHUNK_SIZE * 2);
  });
});

describe('sha256 sinks and zero runs', () => {
  test('the worker and in-thread sinks give the sha256 of data and zeros fed in order; abort stops the worker', async () => {
    const a = randomBytes(3 * MiB + 7);
    const b = randomBytes(100);
    const all = Buffer.concat([a, Buffer.alloc(20 * MiB + 3), b, Buffer.alloc(5)]);
    const bAt = a.length + 20 * MiB + 3;
    // The file-reading sink hashes the bytes of the file at the positions it is given.
    const file = await sparseFile('sink.raw', all.length, [
      [0, a],
      [bAt, b],
    ]);
    for (const sink of [inThreadSha256(), workerSha256(), workerSha256(file)]) {
      await sink.update(a, 0);
      a[0] = (a[0] ?? 0) ^ 1; // the sink has its own copy (or reads the file)
      sink.zeros(20 * MiB + 3);
      await sink.update(b, bAt);
      sink.zeros(5);
      a[0] = (a[0] ?? 0) ^ 1;
      expect(await sink.digest()).toBe(sha(all));
      await sink.abort();
    }
    const w = workerSha256();
    // More data than the worker's backlog: update waits instead of queueing without bound.
    const big = randomBytes(8 * MiB);
    const h = createHash('sha256');
    for (let i = 0; i < 12; i++) {
      await w.update(big, i * big.length);
      h.update(big);
    }
    expect(await w.digest()).toBe(h.digest('hex'));
    // A read past the end of the file fails the digest.
    const short = workerSha256(file);
    await short.update(Buffer.alloc(10), all.length - 5);
    await expect(short.digest()).rejects.toThrow(/ends at byte/);
    await short.abort();
    const aborted = workerSha256();
    aborted.zeros(MiB);
    await aborted.abort();
    await expect(Promise.resolve(aborted.update(b, 0))).rejects.toThrow();
  });

  test('nonZeroRuns skips whole zero chunks aligned in the file, and nothing else', () => {
    const d = Buffer.concat([Buffer.alloc(CHUNK_SIZE), randomBytes(10), Buffer.alloc(3 * CHUNK_SIZE), randomBytes(5)]);
    // At file position 0: chunk 0 is zero, chunk 1 holds the 10 random bytes, chunks 2-3 zero, chunk 4 the tail.
    expect(nonZeroRuns(d, 0)).toEqual([[CHUNK_SIZE, 2 * CHUNK_SIZE], [4 * CHUNK_SIZE, d.length]]);
    // 10 bytes further in the file: file chunk 1 holds zeros and random bytes, chunks 2-3 are zero.
    expect(nonZeroRuns(d, 10)).toEqual([[0, 2 * CHUNK_SIZE - 10], [4 * CHUNK_SIZE - 10, d.length]]);
    expect(nonZeroRuns(Buffer.alloc(0), 0)).toEqual([]);
    expect(nonZeroRuns(Buffer.alloc(100), 0)).toEqual([[0, 100]]);
  });
});

describe('a base made from a sparse disk', () => {
  test('is stored sparse by create and by import, with the same digests and index', async () => {
    const disk = await sparseFile('disk.raw', SIZE, layout());
    const save = await sparseFile('memory.sav', 3 * CHUNK_SIZE + 17, [[0, Buffer.concat([Buffer.from('LibvirtQemudSave'), randomBytes(3 * CHUNK_SIZE + 1)])]]);
    const diskBytes = await fsp.readFile(disk);
    const storeA = path.join(dir, 'storeA');
    const manifest = await createBase({ diskPath: disk, savePath: save, storeRoot: storeA });
    expect(manifest.disk.sha256).toBe(sha(diskBytes));
    const a = await openBase(storeA, manifest.baseId);
    expect((await fsp.readFile(a.diskPath)).equals(diskBytes)).toBe(true);
    expect(await dataBytes(a.diskPath)).toBeLessThan(3.2 * MiB);

    const pkg = path.join(dir, 'base.cbp');
    await exportBase(storeA, manifest.baseId, pkg);
    const storeB = path.join(dir, 'storeB');
    const r = await importBase(storeB, pkg);
    expect(r.manifest).toEqual(manifest);
    const b = await openBase(storeB, manifest.baseId);
    expect((await fsp.readFile(b.diskPath)).equals(diskBytes)).toBe(true);
    expect(await dataBytes(b.diskPath)).toBeLessThan(3.2 * MiB);
    for (const f of ['disk.idx', 'memory.idx', 'memory.sav']) {
      expect(sha(await fsp.readFile(path.join(b.dir, f)))).toBe(sha(await fsp.readFile(path.join(a.dir, f))));
    }
    const full = await buildChunkIndex(b.diskPath, { holes: 'read', threads: 0 });
    for (let i = 0; i < full.chunkCount; i++) expect(b.diskIndex.equalAt(i, full.digestAt(i))).toBe(true);
    expect(await verifyBase(storeB, manifest.baseId)).toEqual({ baseId: manifest.baseId, ok: true, problems: [] });
  });

  test('a disk large enough to be hashed on its own thread: exported sparse, imported with its digest checked last', async () => {
    // 300 MiB, 2 MiB of data: the package holds the data (and the indexes), not the zeros.
    const big = 300 * MiB;
    const disk = await sparseFile('big.raw', big, [
      [5 * MiB, randomBytes(MiB)],
      [big - MiB, randomBytes(MiB)],
    ]);
    const save = await sparseFile('big.sav', 3 * CHUNK_SIZE, [[0, Buffer.concat([Buffer.from('LibvirtQemudSave'), randomBytes(3 * CHUNK_SIZE - 16)])]]);
    const storeA = path.join(dir, 'storeBigA');
    const manifest = await createBase({ diskPath: disk, savePath: save, storeRoot: storeA });
    const pkg = path.join(dir, 'big.cbp');
    await exportBase(storeA, manifest.baseId, pkg);
    expect((await fsp.stat(pkg)).size).toBeLessThan(2 * MiB + manifest.members[2]!.size + manifest.members[3]!.size + 64 * 1024);
    const stages = new Set<string>();
    const r = await importBase(path.join(dir, 'storeBigB'), pkg, { onProgress: (_d, _t, s) => stages.add(s ?? '') });
    expect(r.manifest).toEqual(manifest);
    expect(stages.has('check disk.raw sha256')).toBe(true);
    expect(await dataBytes(path.join(dir, 'storeBigB', 'bases', manifest.baseId, 'disk.raw'))).toBeLessThan(2.2 * MiB);

    // A flipped data byte of the disk: found by the disk's digest (before the index that then disagrees).
    const bytes = await fsp.readFile(pkg);
    // Header, manifest, disk.raw's member header (MEMB, name, size, layout) and extent counts, then its data.
    const at = 48 + bytes.readUInt32BE(12) + (4 + 2 + 8 + 8 + 1) + 16 + 100;
    bytes[at] = (bytes[at] ?? 0) ^ 1;
    const bad = path.join(dir, 'big-bad.cbp');
    await fsp.writeFile(bad, bytes);
    const storeC = path.join(dir, 'storeBigC');
    const err = await importBase(storeC, bad).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CloudletError);
    expect((err as CloudletError).code).toBe('DIGEST_MISMATCH');
    expect((err as Error).message).toMatch(/member disk\.raw/);
    expect(await fsp.readdir(path.join(storeC, 'bases'))).toEqual([]);
    expect(await fsp.readdir(path.join(storeC, 'tmp'))).toEqual([]);
  });
});
