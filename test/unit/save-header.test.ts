/**
 * encodeSaveHeader: a libvirt save header written by us (for a QEMU stream obtained by QMP
 * `migrate`) reads back through the same decoders as a real one, and a stream appended to it
 * splits like a libvirt save file.
 */
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { decodeFixedHeader, decodeHeaderData, encodeSaveHeader, readSaveHeader, rewriteSaveHeaderXml, SAVE_HEADER_PADDING } from '../../src/core/snapshot/header';
import { cpuModelOf, splitSnapshot } from '../../src/core/snapshot';
import { LIBVIRT_HEADER_SIZE } from '../../src/core/snapshot/format';
import { craftSaveFile, DEFAULT_COOKIE, DEFAULT_XML, type CraftSpec } from '../fixtures/snapshot/craft';

const silent = pino({ level: 'silent' });
let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'sc-save-header-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const XML = "<domain type='qemu'>\n  <name>hx-é</name>\n  <cpu><model>qemu64</model></cpu>\n</domain>\n";

describe('encodeSaveHeader', () => {
  test('writes the fixed part as libvirt does: magic, version 2, data_len, was_running 1, raw, no cookie', () => {
    const h = encodeSaveHeader(XML);
    const xmlBytes = Buffer.byteLength(XML, 'utf8') + 1;
    expect(h.length).toBe(LIBVIRT_HEADER_SIZE + xmlBytes + SAVE_HEADER_PADDING);
    expect(h.subarray(0, 16).toString('latin1')).toBe('LibvirtQemudSave');
    expect(decodeFixedHeader(h, 'test header')).toEqual({ version: 2, dataLen: xmlBytes + SAVE_HEADER_PADDING, wasRunning: 1, compressed: 0, cookieOffset: 0 });
    expect(h.subarray(36, LIBVIRT_HEADER_SIZE).every((b) => b === 0)).toBe(true); // unused[14]
    expect(h[LIBVIRT_HEADER_SIZE + xmlBytes - 1]).toBe(0); // NUL after the XML
    expect(h.subarray(LIBVIRT_HEADER_SIZE + xmlBytes).every((b) => b === 0)).toBe(true); // padding
    expect(decodeHeaderData(decodeFixedHeader(h, 'test header'), h.subarray(LIBVIRT_HEADER_SIZE))).toEqual({ domainXml: XML });
  });

  test('with a cookie: cookieOffset is the XML length + NUL, the cookie follows NUL-terminated', () => {
    const h = encodeSaveHeader(XML, { cookie: DEFAULT_COOKIE });
    const raw = decodeFixedHeader(h, 'test header');
    const xmlBytes = Buffer.byteLength(XML, 'utf8') + 1;
    expect(raw.cookieOffset).toBe(xmlBytes);
    expect(raw.dataLen).toBe(xmlBytes + DEFAULT_COOKIE.length + 1 + SAVE_HEADER_PADDING);
    expect(decodeHeaderData(raw, h.subarray(LIBVIRT_HEADER_SIZE))).toEqual({ domainXml: XML, cookie: DEFAULT_COOKIE });
  });

  test('is byte for byte the header of an independently crafted save file with 64 KiB padding', () => {
    for (const cookie of [DEFAULT_COOKIE, '']) {
      const crafted = craftSaveFile({ xml: DEFAULT_XML, cookie, padding: SAVE_HEADER_PADDING, blocks: [{ name: 'pc.ram', size: 4096 }], parts: [[]] });
      const ours = encodeSaveHeader(DEFAULT_XML, cookie === '' ? {} : { cookie });
      expect(ours.equals(crafted.file.subarray(0, crafted.qemuStreamOffset))).toBe(true);
    }
  });

  test('round trip through a file: readSaveHeader finds the XML, the cookie and the QEMU stream right after the header', async () => {
    const spec: CraftSpec = {
      cookie: '',
      blocks: [{ name: 'pc.ram', size: 16 * 4096 }, { name: 'pc.bios', size: 4096 }],
      parts: [[{ block: 'pc.ram', page: 3, kind: 'page' }, { block: 'pc.ram', page: 5, kind: 'zero', fill: 7 }, { block: 'pc.bios', page: 0, kind: 'page' }], [{ block: 'pc.ram', page: 3, kind: 'page' }]],
      devices: [{ name: 'timer', data: Buffer.alloc(24, 1) }],
    };
    const crafted = craftSaveFile(spec);
    const stream = crafted.file.subarray(crafted.qemuStreamOffset);
    const header = encodeSaveHeader(XML, { cookie: DEFAULT_COOKIE });
    const save = join(dir, 'ours.sav');
    await writeFile(save, Buffer.concat([header, stream]));

    const h = await readSaveHeader(save);
    expect(h).toEqual({ version: 2, domainXml: XML, cookie: DEFAULT_COOKIE, wasRunning: true, compressed: 0, qemuStreamOffset: header.length });
    expect(cpuModelOf(h.domainXml, h.cookie)).toBe('Haswell-noTSX');
    expect((await readFile(save)).subarray(h.qemuStreamOffset, h.qemuStreamOffset + 4).toString('latin1')).toBe('QEVM');

    const layout = await splitSnapshot(save, join(dir, 'ours.img'), { logger: silent, verify: true });
    expect(layout.mode).toBe('parsed');
    expect(layout.domainXml).toBe(XML);
    expect((await readFile(join(dir, 'ours.img'))).equals(crafted.image)).toBe(true);

    // The padding leaves room to edit the XML in place, as in a save file libvirt wrote.
    const longer = XML.replace('</domain>', `<description>${'x'.repeat(30000)}</description></domain>`);
    await rewriteSaveHeaderXml(save, longer);
    expect((await readSaveHeader(save)).domainXml).toBe(longer);
  });

  test("cpuModelOf reads libvirt's real cookie root (<cookie><cpu>) before the domain XML", () => {
    const cookie = "<cookie>\n  <cpu mode='custom' match='exact' check='full'>\n    <model fallback='forbid'>Nehalem</model>\n    <feature policy='require' name='hypervisor'/>\n  </cpu>\n</cookie>\n";
    const h = encodeSaveHeader(XML, { cookie });
    const raw = decodeFixedHeader(h, 'test header');
    const data = decodeHeaderData(raw, h.subarray(LIBVIRT_HEADER_SIZE));
    expect(cpuModelOf(data.domainXml, data.cookie)).toBe('Nehalem');
    expect(cpuModelOf(XML, undefined)).toBe('qemu64');
  });

  test('refuses an empty XML and NUL bytes (BAD_INPUT naming the part)', () => {
    expect(() => encodeSaveHeader('  ')).toThrow(expect.objectContaining({ code: 'BAD_INPUT', message: expect.stringMatching(/domain XML .* is empty/) }));
    expect(() => encodeSaveHeader('<domain>\0</domain>')).toThrow(expect.objectContaining({ code: 'BAD_INPUT', message: expect.stringMatching(/domain XML .* NUL/) }));
    expect(() => encodeSaveHeader(XML, { cookie: 'a\0b' })).toThrow(expect.objectContaining({ code: 'BAD_INPUT', message: expect.stringMatching(/save cookie .* NUL/) }));
  });
});
