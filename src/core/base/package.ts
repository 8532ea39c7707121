/**
 * The base package: one self-describing file holding a base VM (docs/base-package.md).
 *
 *   offset 0   8 bytes   magic "CLDBASE\0"
 *          8   u32 BE    container format version (2; version 1 is still read)
 *         12   u32 BE    manifest length M (at most 16 MiB)
 *         16   32 bytes  sha256 of the manifest bytes
 *         48   M bytes   manifest: canonical JSON (sorted keys), see manifest.ts
 *   then, for each manifest member in order (disk.raw, memory.sav, disk.idx, memory.idx):
 *              4 bytes   "MEMB"
 *              u16 BE    name length N, then N bytes of name (must equal the manifest's)
 *              u64 BE    logical size (must equal the manifest's)
 *   version 1: size bytes of payload
 *   version 2: u8 layout, then
 *              layout 0 (plain):  size bytes of payload
 *              layout 1 (sparse): u64 BE extent count E, u64 BE data length D, D bytes of data
 *                                 (the extents' bytes, in order), then E extents (u64 BE offset,
 *                                 u64 BE length): in order, not overlapping, non-empty, within the
 *                                 member; every byte outside them is zero
 *   end        8 bytes   trailer "CLDBEND\0"
 *
 * The manifest (and so the base id and every member digest, of the logical bytes, holes as zeros)
 * is the same in both versions. Export writes version 2, the data members sparse (extents from the
 * file system, minus all-zero 4 KiB chunks) and the indexes plain.
 *
 * Export and reading stream (4 MiB reads): no file is ever loaded whole. Import (import.ts)
 * verifies and unpacks a package into a store.
 */
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { CloudletError } from '../errors';
import { dataExtentsOrWhole } from '../extents';
import type { OnProgress } from '../progress';
import { SparseWriter, inThreadSha256, nonZeroRuns, workerSha256 } from '../sparse';
import type { Sha256Sink } from '../sparse';
import { BASE_FILES, Store } from '../store';
import { IO_BLOCK, fsyncDir, openOrThrow, tempNameFor, writeAll } from '../store/files';
import type { BaseManifest, Member } from './manifest';
import { canonicalJson, parseManifest } from './manifest';
import { readStoredManifest } from './stored';

export const PACKAGE_MAGIC = Buffer.from('CLDBASE\0', 'latin1');
export const PACKAGE_TRAILER = Buffer.from('CLDBEND\0', 'latin1');
const MEMBER_MAGIC = Buffer.from('MEMB', 'latin1');
export const PACKAGE_HEADER_SIZE = 48;
export const MAX_MANIFEST_LENGTH = 16 * 1024 * 1024;
/** Container versions: what exportBase writes, and what importBase reads. */
export const PACKAGE_CONTAINER_VERSION = 2;
export const READABLE_CONTAINER_VERSIONS: readonly number[] = [1, 2];
const LAYOUT_PLAIN = 0;
const LAYOUT_SPARSE = 1;
const EXTENT_SIZE = 16;
/** Extents per table read or write (1 MiB). */
const EXTENTS_PER_BLOCK = 65536;
/** Members written sparse by export; the indexes are dense digests (nothing to skip). */
const SPARSE_MEMBERS: ReadonlySet<string> = new Set([BASE_FILES.disk, BASE_FILES.memorySave]);
/** Members at least this large are hashed on a worker thread (overlapping the rest of the work). */
export const WORKER_HASH_MIN = 256 * 1024 * 1024;

/** MEMB, name, logical size: the part of a member header both versions share. */
function memberHeader(m: Member): Buffer {
  const name = Buffer.from(m.name, 'utf8');
  const h = Buffer.alloc(4 + 2 + name.length + 8);
  MEMBER_MAGIC.copy(h, 0);
  h.writeUInt16BE(name.length, 4);
  name.copy(h, 6);
  h.writeBigUInt64BE(BigInt(m.size), 6 + name.length);
  return h;
}

