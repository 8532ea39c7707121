/**
 * Import a base package into a store (format: package.ts, docs/base-package.md). Import verifies
 * the manifest checksum, every member's sha256, the two chunk indexes against the data, the base
 * id, and unpacks into `<store>/tmp/…` which is renamed to `<store>/bases/<baseId>` only when all
 * of that passed; on any failure the temp directory is removed and nothing enters the store. A
 * package by URL is downloaded first; under a fetch policy (a host's workers) the source is checked.
 */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { buildChunkIndex, readChunkIndex } from '../chunk';
import type { ChunkIndex } from '../chunk';
import { CloudletError } from '../errors';
import { bodyError, guardedFetch } from '../fetch/guarded-fetch';
import { resolveImportPath } from '../fetch/import-path';
import { tooLarge, type FetchPolicy } from '../fetch/policy';
import type { OnProgress } from '../progress';
import { splitSnapshot } from '../snapshot';
import type { Sha256Sink } from '../sparse';
import { BASE_FILES, Store } from '../store';
import { fsyncFile, openOrThrow, resolveInside, writeAll, writeFileSynced } from '../store/files';
import type { BaseManifest, Member } from './manifest';
import { canonicalJson } from './manifest';
import { PACKAGE_TRAILER, PackageReader, WORKER_HASH_MIN, readHead } from './package';
import { readStoredManifest, registerBase } from './stored';

export interface ImportResult {
  manifest: BaseManifest;
  /** True when the base was already in the store (nothing was written). */
  alreadyPresent: boolean;
}

function sameIndex(a: ChunkIndex, b: ChunkIndex): boolean {
  if (a.byteLength !== b.byteLength || a.chunkCount !== b.chunkCount) return false;
  for (let i = 0; i < a.chunkCount; i++) if (!b.equalAt(i, a.digestAt(i))) return false;
  return true;
}

/**
 * Import a package (a file, or an http(s) URL downloaded into the store's tmp/ first) into the
 * store at `storeRoot`: verify everything, then move the base into place atomically. Importing a
 * base that is already there is a no-op (`alreadyPresent: true`).
 */
export async function importBase(storeRoot: string, packageFileOrUrl: string, opts: { onProgress?: OnProgress; policy?: FetchPolicy; extraDirs?: readonly string[]; signal?: AbortSignal } = {}): Promise<ImportResult> {
  const { policy } = opts;
  if (!/^https?:\/\//i.test(packageFileOrUrl)) {
    const file = policy
      ? await resolveImportPath('base package', packageFileOrUrl, policy, { maxBytes: policy.limits.maxPackageBytes, limitSetting: 'CLOUDLET_MAX_PACKAGE_BYTES', ...(opts.extraDirs ? { extraDirs: opts.extraDirs } : {}) })
      : packageFileOrUrl;
    return importBaseFile(storeRoot, file, opts);
  }
  const store = await Store.open(storeRoot);
  let dir: string;
  try {
    dir = await store.makeTempDir('download');
  } finally {
    store.close();
  }
  try {
    const file = path.join(dir, 'package.cbp');
    await download(packageFileOrUrl, file, opts.onProgress, policy, opts.signal);
    return await importBaseFile(storeRoot, file, opts);
  } finally {
    await fsp.rm(dir, { recursive: true, force: true });
  }
}

/** Downloads a package; under a policy, checked like any fetch and stopped at the size limit. */
async function download(url: string, file: string, onProgress?: OnProgress, policy?: FetchPolicy, signal?: AbortSignal): Promise<void> {
  let res: Response;
  try {
    res = policy ? ((await guardedFetch('base package', url, policy, signal ? { signal } : {})) as unknown as Response) : await fetch(url, signal ? { signal } : {});
  } catch (e) {
    // Stopped by the caller (a cancelled activity): its reason, not a network failure.
    if (signal?.aborted) throw signal.reason;
    if (e instanceof CloudletError) throw e;
    throw new CloudletError('TIMEOUT', `cannot fetch base package ${url}: ${(e as Error).message}`, { fix: 'check the URL and that the server is up', cause: e });
  }
  if (!res.ok || !res.body) await res.body?.cancel().catch(() => undefined);
  if (res.status === 404) throw new CloudletError('NOT_FOUND', `base package ${url} not found (HTTP 404)`, { fix: 'check the URL' });
  if (!res.ok || !res.body) {
    throw new CloudletError(res.status >= 500 ? 'TIMEOUT' : 'BAD_INPUT', `fetching base package ${url} answered HTTP ${res.status}`, { fix: 'check the URL and the server' });
  }
  const total = Number(res.headers.get('content-length') ?? 0);
  const limit = policy?.limits.maxPackageBytes ?? Infinity;
  if (total > limit) {
    await res.body.cancel().catch(() => undefined);
    throw tooLarge('base package', url, total, limit, 'CLOUDLET_MAX_PACKAGE_BYTES');
  }
  const out = await fsp.open(file, 'wx').catch(async (e: unknown) => {
    await res.body?.cancel().catch(() => undefined);
    throw e;
  });
  let done = 0;
  try {
    for await (const part of res.body as unknown as AsyncIterable<Uint8Array>) {
      done += part.byteLength;
      // A server that sends more than it declared (or declared nothing) stops at the limit.
      if (done > limit) throw tooLarge('base package', url, done, limit, 'CLOUDLET_MAX_PACKAGE_BYTES');
      await writeAll(out, Buffer.from(part.buffer, part.byteOffset, part.byteLength));
      onProgress?.(done, Math.max(total, done), 'download');
    }
    await out.sync();
  } catch (e) {
    if (signal?.aborted) throw signal.reason;
    if (e instanceof CloudletError) throw e;
    const timeout = policy ? bodyError(e, 'base package', url, policy) : e;
    if (timeout instanceof CloudletError) throw timeout;
    throw new CloudletError('TIMEOUT', `download of base package ${url} broke after ${done} bytes: ${(e as Error).message}`, { fix: 'retry the import', cause: e });
  } finally {
    await out.close();
  }
}

