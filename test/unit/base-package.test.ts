/**
 * Base packages on small generated files: round trip, idempotence, and every kind of damage
 * (flipped bytes in each part, truncation at many offsets, trailing bytes, path escape, unknown
 * versions, an index that does not match its data) ends in a typed error with nothing left in the
 * store.
 *
 * The memory snapshot codec is replaced by a fake (opaque mode: the memory image is the save file)
 * so these tests exercise the package format alone; test/integration/base.test.ts uses the real
 * codec on real libvirt save files.
 */
import { createHash, randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import type * as NodeCrypto from 'node:crypto';
import type * as NodeFs from 'node:fs';
import type * as Errors from '../../src/core/errors';

jest.mock('../../src/core/snapshot', () => {
  const { promises: fs } = jest.requireActual<typeof NodeFs>('node:fs');
  const { createHash: hash } = jest.requireActual<typeof NodeCrypto>('node:crypto');
  return {
    splitSnapshot: async (savePath: string, memImagePath: string) => {
      const data = await fs.readFile(savePath);
      if (data.subarray(0, 7).toString() === 'NOTSAVE') {
        const { CloudletError: Err } = jest.requireActual<typeof Errors>('../../src/core/errors');
        throw new Err('CORRUPT', `save file ${savePath} is not a libvirt save file`, { fix: 'pass a file written by virsh save' });
      }
      await fs.writeFile(memImagePath, data);
      return {
        mode: 'opaque',
        skeleton: Buffer.from('fake skeleton'),
        domainXml: '<domain type="qemu"><name>bp-test</name></domain>',
        cpuModel: 'qemu64',
        blocks: [],
        memImageSize: data.length,
        saveFileSize: data.length,
        saveFileSha256: hash('sha256').update(data).digest('hex'),
      };
    },
  };
});

import { buildChunkIndex } from '../../src/core/chunk';
import type { BaseManifest } from '../../src/core/base';
import { computeBaseId, createBase, exportBase, importBase, listBases, openBase, openBaseFiles, readPackageManifest, removeBase, verifyBase } from '../../src/core/base';
import { canonicalJson } from '../../src/core/base/manifest';
import { CloudletError } from '../../src/core/errors';

let dir: string;
let storeA: string;
let pkg: string;
let manifest: BaseManifest;
let pkgBytes: Buffer;
/** The same base as a version 1 package (every byte of every member). */
let pkgV1: string;
let pkgV1Bytes: Buffer;

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

async function makeInputs(d: string): Promise<{ disk: string; save: string }> {
  // Disk: random chunks, zero chunks, a repeated chunk and a partial last chunk.
  const chunk = randomBytes(4096);
  const disk = Buffer.concat([randomBytes(4096 * 5), Buffer.alloc(4096 * 3), chunk, chunk, randomBytes(1000)]);
  const save = Buffer.concat([Buffer.from('LibvirtQemudSave'), randomBytes(3 * 4096 + 17)]);
  await fsp.writeFile(path.join(d, 'disk.raw'), disk);
  await fsp.writeFile(path.join(d, 'memory.sav'), save);
  return { disk: path.join(d, 'disk.raw'), save: path.join(d, 'memory.sav') };
}

/** Bases and temp entries left in a store (must be none after a failed import). */
async function leftovers(root: string): Promise<string[]> {
  const out: string[] = [];
  for (const sub of ['bases', 'tmp']) {
    const entries = await fsp.readdir(path.join(root, sub)).catch(() => [] as string[]);
    out.push(...entries.map((e) => `${sub}/${e}`));
  }
  return out;
}

beforeAll(async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'cloudlet-base-'));
  storeA = path.join(dir, 'storeA');
  const { disk, save } = await makeInputs(dir);
  manifest = await createBase({ diskPath: disk, savePath: save, storeRoot: storeA });
  pkg = path.join(dir, 'base.cbp');
  await exportBase(storeA, manifest.baseId, pkg);
  pkgBytes = await fsp.readFile(pkg);
  pkgV1 = path.join(dir, 'base-v1.cbp');
  await exportBase(storeA, manifest.baseId, pkgV1, { formatVersion: 1 });
  pkgV1Bytes = await fsp.readFile(pkgV1);
});

