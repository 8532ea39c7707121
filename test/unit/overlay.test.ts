import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { buildChunkIndex } from '../../src/core/chunk';
import { isCloudletError } from '../../src/core/errors';
import { applyOverlayToParts, readOverlayMeta } from '../../src/core/overlay/apply';
import { createOverlayFromParts } from '../../src/core/overlay/create';
import { HEADER_SIZE, dataAreaLength, encodeHeader, type OverlayMeta } from '../../src/core/overlay/format';
import { xzCompress, xzDecompress } from '../../src/core/overlay/lzma';
import { createHash } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { baseFilesOf, type BaseRef, type LaunchMemory } from '../../src/core/overlay/types';
import { fakeJoin, generatePair, type GeneratedPair } from './overlay-fixture';
import { AllowList, DEFAULT_LIMITS } from '../../src/core/fetch/policy';

let dir: string;
let pair: GeneratedPair;
let base: BaseRef;
let memory: LaunchMemory;
const skeleton = Buffer.from('SKELETON: device state and page order would be here\n');

async function expectedSave(): Promise<{ size: number; sha256: string }> {
  const p = path.join(dir, 'expected.sav');
  rmSync(p, { force: true });
  return fakeJoin(skeleton, pair.launchMem, p);
}

beforeAll(async () => {
  dir = mkdtempSync(path.join(tmpdir(), 'ov-unit-'));
  // Base disk size not a multiple of 2 MiB, launch memory larger than the base's.
  pair = generatePair(dir, { diskSize: 6 * 1024 * 1024 + 3 * 4096, memSize: 4 * 1024 * 1024, launchMemSize: 4 * 1024 * 1024 + 64 * 4096, fraction: 0.08, seed: 3 });
  base = { id: 'b'.repeat(64), diskPath: pair.baseDisk, diskIndex: await buildChunkIndex(pair.baseDisk), memImagePath: pair.baseMem, memIndex: await buildChunkIndex(pair.baseMem) };
  const save = await expectedSave();
  memory = { memImagePath: pair.launchMem, skeleton, mode: 'parsed', domainXml: '<domain/>', cpuModel: 'qemu64', saveFileSize: save.size, saveFileSha256: save.sha256 };
});

afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function create(name: string, options = {}): Promise<string> {
  const out = path.join(dir, name);
  await createOverlayFromParts({ base, launchDiskPath: pair.launchQcow2, memory, outPath: out, options: { segmentSize: 64 * 1024, lzmaLevel: 1, ...options } });
  return out;
}

async function apply(overlay: string, b: BaseRef = base): Promise<{ disk: string; save: string; timings: Record<string, number> }> {
  const outDir = mkdtempSync(path.join(dir, 'out-'));
  const disk = path.join(outDir, 'disk.qcow2');
  const save = path.join(outDir, 'memory.sav');
  const { timings } = await applyOverlayToParts({ base: baseFilesOf(b), overlay, outDiskPath: disk, outSavePath: save, join: fakeJoin });
  return { disk, save, timings };
}

