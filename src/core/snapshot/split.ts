/**
 * splitSnapshot: one streaming pass over a libvirt save file that writes the flat memory image
 * (every RAM block at its 4 KiB-aligned imageOffset, pages by address) and builds the skeleton
 * (every other byte plus the page-record order). Anything outside what we understand makes the
 * split fall back to 'opaque' mode, never to a wrong result.
 */
import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
import { CloudletError } from '../errors';
import * as F from './format';
import { createStreamHasher, hashFileInWorker } from './hasher';
import { verifySnapshot } from './join';
import { cpuModelOf, decodeFixedHeader, decodeHeaderData } from './header';
import { snapshotLog, type Logger } from './log';
import { ImageWriter } from './image-writer';
import { PageRecords, type StreamEvent } from './records';
import { StreamReader } from './reader';
import { encodeSkeleton, type SkeletonHeader, type SkeletonOp } from './skeleton';

export interface RamBlockLayout {
  name: string;
  size: number;
  imageOffset: number;
}

export interface SnapshotLayout {
  mode: 'parsed' | 'opaque';
  /** Versioned, self-contained: every non-payload byte of the save file and the page-record order. */
  skeleton: Buffer;
  domainXml: string;
  /** From the save cookie's CPU definition (else the domain XML's). */
  cpuModel: string | undefined;
  blocks: RamBlockLayout[];
  memImageSize: number;
  saveFileSize: number;
  saveFileSha256: string;
}

export interface SplitStats {
  pageRecords: number;
  zeroRecords: number;
  /** Records superseded by a later record of the same page (their payload stays in the skeleton). */
  resentRecords: number;
  runs: number;
  literalBytes: number;
  deviceSections: string[];
  vmdescBytes: number;
  tailBytes: number;
  capabilities: string[];
  machineType: string;
}

export interface SplitOptions {
  onProgress?(done: number, total: number): void;
  logger?: Logger;
  /** Re-read the memory image after the split and check it rebuilds the save file (costs one more pass). */
  verify?: boolean;
  /** Receives parse statistics (tests, benchmarks). */
  onStats?(stats: SplitStats): void;
}

/** Internal signal: the stream holds something this codec does not understand → opaque mode. */
class NotUnderstood extends Error {}

const IO_SIZE = 8 * 1024 * 1024;
/** Files at least this large are hashed by a worker thread reading the file itself. */
const HASH_IN_WORKER_FROM = 32 * 1024 * 1024;
const TWO32 = 2 ** 32;

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

interface ParseResult {
  header: SkeletonHeader;
  ops: SkeletonOp[];
  domainXml: string;
  cookie: string | undefined;
  stats: SplitStats;
}

async function parseAndWrite(savePath: string, fh: FileHandle, size: number, img: FileHandle, opts: SplitOptions, log: Logger): Promise<ParseResult> {
  // Large files: a worker reads and hashes the file on its own, beside the parse (no copies).
  const fileHash = size >= HASH_IN_WORKER_FROM ? hashFileInWorker(savePath, size) : undefined;
  const r = new StreamReader(fh, size, `save file ${savePath}`, opts.onProgress, !fileHash);
  try {
    const result = await parseWith(r, savePath, fh, size, img, log);
    if (fileHash) {
      const digest = await fileHash.digest;
      if (digest === undefined) throw new CloudletError('CORRUPT', `save file ${savePath} changed while it was being split`, { fix: 'do not modify a save file while it is split' });
      result.header.saveFileSha256 = digest;
    }
    return result;
  } finally {
    r.close();
    fileHash?.close();
  }
}

