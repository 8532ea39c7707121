/**
 * Bases as they sit in a store: reading manifests, opening a base for the overlay engine, listing.
 */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { buildChunkIndex, readChunkIndex } from '../chunk';
import { CloudletError } from '../errors';
import type { OnProgress } from '../progress';
import { BASE_FILES, Store } from '../store';
import { sha256Sparse } from '../sparse';
import type { BaseManifest } from './manifest';
import type { BaseFiles, BaseRef } from '../overlay/types';
import { parseManifest } from './manifest';

/** A base as the overlay engine uses it (the contract's BaseRef, defined with the engine). */
export type { BaseRef } from '../overlay/types';

export interface OpenedBase extends BaseRef {
  manifest: BaseManifest;
  /** The libvirt save file and the skeleton that rebuilds it from the memory image. */
  savePath: string;
  skeletonPath: string;
  dir: string;
}

export interface BaseSummary {
  baseId: string;
  addedAt: string;
  diskSize: number;
  memorySize: number;
  cpuModel: string | undefined;
  memoryMode: 'parsed' | 'opaque';
}

export async function readStoredManifest(store: Store, baseId: string): Promise<BaseManifest> {
  const file = store.baseFile(baseId, 'manifest');
  let text: string;
  try {
    text = await fsp.readFile(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new CloudletError('NOT_FOUND', `base ${baseId} is not in the store ${store.root}`, {
        fix: 'list the bases with `cloudlet base list`, or import the base package first',
        details: { baseId },
      });
    }
    throw e;
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new CloudletError('CORRUPT', `${file} is not JSON`, { fix: `remove the base (cloudlet base remove ${baseId}) and import it again`, cause: e });
  }
  const manifest = parseManifest(raw, `stored base ${baseId}`);
  if (manifest.baseId !== baseId) {
    throw new CloudletError('CORRUPT', `${file} describes base ${manifest.baseId}, not ${baseId}`, { fix: `remove the base (cloudlet base remove ${baseId}) and import it again` });
  }
  return manifest;
}

export function registerBase(store: Store, manifest: BaseManifest): void {
  store.catalog.putBase({
    id: manifest.baseId,
    addedAt: store.catalog.getBase(manifest.baseId)?.addedAt ?? new Date().toISOString(),
    diskSize: manifest.disk.size,
    memorySize: manifest.memory.saveFileSize,
    manifest,
  });
}

/** Runs `f` on the store at `storeRoot`, closing it afterwards whatever happens. */
async function withStore<T>(storeRoot: string, f: (store: Store) => Promise<T>): Promise<T> {
  const store = await Store.open(storeRoot);
  try {
    return await f(store);
  } finally {
    store.close();
  }
}

/**
 * The manifest of stored base `baseId` (NOT_FOUND if it is not in the store): a check that costs
 * a small file read, not the chunk indexes (32 MB for a 4 GiB disk) that openBase loads.
 */
export function readBaseManifest(storeRoot: string, baseId: string): Promise<BaseManifest> {
  return withStore(storeRoot, (store) => readStoredManifest(store, baseId));
}

/**
 * The files and sizes of stored base `baseId`, all that applying an overlay needs: its manifest
 * and two stats, not the chunk indexes that openBase loads (121 ms for a 4 GiB disk).
 */
export function openBaseFiles(storeRoot: string, baseId: string): Promise<BaseFiles> {
  return withStore(storeRoot, async (store) => {
    const files = storedFiles(store, baseId, await readStoredManifest(store, baseId));
    for (const [file, size] of [[files.diskPath, files.diskSize], [files.memImagePath, files.memImageSize]] as const) {
      const st = await fsp.stat(file).catch((e: unknown) => {
        throw new CloudletError('CORRUPT', `stored base ${baseId} has lost ${path.basename(file)}: ${(e as Error).message}`, { fix: `remove the base (cloudlet base remove ${baseId}) and import it again` });
      });
      if (st.size !== size) {
        throw new CloudletError('CORRUPT', `${file} of stored base ${baseId} has ${st.size} bytes; its manifest says ${size}`, { fix: `remove the base (cloudlet base remove ${baseId}) and import it again` });
      }
    }
    return files;
  });
}

/** Where stored base `baseId` keeps its disk and memory image, and their sizes by its manifest. */
function storedFiles(store: Store, baseId: string, manifest: BaseManifest): BaseFiles {
  const dir = store.baseDir(baseId);
  return {
    id: baseId,
    diskPath: path.join(dir, BASE_FILES.disk),
    diskSize: manifest.disk.size,
    memImagePath: path.join(dir, BASE_FILES.memoryImage),
    memImageSize: manifest.memory.imageSize,
  };
}

