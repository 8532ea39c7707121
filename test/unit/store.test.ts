import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CloudletError } from '../../src/core/errors';
import { Store, withStore } from '../../src/core/store';
import { copyFileAtomic, resolveInside, sha256File, writeFileAtomic } from '../../src/core/store/files';

let dir: string;
beforeEach(async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'cloudlet-store-'));
});
afterEach(async () => {
  await fsp.rm(dir, { recursive: true, force: true });
});

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

function expectCode(e: unknown, code: string): void {
  expect(e).toBeInstanceOf(CloudletError);
  expect((e as CloudletError).code).toBe(code);
}

describe('store files', () => {
  test('sha256File streams a file larger than one read block', async () => {
    const data = Buffer.alloc(9 * 1024 * 1024 + 123, 7);
    data.write('differs', 5 * 1024 * 1024);
    const f = path.join(dir, 'big');
    await fsp.writeFile(f, data);
    const seen: number[] = [];
    const r = await sha256File(f, (d) => seen.push(d));
    expect(r).toEqual({ sha256: sha(data), size: data.length });
    expect(seen[seen.length - 1]).toBe(data.length);
    expect(seen.length).toBeGreaterThan(1);
  });

  test('writeFileAtomic replaces a file and leaves no temp file', async () => {
    const f = path.join(dir, 'x.json');
    await writeFileAtomic(f, 'one');
    await writeFileAtomic(f, 'two');
    expect(await fsp.readFile(f, 'utf8')).toBe('two');
    expect(await fsp.readdir(dir)).toEqual(['x.json']);
  });

  test('copyFileAtomic with a wrong expected digest keeps nothing', async () => {
    const src = path.join(dir, 'src');
    await fsp.writeFile(src, 'payload');
    const err = await copyFileAtomic(src, path.join(dir, 'dst'), { expectSha256: 'a'.repeat(64) }).catch((e: unknown) => e);
    expectCode(err, 'DIGEST_MISMATCH');
    expect(await fsp.readdir(dir)).toEqual(['src']);
  });

  test('resolveInside refuses paths that escape the root', () => {
    expect(resolveInside(dir, 'bases/abc')).toBe(path.join(dir, 'bases', 'abc'));
    for (const bad of ['../x', 'a/../../x', '/etc/passwd', '', '.', 'a\0b']) {
      let err: unknown;
      try {
        resolveInside(dir, bad);
      } catch (e) {
        err = e;
      }
      expectCode(err, 'BAD_INPUT');
    }
  });
});

