/**
 * The host's store: content-addressed files under one root plus a catalog.
 *
 *   <root>/catalog.db                    the catalog (SQLite by default)
 *   <root>/bases/<baseId>/               one directory per base (see BASE_FILES), moved into place
 *                                        whole by a rename, so a base is either complete or absent
 *   <root>/overlays/<sha256>.overlay     overlays, named by the sha256 of their own bytes
 *   <root>/tmp/                          work space of imports in progress (same file system)
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { CloudletError } from '../errors';
import type { OnProgress } from '../progress';
import type { Catalog, OverlayRecord } from './catalog';
import { SqliteCatalog } from './catalog';
import { SHA256_HEX, copyFileAtomic, exists, fsyncDir, resolveInside, sha256File } from './files';
import { processAlive } from '../../common/process';

export type { BaseRecord, Catalog, OverlayRecord } from './catalog';
export { SqliteCatalog } from './catalog';
export { copyFileAtomic, resolveInside, sha256File, writeFileAtomic } from './files';

/** The files of a stored base, by role. */
export const BASE_FILES = {
  disk: 'disk.raw',
  memorySave: 'memory.sav',
  memoryImage: 'memory.img',
  memorySkeleton: 'memory.skeleton',
  diskIndex: 'disk.idx',
  memoryIndex: 'memory.idx',
  manifest: 'manifest.json',
} as const;

export interface StoreOptions {
  /** Catalog factory (default: SQLite in `<root>/catalog.db`). */
  catalog?: (root: string) => Catalog;
}

export class Store {
  private constructor(
    readonly root: string,
    readonly catalog: Catalog,
  ) {}

  /** Open (creating if needed) the store at `root`. Close it when done. */
  static async open(root: string, opts: StoreOptions = {}): Promise<Store> {
    const abs = path.resolve(root);
    try {
      for (const d of ['bases', 'overlays', 'tmp']) await fsp.mkdir(path.join(abs, d), { recursive: true });
    } catch (e) {
      throw new CloudletError('BAD_INPUT', `cannot create the store at ${abs}: ${(e as Error).message}`, {
        fix: 'pass a writable directory with --store or $CLOUDLET_STORE',
        cause: e,
      });
    }
    const catalog = (opts.catalog ?? ((r: string) => new SqliteCatalog(path.join(r, 'catalog.db'))))(abs);
    const store = new Store(abs, catalog);
    await store.removeStaleTemp();
    return store;
  }

  /**
   * Remove what crashed operations left in tmp/: entries of processes that no longer run, entries
   * of no known process older than a minute, and anything older than a day. Best effort; never
   * fails the caller.
   */
  async removeStaleTemp(now = Date.now()): Promise<string[]> {
    const removed: string[] = [];
    const dir = path.join(this.root, 'tmp');
    for (const name of await fsp.readdir(dir).catch(() => [] as string[])) {
      try {
        const age = now - (await fsp.lstat(path.join(dir, name))).mtimeMs;
        const pid = Number(/^[a-z0-9]+(?:-[a-z0-9]+)*?-(\d+)-[0-9a-f]{12}$/.exec(name)?.[1] ?? NaN);
        const owner = Number.isInteger(pid) ? pid : undefined;
        if (age > 24 * 3600_000 || (owner !== undefined && !processAlive(owner)) || (owner === undefined && age > 60_000)) {
          await fsp.rm(path.join(dir, name), { recursive: true, force: true });
          removed.push(name);
        }
      } catch {
        // Another process may be removing it too.
      }
    }
    return removed;
  }

  close(): void {
    this.catalog.close();
  }

  /** Directory of base `id` (validated: 64 hex digits, so it cannot escape the store). */
  baseDir(id: string): string {
    if (!SHA256_HEX.test(id)) {
      throw new CloudletError('BAD_INPUT', `"${id}" is not a base id (64 lower-case hex digits)`, { fix: 'use an id shown by `cloudlet base list`' });
    }
    return resolveInside(this.root, path.join('bases', id));
  }

  baseFile(id: string, role: keyof typeof BASE_FILES): string {
    return path.join(this.baseDir(id), BASE_FILES[role]);
  }

  /**
   * A full base id from a full id or a unique prefix of at least 6 hex digits (as shown by
   * `base list`): NOT_FOUND when no base matches, BAD_INPUT when several do.
   */
  async resolveBaseId(ref: string): Promise<string> {
    if (SHA256_HEX.test(ref)) return ref;
    if (!/^[0-9a-f]{6,63}$/.test(ref)) {
      throw new CloudletError('BAD_INPUT', `"${ref}" is not a base id (64 lower-case hex digits, or a unique prefix of at least 6)`, {
        fix: 'use an id shown by `cloudlet base list`',
      });
    }
    const ids = new Set(this.catalog.listBases().map((b) => b.id));
    for (const d of await fsp.readdir(path.join(this.root, 'bases'))) if (SHA256_HEX.test(d)) ids.add(d);
    const matches = [...ids].filter((id) => id.startsWith(ref));
    if (matches.length === 1) return matches[0] as string;
    if (matches.length === 0) {
      throw new CloudletError('NOT_FOUND', `no base in the store ${this.root} has an id starting with ${ref}`, { fix: 'list the bases with `cloudlet base list`' });
    }
    throw new CloudletError('BAD_INPUT', `${matches.length} bases have ids starting with ${ref}`, { fix: 'give more digits of the id' });
  }