async function parseWith(r: StreamReader, savePath: string, fh: FileHandle, size: number, img: FileHandle, log: Logger): Promise<ParseResult> {
  const what = `save file ${savePath}`;
  const unsupported = (why: string): never => {
    throw new NotUnderstood(`${why} (offset ${r.pos})`);
  };
  const corrupt = (why: string, at = r.pos): never => {
    throw new CloudletError('CORRUPT', `${what} is corrupt: ${why} at offset ${at}`, { fix: 'the save file is damaged; save the VM again', details: { offset: at } });
  };

  // ---- skeleton under construction ----
  const events: StreamEvent[] = [];
  let litParts: Buffer[] = [];
  let litBytes = 0;
  const lit = (n: number): Buffer => {
    const v = Buffer.from(r.take(n));
    litParts.push(v);
    litBytes += n;
    return v;
  };
  const flushLit = (): void => {
    if (litParts.length) events.push(litParts.length === 1 ? (litParts[0] as Buffer) : Buffer.concat(litParts));
    litParts = [];
  };
  const records = new PageRecords();
  const stats: SplitStats = { pageRecords: 0, zeroRecords: 0, resentRecords: 0, runs: 0, literalBytes: 0, deviceSections: [], vmdescBytes: 0, tailBytes: 0, capabilities: [], machineType: '' };

  // ---- libvirt header ----
  await r.need(F.LIBVIRT_HEADER_SIZE, 'the libvirt header');
  const raw = decodeFixedHeader(r.peek(F.LIBVIRT_HEADER_SIZE), what);
  lit(F.LIBVIRT_HEADER_SIZE);
  if (!F.LIBVIRT_HEADER_VERSIONS.includes(raw.version)) unsupported(`libvirt save header version ${raw.version}`);
  await r.need(raw.dataLen, 'the domain XML area');
  const { domainXml, cookie } = decodeHeaderData(raw, lit(raw.dataLen));
  if (raw.compressed !== 0) unsupported(`QEMU stream compressed by libvirt (format ${raw.compressed})`);

  // ---- QEMU stream ----
  const qemuStreamOffset = r.pos;
  await r.need(8, 'the QEMU stream header');
  if (r.be32() !== F.QEMU_VM_FILE_MAGIC) corrupt(`bad QEMU stream magic 0x${r.be32().toString(16)} (expected QEVM)`);
  if (r.be32(4) !== F.QEMU_VM_FILE_VERSION) unsupported(`QEMU stream version ${r.be32(4)}`);
  lit(8);

  const blocks: RamBlockLayout[] = [];
  const blockByName = new Map<string, number>();
  let imageCursor = 0;
  const caps = new Set<string>();
  let lastBlock = -1;
  const w = new ImageWriter(img);

  const be64 = (skip: number): number => r.be32(skip) * TWO32 + r.be32(skip + 4);

  const configuration = async (): Promise<void> => {
    await r.need(5, 'the configuration section');
    const len = r.be32(1);
    await r.need(5 + len, 'the machine type');
    stats.machineType = r.peek(len, 5).toString('latin1');
    lit(5 + len);
    for (;;) {
      if ((await r.ensure(1)) < 1 || r.u8() !== F.QEMU_VM_SUBSECTION) return;
      await r.need(2, 'a configuration subsection');
      const nlen = r.u8(1);
      await r.need(2 + nlen + 4, 'a configuration subsection');
      const name = r.peek(nlen, 2).toString('latin1');
      lit(2 + nlen + 4);
      if (name === 'configuration/target-page-bits') {
        await r.need(4, 'target-page-bits');
        if (r.be32() !== F.PAGE_BITS) unsupported(`target page bits ${r.be32()}`);
        lit(4);
      } else if (name === 'configuration/capabilities') {
        await r.need(4, 'the capability count');
        const count = r.be32();
        lit(4);
        for (let i = 0; i < count; i++) {
          await r.need(1, 'a capability');
          const l = r.u8();
          await r.need(1 + l, 'a capability');
          caps.add(r.peek(l, 1).toString('latin1'));
          lit(1 + l);
        }
      } else if (name === 'configuration/uuid') {
        await r.need(16, 'the VM uuid');
        lit(16);
      } else unsupported(`configuration subsection ${name}`);
    }
  };

  const memSize = async (total: number): Promise<void> => {
    if (blocks.length) unsupported('a second RAM block list');
    let remaining = total;
    while (remaining > 0) {
      await r.need(1, 'a RAM block entry');
      const len = r.u8();
      await r.need(1 + len + 8, 'a RAM block entry');
      const name = r.peek(len, 1).toString('latin1');
      const bsize = be64(1 + len);
      lit(1 + len + 8);
      if (caps.has('x-ignore-shared')) {
        await r.need(8, 'a RAM block address');
        lit(8);
      }
      if (len === 0 || bsize > remaining || blockByName.has(name)) unsupported(`RAM block list entry ${JSON.stringify(name)} of ${bsize} bytes`);
      blockByName.set(name, blocks.length);
      blocks.push({ name, size: bsize, imageOffset: imageCursor });
      records.addBlock(Math.ceil(bsize / F.PAGE_SIZE));
      imageCursor += alignUp(bsize, F.PAGE_SIZE);
      remaining -= bsize;
    }
  };

  /** Longest page record: header, name length byte, 255-byte name, payload. */
  const MAX_RECORD = 8 + 1 + 255 + F.PAGE_SIZE;
  const ramData = async (): Promise<void> => {
    for (;;) {
      // One look-ahead per record; the rest is synchronous (this loop runs once per page).
      if (r.available() < MAX_RECORD) await r.ensure(MAX_RECORD);
      const avail = r.available();
      if (avail < 8) await r.need(8, 'a RAM record');
      const lo = r.be32(4);
      const flags = lo & F.RAM_FLAGS_MASK;
      const addr = r.be32() * TWO32 + (lo - flags);
      const kind = flags & ~F.RAM_FLAG_CONTINUE;
      if (kind === F.RAM_FLAG_EOS) {
        lit(8);
        return;
      }
      if (kind === F.RAM_FLAG_MEM_SIZE) {
        lit(8);
        await memSize(addr);
        continue;
      }
      if (kind !== F.RAM_FLAG_PAGE && kind !== F.RAM_FLAG_ZERO) unsupported(`RAM record flags 0x${flags.toString(16)}`);
      const at = r.pos;
      let block = lastBlock;
      let hdr = 8;
      const named = (flags & F.RAM_FLAG_CONTINUE) === 0;
      if (named) {
        if (avail < 9) await r.need(9, 'a RAM block name');
        const len = r.u8(8);
        if (avail < 9 + len) await r.need(9 + len, 'a RAM block name');
        const name = r.peek(len, 9).toString('latin1');
        block = blockByName.get(name) ?? corrupt(`page record names unknown RAM block ${JSON.stringify(name)}`);
        hdr = 9 + len;
      } else if (block < 0) corrupt('page record continues a RAM block but none was named before');
      lastBlock = block;
      const b = blocks[block] as RamBlockLayout;
      if (addr >= b.size) corrupt(`page at address 0x${addr.toString(16)} is beyond RAM block ${b.name} (${b.size} bytes)`);
      const zero = kind === F.RAM_FLAG_ZERO;
      const plen = zero ? 1 : F.PAGE_SIZE;
      if (avail < hdr + plen) await r.need(hdr + plen, `the page at 0x${addr.toString(16)} of ${b.name}`);
      flushLit();
      const { rec, resent } = records.add(block, addr / F.PAGE_SIZE, zero ? r.u8(hdr) : undefined, named, at, hdr + plen);
      events.push(rec);
      if (resent) stats.resentRecords++;
      r.skip(hdr);
      const off = b.imageOffset + addr;
      let pending: Promise<void> | undefined;
      if (!zero) {
        stats.pageRecords++;
        pending = w.putFrom(off, r);
      } else {
        stats.zeroRecords++;
        const fill = r.u8();
        r.skip(1);
        if (fill === 0 && !resent) w.zeroHole(off);
        else pending = w.fill(off, fill);
      }
      if (pending) await pending;
    }
  };

  let footers: boolean | undefined;
  const footer = async (id: number): Promise<void> => {
    const n = await r.ensure(5);
    const present = n === 5 && r.u8() === F.QEMU_VM_SECTION_FOOTER && r.be32(1) === id;
    if (footers === undefined) footers = present || (n >= 1 && r.u8() === F.QEMU_VM_SECTION_FOOTER ? unsupported('section footer of another section') : false);
    if (!footers) return;
    if (!present) unsupported(`missing footer of section ${id}`);
    lit(5);
  };

  const printable = (v: Buffer, from: number, len: number): boolean => {
    for (let i = from; i < from + len; i++) {
      const c = v[i] as number;
      if (c < 0x20 || c > 0x7e) return false;
    }
    return true;
  };
  /** Ends a device (FULL) section: the first `7e <id>` followed by a well-formed next record. */
  const deviceSection = async (id: number, idstr: string): Promise<void> => {
    const LOOK = 300;
    let from = 0;
    let want = 64 * 1024;
    for (;;) {
      const avail = await r.ensure(want);
      const all = avail === r.remaining;
      const v = r.peek(avail);
      const limit = all ? avail : avail - LOOK;
      for (let i = v.indexOf(F.QEMU_VM_SECTION_FOOTER, from); i >= 0 && i < limit; i = v.indexOf(F.QEMU_VM_SECTION_FOOTER, i + 1)) {
        if (i + 5 > avail || v.readUInt32BE(i + 1) !== id) continue;
        const j = i + 5;
        let ok = false;
        if (j < avail && v[j] === F.QEMU_VM_SECTION_FULL && j + 6 <= avail) {
          const len = v[j + 5] as number;
          ok = len > 0 && j + 6 + len + 8 <= avail && printable(v, j + 6, len);
        } else if (j < avail && v[j] === F.QEMU_VM_EOF) {
          ok = (all && j + 1 === avail) || (j + 6 <= avail && v[j + 1] === F.QEMU_VM_VMDESCRIPTION && j + 6 < avail && v[j + 6] === 0x7b /* { */ && r.pos + j + 6 + v.readUInt32BE(j + 2) <= size);
        }
        if (ok) {
          lit(i + 5);
          return;
        }
      }
      if (all) corrupt(`device section ${idstr} (id ${id}) has no end (truncated file?)`);
      from = Math.max(0, limit);
      want = avail * 2;
    }
  };

  // ---- sections ----
  let ramId: number | undefined;
  let ramEnded = false;
  let seenConfig = false;
  let vmdesc: unknown;
  let complete = false;
  const tailWarn = (why: string): void => log.warn({ savePath, offset: r.pos }, `snapshot: ${why}; keeping the rest of the stream as opaque bytes`);
  sections: for (;;) {
    if ((await r.ensure(1)) < 1) corrupt('the QEMU stream ends without QEMU_VM_EOF (truncated)');
    const t = r.u8();
    switch (t) {
      case F.QEMU_VM_CONFIGURATION:
        if (seenConfig || ramId !== undefined) unsupported('an unexpected configuration section');
        seenConfig = true;
        await configuration();
        break;
      case F.QEMU_VM_SECTION_START:
      case F.QEMU_VM_SECTION_FULL: {
        await r.need(6, 'a section header');
        const id = r.be32(1);
        const len = r.u8(5);
        await r.need(14 + len, 'a section header');
        const idstr = r.peek(len, 6).toString('latin1');
        if (t === F.QEMU_VM_SECTION_START && idstr === 'ram' && ramId === undefined) {
          lit(14 + len);
          ramId = id;
          await ramData();
          if (!blocks.length) unsupported('the RAM section does not start with its block list');
          await footer(id);
        } else if (t === F.QEMU_VM_SECTION_FULL && ramEnded && footers) {
          lit(14 + len);
          await deviceSection(id, idstr);
          stats.deviceSections.push(idstr);
        } else if (ramEnded) {
          tailWarn(footers ? `unexpected section ${idstr}` : 'the stream has no section footers, device sections are not delimited');
          break sections;
        } else unsupported(`section ${JSON.stringify(idstr)} (type ${t})`);
        break;
      }
      case F.QEMU_VM_SECTION_PART:
      case F.QEMU_VM_SECTION_END: {
        await r.need(5, 'a section header');
        const id = r.be32(1);
        if (id === ramId && !ramEnded) {
          lit(5);
          await ramData();
          await footer(id);
          if (t === F.QEMU_VM_SECTION_END) ramEnded = true;
        } else if (ramEnded) {
          tailWarn(`unexpected section type ${t}`);
          break sections;
        } else unsupported(`iterable section ${id} other than RAM`);
        break;
      }
      case F.QEMU_VM_EOF: {
        if (!ramEnded) unsupported('QEMU_VM_EOF before the end of the RAM section');
        lit(1);
        complete = true;
        if ((await r.ensure(5)) === 5 && r.u8() === F.QEMU_VM_VMDESCRIPTION) {
          const len = r.be32(1);
          await r.need(5 + len, 'the JSON device description');
          const json = lit(5 + len).subarray(5);
          stats.vmdescBytes = len;
          try {
            vmdesc = JSON.parse(json.toString('utf8'));
          } catch {
            log.warn({ savePath }, 'snapshot: the JSON device description does not parse');
          }
        }
        break sections;
      }
      default:
        if (ramEnded) {
          tailWarn(`unknown record type ${t}`);
          break sections;
        }
        unsupported(`record type ${t}`);
    }
  }
  // Cross-check the device sections against the JSON description QEMU wrote.
  if (vmdesc && typeof vmdesc === 'object' && Array.isArray((vmdesc as { devices?: unknown }).devices)) {
    const names = ((vmdesc as { devices: { name?: unknown }[] }).devices).map((d) => String(d.name));
    if (names.join('\n') !== stats.deviceSections.join('\n')) {
      log.warn({ savePath, described: names.length, found: stats.deviceSections.length }, 'snapshot: device sections differ from the JSON description (kept as opaque bytes either way)');
    }
  }
  // Whatever follows (padding, unknown records) is kept verbatim.
  const tailStart = r.pos;
  while ((await r.ensure(IO_SIZE)) > 0) lit(r.available());
  stats.tailBytes = r.pos - tailStart;
  if (!complete && stats.tailBytes === 0) corrupt('the QEMU stream ends early');
  flushLit();
  const saveFileSha256 = await r.finish();
  const memImageSize = imageCursor;
  await w.close(memImageSize);

  // ---- skeleton ops: runs of final page records; superseded records as literals ----
  const { ops, runs } = await records.toOps(events, async (start, len) => {
    const rec = Buffer.alloc(len);
    await fh.read(rec, 0, len, start);
    return rec;
  });
  stats.runs = runs;
  stats.literalBytes = litBytes;
  stats.capabilities = [...caps];
  const header: SkeletonHeader = { mode: 'parsed', saveFileSize: size, saveFileSha256, memImageSize, pageSize: F.PAGE_SIZE, blocks, qemuStreamOffset, resentRecords: stats.resentRecords };
  return { header, ops, domainXml, cookie, stats };
}

