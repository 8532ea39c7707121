/**
 * The base package: one self-describing file holding a base VM (docs/base-package.md).
 *
 *   offset 0   8 bytes   magic "CLDBASE\0"
 *          8   u32 BE    container format version (1)
 *         12   u32 BE    manifest length M (at most 16 MiB)
 *         16   32 bytes  sha256 of the manifest bytes
 *         48   M bytes   manifest: canonical JSON (sorted keys), see manifest.ts
 *   then, for each manifest member in order (disk.raw, memory.sav, disk.idx, memory.idx):
 *              4 bytes   "MEMB"
 *              u16 BE    name length N, then N bytes of name (must equal the manifest's)
 *              u64 BE    payload size (must equal the manifest's)
 *              payload
 *   end        8 bytes   trailer "CLDBEND\0"
 *
 * Export and import stream (4 MiB reads): no file is ever loaded whole. Import verifies the
 * manifest checksum, every member's sha256, the two chunk indexes against the data, the base id,
 * and unpacks into `<store>/tmp/…` which is renamed to `<store>/bases/<baseId>` only when all of
 * that passed; on any failure the temp directory is removed and nothing enters the store.
 */
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { buildChunkIndex, readChunkIndex } from '../chunk';
import type { ChunkIndex } from '../chunk';
import { CloudletError } from '../errors';
import type { OnProgress } from '../progress';
import { splitSnapshot } from '../snapshot';
import { SparseWriter } from '../sparse';
import { BASE_FILES, Store } from '../store';
import { IO_BLOCK, fsyncDir, fsyncFile, openOrThrow, resolveInside, tempNameFor, writeAll, writeFileSynced } from '../store/files';
import type { BaseManifest, Member } from './manifest';
import { PACKAGE_FORMAT_VERSION, canonicalJson, parseManifest } from './manifest';
import { readStoredManifest, registerBase } from './stored';

export const PACKAGE_MAGIC = Buffer.from('CLDBASE\0', 'latin1');
export const PACKAGE_TRAILER = Buffer.from('CLDBEND\0', 'latin1');
const MEMBER_MAGIC = Buffer.from('MEMB', 'latin1');
export const PACKAGE_HEADER_SIZE = 48;
export const MAX_MANIFEST_LENGTH = 16 * 1024 * 1024;

export interface ImportResult {
  manifest: BaseManifest;
  /** True when the base was already in the store (nothing was written). */
  alreadyPresent: boolean;
}

function memberHeader(m: Member): Buffer {
  const name = Buffer.from(m.name, 'utf8');
  const h = Buffer.alloc(4 + 2 + name.length + 8);
  MEMBER_MAGIC.copy(h, 0);
  h.writeUInt16BE(name.length, 4);
  name.copy(h, 6);
  h.writeBigUInt64BE(BigInt(m.size), 6 + name.length);
  return h;
}

/** Total package size implied by a manifest of `manifestLength` bytes. */
function expectedPackageSize(manifestLength: number, members: readonly Member[]): number {
  return PACKAGE_HEADER_SIZE + manifestLength + members.reduce((s, m) => s + memberHeader(m).length + m.size, 0) + PACKAGE_TRAILER.length;
}

