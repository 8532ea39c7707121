/**
 * libvirt's save-file header (qemu_saveimage.c): 92 bytes, then `data_len` bytes holding the
 * domain XML (NUL-terminated), the save cookie (NUL-terminated, version 2) and zero padding that
 * lets the XML be edited in place. The QEMU migration stream starts right after, at 92 + data_len.
 */
import { open } from 'node:fs/promises';
import { XMLParser } from 'fast-xml-parser';
import { CloudletError } from '../errors';
import { LIBVIRT_HEADER_SIZE, LIBVIRT_HEADER_VERSIONS, LIBVIRT_MAGIC, LIBVIRT_PARTIAL_MAGIC } from './format';

/** The zero padding libvirt appends after XML + cookie (virQEMUSaveDataWrite), room for a longer XML later. */
export const SAVE_HEADER_PADDING = 64 * 1024;

export interface SaveHeader {
  version: number;
  domainXml: string;
  cookie?: string;
  wasRunning: boolean;
  /** libvirt's compression format of the QEMU stream (0 = raw). */
  compressed: number;
  qemuStreamOffset: number;
}

export interface RawSaveHeader {
  version: number;
  dataLen: number;
  wasRunning: number;
  compressed: number;
  cookieOffset: number;
}

/** Checks the magic and decodes the fixed 92-byte part (little-endian, as libvirt writes it on x86). */
export function decodeFixedHeader(b: Buffer, what: string): RawSaveHeader {
  if (b.length < LIBVIRT_HEADER_SIZE) {
    throw new CloudletError('CORRUPT', `${what} is truncated: ${b.length} bytes is shorter than libvirt's ${LIBVIRT_HEADER_SIZE}-byte save header`, { details: { offset: b.length } });
  }
  const magic = b.subarray(0, 16);
  if (magic.equals(LIBVIRT_PARTIAL_MAGIC)) {
    throw new CloudletError('CORRUPT', `${what} is an incomplete libvirt save (magic LibvirtQemudPart at offset 0: the save never finished)`, { fix: 'save the VM again', details: { offset: 0 } });
  }
  if (!magic.equals(LIBVIRT_MAGIC)) {
    throw new CloudletError('CORRUPT', `${what} is not a libvirt save file (bad magic at offset 0, expected LibvirtQemudSave)`, { fix: 'pass a file written by `virsh save`', details: { offset: 0 } });
  }
  return {
    version: b.readUInt32LE(16),
    dataLen: b.readUInt32LE(20),
    wasRunning: b.readUInt32LE(24),
    compressed: b.readUInt32LE(28),
    cookieOffset: b.readUInt32LE(32),
  };
}

/**
 * A complete libvirt save header (version 2) as libvirt writes it: the 92-byte fixed part
 * (was_running = 1, compressed = 0, cookieOffset = XML length + 1 when there is a cookie), the
 * XML and the cookie, each NUL-terminated, then SAVE_HEADER_PADDING zero bytes. A QEMU migration
 * stream appended right after it makes a save file `virsh restore` accepts (the stream starts at
 * 92 + data_len, which is the returned buffer's length).
 */
export function encodeSaveHeader(domainXml: string, opts: { cookie?: string } = {}): Buffer {
  const text = (what: string, v: string): Buffer => {
    if (v.includes('\0')) throw new CloudletError('BAD_INPUT', `the ${what} for a libvirt save header contains a NUL byte`, { fix: `pass the ${what} as text without NUL bytes` });
    return Buffer.from(`${v}\0`, 'utf8');
  };
  if (domainXml.trim() === '') throw new CloudletError('BAD_INPUT', 'the domain XML for a libvirt save header is empty', { fix: 'pass the domain XML (virsh dumpxml --migratable)' });
  const xml = text('domain XML', domainXml);
  const cookie = opts.cookie === undefined ? Buffer.alloc(0) : text('save cookie', opts.cookie);
  const dataLen = xml.length + cookie.length + SAVE_HEADER_PADDING;
  const out = Buffer.alloc(LIBVIRT_HEADER_SIZE + dataLen); // zeroed: unused[14] and the padding
  LIBVIRT_MAGIC.copy(out, 0);
  out.writeUInt32LE(2, 16); // version
  out.writeUInt32LE(dataLen, 20);
  out.writeUInt32LE(1, 24); // was_running
  out.writeUInt32LE(0, 28); // compressed: raw
  out.writeUInt32LE(cookie.length ? xml.length : 0, 32); // cookieOffset
  xml.copy(out, LIBVIRT_HEADER_SIZE);
  cookie.copy(out, LIBVIRT_HEADER_SIZE + xml.length);
  return out;
}

function cString(b: Buffer, from: number): string {
  const nul = b.indexOf(0, from);
  return b.subarray(from, nul < 0 ? b.length : nul).toString('utf8');
}