describe('Store', () => {
  test('creates its layout and validates ids', async () => {
    await withStore(dir, async (store) => {
      for (const d of ['bases', 'overlays', 'tmp']) expect((await fsp.stat(path.join(dir, d))).isDirectory()).toBe(true);
      expect(store.baseDir('a'.repeat(64))).toBe(path.join(dir, 'bases', 'a'.repeat(64)));
      expect(() => store.baseDir('../../etc')).toThrow(CloudletError);
      expect(() => store.overlayPath('ABC')).toThrow(CloudletError);
    });
    await expect(fsp.stat(path.join(dir, 'catalog.db'))).resolves.toBeDefined();
  });

  test('overlays are content-addressed, idempotent and persist in the catalog', async () => {
    const data = Buffer.from('an overlay, really');
    const src = path.join(dir, 'o.overlay');
    await fsp.writeFile(src, data);
    const root = path.join(dir, 'store');
    await withStore(root, async (store) => {
      const a = await store.addOverlay(src, { baseId: 'b'.repeat(64), meta: { hello: 1 } });
      const b = await store.addOverlay(src, { baseId: 'b'.repeat(64), meta: { hello: 1 } });
      expect(a.digest).toBe(sha(data));
      expect(b.addedAt).toBe(a.addedAt);
      expect(await fsp.readFile(store.overlayPath(a.digest))).toEqual(data);
    });
    // A fresh process sees the same catalog.
    await withStore(root, async (store) => {
      const list = store.catalog.listOverlays();
      expect(list.map((o) => [o.digest, o.size, o.baseId, o.meta])).toEqual([[sha(data), data.length, 'b'.repeat(64), { hello: 1 }]]);
      await store.removeOverlay(sha(data));
      expect(store.catalog.listOverlays()).toEqual([]);
      await expect(fsp.stat(store.overlayPath(sha(data)))).rejects.toThrow();
      const err = await store.removeOverlay(sha(data)).catch((e: unknown) => e);
      expectCode(err, 'NOT_FOUND');
    });
  });

  test('addOverlay with move renames the file in', async () => {
    await withStore(dir, async (store) => {
      const tmp = await store.makeTempDir('t');
      const f = path.join(tmp, 'x');
      await fsp.writeFile(f, 'moved');
      const rec = await store.addOverlay(f, { move: true });
      await expect(fsp.stat(f)).rejects.toThrow();
      expect(await fsp.readFile(store.overlayPath(rec.digest), 'utf8')).toBe('moved');
    });
  });

  test('commitBaseDir is atomic and idempotent; removeBase removes files and record', async () => {
    const id = 'c'.repeat(64);
    await withStore(dir, async (store) => {
      const t1 = await store.makeTempDir('a');
      await fsp.writeFile(path.join(t1, 'manifest.json'), '{}');
      expect(await store.commitBaseDir(t1, id)).toBe(true);
      const t2 = await store.makeTempDir('b');
      await fsp.writeFile(path.join(t2, 'manifest.json'), '{"second":true}');
      expect(await store.commitBaseDir(t2, id)).toBe(false);
      expect(await fsp.readFile(path.join(store.baseDir(id), 'manifest.json'), 'utf8')).toBe('{}');
      expect(await fsp.readdir(path.join(dir, 'tmp'))).toEqual([]);
      store.catalog.putBase({ id, addedAt: 'now', diskSize: 1, memorySize: 2, manifest: {} });
      await store.removeBase(id);
      expect(store.catalog.getBase(id)).toBeUndefined();
      expect(await store.hasBaseDir(id)).toBe(false);
      expectCode(await store.removeBase(id).catch((e: unknown) => e), 'NOT_FOUND');
    });
  });

  test('resolveBaseId accepts a full id or a unique prefix of at least 6 digits', async () => {
    await withStore(dir, async (store) => {
      const a = 'abcdef01'.repeat(8);
      const b = 'abcdef02'.repeat(8);
      store.catalog.putBase({ id: a, addedAt: 't', diskSize: 1, memorySize: 1, manifest: {} });
      await fsp.mkdir(store.baseDir(b));
      expect(await store.resolveBaseId(a)).toBe(a);
      expect(await store.resolveBaseId('abcdef01a')).toBe(a);
      expect(await store.resolveBaseId('abcdef02')).toBe(b);
      expectCode(await store.resolveBaseId('abcdef').catch((e: unknown) => e), 'BAD_INPUT');
      expectCode(await store.resolveBaseId('abcd').catch((e: unknown) => e), 'BAD_INPUT');
      expectCode(await store.resolveBaseId('../abcdef').catch((e: unknown) => e), 'BAD_INPUT');
      expectCode(await store.resolveBaseId('0123456').catch((e: unknown) => e), 'NOT_FOUND');
    });
  });

  test('stale temp entries of dead processes are removed at once, unowned ones after a minute, live ones kept', async () => {
    await withStore(dir, async (store) => {
      const live = await store.makeTempDir('import-abc');
      const dead = path.join(dir, 'tmp', `import-abc-99999999-${'0'.repeat(12)}`);
      const grave = path.join(dir, 'tmp', `removed-${'a'.repeat(64)}-0000`);
      await fsp.mkdir(dead);
      await fsp.mkdir(grave);
      // A dead process's at once; one of no known process once it is a minute old.
      expect(await store.removeStaleTemp()).toEqual([path.basename(dead)]);
      const later = Date.now() + 120_000;
      expect(await store.removeStaleTemp(later)).toEqual([path.basename(grave)]);
      expect(await fsp.readdir(path.join(dir, 'tmp'))).toEqual([path.basename(live)]);
      expect(await store.removeStaleTemp(Date.now() + 25 * 3600_000)).toEqual([path.basename(live)]);
    });
  });

  test('an unwritable store root is a BAD_INPUT', async () => {
    const file = path.join(dir, 'file');
    await fsp.writeFile(file, 'x');
    expectCode(await Store.open(path.join(file, 'store')).catch((e: unknown) => e), 'BAD_INPUT');
  });
});