/** Write base `baseId` of the store at `storeRoot` as one package file `outFile` (atomically). */
export async function exportBase(storeRoot: string, baseId: string, outFile: string, opts: { onProgress?: OnProgress } = {}): Promise<BaseManifest> {
  const store = await Store.open(storeRoot);
  try {
    const manifest = await readStoredManifest(store, baseId);
    const manifestBytes = Buffer.from(canonicalJson(manifest), 'utf8');
    const header = Buffer.alloc(PACKAGE_HEADER_SIZE);
    PACKAGE_MAGIC.copy(header, 0);
    header.writeUInt32BE(PACKAGE_FORMAT_VERSION, 8);
    header.writeUInt32BE(manifestBytes.length, 12);
    createHash('sha256').update(manifestBytes).digest().copy(header, 16);

    const total = manifest.members.reduce((s, m) => s + m.size, 0);
    let done = 0;
    const target = path.resolve(outFile);
    const tmp = tempNameFor(target);
    const out = await fsp.open(tmp, 'wx').catch((e: unknown) => {
      throw new CloudletError('BAD_INPUT', `cannot write the package ${target}: ${(e as Error).message}`, { fix: 'choose a writable output path', cause: e });
    });
    try {
      try {
        await writeAll(out, header);
        await writeAll(out, manifestBytes);
        const buf = Buffer.allocUnsafe(IO_BLOCK);
        for (const m of manifest.members) {
          await writeAll(out, memberHeader(m));
          const file = path.join(store.baseDir(baseId), m.name);
          const src = await openOrThrow(file, 'r');
          try {
            const hash = createHash('sha256');
            let pos = 0;
            while (pos < m.size) {
              const { bytesRead } = await src.read(buf, 0, Math.min(buf.length, m.size - pos), pos);
              if (bytesRead === 0) break;
              const part = buf.subarray(0, bytesRead);
              hash.update(part);
              await writeAll(out, part);
              pos += bytesRead;
              done += bytesRead;
              opts.onProgress?.(done, total, 'export');
            }
            const extra = (await src.read(buf, 0, 1, pos)).bytesRead;
            const digest = hash.digest('hex');
            if (pos !== m.size || extra !== 0 || digest !== m.sha256) {
              throw new CloudletError('CORRUPT', `the stored file ${file} of base ${baseId} no longer matches its manifest (size or sha256)`, {
                fix: `remove the base (cloudlet base remove ${baseId}) and import or create it again`,
                details: { file, expectedSize: m.size, expectedSha256: m.sha256 },
              });
            }
          } finally {
            await src.close();
          }
        }
        await writeAll(out, PACKAGE_TRAILER);
        await out.sync();
      } finally {
        await out.close();
      }
      await fsp.rename(tmp, target);
      await fsyncDir(path.dirname(target));
    } catch (e) {
      await fsp.rm(tmp, { force: true });
      throw e;
    }
    return manifest;
  } finally {
    store.close();
  }
}

/** Positional reads of a package, with truncation turned into CORRUPT. */
class PackageReader {
  constructor(
    private readonly fh: fsp.FileHandle,
    readonly file: string,
    readonly size: number,
  ) {}

  async readExactly(pos: number, length: number, what: string): Promise<Buffer> {
    if (pos + length > this.size) throw this.truncated(what, pos + length);
    const buf = Buffer.alloc(length);
    let got = 0;
    while (got < length) {
      const { bytesRead } = await this.fh.read(buf, got, length - got, pos + got);
      if (bytesRead === 0) throw this.truncated(what, pos + length);
      got += bytesRead;
    }
    return buf;
  }

  truncated(what: string, needed: number): CloudletError {
    return new CloudletError('CORRUPT', `base package ${this.file} is truncated: ${what} needs ${needed} bytes, the file has ${this.size}`, {
      fix: 'copy or download the package again',
      details: { file: this.file, size: this.size, needed },
    });
  }

  corrupt(why: string, offset: number): CloudletError {
    return new CloudletError('CORRUPT', `base package ${this.file} is damaged: ${why} (at byte ${offset})`, {
      fix: 'copy or download the package again',
      details: { file: this.file, offset },
    });
  }