/** Opaque mode: the memory image is a copy of the save file. */
async function copyOpaque(fh: FileHandle, size: number, img: FileHandle, opts: SplitOptions): Promise<string> {
  const hash = createStreamHasher(size);
  try {
    const bufs = [Buffer.allocUnsafe(IO_SIZE), Buffer.allocUnsafe(IO_SIZE)];
    let pending: Promise<unknown> = Promise.resolve();
    for (let pos = 0, k = 0; pos < size; k ^= 1) {
      const buf = bufs[k] as Buffer;
      const { bytesRead } = await fh.read(buf, 0, Math.min(IO_SIZE, size - pos), pos);
      if (bytesRead === 0) throw new CloudletError('CORRUPT', `save file shrank while being copied (at offset ${pos})`);
      await hash.update(buf.subarray(0, bytesRead));
      await pending;
      pending = img.write(buf, 0, bytesRead, pos);
      pos += bytesRead;
      opts.onProgress?.(pos, size);
    }
    await pending;
    await img.truncate(size);
    return await hash.digest();
  } finally {
    hash.close();
  }
}

export async function splitSnapshot(savePath: string, memImagePath: string, opts: SplitOptions = {}): Promise<SnapshotLayout> {
  const log = opts.logger ?? snapshotLog;
  const fh = await open(savePath, 'r').catch((e: unknown) => {
    throw new CloudletError('NOT_FOUND', `cannot open save file ${savePath}: ${(e as Error).message}`, { cause: e });
  });
  const tmp = `${memImagePath}.tmp-${process.pid}`;
  try {
    const size = (await fh.stat()).size;
    let result: SnapshotLayout;
    const img = await open(tmp, 'w');
    try {
      const p = await parseAndWrite(savePath, fh, size, img, opts, log);
      opts.onStats?.(p.stats);
      result = {
        mode: 'parsed',
        skeleton: encodeSkeleton(p.header, p.ops),
        domainXml: p.domainXml,
        cpuModel: cpuModelOf(p.domainXml, p.cookie),
        blocks: p.header.blocks,
        memImageSize: p.header.memImageSize,
        saveFileSize: size,
        saveFileSha256: p.header.saveFileSha256,
      };
    } catch (e) {
      if (!(e instanceof NotUnderstood)) throw e;
      log.warn({ savePath, reason: e.message }, 'snapshot: save file not understood; keeping it as an opaque memory image (correct, but memory dedups only by position)');
      await img.truncate(0);
      const saveFileSha256 = await copyOpaque(fh, size, img, opts);
      let domainXml = '';
      let cookie: string | undefined;
      try {
        const head = Buffer.alloc(Math.min(size, F.LIBVIRT_HEADER_SIZE));
        await fh.read(head, 0, head.length, 0);
        const raw = decodeFixedHeader(head, savePath);
        const data = Buffer.alloc(Math.max(0, Math.min(raw.dataLen, size - F.LIBVIRT_HEADER_SIZE)));
        await fh.read(data, 0, data.length, F.LIBVIRT_HEADER_SIZE);
        ({ domainXml, cookie } = decodeHeaderData(raw, data));
      } catch {
        /* the XML is informative only in opaque mode */
      }
      const header: SkeletonHeader = { mode: 'opaque', saveFileSize: size, saveFileSha256, memImageSize: size, pageSize: F.PAGE_SIZE, blocks: [], reason: e.message };
      result = { mode: 'opaque', skeleton: encodeSkeleton(header, []), domainXml, cpuModel: cpuModelOf(domainXml, cookie), blocks: [], memImageSize: size, saveFileSize: size, saveFileSha256 };
    } finally {
      await img.close();
    }
    if (opts.verify) await verifySnapshot(result.skeleton, tmp);
    await rename(tmp, memImagePath);
    return result;
  } catch (e) {
    await unlink(tmp).catch(() => undefined);
    throw e;
  } finally {
    await fh.close();
  }
}
