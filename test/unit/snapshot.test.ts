import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { deflateRawSync } from 'node:zlib';
import { join } from 'node:path';
import pino from 'pino';
import { CloudletError } from '../../src/core/errors';
import { decodeSkeleton, joinSnapshot, readSaveHeader, rewriteSaveHeaderXml, splitSnapshot, verifySnapshot, type SplitStats } from '../../src/core/snapshot';
import { craftSaveFile, DEFAULT_COOKIE, DEFAULT_XML, pageData, trickyDeviceData, type CraftRecord, type CraftSpec } from '../fixtures/snapshot/craft';

const silent = pino({ level: 'silent' });
let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'sc-snapshot-unit-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
let n = 0;

async function roundTrip(spec: CraftSpec) {
  const crafted = craftSaveFile(spec);
  const k = n++;
  const save = join(dir, `s${k}.sav`);
  const img = join(dir, `s${k}.img`);
  const out = join(dir, `s${k}.out`);
  await writeFile(save, crafted.file);
  let stats: SplitStats | undefined;
  const layout = await splitSnapshot(save, img, { logger: silent, verify: true, onStats: (s) => (stats = s) });
  const image = await readFile(img);
  const joined = await joinSnapshot(layout.skeleton, img, out);
  const rebuilt = await readFile(out);
  return { crafted, layout, image, joined, rebuilt, stats, save, img, out };
}

const ram = (pages: number): { name: string; size: number } => ({ name: 'pc.ram', size: pages * 4096 });
const seq = (block: string, from: number, count: number, kind: (i: number) => 'page' | 'zero' = () => 'page'): CraftRecord[] =>
  Array.from({ length: count }, (_, i) => ({ block, page: from + i, kind: kind(from + i) }));

const base: CraftSpec = {
  blocks: [ram(64), { name: 'pc.bios', size: 8 * 4096 }, { name: '/rom@etc/acpi/rsdp', size: 4096 }],
  parts: [
    [...seq('pc.ram', 0, 40, (i) => (i % 3 === 0 ? 'zero' : 'page')), ...seq('pc.bios', 0, 8), { block: '/rom@etc/acpi/rsdp', page: 0, kind: 'page' }],
    [...seq('pc.ram', 40, 24, (i) => (i % 5 === 0 ? 'zero' : 'page'))],
  ],
  devices: [
    { name: 'timer', data: Buffer.alloc(24, 1) },
    { name: 'cpu', data: trickyDeviceData(11) },
    { name: '0000:00:02.0/virtio-net', data: Buffer.from('device state') },
  ],
};