  /**
   * Copy `length` bytes at `pos` into `outPath`, returning their sha256. Double-buffered: the
   * next block is read while the current one is hashed and written. All-zero 4 KiB chunks are
   * not written but left as holes, so a sparse base disk stays sparse in the store (and its chunk
   * index skips them).
   */
  async copyOut(pos: number, length: number, outPath: string, progress: (n: number) => void): Promise<string> {
    const out = await fsp.open(outPath, 'wx');
    const writer = new SparseWriter(out);
    const hash = createHash('sha256');
    const bufs = [Buffer.allocUnsafe(IO_BLOCK), Buffer.allocUnsafe(IO_BLOCK)];
    const readBlock = async (i: number, at: number): Promise<Buffer> => {
      const buf = bufs[i % 2] as Buffer;
      const want = Math.min(buf.length, length - at);
      let got = 0;
      while (got < want) {
        const { bytesRead } = await this.fh.read(buf, got, want - got, pos + at + got);
        if (bytesRead === 0) throw this.truncated('a member', pos + length);
        got += bytesRead;
      }
      return buf.subarray(0, got);
    };
    try {
      let done = 0;
      let i = 0;
      let next: Promise<Buffer> | undefined = length > 0 ? readBlock(0, 0) : undefined;
      while (next) {
        const part = await next;
        done += part.length;
        i += 1;
        next = done < length ? readBlock(i, done) : undefined;
        // Keep a rejected read-ahead from going unhandled if the write below fails first.
        next?.catch(() => undefined);
        hash.update(part);
        await writer.write(part, done - part.length);
        progress(part.length);
      }
      await writer.finish(length);
      await out.sync();
    } finally {
      await out.close();
    }
    return hash.digest('hex');
  }
}

/** Read and check the header and manifest of a package, without unpacking it. */
export async function readPackageManifest(packageFile: string): Promise<BaseManifest> {
  const fh = await openOrThrow(packageFile, 'r');
  try {
    const reader = new PackageReader(fh, packageFile, (await fh.stat()).size);
    return (await readHead(reader)).manifest;
  } finally {
    await fh.close();
  }
}