function sameDisk(qcow2: string, raw: string): boolean {
  try {
    execFileSync('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow2, raw], { stdio: 'pipe' });
    execFileSync('qemu-img', ['check', qcow2], { stdio: 'pipe' });
    return true;
  } catch {
    return false;
  }
}

describe('overlay round trip on generated data', () => {
  test.each([
    ['no delta', { delta: false }],
    ['with xdelta3', { delta: true }],
  ])('%s: rebuilds the disk and the save file exactly', async (name, options) => {
    const overlay = await create(`rt-${name.replace(/\W/g, '')}.overlay`, options);
    const meta = await readOverlayMeta(overlay);
    expect(meta.base.id).toBe(base.id);
    expect(meta.segments.length).toBeGreaterThan(1);
    expect(meta.launch.disk.changedChunks).toBeGreaterThan(0);
    expect(meta.launch.memory.imageSize).toBe(4 * 1024 * 1024 + 64 * 4096);
    for (const kind of ['zero', 'raw', 'baseMem', 'baseDisk']) expect(meta.stats[kind] ?? 0).toBeGreaterThan(0);
    expect((meta.stats['selfDisk'] ?? 0) + (meta.stats['selfMem'] ?? 0)).toBeGreaterThan(0);
    if (options.delta) expect(meta.stats['delta'] ?? 0).toBeGreaterThan(0);
    const out = await apply(overlay);
    expect(sameDisk(out.disk, pair.launchRaw)).toBe(true);
    expect(readFileSync(out.save).equals(Buffer.concat([skeleton, readFileSync(pair.launchMem)]))).toBe(true);
    expect(readdirSync(path.dirname(out.disk)).sort()).toEqual(['disk.qcow2', 'memory.sav']);
  });

  test('the overlay is much smaller than the changed data', async () => {
    const overlay = await create('size.overlay');
    const meta = await readOverlayMeta(overlay);
    const changedBytes = (meta.launch.disk.changedChunks + meta.launch.memory.changedChunks) * 4096;
    expect(readFileSync(overlay).length).toBeLessThan(changedBytes / 2);
  });
});

describe('overlay application rejects bad inputs with typed errors', () => {
  let good: string;
  let bytes: Buffer;
  beforeAll(async () => {
    good = await create('good.overlay');
    bytes = readFileSync(good);
  });

  async function expectTypedFailure(overlay: string, b: BaseRef = base): Promise<string> {
    const outDir = mkdtempSync(path.join(dir, 'bad-'));
    const disk = path.join(outDir, 'disk.qcow2');
    const save = path.join(outDir, 'memory.sav');
    let code = 'none';
    try {
      await applyOverlayToParts({ base: baseFilesOf(b), overlay, outDiskPath: disk, outSavePath: save, join: fakeJoin });
    } catch (e) {
      if (!isCloudletError(e)) throw e;
      code = e.code;
    }
    // Nothing half-written: no outputs, no temporary files.
    expect(readdirSync(outDir)).toEqual([]);
    rmSync(outDir, { recursive: true });
    return code;
  }

  test('a wrong base is WRONG_BASE', async () => {
    expect(await expectTypedFailure(good, { ...base, id: 'c'.repeat(64) })).toBe('WRONG_BASE');
    const files = baseFilesOf(base);
    const err = await applyOverlayToParts({ base: { ...files, diskSize: files.diskSize + 4096 }, overlay: good, outDiskPath: path.join(dir, 'never.qcow2'), outSavePath: path.join(dir, 'never.sav'), join: fakeJoin }).catch((e: unknown) => e);
    expect(isCloudletError(err) && err.code).toBe('WRONG_BASE');
    expect((err as Error).message).toMatch(/base disk size \d+ ≠ \d+/);
  });

  test('a missing file is NOT_FOUND, a non-overlay is CORRUPT', async () => {
    expect(await expectTypedFailure(path.join(dir, 'nope.overlay'))).toBe('NOT_FOUND');
    const junk = path.join(dir, 'junk.overlay');
    writeFileSync(junk, Buffer.alloc(1000, 7));
    expect(await expectTypedFailure(junk)).toBe('CORRUPT');
  });

  test('a flipped byte anywhere gives a typed error naming the part', async () => {
    const meta = await readOverlayMeta(good);
    const step = Math.max(1, Math.floor(bytes.length / 80));
    const positions = new Set<number>([0, 8, 12, 16, 24, 60, 64, 65, 100, bytes.length - 1]);
    for (let p = 0; p < bytes.length; p += step) positions.add(p);
    const codes = new Map<string, number>();
    for (const p of positions) {
      const bad = Buffer.from(bytes);
      bad[p] = (bad[p] ?? 0) ^ (1 << (p % 8));
      const f = path.join(dir, 'flip.overlay');
      writeFileSync(f, bad);
      const code = await expectTypedFailure(f);
      expect(code).not.toBe('none');
      codes.set(code, (codes.get(code) ?? 0) + 1);
    }
    expect(codes.get('DIGEST_MISMATCH') ?? 0).toBeGreaterThan(meta.segments.length / 2);
  });

  test('truncation at many offsets is CORRUPT', async () => {
    const step = Math.max(1, Math.floor(bytes.length / 50));
    for (let len = 0; len < bytes.length; len += step) {
      const f = path.join(dir, 'trunc.overlay');
      writeFileSync(f, bytes.subarray(0, len));
      expect(await expectTypedFailure(f)).toBe('CORRUPT');
    }
  });

  test('a changed base chunk is caught by the digests', async () => {
    const baseCopy = path.join(dir, 'base-tampered.mem');
    const m = readFileSync(pair.baseMem);
    // Tamper with every base memory chunk that the overlay references: flip a byte in each chunk.
    for (let i = 0; i < m.length; i += 4096) m[i + 17] = (m[i + 17] ?? 0) ^ 0xff;
    writeFileSync(baseCopy, m);
    expect(await expectTypedFailure(good, { ...base, memImagePath: baseCopy })).toBe('DIGEST_MISMATCH');
    expect(existsSync(baseCopy)).toBe(true);
  });
});

/** Re-assemble an overlay from a meta and (compressed) blobs, with consistent offsets and digests. */
function assemble(meta: OverlayMeta, blobs: Buffer[]): Buffer {
  let offset = 0;
  const refs = blobs.map((b) => {
    const r = { offset, length: b.length, sha256: createHash('sha256').update(b).digest('hex') };
    offset += b.length;
    return r;
  });
  const m: OverlayMeta = {
    ...meta,
    launch: { ...meta.launch, memory: { ...meta.launch.memory, skeleton: { ...meta.launch.memory.skeleton, ...refs[0]! } } },
    segments: meta.segments.map((s, i) => ({ ...s, ...refs[i + 1]! })),
  };
  const json = Buffer.from(JSON.stringify(m));
  return Buffer.concat([encodeHeader(json), json, ...blobs]);
}

describe('segments with valid digests but damaged records', () => {
  test('every damaged record is a typed error or (harmless damage) an exact result', async () => {
    const good = await create('records.overlay');
    const bytes = readFileSync(good);
    const meta = await readOverlayMeta(good);
    const dataStart = HEADER_SIZE + bytes.readUInt32LE(16);
    const blobs = [meta.launch.memory.skeleton, ...meta.segments].map((r) => bytes.subarray(dataStart + r.offset, dataStart + r.offset + r.length));
    const raws = await Promise.all(blobs.slice(1).map((b) => xzDecompress(b)));
    const expectedSave = Buffer.concat([skeleton, readFileSync(pair.launchMem)]);
    const outcomes = new Map<string, number>();
    let trial = 0;
    for (const [si, raw] of raws.entries()) {
      if (si > 0 && si !== raws.length - 1) continue; // first (disk records) and last (memory records)
      // Damage record headers (the first bytes of a segment are a header) and bytes inside.
      const positions = [0, 1, 3, 6, 7, 8, 10, 11, 12, 16, raw.length - 1, raw.length >> 1, raw.length >> 2];
      for (const p of positions) {
        const bad = Buffer.from(raw);
        bad[p] = (bad[p] ?? 0) ^ (0x11 << (trial++ % 4));
        const rebuilt: Buffer[] = [...blobs];
        rebuilt[si + 1] = await xzCompress(bad, 0);
        const m = { ...meta, segments: meta.segments.map((s, i) => (i === si ? { ...s, rawLength: bad.length } : s)) };
        const f = path.join(dir, 'records-bad.overlay');
        writeFileSync(f, assemble(m, rebuilt));
        const outDir = mkdtempSync(path.join(dir, 'rec-'));
        try {
          await applyOverlayToParts({ base: baseFilesOf(base), overlay: f, outDiskPath: path.join(outDir, 'd.qcow2'), outSavePath: path.join(outDir, 'm.sav'), join: fakeJoin });
          expect(readFileSync(path.join(outDir, 'm.sav')).equals(expectedSave)).toBe(true);
          expect(sameDisk(path.join(outDir, 'd.qcow2'), pair.launchRaw)).toBe(true);
          outcomes.set('exact', (outcomes.get('exact') ?? 0) + 1);
        } catch (e) {
          if (!isCloudletError(e)) throw e;
          expect(readdirSync(outDir)).toEqual([]);
          outcomes.set(e.code, (outcomes.get(e.code) ?? 0) + 1);
        }
        rmSync(outDir, { recursive: true, force: true });
      }
    }
    expect(outcomes.get('CORRUPT') ?? 0).toBeGreaterThan(0);
    expect(outcomes.get('DIGEST_MISMATCH') ?? 0).toBeGreaterThan(0);
  });

  test('the reassembled, undamaged overlay still applies (the helper is faithful)', async () => {
    const good = await create('records2.overlay');
    const bytes = readFileSync(good);
    const meta = await readOverlayMeta(good);
    const dataStart = HEADER_SIZE + bytes.readUInt32LE(16);
    const blobs = [meta.launch.memory.skeleton, ...meta.segments].map((r) => bytes.subarray(dataStart + r.offset, dataStart + r.offset + r.length));
    const f = path.join(dir, 'records-same.overlay');
    writeFileSync(f, assemble(meta, blobs));
    const out = await apply(f);
    expect(sameDisk(out.disk, pair.launchRaw)).toBe(true);
  });
});

describe('applying from an http URL', () => {
  test('uses Range requests and resumes a broken download', async () => {
    const overlay = await create('http.overlay');
    const bytes = readFileSync(overlay);
    let drops = 0;
    const ranges: string[] = [];
    const server = http.createServer((req, res) => {
      const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
      if (!m) {
        res.writeHead(400);
        res.end();
        return;
      }
      ranges.push(req.headers.range ?? '');
      const from = Number(m[1]);
      const to = Math.min(Number(m[2]), bytes.length - 1);
      if (from >= bytes.length) {
        res.writeHead(416);
        res.end();
        return;
      }
      const body = bytes.subarray(from, to + 1);
      res.writeHead(206, { 'content-length': body.length, 'content-range': `bytes ${from}-${to}/${bytes.length}` });
      if (body.length > 16 * 1024 && drops < 2) {
        drops += 1;
        res.write(body.subarray(0, body.length >> 2), () => res.destroy());
        return;
      }
      res.end(body);
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    try {
      const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/x.overlay`;
      const out = await apply(url);
      expect(drops).toBe(2);
      expect(ranges.length).toBeGreaterThanOrEqual(5);
      expect(sameDisk(out.disk, pair.launchRaw)).toBe(true);
      expect(readFileSync(out.save).equals(Buffer.concat([skeleton, readFileSync(pair.launchMem)]))).toBe(true);
      // A URL whose file is shorter than its meta says: CORRUPT (truncated), nothing left behind.
      const cut = http.createServer((req, res) => {
        const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
        const from = Number(m?.[1] ?? 0);
        const short = bytes.subarray(0, bytes.length - 1000);
        if (from >= short.length) {
          res.writeHead(416);
          res.end();
          return;
        }
        const body = short.subarray(from, Math.min(Number(m?.[2] ?? short.length - 1), short.length - 1) + 1);
        res.writeHead(206, { 'content-length': body.length });
        res.end(body);
      });
      await new Promise<void>((r) => cut.listen(0, '127.0.0.1', r));
      try {
        const outDir = mkdtempSync(path.join(dir, 'cut-'));
        const err = await applyOverlayToParts({
          base: baseFilesOf(base),
          overlay: `http://127.0.0.1:${(cut.address() as AddressInfo).port}/x.overlay`,
          outDiskPath: path.join(outDir, 'd.qcow2'),
          outSavePath: path.join(outDir, 'm.sav'),
          join: fakeJoin,
        }).catch((e: unknown) => e);
        expect(isCloudletError(err) && err.code).toBe('CORRUPT');
        expect(readdirSync(outDir)).toEqual([]);
      } finally {
        cut.close();
      }
    } finally {
      server.close();
    }
  });
});