describe('splitSnapshot / joinSnapshot on crafted save files', () => {
  test('parses every record, lays blocks out 4 KiB aligned and rebuilds the file byte for byte', async () => {
    const r = await roundTrip(base);
    expect(r.layout.mode).toBe('parsed');
    expect(r.layout.blocks).toEqual([
      { name: 'pc.ram', size: 64 * 4096, imageOffset: 0 },
      { name: 'pc.bios', size: 8 * 4096, imageOffset: 64 * 4096 },
      { name: '/rom@etc/acpi/rsdp', size: 4096, imageOffset: 72 * 4096 },
    ]);
    expect(r.layout.memImageSize).toBe(73 * 4096);
    expect(r.image.equals(r.crafted.image)).toBe(true);
    expect(r.rebuilt.equals(r.crafted.file)).toBe(true);
    expect(r.joined).toEqual({ size: r.crafted.file.length, sha256: sha(r.crafted.file) });
    expect(r.layout.saveFileSha256).toBe(sha(r.crafted.file));
    expect(r.layout.saveFileSize).toBe(r.crafted.file.length);
    expect(r.layout.domainXml).toBe(DEFAULT_XML);
    expect(r.layout.cpuModel).toBe('Haswell-noTSX');
    expect(r.stats?.deviceSections).toEqual(['timer', 'cpu', '0000:00:02.0/virtio-net']);
    expect(r.stats?.pageRecords).toBe(40 - 14 + 8 + 1 + 24 - 5);
    expect(r.stats?.zeroRecords).toBe(14 + 5);
    // a run per (section, block): 2 in part 1 for pc.ram/pc.bios + 1 rsdp + 1 in part 2
    expect(r.stats?.runs).toBe(4);
    // the skeleton holds no page payloads
    expect(r.layout.skeleton.length).toBeLessThan(r.crafted.file.length - 50 * 4096);
  });

  test('pages sent twice: the memory image holds the last version, the skeleton the earlier ones', async () => {
    const spec: CraftSpec = {
      blocks: [ram(16)],
      parts: [
        [...seq('pc.ram', 0, 8), { block: 'pc.ram', page: 3, kind: 'zero', fill: 0 }],
        [
          { block: 'pc.ram', page: 3, kind: 'page', data: pageData('pc.ram', 3, 7) },
          { block: 'pc.ram', page: 5, kind: 'zero', fill: 0x5a },
          { block: 'pc.ram', page: 5, kind: 'zero', fill: 0x00 },
          { block: 'pc.ram', page: 1, kind: 'page', data: pageData('pc.ram', 1, 9) },
        ],
      ],
    };
    const r = await roundTrip(spec);
    expect(r.layout.mode).toBe('parsed');
    expect(r.stats?.resentRecords).toBe(5); // page 3 twice, page 5 twice, page 1 once
    expect(r.image.subarray(3 * 4096, 4 * 4096).equals(pageData('pc.ram', 3, 7))).toBe(true);
    expect(r.image.subarray(5 * 4096, 6 * 4096).equals(Buffer.alloc(4096))).toBe(true);
    expect(r.image.subarray(1 * 4096, 2 * 4096).equals(pageData('pc.ram', 1, 9))).toBe(true);
    expect(r.image.equals(r.crafted.image)).toBe(true);
    expect(r.rebuilt.equals(r.crafted.file)).toBe(true);
  });

  test('out-of-order pages, non-zero fill bytes, explicit names on continuing records', async () => {
    const spec: CraftSpec = {
      blocks: [ram(32), { name: 'pc.rom', size: 4 * 4096 }],
      parts: [
        [
          { block: 'pc.ram', page: 31, kind: 'page' },
          { block: 'pc.ram', page: 30, kind: 'zero', fill: 0xff },
          { block: 'pc.rom', page: 2, kind: 'page' },
          { block: 'pc.ram', page: 0, kind: 'zero', fill: 0x11 },
          { block: 'pc.ram', page: 1, kind: 'page', named: true },
          { block: 'pc.ram', page: 2, kind: 'page', named: true },
        ],
        [{ block: 'pc.ram', page: 3, kind: 'page', named: false }],
      ],
      caps: ['x-ignore-shared', 'validate-uuid'],
      targetPageBits: 12,
      uuid: true,
    };
    const r = await roundTrip(spec);
    expect(r.layout.mode).toBe('parsed');
    expect(r.stats?.capabilities).toEqual(['x-ignore-shared', 'validate-uuid']);
    expect(r.image.subarray(30 * 4096, 31 * 4096).equals(Buffer.alloc(4096, 0xff))).toBe(true);
    expect(r.image.equals(r.crafted.image)).toBe(true);
    expect(r.rebuilt.equals(r.crafted.file)).toBe(true);
  });

  test('bytes after the JSON description and a stream without section footers are kept verbatim', async () => {
    const tail = await roundTrip({ ...base, tail: Buffer.from('trailing bytes\0\0\0') });
    expect(tail.layout.mode).toBe('parsed');
    expect(tail.stats?.tailBytes).toBe(17);
    expect(tail.rebuilt.equals(tail.crafted.file)).toBe(true);
    const noFooters = await roundTrip({ ...base, footers: false });
    expect(noFooters.layout.mode).toBe('parsed');
    expect(noFooters.image.equals(noFooters.crafted.image)).toBe(true);
    expect(noFooters.rebuilt.equals(noFooters.crafted.file)).toBe(true);
    const noDesc = await roundTrip({ ...base, vmdesc: false, cookie: '' });
    expect(noDesc.layout.cpuModel).toBe('qemu64'); // no cookie: the domain XML's model
    expect(noDesc.rebuilt.equals(noDesc.crafted.file)).toBe(true);
  });

  test.each<[string, Partial<CraftSpec>]>([
    ['an unknown QEMU stream version', { qemuVersion: 2 }],
    ['an XBZRLE page', { parts: [[...seq('pc.ram', 0, 4), { block: 'pc.ram', page: 4, kind: 'page', extraFlags: 0x40 }]] }],
    ['a compressed stream', { compressed: 2 }],
    ['a foreign target page size', { targetPageBits: 16 }],
    ['an unknown libvirt header version', { headerVersion: 7 }],
  ])('%s degrades to opaque mode: the memory image is the save file, the join is exact', async (_what, change) => {
    const r = await roundTrip({ ...base, ...change });
    expect(r.layout.mode).toBe('opaque');
    expect(r.layout.blocks).toEqual([]);
    expect(r.image.equals(r.crafted.file)).toBe(true);
    expect(r.layout.memImageSize).toBe(r.crafted.file.length);
    expect(r.rebuilt.equals(r.crafted.file)).toBe(true);
    expect(decodeSkeleton(r.layout.skeleton).header.reason).toBeTruthy();
  });

  async function splitError(file: Buffer): Promise<CloudletError> {
    const k = n++;
    const save = join(dir, `e${k}.sav`);
    const img = join(dir, `e${k}.img`);
    await writeFile(save, file);
    const e = await splitSnapshot(save, img, { logger: silent }).then(
      () => undefined,
      (err: unknown) => err,
    );
    expect(e).toBeInstanceOf(CloudletError);
    expect(existsSync(img)).toBe(false);
    expect((await readdir(dir)).filter((f) => f.startsWith(`e${k}.img`))).toEqual([]);
    return e as CloudletError;
  }

  test('a page beyond its block is CORRUPT and names the offset', async () => {
    const crafted = craftSaveFile({ ...base, parts: [[...seq('pc.ram', 0, 3), { block: 'pc.bios', page: 8, kind: 'page' }]] });
    const e = await splitError(crafted.file);
    expect(e.code).toBe('CORRUPT');
    expect(e.message).toMatch(/beyond RAM block pc\.bios/);
    expect(e.details['offset']).toBe(crafted.recordOffsets[3]);
    expect(e.message).toContain(`offset ${crafted.recordOffsets[3]}`);
  });

  test('a page of an unknown block, or continuing before any block, is CORRUPT', async () => {
    const unknown = craftSaveFile({ ...base, parts: [[{ block: 'nope', page: 0, kind: 'page' }]] });
    expect((await splitError(unknown.file)).message).toMatch(/unknown RAM block "nope"/);
    const orphan = craftSaveFile({ ...base, parts: [[{ block: 'pc.ram', page: 0, kind: 'page', named: false }]] });
    expect((await splitError(orphan.file)).code).toBe('CORRUPT');
  });

  test('bad magics and partial saves are CORRUPT', async () => {
    const good = craftSaveFile(base);
    expect((await splitError(craftSaveFile({ ...base, magic: 'NotASaveFile....' }).file)).message).toMatch(/bad magic at offset 0/);
    expect((await splitError(craftSaveFile({ ...base, magic: 'LibvirtQemudPart' }).file)).message).toMatch(/incomplete/);
    const e = await splitError(craftSaveFile({ ...base, qemuMagic: 0x12345678 }).file);
    expect(e.code).toBe('CORRUPT');
    expect(e.details['offset']).toBe(good.qemuStreamOffset);
  });

  test('a truncated file is CORRUPT wherever it is cut before the end of the stream', async () => {
    const { file, recordOffsets, qemuStreamOffset } = craftSaveFile(base);
    const eof = file.lastIndexOf(Buffer.from('{"page_size"')) - 5;
    const cuts = [10, 92 + 50, qemuStreamOffset + 3, qemuStreamOffset + 40, (recordOffsets[0] ?? 0) + 100, (recordOffsets[20] ?? 0) + 4, (recordOffsets.at(-1) ?? 0) + 4097, eof - 10, eof - 1, file.length - 3];
    for (const cut of cuts) {
      const e = await splitError(file.subarray(0, cut));
      expect([cut, e.code]).toEqual([cut, 'CORRUPT']);
      expect(e.message).toMatch(/truncated|ends|no end|shorter/);
    }
  });
});