async function readHead(reader: PackageReader): Promise<{ manifest: BaseManifest; dataStart: number }> {
  if (reader.size < PACKAGE_MAGIC.length || !(await reader.readExactly(0, PACKAGE_MAGIC.length, 'the magic')).equals(PACKAGE_MAGIC)) {
    throw new CloudletError('BAD_INPUT', `${reader.file} is not a cloudlet base package (no "CLDBASE" magic at byte 0)`, {
      fix: 'pass a file written by `cloudlet base export`',
    });
  }
  const header = await reader.readExactly(0, PACKAGE_HEADER_SIZE, 'the header');
  const version = header.readUInt32BE(8);
  if (version !== PACKAGE_FORMAT_VERSION) {
    throw new CloudletError('UNSUPPORTED_VERSION', `base package ${reader.file} has format version ${version}; this cloudlet reads version ${PACKAGE_FORMAT_VERSION}`, {
      fix: 'import it with a cloudlet release that knows this version, or export the base again with this one',
      details: { version },
    });
  }
  const manifestLength = header.readUInt32BE(12);
  if (manifestLength === 0 || manifestLength > MAX_MANIFEST_LENGTH) {
    throw reader.corrupt(`manifest length ${manifestLength} is outside 1..${MAX_MANIFEST_LENGTH}`, 12);
  }
  const manifestBytes = await reader.readExactly(PACKAGE_HEADER_SIZE, manifestLength, 'the manifest');
  if (!createHash('sha256').update(manifestBytes).digest().equals(header.subarray(16, 48))) {
    throw reader.corrupt('the manifest does not match its sha256', 16);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(manifestBytes.toString('utf8'));
  } catch {
    throw reader.corrupt('the manifest is not JSON', PACKAGE_HEADER_SIZE);
  }
  const manifest = parseManifest(raw, `base package ${reader.file}`);
  const expected = expectedPackageSize(manifestLength, manifest.members);
  if (reader.size < expected) throw reader.truncated('the whole package', expected);
  if (reader.size > expected) throw reader.corrupt(`${reader.size - expected} unexpected bytes after the trailer`, expected);
  return { manifest, dataStart: PACKAGE_HEADER_SIZE + manifestLength };
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
export async function importBase(storeRoot: string, packageFileOrUrl: string, opts: { onProgress?: OnProgress } = {}): Promise<ImportResult> {
  if (!/^https?:\/\//i.test(packageFileOrUrl)) return importBaseFile(storeRoot, packageFileOrUrl, opts);
  const store = await Store.open(storeRoot);
  let dir: string;
  try {
    dir = await store.makeTempDir('download');
  } finally {
    store.close();
  }
  try {
    const file = path.join(dir, 'package.cbp');
    await download(packageFileOrUrl, file, opts.onProgress);
    return await importBaseFile(storeRoot, file, opts);
  } finally {
    await fsp.rm(dir, { recursive: true, force: true });
  }
}

async function download(url: string, file: string, onProgress?: OnProgress): Promise<void> {
  let res: Response;
  try {
    res = await fetch(url);
  } catch (e) {
    throw new CloudletError('TIMEOUT', `cannot fetch base package ${url}: ${(e as Error).message}`, { fix: 'check the URL and that the server is up', cause: e });
  }
  if (res.status === 404) throw new CloudletError('NOT_FOUND', `base package ${url} not found (HTTP 404)`, { fix: 'check the URL' });
  if (!res.ok || !res.body) {
    throw new CloudletError(res.status >= 500 ? 'TIMEOUT' : 'BAD_INPUT', `fetching base package ${url} answered HTTP ${res.status}`, { fix: 'check the URL and the server' });
  }
  const total = Number(res.headers.get('content-length') ?? 0);
  const out = await fsp.open(file, 'wx');
  let done = 0;
  try {
    for await (const part of res.body as unknown as AsyncIterable<Uint8Array>) {
      await writeAll(out, Buffer.from(part.buffer, part.byteOffset, part.byteLength));
      done += part.byteLength;
      onProgress?.(done, Math.max(total, done), 'download');
    }
    await out.sync();
  } catch (e) {
    if (e instanceof CloudletError) throw e;
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
  try {
    const reader = new PackageReader(fh, packageFile, (await fh.stat()).size);
    const { manifest, dataStart } = await readHead(reader);
    const baseId = manifest.baseId;
    if (await store.hasBaseDir(baseId)) {
      const existing = await readStoredManifest(store, baseId);
      if (!store.catalog.getBase(baseId)) registerBase(store, existing);
      return { manifest: existing, alreadyPresent: true };
    }

    tmp = await store.makeTempDir(`import-${baseId.slice(0, 12)}`);
    const total = manifest.members.reduce((s, m) => s + m.size, 0);
    let done = 0;
    let pos = dataStart;
    for (const m of manifest.members) {
      const expectedHeader = memberHeader(m);
      const header = await reader.readExactly(pos, expectedHeader.length, `the header of member ${m.name}`);
      if (!header.equals(expectedHeader)) throw reader.corrupt(`the header of member ${m.name} does not match the manifest`, pos);
      pos += header.length;
      const digest = await reader.copyOut(pos, m.size, resolveInside(tmp, m.name), (n) => {
        done += n;
        opts.onProgress?.(done, total, 'import');
      });
      if (digest !== m.sha256) {
        throw new CloudletError('DIGEST_MISMATCH', `member ${m.name} of base package ${packageFile} has sha256 ${digest}, the manifest says ${m.sha256}`, {
          fix: 'the package is damaged; copy or download it again',
          details: { member: m.name, sha256: digest, expected: m.sha256 },
        });
      }
      pos += m.size;
    }
    const trailer = await reader.readExactly(pos, PACKAGE_TRAILER.length, 'the trailer');
    if (!trailer.equals(PACKAGE_TRAILER)) throw reader.corrupt('bad trailer', pos);

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
    for (const [data, idx, what] of [
      [BASE_FILES.disk, BASE_FILES.diskIndex, 'disk'],
      [BASE_FILES.memoryImage, BASE_FILES.memoryIndex, 'memory'],
    ] as const) {
      const stored = await readChunkIndex(path.join(tmp, idx));
      const built = await buildChunkIndex(path.join(tmp, data), { onProgress: (d, t) => opts.onProgress?.(d, t, `check ${what} index`) });
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
    if (tmp !== undefined) await fsp.rm(tmp, { recursive: true, force: true });
    store.close();
    await fh.close();
  }
}