async function importBaseFile(storeRoot: string, packageFile: string, opts: { onProgress?: OnProgress }): Promise<ImportResult> {
  const fh = await openOrThrow(packageFile, 'r');
  const store = await Store.open(storeRoot).catch(async (e: unknown) => {
    await fh.close();
    throw e;
  });
  let tmp: string | undefined;
  const pending: Array<{ member: Member; sink: Sha256Sink }> = [];
  try {
    const reader = new PackageReader(fh, packageFile, (await fh.stat()).size);
    const { manifest, places, trailerPos } = await readHead(reader);
    const baseId = manifest.baseId;
    if (await store.hasBaseDir(baseId)) {
      const existing = await readStoredManifest(store, baseId);
      if (!store.catalog.getBase(baseId)) registerBase(store, existing);
      return { manifest: existing, alreadyPresent: true };
    }

    tmp = await store.makeTempDir(`import-${baseId.slice(0, 12)}`);
    const total = manifest.members.reduce((s, m) => s + m.size, 0);
    let done = 0;
    const checkDigest = (m: Member, digest: string): void => {
      if (digest !== m.sha256) {
        throw new CloudletError('DIGEST_MISMATCH', `member ${m.name} of base package ${packageFile} has sha256 ${digest}, the manifest says ${m.sha256}`, {
          fix: 'the package is damaged; copy or download it again',
          details: { member: m.name, sha256: digest, expected: m.sha256 },
        });
      }
    };
    for (const place of places) {
      const sink = await reader.copyOut(place, resolveInside(tmp, place.member.name), (n) => {
        done += n;
        opts.onProgress?.(done, total, 'import');
      });
      // A large member (the disk) is still being hashed on its own thread, mostly zeros of its
      // holes: its digest is checked after the memory split and the index rebuilds, which run
      // meanwhile on the other core. Nothing is used before every digest has been checked.
      if (place.member.size >= WORKER_HASH_MIN) pending.push({ member: place.member, sink });
      else checkDigest(place.member, await sink.digest());
    }
    const trailer = await reader.readExactly(trailerPos, PACKAGE_TRAILER.length, 'the trailer');
    if (!trailer.equals(PACKAGE_TRAILER)) throw reader.corrupt('bad trailer', trailerPos);

    // Derived files: the memory image and skeleton, and a check of both indexes against the data.
    const layout = await splitSnapshot(path.join(tmp, BASE_FILES.memorySave), path.join(tmp, BASE_FILES.memoryImage), {
      onProgress: (d: number, t: number) => opts.onProgress?.(d, t, 'split memory'),
    });
    if (layout.memImageSize !== manifest.memory.imageSize || layout.mode !== manifest.memory.mode) {
      throw new CloudletError('CORRUPT', `the memory snapshot of base package ${packageFile} decodes to a ${layout.mode} image of ${layout.memImageSize} bytes, the manifest says ${manifest.memory.mode}, ${manifest.memory.imageSize} bytes`, {
        fix: 'the package was made by an incompatible cloudlet or altered; export the base again',
      });
    }
    await fsyncFile(path.join(tmp, BASE_FILES.memoryImage));
    await writeFileSynced(path.join(tmp, BASE_FILES.memorySkeleton), layout.skeleton);
    const checks: Array<{ what: string; built: ChunkIndex; stored: ChunkIndex }> = [];
    for (const [data, idx, what] of [
      [BASE_FILES.disk, BASE_FILES.diskIndex, 'disk'],
      [BASE_FILES.memoryImage, BASE_FILES.memoryIndex, 'memory'],
    ] as const) {
      const stored = await readChunkIndex(path.join(tmp, idx));
      const built = await buildChunkIndex(path.join(tmp, data), { onProgress: (d, t) => opts.onProgress?.(d, t, `check ${what} index`) });
      checks.push({ what, built, stored });
    }
    // Damaged data is reported as such (DIGEST_MISMATCH) before the index that then disagrees.
    for (const { member, sink } of pending.splice(0)) {
      opts.onProgress?.(0, 1, `check ${member.name} sha256`);
      checkDigest(member, await sink.digest());
      opts.onProgress?.(1, 1, `check ${member.name} sha256`);
    }
    for (const { what, built, stored } of checks) {
      if (!sameIndex(built, stored)) {
        throw new CloudletError('CORRUPT', `the ${what} chunk index in base package ${packageFile} does not match the ${what} data`, {
          fix: 'the package is damaged or was altered; export the base again',
        });
      }
    }
    await writeFileSynced(path.join(tmp, BASE_FILES.manifest), canonicalJson(manifest) + '\n');
    const moved = await store.commitBaseDir(tmp, baseId);
    tmp = undefined;
    registerBase(store, moved ? manifest : await readStoredManifest(store, baseId));
    return { manifest, alreadyPresent: !moved };
  } finally {
    for (const { sink } of pending) await sink.abort();
    if (tmp !== undefined) await fsp.rm(tmp, { recursive: true, force: true });
    store.close();
    await fh.close();
  }
}