/** Open base `baseId` of the store at `storeRoot`: paths, manifest and both chunk indexes. */
export function openBase(storeRoot: string, baseId: string): Promise<OpenedBase> {
  return withStore(storeRoot, (store) => openStoredBase(store, baseId));
}

export async function openStoredBase(store: Store, baseId: string): Promise<OpenedBase> {
  const manifest = await readStoredManifest(store, baseId);
  const dir = store.baseDir(baseId);
  const [diskIndex, memIndex] = await Promise.all([
    readChunkIndex(path.join(dir, BASE_FILES.diskIndex)),
    readChunkIndex(path.join(dir, BASE_FILES.memoryIndex)),
  ]);
  if (diskIndex.byteLength !== manifest.disk.size || memIndex.byteLength !== manifest.memory.imageSize) {
    throw new CloudletError('CORRUPT', `the chunk indexes of stored base ${baseId} do not match its manifest`, {
      fix: `remove the base (cloudlet base remove ${baseId}) and import it again`,
    });
  }
  const { id, diskPath, memImagePath } = storedFiles(store, baseId, manifest);
  return {
    id,
    manifest,
    dir,
    diskPath,
    diskIndex,
    memImagePath,
    memIndex,
    savePath: path.join(dir, BASE_FILES.memorySave),
    skeletonPath: path.join(dir, BASE_FILES.memorySkeleton),
  };
}

/** The bases of the store at `storeRoot`, oldest first. */
export function listBases(storeRoot: string): Promise<BaseSummary[]> {
  return withStore(storeRoot, async (store) => {
    const out: BaseSummary[] = [];
    for (const rec of store.catalog.listBases()) {
      const m = parseManifest(rec.manifest, `catalog entry of base ${rec.id}`);
      out.push({
        baseId: rec.id,
        addedAt: rec.addedAt,
        diskSize: m.disk.size,
        memorySize: m.memory.saveFileSize,
        cpuModel: m.cpuModel,
        memoryMode: m.memory.mode,
      });
    }
    return out;
  });
}

/** Remove base `baseId` from the store at `storeRoot`. */
export function removeBase(storeRoot: string, baseId: string): Promise<void> {
  return withStore(storeRoot, (store) => store.removeBase(baseId));
}

export interface VerifyReport {
  baseId: string;
  ok: boolean;
  /** One line per problem found (empty when ok). */
  problems: string[];
}

/**
 * Re-check a stored base against its manifest: the sha256 of every member, and the memory image
 * against the memory index (the disk index is checked through its digest). Reports problems
 * instead of throwing, so an operator sees all of them.
 */
export function verifyBase(storeRoot: string, baseId: string, opts: { onProgress?: OnProgress } = {}): Promise<VerifyReport> {
  return withStore(storeRoot, async (store) => {
    const id = await store.resolveBaseId(baseId);
    const manifest = await readStoredManifest(store, id);
    const dir = store.baseDir(id);
    const problems: string[] = [];
    for (const m of manifest.members) {
      const file = path.join(dir, m.name);
      const got = await sha256Sparse(file, (d, t) => opts.onProgress?.(d, t, `verify ${m.name}`)).catch((e: unknown) => e as Error);
      if (got instanceof Error) problems.push(`${m.name}: ${got.message}`);
      else if (got.size !== m.size || got.sha256 !== m.sha256) problems.push(`${m.name}: ${got.size} bytes sha256 ${got.sha256}, the manifest says ${m.size} bytes sha256 ${m.sha256}`);
    }
    try {
      const stored = await readChunkIndex(path.join(dir, BASE_FILES.memoryIndex));
      const built = await buildChunkIndex(path.join(dir, BASE_FILES.memoryImage), { onProgress: (d, t) => opts.onProgress?.(d, t, 'verify memory.img') });
      let bad = built.byteLength === stored.byteLength ? 0 : -1;
      for (let i = 0; bad >= 0 && i < built.chunkCount; i++) if (!stored.equalAt(i, built.digestAt(i))) bad++;
      if (bad !== 0) problems.push(`memory.img: ${bad < 0 ? `${built.byteLength} bytes, the index describes ${stored.byteLength}` : `${bad} chunks differ from memory.idx`}`);
    } catch (e) {
      problems.push(`memory.img: ${(e as Error).message}`);
    }
    return { baseId: id, ok: problems.length === 0, problems };
  });
}