  async hasBaseDir(id: string): Promise<boolean> {
    return exists(path.join(this.baseDir(id), BASE_FILES.manifest));
  }

  overlayPath(digest: string): string {
    if (!SHA256_HEX.test(digest)) {
      throw new CloudletError('BAD_INPUT', `"${digest}" is not an overlay digest (64 lower-case hex digits)`, { fix: 'use a digest shown by `cloudlet overlay list`' });
    }
    return resolveInside(this.root, path.join('overlays', `${digest}.overlay`));
  }

  /** A new private directory under `<root>/tmp`, on the store's file system. */
  async makeTempDir(prefix: string): Promise<string> {
    const dir = path.join(this.root, 'tmp', `${prefix}-${process.pid}-${randomBytes(6).toString('hex')}`);
    await fsp.mkdir(dir);
    return dir;
  }

  /**
   * Move a fully written directory into place as base `id`. Returns false (and removes `tempDir`)
   * when the base is already there: imports are idempotent.
   */
  async commitBaseDir(tempDir: string, id: string): Promise<boolean> {
    const target = this.baseDir(id);
    await fsyncDir(tempDir);
    try {
      await fsp.rename(tempDir, target);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOTEMPTY' || code === 'EEXIST') {
        await fsp.rm(tempDir, { recursive: true, force: true });
        return false;
      }
      throw e;
    }
    await fsyncDir(path.dirname(target));
    return true;
  }

  /** Remove base `id` (its files and its catalog entry). */
  async removeBase(id: string): Promise<void> {
    const dir = this.baseDir(id);
    const known = this.catalog.getBase(id) !== undefined;
    if (!known && !(await exists(dir))) {
      throw new CloudletError('NOT_FOUND', `base ${id} is not in the store ${this.root}`, { fix: 'list the bases with `cloudlet base list`' });
    }
    this.catalog.removeBase(id);
    if (await exists(dir)) {
      // Rename first, so readers never see a half-removed base.
      const grave = path.join(this.root, 'tmp', `removed-${id}-${randomBytes(4).toString('hex')}`);
      await fsp.rename(dir, grave);
      await fsp.rm(grave, { recursive: true, force: true });
    }
  }

  /**
   * Put an overlay file into the store under its own digest (idempotent). `move: true` renames the
   * file in (it must be on the store's file system, e.g. under `makeTempDir`) instead of copying.
   */
  async addOverlay(file: string, info: { meta?: unknown; baseId?: string; move?: boolean; onProgress?: OnProgress } = {}): Promise<OverlayRecord> {
    const { sha256 } = await sha256File(file, info.onProgress);
    const target = this.overlayPath(sha256);
    let size: number;
    if (await exists(target)) {
      size = (await fsp.stat(target)).size;
      if (info.move) await fsp.rm(file, { force: true });
    } else if (info.move) {
      await fsp.rename(file, target);
      await fsyncDir(path.dirname(target));
      size = (await fsp.stat(target)).size;
    } else {
      size = (await copyFileAtomic(file, target, { expectSha256: sha256 })).size;
    }
    const rec: OverlayRecord = {
      digest: sha256,
      size,
      baseId: info.baseId,
      addedAt: this.catalog.getOverlay(sha256)?.addedAt ?? new Date().toISOString(),
      meta: info.meta,
    };
    this.catalog.putOverlay(rec);
    return rec;
  }

  getOverlay(digest: string): OverlayRecord | undefined {
    return this.catalog.getOverlay(digest);
  }

  async removeOverlay(digest: string): Promise<void> {
    const file = this.overlayPath(digest);
    const known = this.catalog.removeOverlay(digest);
    if (await exists(file)) await fsp.rm(file);
    else if (!known) {
      throw new CloudletError('NOT_FOUND', `overlay ${digest} is not in the store ${this.root}`, { fix: 'list the overlays with `cloudlet overlay list`' });
    }
  }
}

/** Open the store at `root`, run `fn`, close it. */
export async function withStore<T>(root: string, fn: (store: Store) => Promise<T>): Promise<T> {
  const store = await Store.open(root);
  try {
    return await fn(store);
  } finally {
    store.close();
  }
}