/** Where the parts of a package are (parsed independently of the implementation). */
interface Place {
  name: string;
  headerPos: number;
  headerLen: number;
  layout: number;
  /** Sparse: position of the u64 extent count and u64 data length. */
  countsPos: number;
  dataPos: number;
  dataLength: number;
  tablePos: number;
  extentCount: number;
  end: number;
}
function parsePackage(bytes: Buffer): { version: number; places: Place[]; trailerPos: number } {
  const version = bytes.readUInt32BE(8);
  const len = bytes.readUInt32BE(12);
  const m = JSON.parse(bytes.subarray(48, 48 + len).toString('utf8')) as BaseManifest;
  let pos = 48 + len;
  const places: Place[] = [];
  for (const member of m.members) {
    const headerPos = pos;
    const headerLen = 4 + 2 + Buffer.byteLength(member.name) + 8 + (version >= 2 ? 1 : 0);
    pos += headerLen;
    const layout = version >= 2 ? (bytes[pos - 1] as number) : 0;
    if (layout === 0) {
      places.push({ name: member.name, headerPos, headerLen, layout, countsPos: -1, dataPos: pos, dataLength: member.size, tablePos: -1, extentCount: 0, end: pos + member.size });
      pos += member.size;
    } else {
      const extentCount = Number(bytes.readBigUInt64BE(pos));
      const dataLength = Number(bytes.readBigUInt64BE(pos + 8));
      const dataPos = pos + 16;
      const end = dataPos + dataLength + 16 * extentCount;
      places.push({ name: member.name, headerPos, headerLen, layout, countsPos: pos, dataPos, dataLength, tablePos: dataPos + dataLength, extentCount, end });
      pos = end;
    }
  }
  return { version, places, trailerPos: pos };
}


afterAll(async () => {
  await fsp.rm(dir, { recursive: true, force: true });
});

async function importBytes(bytes: Buffer, name: string): Promise<{ err: unknown; store: string }> {
  const file = path.join(dir, `${name}.cbp`);
  const store = path.join(dir, `store-${name}`);
  await fsp.writeFile(file, bytes);
  const err = await importBase(store, file).then(
    () => undefined,
    (e: unknown) => e,
  );
  await fsp.rm(file);
  return { err, store };
}

/** Rebuild a package with an edited manifest (and a correct manifest checksum). */
function withManifest(edit: (m: Record<string, unknown>) => void, pkgBytes: Buffer): Buffer {
  const len = pkgBytes.readUInt32BE(12);
  const m = JSON.parse(pkgBytes.subarray(48, 48 + len).toString('utf8')) as Record<string, unknown>;
  edit(m);
  const bytes = Buffer.from(canonicalJson(m), 'utf8');
  const header = Buffer.from(pkgBytes.subarray(0, 48));
  header.writeUInt32BE(bytes.length, 12);
  createHash('sha256').update(bytes).digest().copy(header, 16);
  return Buffer.concat([header, bytes, pkgBytes.subarray(48 + len)]);
}