describe('joinSnapshot guards', () => {
  test('a memory image that does not match the skeleton fails with DIGEST_MISMATCH and leaves nothing', async () => {
    const r = await roundTrip(base);
    const image = Buffer.from(r.image);
    image[5 * 4096 + 7] = (image[5 * 4096 + 7] as number) ^ 1;
    const bad = join(dir, 'bad.img');
    await writeFile(bad, image);
    const out = join(dir, 'bad.out');
    await expect(joinSnapshot(r.layout.skeleton, bad, out)).rejects.toMatchObject({ code: 'DIGEST_MISMATCH' });
    expect((await readdir(dir)).filter((f) => f.startsWith('bad.out'))).toEqual([]);
    await expect(verifySnapshot(r.layout.skeleton, bad)).rejects.toMatchObject({ code: 'DIGEST_MISMATCH' });
    await expect(verifySnapshot(r.layout.skeleton, r.img)).resolves.toEqual(r.joined);
    await writeFile(bad, image.subarray(0, 4096));
    await expect(joinSnapshot(r.layout.skeleton, bad, out)).rejects.toMatchObject({ code: 'CORRUPT' });
  });

  test('a damaged or foreign skeleton is a typed error', async () => {
    const r = await roundTrip(base);
    const sk = Buffer.from(r.layout.skeleton);
    expect(() => decodeSkeleton(Buffer.from('garbage garbage garbage'))).toThrow(expect.objectContaining({ code: 'CORRUPT' }));
    const v9 = Buffer.from(sk);
    v9.writeUInt32LE(9, 8);
    expect(() => decodeSkeleton(v9)).toThrow(expect.objectContaining({ code: 'UNSUPPORTED_VERSION' }));
    expect(() => decodeSkeleton(sk.subarray(0, sk.length - 5))).toThrow(expect.objectContaining({ code: 'CORRUPT' }));
  });

  test('ZERO records take their fill byte from the skeleton: the join reads only pages with data', async () => {
    const r = await roundTrip({
      blocks: [ram(256)],
      parts: [seq('pc.ram', 0, 256, (i) => (i < 10 || i === 200 ? 'page' : 'zero')).map((rec) => (rec.page === 100 ? { ...rec, fill: 0x7f } : rec))],
    });
    const image = Buffer.from(r.image);
    image.fill(0xee, 10 * 4096, 200 * 4096); // scribble over the zero pages: not read by the join
    image.fill(0xee, 201 * 4096);
    const scribbled = join(dir, 'scribbled.img');
    await writeFile(scribbled, image);
    const out = join(dir, 'scribbled.out');
    expect(await joinSnapshot(r.layout.skeleton, scribbled, out)).toEqual(r.joined);
    expect((await readFile(out)).equals(r.crafted.file)).toBe(true);
    const run = decodeSkeleton(r.layout.skeleton).ops.find((o) => o.op === 'run');
    expect(run?.op === 'run' && [...(run.fills ?? [])]).toEqual([[100, 0x7f]]);
  });

  test('version 1 skeletons (ZERO fill bytes read from the image) still join', async () => {
    const r = await roundTrip(base);
    const { header, ops } = decodeSkeleton(r.layout.skeleton);
    const varint = (v: number): number[] => {
      const out: number[] = [];
      for (; v >= 0x80; v = Math.floor(v / 0x80)) out.push((v % 0x80) | 0x80);
      return [...out, v];
    };
    const body = Buffer.concat([
      ...ops.map((o) =>
        o.op === 'lit'
          ? Buffer.concat([Buffer.from([1, ...varint(o.data.length)]), o.data])
          : Buffer.concat([Buffer.from([2, ...varint(o.block), ...varint(o.firstPage), ...varint(o.count), o.named ? 1 : 0]), o.zeroBits]),
      ),
      Buffer.from([0]),
    ]);
    const json = Buffer.from(JSON.stringify(header));
    const head = Buffer.alloc(16);
    head.write('CLDSKEL\0', 0, 'latin1');
    head.writeUInt32LE(1, 8);
    head.writeUInt32LE(json.length, 12);
    const v1 = Buffer.concat([head, json, deflateRawSync(body)]);
    expect(decodeSkeleton(v1).ops.every((o) => o.op === 'lit' || o.fills === undefined)).toBe(true);
    expect(await joinSnapshot(v1, r.img, join(dir, 'v1.out'))).toEqual(r.joined);
  });

  test('the skeleton is compact: runs, not per-record headers', async () => {
    const pages = 4096;
    const r = await roundTrip({ blocks: [ram(pages)], parts: [seq('pc.ram', 0, pages, (i) => (i % 2 ? 'zero' : 'page'))] });
    const { ops } = decodeSkeleton(r.layout.skeleton);
    expect(ops.filter((o) => o.op === 'run')).toHaveLength(1);
    expect(r.layout.skeleton.length).toBeLessThan(8 * 1024); // vs 8 bytes x 4096 record headers
    expect(r.rebuilt.equals(r.crafted.file)).toBe(true);
  });
});