describe('aborting an apply', () => {
  test('stops a stalled download at once with the abort reason, without retrying, and leaves nothing', async () => {
    const overlay = await create('abort.overlay');
    const bytes = readFileSync(overlay);
    const ranges: string[] = [];
    let holding: (() => void) | undefined;
    const held = new Promise<void>((r) => (holding = r));
    const server = http.createServer((req, res) => {
      const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
      const from = Number(m?.[1] ?? 0);
      const to = Math.min(Number(m?.[2] ?? bytes.length - 1), bytes.length - 1);
      ranges.push(`${from}-${to}`);
      res.writeHead(206, { 'content-length': to - from + 1, 'content-range': `bytes ${from}-${to}/${bytes.length}` });
      if (to === bytes.length - 1 && from > 0) {
        // The data area: some bytes, then silence.
        res.write(bytes.subarray(from, from + 100));
        holding?.();
        return;
      }
      res.end(bytes.subarray(from, to + 1));
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    try {
      const outDir = mkdtempSync(path.join(dir, 'abort-'));
      const ac = new AbortController();
      const applying = applyOverlayToParts({
        base: baseFilesOf(base),
        overlay: `http://127.0.0.1:${(server.address() as AddressInfo).port}/x.overlay`,
        outDiskPath: path.join(outDir, 'd.qcow2'),
        outSavePath: path.join(outDir, 'm.sav'),
        join: fakeJoin,
        signal: ac.signal,
      }).catch((e: unknown) => e);
      await held;
      const requests = ranges.length;
      const reason = new Error('cancelled by the test');
      ac.abort(reason);
      expect(await applying).toBe(reason);
      expect(ranges.length).toBe(requests); // no resumed download after the abort
      expect(readdirSync(outDir)).toEqual([]);
    } finally {
      server.closeAllConnections();
      server.close();
    }
  });
});

describe('overlay creation checks the launch disk', () => {
  test('a launch disk backed by another image is WRONG_BASE; by an identical copy it is fine', async () => {
    const other = path.join(dir, 'other-base.raw');
    const copy = readFileSync(pair.baseDisk);
    writeFileSync(path.join(dir, 'same-base.raw'), copy);
    copy.fill(0x5a, 0, 4096 * 64);
    writeFileSync(other, copy);
    const launchOther = path.join(dir, 'launch-other.qcow2');
    execFileSync('cp', [pair.launchQcow2, launchOther]);
    execFileSync('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', other, '-F', 'raw', launchOther]);
    const err = await createOverlayFromParts({ base, launchDiskPath: launchOther, memory, outPath: path.join(dir, 'other.overlay') }).catch((e: unknown) => e);
    expect(isCloudletError(err) && err.code).toBe('WRONG_BASE');
    expect(existsSync(path.join(dir, 'other.overlay'))).toBe(false);
    execFileSync('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', path.join(dir, 'same-base.raw'), '-F', 'raw', launchOther]);
    const meta = await createOverlayFromParts({ base, launchDiskPath: launchOther, memory, outPath: path.join(dir, 'same.overlay'), options: { lzmaLevel: 1 } });
    expect(meta.launch.disk.changedChunks).toBeGreaterThan(0);
    const bad = path.join(dir, 'raw-launch.raw');
    const err2 = await createOverlayFromParts({ base, launchDiskPath: pair.launchRaw, memory, outPath: bad }).catch((e: unknown) => e);
    expect(isCloudletError(err2) && err2.code).toBe('BAD_INPUT');
  });
});