describe('createBase', () => {
  test('stores the files, indexes and a manifest whose id is defined by the content digests', async () => {
    const disk = await fsp.readFile(path.join(dir, 'disk.raw'));
    const save = await fsp.readFile(path.join(dir, 'memory.sav'));
    expect(manifest.baseId).toBe(computeBaseId({ size: disk.length, sha256: sha(disk) }, { size: save.length, sha256: sha(save) }));
    expect(manifest.disk).toEqual({ size: disk.length, sha256: sha(disk), chunkCount: Math.ceil(disk.length / 4096) });
    expect(manifest.memory.saveFileSha256).toBe(sha(save));
    expect(manifest.cpuModel).toBe('qemu64');
    const base = await openBase(storeA, manifest.baseId);
    expect(await fsp.readFile(base.diskPath)).toEqual(disk);
    expect(base.diskIndex.chunkCount).toBe(manifest.disk.chunkCount);
    const fresh = await buildChunkIndex(base.diskPath);
    for (let i = 0; i < fresh.chunkCount; i++) expect(base.diskIndex.equalAt(i, fresh.digestAt(i))).toBe(true);
    // The repeated chunk is found at its first position; zero chunks dedup to the first zero chunk.
    expect(base.diskIndex.findByDigest(base.diskIndex.digestAt(9))).toBe(8);
    expect(base.diskIndex.findByDigest(base.diskIndex.digestAt(7))).toBe(5);
    expect((await listBases(storeA)).map((b) => b.baseId)).toEqual([manifest.baseId]);
  });

  test('creating the same base again returns the same id and keeps one entry', async () => {
    const again = await createBase({ diskPath: path.join(dir, 'disk.raw'), savePath: path.join(dir, 'memory.sav'), storeRoot: storeA });
    expect(again).toEqual(manifest);
    expect(await listBases(storeA)).toHaveLength(1);
    expect(await leftovers(storeA)).toEqual([`bases/${manifest.baseId}`]);
  });

  test('a bad save file is reported under the name the user gave, and nothing is left in the store', async () => {
    const bad = path.join(dir, 'not-a-save.sav');
    await fsp.writeFile(bad, 'NOTSAVE and more');
    const store = path.join(dir, 'storeBadSave');
    const err = await createBase({ diskPath: path.join(dir, 'disk.raw'), savePath: bad, storeRoot: store }).catch((e: unknown) => e);
    expect((err as CloudletError).code).toBe('CORRUPT');
    expect((err as Error).message).toBe(`save file ${bad} is not a libvirt save file. Fix: pass a file written by virsh save`);
    expect(await leftovers(store)).toEqual([]);
  });

  test('a qcow2 disk is refused with a hint to convert it', async () => {
    const q = path.join(dir, 'q.qcow2');
    await fsp.writeFile(q, Buffer.concat([Buffer.from([0x51, 0x46, 0x49, 0xfb]), Buffer.alloc(1000)]));
    const err = await createBase({ diskPath: q, savePath: path.join(dir, 'memory.sav'), storeRoot: storeA }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CloudletError);
    expect((err as CloudletError).code).toBe('BAD_INPUT');
    expect((err as Error).message).toMatch(/qemu-img convert/);
  });
});