/** For a member of `size` bytes; `readBack`: a file the data is written to before it is hashed. */
function sha256Sink(size: number, readBack?: string): Sha256Sink {
  return size >= WORKER_HASH_MIN ? workerSha256(readBack) : inThreadSha256();
}

function changedFile(file: string, baseId: string, m: Member): CloudletError {
  return new CloudletError('CORRUPT', `the stored file ${file} of base ${baseId} no longer matches its manifest (size or sha256)`, {
    fix: `remove the base (cloudlet base remove ${baseId}) and import or create it again`,
    details: { file, expectedSize: m.size, expectedSha256: m.sha256 },
  });
}

export interface ExportOptions {
  onProgress?: OnProgress;
  /** Container version to write: 2 (default, sparse data members) or 1 (every byte, for cloudlets that read only version 1). */
  formatVersion?: 1 | 2;
}

/** Write base `baseId` of the store at `storeRoot` as one package file `outFile` (atomically). */
export async function exportBase(storeRoot: string, baseId: string, outFile: string, opts: ExportOptions = {}): Promise<BaseManifest> {
  const version = opts.formatVersion ?? PACKAGE_CONTAINER_VERSION;
  if (!READABLE_CONTAINER_VERSIONS.includes(version)) {
    throw new CloudletError('BAD_INPUT', `cannot write base package format version ${String(version)}`, { fix: `choose one of ${READABLE_CONTAINER_VERSIONS.join(', ')}` });
  }
  const store = await Store.open(storeRoot);
  try {
    const manifest = await readStoredManifest(store, baseId);
    const manifestBytes = Buffer.from(canonicalJson(manifest), 'utf8');
    const header = Buffer.alloc(PACKAGE_HEADER_SIZE);
    PACKAGE_MAGIC.copy(header, 0);
    header.writeUInt32BE(version, 8);
    header.writeUInt32BE(manifestBytes.length, 12);
    createHash('sha256').update(manifestBytes).digest().copy(header, 16);

    const total = manifest.members.reduce((s, m) => s + m.size, 0);
    let done = 0;
    const target = path.resolve(outFile);
    const tmp = tempNameFor(target);
    const out = await fsp.open(tmp, 'wx').catch((e: unknown) => {
      throw new CloudletError('BAD_INPUT', `cannot write the package ${target}: ${(e as Error).message}`, { fix: 'choose a writable output path', cause: e });
    });
    const writer = new PackageWriter(out);
    try {
      try {
        await writer.append(header);
        await writer.append(manifestBytes);
        for (const m of manifest.members) {
          const file = path.join(store.baseDir(baseId), m.name);
          const sparse = version >= 2 && SPARSE_MEMBERS.has(m.name);
          await writer.append(version >= 2 ? Buffer.concat([memberHeader(m), Buffer.from([sparse ? LAYOUT_SPARSE : LAYOUT_PLAIN])]) : memberHeader(m));
          const digest = await writer.member(file, m.size, sparse, () => changedFile(file, baseId, m), (n) => {
            done += n;
            opts.onProgress?.(done, total, 'export');
          });
          if (digest !== m.sha256) throw changedFile(file, baseId, m);
        }
        await writer.append(PACKAGE_TRAILER);
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

/** Appends to a new package file, keeping its position (sparse member headers are patched). */
class PackageWriter {
  private pos = 0;

  constructor(private readonly out: fsp.FileHandle) {}

  async append(buf: Buffer): Promise<void> {
    await writeAll(this.out, buf);
    this.pos += buf.length;
  }

  /**
   * Append the payload of member file `file` (`size` bytes), plain or sparse, returning the
   * sha256 of its logical bytes (holes as zeros). `changed` makes the error for a file whose size
   * is not `size`.
   */
  async member(file: string, size: number, sparse: boolean, changed: () => CloudletError, progress: (n: number) => void): Promise<string> {
    const src = await openOrThrow(file, 'r');
    const sink = sha256Sink(size);
    try {
      if ((await src.stat()).size !== size) throw changed();
      const counts = this.pos;
      if (sparse) await this.append(Buffer.alloc(16));
      const offsets: number[] = [];
      const lengths: number[] = [];
      let dataLength = 0;
      let hashed = 0;
      const extents = sparse ? await dataExtentsOrWhole(src.fd, size, file) : size > 0 ? [{ start: 0, end: size }] : [];
      const buf = Buffer.allocUnsafe(IO_BLOCK);
      for (const e of extents) {
        for (let pos = e.start; pos < e.end; ) {
          // Blocks end on 4 KiB boundaries of the file, so no zero chunk is cut in two.
          let want = Math.min(buf.length, e.end - pos);
          const cut = Math.floor((pos + want) / 4096) * 4096;
          if (pos + want < e.end && cut > pos) want = cut - pos;
          const { bytesRead } = await src.read(buf, 0, want, pos);
          if (bytesRead === 0) throw changed();
          const data = buf.subarray(0, bytesRead);
          sink.zeros(pos - hashed);
          progress(pos - hashed);
          await sink.update(data, pos);
          hashed = pos + bytesRead;
          for (const [from, to] of sparse ? nonZeroRuns(data, pos) : [[0, data.length] as [number, number]]) {
            await this.append(data.subarray(from, to));
            dataLength += to - from;
            const last = offsets.length - 1;
            if (last >= 0 && (offsets[last] as number) + (lengths[last] as number) === pos + from) lengths[last] = (lengths[last] as number) + to - from;
            else {
              offsets.push(pos + from);
              lengths.push(to - from);
            }
          }
          progress(bytesRead);
          pos += bytesRead;
        }
      }
      sink.zeros(size - hashed);
      progress(size - hashed);
      if ((await src.stat()).size !== size) throw changed();
      if (sparse) {
        for (let i = 0; i < offsets.length; i += EXTENTS_PER_BLOCK) {
          const n = Math.min(EXTENTS_PER_BLOCK, offsets.length - i);
          const table = Buffer.allocUnsafe(n * EXTENT_SIZE);
          for (let k = 0; k < n; k++) {
            table.writeBigUInt64BE(BigInt(offsets[i + k] as number), k * EXTENT_SIZE);
            table.writeBigUInt64BE(BigInt(lengths[i + k] as number), k * EXTENT_SIZE + 8);
          }
          await this.append(table);
        }
        const head = Buffer.alloc(16);
        head.writeBigUInt64BE(BigInt(offsets.length), 0);
        head.writeBigUInt64BE(BigInt(dataLength), 8);
        for (let off = 0; off < head.length; ) off += (await this.out.write(head, off, head.length - off, counts + off)).bytesWritten;
      }
      return await sink.digest();
    } finally {
      await sink.abort();
      await src.close();
    }
  }
}

/** Where a member's bytes are in a package (found, and bounds-checked, before anything is unpacked). */
interface MemberPlace {
  member: Member;
  /** Position of the member header. */
  headerPos: number;
  sparse: boolean;
  /** Stored bytes: the payload (plain) or the extents' data (sparse), at `dataPos`. */
  dataPos: number;
  dataLength: number;
  /** Sparse only: the extent table. */
  extentCount: number;
  tablePos: number;
}

/** Positional reads of a package, with truncation turned into CORRUPT. */
export class PackageReader {
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

  /** The extents of a member, read from its table in 1 MiB slices and checked one by one. */
  async *extents(place: MemberPlace): AsyncGenerator<{ offset: number; length: number }> {
    const { member } = place;
    if (!place.sparse) {
      if (member.size > 0) yield { offset: 0, length: member.size };
      return;
    }
    let end = 0n;
    const size = BigInt(member.size);
    for (let i = 0; i < place.extentCount; i += EXTENTS_PER_BLOCK) {
      const n = Math.min(EXTENTS_PER_BLOCK, place.extentCount - i);
      const at = place.tablePos + i * EXTENT_SIZE;
      const table = await this.readExactly(at, n * EXTENT_SIZE, `the extent table of member ${member.name}`);
      for (let k = 0; k < n; k++) {
        const offset = table.readBigUInt64BE(k * EXTENT_SIZE);
        const length = table.readBigUInt64BE(k * EXTENT_SIZE + 8);
        const why =
          length === 0n
            ? 'is empty'
            : offset < end
              ? `starts before the end of the previous one (${end}): extents must be in order and not overlap`
              : offset + length > size
                ? `ends past the member's ${member.size} bytes`
                : undefined;
        if (why !== undefined) throw this.badExtent(member, `extent ${i + k} (offset ${offset}, length ${length}) ${why}`, at + k * EXTENT_SIZE);
        end = offset + length;
        yield { offset: Number(offset), length: Number(length) };
      }
    }
  }

  badExtent(member: Member, why: string, offset: number): CloudletError {
    return new CloudletError('CORRUPT', `member ${member.name} of base package ${this.file} is damaged: ${why} (at byte ${offset})`, {
      fix: 'copy or download the package again, or export the base again',
      details: { file: this.file, member: member.name, offset },
    });
  }

  /**
   * Unpack a member into the new file `outPath`, feeding its logical bytes (holes as zeros) to a
   * sha256 sink that the caller finishes. Double-buffered: the next block is read while the
   * current one is hashed and written. All-zero 4 KiB chunks and the gaps between extents are left
   * as holes. Every extent is checked before anything of it is written, so nothing lands outside
   * [0, size) of the member.
   */
  async copyOut(place: MemberPlace, outPath: string, progress: (n: number) => void): Promise<Sha256Sink> {
    const { member, dataPos, dataLength } = place;
    const out = await fsp.open(outPath, 'wx');
    const writer = new SparseWriter(out);
    // A large member is hashed on its own thread, which reads back what was written (from the
    // page cache): the copy never waits for the hashing of the holes.
    const sink = sha256Sink(member.size, outPath);
    const bufs = [Buffer.allocUnsafe(IO_BLOCK), Buffer.allocUnsafe(IO_BLOCK)];
    const readBlock = async (i: number, at: number): Promise<Buffer> => {
      const buf = bufs[i % 2] as Buffer;
      const want = Math.min(buf.length, dataLength - at);
      let got = 0;
      while (got < want) {
        const { bytesRead } = await this.fh.read(buf, got, want - got, dataPos + at + got);
        if (bytesRead === 0) throw this.truncated(`member ${member.name}`, dataPos + dataLength);
        got += bytesRead;
      }
      return buf.subarray(0, got);
    };
    try {
      const extents = this.extents(place);
      let logical = 0;
      let remaining = 0;
      let consumed = 0;
      let i = 0;
      let next: Promise<Buffer> | undefined = dataLength > 0 ? readBlock(0, 0) : undefined;
      while (next) {
        const block = await next;
        consumed += block.length;
        i += 1;
        next = consumed < dataLength ? readBlock(i, consumed) : undefined;
        // Keep a rejected read-ahead from going unhandled if the write below fails first.
        next?.catch(() => undefined);
        for (let off = 0; off < block.length; ) {
          if (remaining === 0) {
            const e = await extents.next();
            if (e.done) throw this.badExtent(member, `its extents hold ${consumed - block.length + off} bytes, its header says ${dataLength}`, place.headerPos);
            sink.zeros(e.value.offset - logical);
            progress(e.value.offset - logical);
            logical = e.value.offset;
            remaining = e.value.length;
          }
          const take = Math.min(remaining, block.length - off);
          const piece = block.subarray(off, off + take);
          // The zero chunks the writer left as holes are hashed as zeros: a sink that reads the
          // file back reads only what was written.
          let at = 0;
          for (const [from, to] of await writer.write(piece, logical)) {
            sink.zeros(from - at);
            await sink.update(piece.subarray(from, to), logical + from);
            at = to;
          }
          sink.zeros(take - at);
          progress(take);
          logical += take;
          remaining -= take;
          off += take;
        }
      }
      if (remaining > 0 || !(await extents.next()).done) {
        throw this.badExtent(member, `its extents hold more than the ${dataLength} bytes its header says`, place.headerPos);
      }
      sink.zeros(member.size - logical);
      progress(member.size - logical);
      await writer.finish(member.size);
      await out.sync();
      return sink;
    } catch (e) {
      await sink.abort();
      throw e;
    } finally {
      await out.close();
    }
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

export async function readHead(reader: PackageReader): Promise<{ manifest: BaseManifest; version: number; places: MemberPlace[]; trailerPos: number }> {
  if (reader.size < PACKAGE_MAGIC.length || !(await reader.readExactly(0, PACKAGE_MAGIC.length, 'the magic')).equals(PACKAGE_MAGIC)) {
    throw new CloudletError('BAD_INPUT', `${reader.file} is not a cloudlet base package (no "CLDBASE" magic at byte 0)`, {
      fix: 'pass a file written by `cloudlet base export`',
    });
  }
  const header = await reader.readExactly(0, PACKAGE_HEADER_SIZE, 'the header');
  const version = header.readUInt32BE(8);
  if (!READABLE_CONTAINER_VERSIONS.includes(version)) {
    throw new CloudletError('UNSUPPORTED_VERSION', `base package ${reader.file} has format version ${version}; this cloudlet reads versions ${READABLE_CONTAINER_VERSIONS.join(' and ')}`, {
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
  // Walk the member headers: where each member's bytes are, and so the exact package size, is
  // known (truncation and trailing bytes are found) before anything is unpacked.
  const places: MemberPlace[] = [];
  let pos = PACKAGE_HEADER_SIZE + manifestLength;
  for (const m of manifest.members) {
    const expected = memberHeader(m);
    const headerPos = pos;
    const got = await reader.readExactly(pos, expected.length + (version >= 2 ? 1 : 0), `the header of member ${m.name}`);
    if (!got.subarray(0, expected.length).equals(expected)) throw reader.corrupt(`the header of member ${m.name} does not match the manifest`, pos);
    pos += got.length;
    const layout = version >= 2 ? (got[expected.length] as number) : LAYOUT_PLAIN;
    if (layout === LAYOUT_PLAIN) {
      places.push({ member: m, headerPos, sparse: false, dataPos: pos, dataLength: m.size, extentCount: 0, tablePos: 0 });
      pos += m.size;
    } else if (layout === LAYOUT_SPARSE) {
      const counts = await reader.readExactly(pos, 16, `the header of member ${m.name}`);
      const extentCount = counts.readBigUInt64BE(0);
      const dataLength = counts.readBigUInt64BE(8);
      pos += 16;
      // Each extent holds at least one byte, and the data is part of the member.
      if (dataLength > BigInt(m.size) || extentCount > dataLength) {
        throw reader.badExtent(m, `its header says ${extentCount} extents holding ${dataLength} bytes, for a member of ${m.size} bytes`, pos - 16);
      }
      const d = Number(dataLength);
      const e = Number(extentCount);
      places.push({ member: m, headerPos, sparse: true, dataPos: pos, dataLength: d, extentCount: e, tablePos: pos + d });
      pos += d + e * EXTENT_SIZE;
    } else {
      throw reader.badExtent(m, `unknown member layout ${layout}`, pos - 1);
    }
  }
  const expected = pos + PACKAGE_TRAILER.length;
  if (reader.size < expected) throw reader.truncated('the whole package', expected);
  if (reader.size > expected) throw reader.corrupt(`${reader.size - expected} unexpected bytes after the trailer`, expected);
  return { manifest, version, places, trailerPos: pos };
}