test('never-written zero pages stay holes of a sparse memory image', async () => {
  const pages = 4096;
  const r = await roundTrip({ blocks: [ram(pages)], parts: [seq('pc.ram', 0, pages, (i) => (i === 0 || i === 2000 || i === pages - 1 ? 'page' : 'zero'))] });
  expect(r.image.equals(r.crafted.image)).toBe(true);
  const st = await stat(r.img);
  expect(st.size).toBe(pages * 4096);
  expect(st.blocks * 512).toBeLessThan(pages * 4096 / 4);
  expect(r.rebuilt.equals(r.crafted.file)).toBe(true);
});

test('large files (hashed on worker threads) split and join exactly, parsed and opaque', async () => {
  const pages = 10 * 1024; // 40 MiB of page payloads: above the worker-hashing threshold
  const spec: CraftSpec = { blocks: [ram(pages)], parts: [seq('pc.ram', 0, pages / 2), seq('pc.ram', pages / 2, pages / 2)] };
  const parsed = await roundTrip(spec);
  expect(parsed.layout.mode).toBe('parsed');
  expect(parsed.layout.saveFileSha256).toBe(sha(parsed.crafted.file));
  expect(parsed.rebuilt.equals(parsed.crafted.file)).toBe(true);
  const opaque = await roundTrip({ ...spec, qemuVersion: 4 });
  expect(opaque.layout.mode).toBe('opaque');
  expect(opaque.layout.saveFileSha256).toBe(sha(opaque.crafted.file));
  expect(opaque.rebuilt.equals(opaque.crafted.file)).toBe(true);
});