describe('package round trip', () => {
  test('import into a second store gives identical files and digests; re-import is idempotent', async () => {
    const storeB = path.join(dir, 'storeB');
    const r = await importBase(storeB, pkg);
    expect(r.alreadyPresent).toBe(false);
    expect(r.manifest).toEqual(manifest);
    expect(await readPackageManifest(pkg)).toEqual(manifest);
    const a = await openBase(storeA, manifest.baseId);
    const b = await openBase(storeB, manifest.baseId);
    for (const f of ['disk.raw', 'memory.sav', 'memory.img', 'memory.skeleton', 'disk.idx', 'memory.idx', 'manifest.json']) {
      expect(sha(await fsp.readFile(path.join(b.dir, f)))).toBe(sha(await fsp.readFile(path.join(a.dir, f))));
    }
    const again = await importBase(storeB, pkg);
    expect(again.alreadyPresent).toBe(true);
    expect(again.manifest).toEqual(manifest);
    expect(await leftovers(storeB)).toEqual([`bases/${manifest.baseId}`]);
    // Exporting the imported base reproduces the package byte for byte.
    const pkg2 = path.join(dir, 'again.cbp');
    await exportBase(storeB, manifest.baseId, pkg2);
    expect(sha(await fsp.readFile(pkg2))).toBe(sha(pkgBytes));
    await exportBase(storeB, manifest.baseId, pkg2 + '1', { formatVersion: 1 });
    expect(sha(await fsp.readFile(pkg2 + '1'))).toBe(sha(pkgV1Bytes));
    await removeBase(storeB, manifest.baseId);
    expect(await listBases(storeB)).toEqual([]);
    expect(await leftovers(storeB)).toEqual([]);
  });

  test('version 2 is written by default, stores the data members sparse, and holds what version 1 holds', async () => {
    const v2 = parsePackage(pkgBytes);
    const v1 = parsePackage(pkgV1Bytes);
    expect(v2.version).toBe(2);
    expect(v1.version).toBe(1);
    expect(v2.places.map((p) => [p.name, p.layout])).toEqual([
      ['disk.raw', 1],
      ['memory.sav', 1],
      ['disk.idx', 0],
      ['memory.idx', 0],
    ]);
    // The disk's three zero chunks (5..7) are not stored: two extents around them.
    const disk = v2.places[0]!;
    expect(disk.extentCount).toBe(2);
    expect(disk.dataLength).toBe(manifest.disk.size - 3 * 4096);
    expect([0, 1].map((k) => [Number(pkgBytes.readBigUInt64BE(disk.tablePos + 16 * k)), Number(pkgBytes.readBigUInt64BE(disk.tablePos + 16 * k + 8))])).toEqual([
      [0, 5 * 4096],
      [8 * 4096, manifest.disk.size - 8 * 4096],
    ]);
    expect(pkgBytes.length).toBeLessThan(pkgV1Bytes.length - 3 * 4096 + 100);
    // The manifest (and so the base id and digests) is the same in both versions.
    expect(await readPackageManifest(pkgV1)).toEqual(manifest);
    const store1 = path.join(dir, 'storeV1');
    const store2 = path.join(dir, 'storeV2');
    expect((await importBase(store1, pkgV1)).manifest).toEqual(manifest);
    expect((await importBase(store2, pkg)).manifest).toEqual(manifest);
    for (const f of ['disk.raw', 'memory.sav', 'memory.img', 'disk.idx', 'memory.idx', 'manifest.json']) {
      const a = sha(await fsp.readFile(path.join(storeA, 'bases', manifest.baseId, f)));
      expect(sha(await fsp.readFile(path.join(store1, 'bases', manifest.baseId, f)))).toBe(a);
      expect(sha(await fsp.readFile(path.join(store2, 'bases', manifest.baseId, f)))).toBe(a);
    }
    const err = await exportBase(storeA, manifest.baseId, path.join(dir, 'v3.cbp'), { formatVersion: 3 as 2 }).catch((e: unknown) => e);
    expect((err as CloudletError).code).toBe('BAD_INPUT');
  });

  test('verifyBase finds damaged stored files', async () => {
    const storeV = path.join(dir, 'storeV');
    await importBase(storeV, pkg);
    expect(await verifyBase(storeV, manifest.baseId)).toEqual({ baseId: manifest.baseId, ok: true, problems: [] });
    const b = path.join(storeV, 'bases', manifest.baseId);
    for (const f of ['memory.img', 'disk.idx']) {
      const bytes = await fsp.readFile(path.join(b, f));
      bytes[bytes.length - 5] = (bytes[bytes.length - 5] ?? 0) ^ 1;
      await fsp.writeFile(path.join(b, f), bytes);
    }
    const report = await verifyBase(storeV, manifest.baseId.slice(0, 10));
    expect(report.ok).toBe(false);
    expect(report.problems).toHaveLength(2);
    expect(report.problems[0]).toMatch(/^disk\.idx: /);
    expect(report.problems[1]).toBe('memory.img: 1 chunks differ from memory.idx');
  });

  test('openBaseFiles gives the paths and sizes that openBase gives, and refuses a missing or resized file', async () => {
    const storeF = path.join(dir, 'storeF');
    await importBase(storeF, pkg);
    const full = await openBase(storeF, manifest.baseId);
    expect(await openBaseFiles(storeF, manifest.baseId)).toEqual({
      id: manifest.baseId,
      diskPath: full.diskPath,
      diskSize: full.diskIndex.byteLength,
      memImagePath: full.memImagePath,
      memImageSize: full.memIndex.byteLength,
    });
    const unknown = await openBaseFiles(storeF, 'f'.repeat(64)).catch((e: unknown) => e);
    expect((unknown as CloudletError).code).toBe('NOT_FOUND');
    await fsp.truncate(full.diskPath, 4096);
    const resized = await openBaseFiles(storeF, manifest.baseId).catch((e: unknown) => e);
    expect((resized as CloudletError).code).toBe('CORRUPT');
    expect((resized as CloudletError).message).toMatch(/disk\.raw .* has 4096 bytes; its manifest says \d+/);
    await fsp.rm(full.memImagePath);
    await fsp.writeFile(full.diskPath, Buffer.alloc(full.diskIndex.byteLength));
    const lost = await openBaseFiles(storeF, manifest.baseId).catch((e: unknown) => e);
    expect((lost as CloudletError).code).toBe('CORRUPT');
    expect((lost as CloudletError).message).toMatch(/has lost memory\.img/);
  });

  test('export of an unknown base is NOT_FOUND and writes nothing', async () => {
    const out = path.join(dir, 'none.cbp');
    const err = await exportBase(storeA, 'f'.repeat(64), out).catch((e: unknown) => e);
    expect((err as CloudletError).code).toBe('NOT_FOUND');
    await expect(fsp.stat(out)).rejects.toThrow();
  });

  test('export notices a stored file that changed and leaves no package behind', async () => {
    const storeC = path.join(dir, 'storeC');
    await importBase(storeC, pkg);
    const disk = path.join(storeC, 'bases', manifest.baseId, 'disk.raw');
    const bytes = await fsp.readFile(disk);
    bytes[100] = (bytes[100] ?? 0) ^ 0xff;
    await fsp.writeFile(disk, bytes);
    const out = path.join(dir, 'bad-export.cbp');
    const err = await exportBase(storeC, manifest.baseId, out).catch((e: unknown) => e);
    expect((err as CloudletError).code).toBe('CORRUPT');
    await expect(fsp.stat(out)).rejects.toThrow();
    expect((await fsp.readdir(dir)).filter((f) => f.includes('bad-export'))).toEqual([]);
  });
});

