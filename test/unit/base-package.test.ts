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
});

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
function withManifest(edit: (m: Record<string, unknown>) => void): Buffer {
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
    await removeBase(storeB, manifest.baseId);
    expect(await listBases(storeB)).toEqual([]);
    expect(await leftovers(storeB)).toEqual([]);
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

describe('damaged packages', () => {
  /** Offsets in every part: header, manifest, each member header and payload (start/middle/end), trailer. */
  function interestingOffsets(): number[] {
    const len = pkgBytes.readUInt32BE(12);
    const offs = [0, 7, 8, 11, 12, 15, 16, 47, 48, 48 + Math.floor(len / 2), 48 + len - 1];
    let pos = 48 + len;
    for (const m of manifest.members) {
      const headerLen = 4 + 2 + Buffer.byteLength(m.name) + 8;
      offs.push(pos, pos + 5, pos + headerLen - 1);
      pos += headerLen;
      offs.push(pos, pos + Math.floor(m.size / 2), pos + m.size - 1);
      pos += m.size;
    }
    offs.push(pos, pos + 7);
    expect(pos + 8).toBe(pkgBytes.length);
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
      });
      const { err, store } = await importBytes(bad, 'escape');
      expect((err as CloudletError).code).toBe('BAD_INPUT');
      expect((err as Error).message).toMatch(/escape/);
      expect(await leftovers(store)).toEqual([]);
    }
    await expect(fsp.stat(path.join(dir, 'evil'))).rejects.toThrow();
  });

  test('unknown container or manifest versions are UNSUPPORTED_VERSION', async () => {
    const v2 = Buffer.from(pkgBytes);
    v2.writeUInt32BE(2, 8);
    expect(((await importBytes(v2, 'v2')).err as CloudletError).code).toBe('UNSUPPORTED_VERSION');
    const m2 = withManifest((m) => {
      m.formatVersion = 2;
    });
    expect(((await importBytes(m2, 'm2')).err as CloudletError).code).toBe('UNSUPPORTED_VERSION');
  });

  test('a manifest whose base id does not match its digests is CORRUPT', async () => {
    const bad = withManifest((m) => {
      m.baseId = 'e'.repeat(64);
    });
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
    const len = pkgBytes.readUInt32BE(12);
    let pos = 48 + len;
    const parts: Buffer[] = [];
    for (const m of manifest.members) {
      const headerLen = 4 + 2 + Buffer.byteLength(m.name) + 8;
      const header = Buffer.from(pkgBytes.subarray(pos, pos + headerLen));
      const payload = pkgBytes.subarray(pos + headerLen, pos + headerLen + m.size);
      if (m.name === 'disk.idx') {
        header.writeBigUInt64BE(BigInt(idx.length), headerLen - 8);
        parts.push(header, idx);
      } else parts.push(header, payload);
      pos += headerLen + m.size;
    }
    const body = Buffer.concat([...parts, pkgBytes.subarray(pos)]);
    const edited = withManifest((m) => {
      const member = (m.members as Array<{ name: string; size: number; sha256: string }>)[2]!;
      member.size = idx.length;
      member.sha256 = sha(idx);
    });
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