describe('an overlay under a fetch policy', () => {
  const limits = (maxOverlayBytes: number) => ({ ...DEFAULT_LIMITS, maxOverlayBytes });

  test('one larger than the limit is refused after its meta, before its data (file and http)', async () => {
    const file = await create('limit.overlay');
    const size = statSync(file).size;
    const dirs = [dir];
    const meta = await readOverlayMeta(file, { policy: { allow: new AllowList([]), importDirs: dirs, limits: limits(size) } });
    expect(meta.segments.length).toBeGreaterThan(0);
    const small = { allow: new AllowList(['127.0.0.1']), importDirs: dirs, limits: limits(size - 1) };
    const fromFile = await readOverlayMeta(file, { policy: small }).catch((e: unknown) => e);
    expect(isCloudletError(fromFile) && fromFile.code).toBe('SOURCE_TOO_LARGE');
    expect(String(fromFile)).toMatch(/CLOUDLET_MAX_OVERLAY_BYTES/);
    const ranges: string[] = [];
    const server = http.createServer((req, res) => {
      ranges.push(req.headers.range ?? '');
      const m = /bytes=(\d+)-(\d+)/.exec(req.headers.range ?? '');
      const body = readFileSync(file).subarray(Number(m?.[1] ?? 0), Number(m?.[2] ?? size - 1) + 1);
      res.writeHead(206, { 'content-length': body.length }).end(body);
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    try {
      const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/limit.overlay`;
      const outDir = mkdtempSync(path.join(dir, 'limit-'));
      const err = await applyOverlayToParts({ base: baseFilesOf(base), overlay: url, outDiskPath: path.join(outDir, 'disk.qcow2'), outSavePath: path.join(outDir, 'memory.sav'), join: fakeJoin, policy: small }).catch((e: unknown) => e);
      expect(isCloudletError(err) && err.code).toBe('SOURCE_TOO_LARGE');
      // The header and the meta were read; no request reached the data area.
      const dataStart = size - dataAreaLength(meta);
      expect(ranges.length).toBeGreaterThan(0);
      for (const r of ranges) expect(Number(/-(\d+)$/.exec(r)?.[1])).toBeLessThan(dataStart);
      expect(readdirSync(outDir)).toEqual([]);
    } finally {
      server.closeAllConnections();
      server.close();
    }
  });

  test('a local overlay outside the import directories is refused; a URL off the allow-list too', async () => {
    const file = await create('outside.overlay');
    const policy = { allow: new AllowList(['10.0.0.0/8']), importDirs: [path.join(dir, 'imports')], limits: DEFAULT_LIMITS };
    const local = await readOverlayMeta(file, { policy }).catch((e: unknown) => e);
    expect(isCloudletError(local) && local.code).toBe('SOURCE_REFUSED');
    const remote = await readOverlayMeta('http://169.254.169.254/latest/meta-data', { policy }).catch((e: unknown) => e);
    expect(isCloudletError(remote) && remote.code).toBe('SOURCE_REFUSED');
    expect(String(remote)).toMatch(/link-local/);
  });
});