/** Decodes the XML and cookie from the header's data area. */
export function decodeHeaderData(raw: RawSaveHeader, data: Buffer): { domainXml: string; cookie?: string } {
  const domainXml = cString(data, 0);
  let cookie: string | undefined;
  if (raw.version >= 2 && raw.cookieOffset > 0 && raw.cookieOffset < data.length) {
    cookie = cString(data, raw.cookieOffset);
    if (cookie === '') cookie = undefined;
  }
  return cookie === undefined ? { domainXml } : { domainXml, cookie };
}

export async function readSaveHeader(savePath: string): Promise<SaveHeader> {
  const what = `save file ${savePath}`;
  const fh = await open(savePath, 'r').catch((e: unknown) => {
    throw new CloudletError('NOT_FOUND', `cannot open ${what}: ${(e as Error).message}`, { cause: e });
  });
  try {
    const size = (await fh.stat()).size;
    const fixed = Buffer.alloc(LIBVIRT_HEADER_SIZE);
    const { bytesRead } = await fh.read(fixed, 0, LIBVIRT_HEADER_SIZE, 0);
    const raw = decodeFixedHeader(fixed.subarray(0, bytesRead), what);
    if (!LIBVIRT_HEADER_VERSIONS.includes(raw.version)) {
      throw new CloudletError('UNSUPPORTED_VERSION', `${what} has libvirt save header version ${raw.version} (offset 16); supported: ${LIBVIRT_HEADER_VERSIONS.join(', ')}`);
    }
    if (LIBVIRT_HEADER_SIZE + raw.dataLen > size) {
      throw new CloudletError('CORRUPT', `${what} is truncated: its header announces ${raw.dataLen} bytes of XML at offset ${LIBVIRT_HEADER_SIZE} but the file has ${size} bytes`, { details: { offset: size } });
    }
    const data = Buffer.alloc(raw.dataLen);
    await fh.read(data, 0, raw.dataLen, LIBVIRT_HEADER_SIZE);
    return {
      version: raw.version,
      ...decodeHeaderData(raw, data),
      wasRunning: raw.wasRunning !== 0,
      compressed: raw.compressed,
      qemuStreamOffset: LIBVIRT_HEADER_SIZE + raw.dataLen,
    };
  } finally {
    await fh.close();
  }
}

/**
 * Replaces the domain XML inside the padded header in place (as `virsh save-image-define` does):
 * the cookie moves right after the new XML and the rest of the data area is zeroed. Throws
 * BAD_INPUT when XML + cookie do not fit in the data area.
 */
export async function rewriteSaveHeaderXml(savePath: string, newXml: string): Promise<void> {
  const header = await readSaveHeader(savePath);
  const dataLen = header.qemuStreamOffset - LIBVIRT_HEADER_SIZE;
  if (newXml.includes('\0')) throw new CloudletError('BAD_INPUT', 'the new domain XML contains a NUL byte');
  const xml = Buffer.from(`${newXml}\0`, 'utf8');
  const cookie = header.cookie === undefined ? Buffer.alloc(0) : Buffer.from(`${header.cookie}\0`, 'utf8');
  if (xml.length + cookie.length > dataLen) {
    throw new CloudletError('BAD_INPUT', `the new domain XML (${xml.length} bytes) and cookie (${cookie.length} bytes) do not fit in the ${dataLen}-byte header area of ${savePath}`, {
      fix: 'shorten the XML, or restore with the new XML instead of editing the save file',
    });
  }
  const data = Buffer.alloc(dataLen);
  xml.copy(data, 0);
  cookie.copy(data, xml.length);
  const fh = await open(savePath, 'r+');
  try {
    if (header.version >= 2) {
      const off = Buffer.alloc(4);
      off.writeUInt32LE(cookie.length ? xml.length : 0, 0);
      await fh.write(off, 0, 4, 32);
    }
    await fh.write(data, 0, dataLen, LIBVIRT_HEADER_SIZE);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

const xmlParser = new XMLParser({ ignoreAttributes: false, attributeNamePrefix: '@_', textNodeName: '#text' });

function modelOf(cpu: unknown): string | undefined {
  if (!cpu || typeof cpu !== 'object') return undefined;
  const model = (cpu as Record<string, unknown>)['model'];
  if (typeof model === 'string') return model.trim() || undefined;
  if (model && typeof model === 'object') {
    const text = (model as Record<string, unknown>)['#text'];
    if (typeof text === 'string') return text.trim() || undefined;
  }
  return undefined;
}

/** The CPU model of the save: the cookie's CPU definition, else the domain XML's `<cpu><model>`. */
export function cpuModelOf(domainXml: string, cookie: string | undefined): string | undefined {
  try {
    if (cookie) {
      const c = xmlParser.parse(cookie) as Record<string, unknown>;
      // libvirt writes <cookie><cpu>…</cpu></cookie> (virSaveCookieFormat); older fixtures use qemuDomainSaveCookie.
      const root = (c['cookie'] ?? c['qemuDomainSaveCookie']) as Record<string, unknown> | undefined;
      const m = modelOf(root?.['cpu']);
      if (m) return m;
    }
    const d = xmlParser.parse(domainXml) as Record<string, unknown>;
    return modelOf((d['domain'] as Record<string, unknown> | undefined)?.['cpu']);
  } catch {
    return undefined;
  }
}