describe('import from a URL', () => {
  test('downloads into the store, imports, and cleans up; a 404 is NOT_FOUND', async () => {
    const server = http.createServer((req, res) => {
      if (req.url === '/base.cbp') {
        res.writeHead(200, { 'content-length': String(pkgBytes.length) });
        res.end(pkgBytes);
      } else {
        res.writeHead(404);
        res.end();
      }
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    const port = (server.address() as { port: number }).port;
    try {
      const store = path.join(dir, 'storeUrl');
      const stages = new Set<string>();
      const r = await importBase(store, `http://127.0.0.1:${port}/base.cbp`, { onProgress: (_d, _t, stage) => stages.add(stage ?? '') });
      expect(r).toEqual({ manifest, alreadyPresent: false });
      expect(stages.has('download')).toBe(true);
      expect(await leftovers(store)).toEqual([`bases/${manifest.baseId}`]);
      const err = await importBase(store, `http://127.0.0.1:${port}/missing.cbp`).catch((e: unknown) => e);
      expect((err as CloudletError).code).toBe('NOT_FOUND');
      expect(await leftovers(store)).toEqual([`bases/${manifest.baseId}`]);
    } finally {
      server.close();
    }
  });
});

describe.each([
  ['version 2', (): Buffer => pkgBytes],
  ['version 1', (): Buffer => pkgV1Bytes],
])('damaged packages (%s)', (_label, bytesOf) => {
  let pkgBytes: Buffer;
  beforeAll(() => {
    pkgBytes = bytesOf();
  });

  /** Offsets in every part: header, manifest, each member header and payload (start/middle/end), trailer. */
  function interestingOffsets(): number[] {
    const len = pkgBytes.readUInt32BE(12);
    const offs = [0, 7, 8, 11, 12, 15, 16, 47, 48, 48 + Math.floor(len / 2), 48 + len - 1];
    const { places, trailerPos } = parsePackage(pkgBytes);
    for (const p of places) {
      offs.push(p.headerPos, p.headerPos + 5, p.headerPos + p.headerLen - 1);
      if (p.countsPos >= 0) offs.push(p.countsPos + 7, p.countsPos + 15);
      if (p.dataLength > 0) offs.push(p.dataPos, p.dataPos + Math.floor(p.dataLength / 2), p.dataPos + p.dataLength - 1);
      for (let k = 0; k < p.extentCount; k++) offs.push(p.tablePos + 16 * k + 7, p.tablePos + 16 * k + 15);
    }
    offs.push(trailerPos, trailerPos + 7);
    expect(trailerPos + 8).toBe(pkgBytes.length);
    return offs;
  }

  test('a flipped byte anywhere is a typed error and leaves the store empty', async () => {
    const offsets = interestingOffsets();
    for (const [i, off] of offsets.entries()) {
      const bad = Buffer.from(pkgBytes);
      bad[off] = (bad[off] ?? 0) ^ 0x5a;
      const { err, store } = await importBytes(bad, `flip${i}`);
      expect(err).toBeInstanceOf(CloudletError);
      expect(['CORRUPT', 'DIGEST_MISMATCH', 'BAD_INPUT', 'UNSUPPORTED_VERSION']).toContain((err as CloudletError).code);
      expect(await leftovers(store)).toEqual([]);
    }
  });

  test('truncation at many offsets is CORRUPT (or not a package at all) and leaves the store empty', async () => {
    const cuts = new Set<number>([1, 8, 16, 47, 48, 100, pkgBytes.length - 1, pkgBytes.length - 8]);
    for (let k = 1; k < 24; k++) cuts.add(Math.floor((pkgBytes.length * k) / 24));
    for (const cut of cuts) {
      const { err, store } = await importBytes(pkgBytes.subarray(0, cut), `cut${cut}`);
      expect(err).toBeInstanceOf(CloudletError);
      expect((err as CloudletError).code).toBe(cut < 8 ? 'BAD_INPUT' : 'CORRUPT');
      if (cut >= 48 + pkgBytes.readUInt32BE(12)) expect((err as Error).message).toMatch(/truncated/);
      expect(await leftovers(store)).toEqual([]);
    }
  });

  test('fuzz: 60 random single-byte corruptions (seeded) all end in typed errors', async () => {
    let seed = 0x2545f491;
    const next = (): number => {
      seed ^= seed << 13;
      seed ^= seed >>> 17;
      seed ^= seed << 5;
      return (seed >>> 0) / 0x100000000;
    };
    const codes = new Map<string, number>();
    for (let i = 0; i < 60; i++) {
      const bad = Buffer.from(pkgBytes);
      const off = Math.floor(next() * bad.length);
      bad[off] = (bad[off] ?? 0) ^ (1 + Math.floor(next() * 255));
      const { err, store } = await importBytes(bad, `fuzz${i}`);
      expect(err).toBeInstanceOf(CloudletError);
      const code = (err as CloudletError).code;
      codes.set(code, (codes.get(code) ?? 0) + 1);
      expect(await leftovers(store)).toEqual([]);
      await fsp.rm(store, { recursive: true, force: true });
    }
    // Most of the package is payload: most corruptions are caught by a member digest.
    expect(codes.get('DIGEST_MISMATCH') ?? 0).toBeGreaterThan(30);
  });

  test('trailing bytes are CORRUPT', async () => {
    const { err } = await importBytes(Buffer.concat([pkgBytes, Buffer.from('x')]), 'trailing');
    expect((err as CloudletError).code).toBe('CORRUPT');
  });

  test('a member name that escapes the store is BAD_INPUT', async () => {
    for (const name of ['../../evil', '/etc/passwd', '..']) {
      const bad = withManifest((m) => {
        (m.members as Array<{ name: string }>)[0]!.name = name;
      }, pkgBytes);
      const { err, store } = await importBytes(bad, 'escape');
      expect((err as CloudletError).code).toBe('BAD_INPUT');
      expect((err as Error).message).toMatch(/escape/);
      expect(await leftovers(store)).toEqual([]);
    }
    await expect(fsp.stat(path.join(dir, 'evil'))).rejects.toThrow();
  });

  test('unknown container or manifest versions are UNSUPPORTED_VERSION', async () => {
    for (const v of [0, 3, 0xffffffff]) {
      const bad = Buffer.from(pkgBytes);
      bad.writeUInt32BE(v, 8);
      const { err } = await importBytes(bad, `v${v}`);
      expect((err as CloudletError).code).toBe('UNSUPPORTED_VERSION');
      expect((err as Error).message).toMatch(/reads versions 1 and 2/);
    }
    const m2 = withManifest((m) => {
      m.formatVersion = 2;
    }, pkgBytes);
    expect(((await importBytes(m2, 'm2')).err as CloudletError).code).toBe('UNSUPPORTED_VERSION');
  });

  test('a manifest whose base id does not match its digests is CORRUPT', async () => {
    const bad = withManifest((m) => {
      m.baseId = 'e'.repeat(64);
    }, pkgBytes);
    const { err } = await importBytes(bad, 'wrongid');
    expect((err as CloudletError).code).toBe('CORRUPT');
    expect((err as Error).message).toMatch(/base id/);
  });

  test('a consistent package whose disk index does not describe the disk is CORRUPT', async () => {
    // Swap disk.idx for the index of other data, fixing up its size and digest in the manifest.
    const other = path.join(dir, 'other.raw');
    await fsp.writeFile(other, randomBytes(manifest.disk.size));
    const { writeChunkIndex } = await import('../../src/core/chunk');
    const idxFile = path.join(dir, 'other.idx');
    await writeChunkIndex(await buildChunkIndex(other), idxFile);
    const idx = await fsp.readFile(idxFile);
    const { places, trailerPos } = parsePackage(pkgBytes);
    const len = pkgBytes.readUInt32BE(12);
    const parts: Buffer[] = [];
    for (const p of places) {
      const header = Buffer.from(pkgBytes.subarray(p.headerPos, p.headerPos + p.headerLen));
      if (p.name === 'disk.idx') {
        header.writeBigUInt64BE(BigInt(idx.length), 4 + 2 + Buffer.byteLength(p.name));
        parts.push(header, idx);
      } else parts.push(pkgBytes.subarray(p.headerPos, p.end));
    }
    const body = Buffer.concat([...parts, pkgBytes.subarray(trailerPos)]);
    expect(len).toBeGreaterThan(0);
    const edited = withManifest((m) => {
      const member = (m.members as Array<{ name: string; size: number; sha256: string }>)[2]!;
      member.size = idx.length;
      member.sha256 = sha(idx);
    }, pkgBytes);
    const newLen = edited.readUInt32BE(12);
    const { err, store } = await importBytes(Buffer.concat([edited.subarray(0, 48 + newLen), body]), 'badidx');
    expect((err as CloudletError).code).toBe('CORRUPT');
    expect((err as Error).message).toMatch(/disk chunk index/);
    expect(await leftovers(store)).toEqual([]);
  });

  test('a file that is not a package is BAD_INPUT', async () => {
    const { err } = await importBytes(Buffer.from('PK\x03\x04 some zip file'), 'zip');
    expect((err as CloudletError).code).toBe('BAD_INPUT');
  });
});

describe('damaged extent tables (version 2)', () => {
  /**
   * The version 2 package with disk.raw's extents, data length and extent count replaced. Data
   * bytes are the original extents' data, cut or padded to `dataLength`.
   */
  function withDiskExtents(extents: Array<[number, number]>, opts: { dataLength?: number; extentCount?: bigint; data?: Buffer } = {}): Buffer {
    const { places } = parsePackage(pkgBytes);
    const disk = places[0]!;
    const data0 = opts.data ?? pkgBytes.subarray(disk.dataPos, disk.dataPos + disk.dataLength);
    const dataLength = opts.dataLength ?? extents.reduce((s, [, l]) => s + l, 0);
    const data = Buffer.concat([data0, Buffer.alloc(Math.max(0, dataLength - data0.length))]).subarray(0, dataLength);
    const counts = Buffer.alloc(16);
    counts.writeBigUInt64BE(opts.extentCount ?? BigInt(extents.length), 0);
    counts.writeBigUInt64BE(BigInt(dataLength), 8);
    const table = Buffer.alloc(16 * extents.length);
    extents.forEach(([o, l], k) => {
      table.writeBigUInt64BE(BigInt(o), 16 * k);
      table.writeBigUInt64BE(BigInt(l), 16 * k + 8);
    });
    return Buffer.concat([pkgBytes.subarray(0, disk.countsPos), counts, data, table, pkgBytes.subarray(disk.end)]);
  }

  /** Import `bytes` recording every SparseWriter write: none may fall outside its member. */
  async function importWatched(bytes: Buffer, name: string): Promise<{ err: unknown; store: string; maxEnd: number }> {
    const { SparseWriter } = await import('../../src/core/sparse');
    let maxEnd = 0;
    const original = SparseWriter.prototype.write;
    const spy = jest.spyOn(SparseWriter.prototype, 'write').mockImplementation(function (this: InstanceType<typeof SparseWriter>, data: Buffer, position: number) {
      maxEnd = Math.max(maxEnd, position + data.length);
      return original.call(this, data, position);
    });
    try {
      return { ...(await importBytes(bytes, name)), maxEnd };
    } finally {
      spy.mockRestore();
    }
  }

  const size = (): number => manifest.disk.size;
  const C = 4096;

  test('a valid but different extent list (unaligned, adjacent, with explicit zeros) imports the same base', async () => {
    const disk = await fsp.readFile(path.join(dir, 'disk.raw'));
    // Extents of 1000 bytes that cover everything, zeros included: slower, same content.
    const extents: Array<[number, number]> = [];
    for (let o = 0; o < disk.length; o += 1000) extents.push([o, Math.min(1000, disk.length - o)]);
    const bytes = withDiskExtents(extents, { data: disk });
    const { err, store, maxEnd } = await importWatched(bytes, 'unaligned');
    expect(err).toBeUndefined();
    expect(maxEnd).toBeLessThanOrEqual(size());
    expect(sha(await fsp.readFile(path.join(store, 'bases', manifest.baseId, 'disk.raw')))).toBe(manifest.disk.sha256);
  });

  test.each([
    ['out of order', () => [[8 * C, size() - 8 * C], [0, 5 * C]], () => ({}), /extent 1 .* starts before the end of the previous one/],
    ['overlapping', () => [[0, 5 * C], [4 * C, 2 * C]], () => ({}), /extent 1 .* starts before the end of the previous one/],
    ['past the member size', () => [[0, 5 * C], [8 * C, size() - 8 * C + 1]], () => ({}), /extent 1 .* ends past the member's \d+ bytes/],
    ['far past the member size', () => [[0, 5 * C], [2 ** 62, 10]], () => ({}), /ends past the member's/],
    ['empty', () => [[0, 5 * C], [6 * C, 0], [8 * C, size() - 8 * C]], () => ({}), /extent 1 .* is empty/],
    ['holding less than the data length', () => [[0, 5 * C], [8 * C, size() - 8 * C - 10]], () => ({ dataLength: size() - 3 * C }), /its extents hold \d+ bytes, its header says \d+/],
    ['holding more than the data length', () => [[0, 5 * C], [8 * C, size() - 8 * C]], () => ({ dataLength: size() - 3 * C - 10 }), /its extents hold more than the \d+ bytes its header says/],
    ['more extents than data bytes', () => [[0, 5 * C]], () => ({ dataLength: 5 * C, extentCount: BigInt(5 * C + 1) }), /its header says \d+ extents holding \d+ bytes/],
    ['a data length past the member size', () => [[0, size() + 1]], () => ({ dataLength: size() + 1 }), /holding \d+ bytes, for a member of \d+ bytes/],
    ['an extent count of 2^64-1', () => [[0, 5 * C]], () => ({ dataLength: 5 * C, extentCount: 2n ** 64n - 1n }), /its header says 18446744073709551615 extents/],
  ] as Array<[string, () => Array<[number, number]>, () => { dataLength?: number; extentCount?: bigint }, RegExp]>)('extents %s: CORRUPT naming the member, nothing written outside it, nothing in the store', async (label, extents, opts, message) => {
    const { err, store, maxEnd } = await importWatched(withDiskExtents(extents(), opts()), `ext-${label.replace(/\W+/g, '-')}`);
    expect(err).toBeInstanceOf(CloudletError);
    expect((err as CloudletError).code).toBe('CORRUPT');
    expect((err as Error).message).toMatch(/^member disk\.raw of base package .* is damaged: /);
    expect((err as Error).message).toMatch(message);
    expect((err as CloudletError).fix).toMatch(/download the package again/);
    expect(maxEnd).toBeLessThanOrEqual(size());
    expect(await leftovers(store)).toEqual([]);
  });

  test('an unknown member layout is CORRUPT naming the member', async () => {
    const bad = Buffer.from(pkgBytes);
    const disk = parsePackage(pkgBytes).places[0]!;
    bad[disk.headerPos + disk.headerLen - 1] = 2;
    const { err, store } = await importBytes(bad, 'layout2');
    expect((err as CloudletError).code).toBe('CORRUPT');
    expect((err as Error).message).toMatch(/member disk\.raw .* unknown member layout 2/);
    expect(await leftovers(store)).toEqual([]);
  });

  test('an extent moved to another valid place is a DIGEST_MISMATCH of the member', async () => {
    const { err, store } = await importBytes(withDiskExtents([[0, 5 * C], [8 * C + 1, size() - 8 * C - 1]], { dataLength: size() - 3 * C - 1 }), 'moved');
    expect((err as CloudletError).code).toBe('DIGEST_MISMATCH');
    expect((err as Error).message).toMatch(/member disk\.raw/);
    expect(await leftovers(store)).toEqual([]);
  });
});