describe('libvirt header', () => {
  test('readSaveHeader returns XML, cookie, flags and the stream offset', async () => {
    const crafted = craftSaveFile({ ...base, wasRunning: 0 });
    const save = join(dir, 'h.sav');
    await writeFile(save, crafted.file);
    expect(await readSaveHeader(save)).toEqual({
      version: 2,
      domainXml: DEFAULT_XML,
      cookie: DEFAULT_COOKIE,
      wasRunning: false,
      compressed: 0,
      qemuStreamOffset: crafted.qemuStreamOffset,
    });
  });

  test('rewriteSaveHeaderXml edits the XML in place, keeps the cookie and every stream byte', async () => {
    const crafted = craftSaveFile(base);
    const save = join(dir, 'rw.sav');
    await writeFile(save, crafted.file);
    const xml = DEFAULT_XML.replace('</domain>', '<description>edited in place</description></domain>');
    await rewriteSaveHeaderXml(save, xml);
    const after = await readFile(save);
    expect(after.length).toBe(crafted.file.length);
    expect(after.subarray(crafted.qemuStreamOffset).equals(crafted.file.subarray(crafted.qemuStreamOffset))).toBe(true);
    const h = await readSaveHeader(save);
    expect(h.domainXml).toBe(xml);
    expect(h.cookie).toBe(DEFAULT_COOKIE);
    expect(h.qemuStreamOffset).toBe(crafted.qemuStreamOffset);
    // and the edited file still splits and joins exactly
    const img = join(dir, 'rw.img');
    const layout = await splitSnapshot(save, img, { logger: silent });
    expect(layout.domainXml).toBe(xml);
    expect((await joinSnapshot(layout.skeleton, img, join(dir, 'rw.out'))).sha256).toBe(sha(after));
    await expect(rewriteSaveHeaderXml(save, `<domain>${'x'.repeat(10000)}</domain>`)).rejects.toMatchObject({ code: 'BAD_INPUT' });
    expect((await readFile(save)).equals(after)).toBe(true);
  });

  test('readSaveHeader rejects a file that is not a complete libvirt save', async () => {
    const p = join(dir, 'not.sav');
    await writeFile(p, Buffer.from('hello'));
    await expect(readSaveHeader(p)).rejects.toMatchObject({ code: 'CORRUPT' });
    await writeFile(p, craftSaveFile({ ...base, headerVersion: 3 }).file);
    await expect(readSaveHeader(p)).rejects.toMatchObject({ code: 'UNSUPPORTED_VERSION' });
    await writeFile(p, craftSaveFile(base).file.subarray(0, 500));
    await expect(readSaveHeader(p)).rejects.toMatchObject({ code: 'CORRUPT' });
  });
});
