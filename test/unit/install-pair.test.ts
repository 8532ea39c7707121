import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { deflateRawSync } from 'node:zlib';
import { xzCompress } from '../../src/core/overlay/lzma';
import { APP_INSTALL_MODEL, CHUNK, budgets, generateInstallPair, sampleContent, type InstallPair } from '../helpers/install-pair';
import { sha256File } from './overlay-fixture';

const opts = { diskSize: 32 << 20, memSize: 16 << 20, fraction: 0.08, seed: 11 };
let root: string;
let pair: InstallPair;

beforeAll(() => {
  root = mkdtempSync(path.join(tmpdir(), 'install-pair-'));
  pair = generateInstallPair(path.join(root, 'a'), opts);
});

afterAll(() => {
  rmSync(root, { recursive: true, force: true });
});

function chunksOf(file: string): Buffer[] {
  const b = readFileSync(file);
  const out: Buffer[] = [];
  for (let i = 0; i < b.length; i += CHUNK) out.push(b.subarray(i, i + CHUNK));
  return out;
}

const digest = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
const isZero = (b: Buffer): boolean => b.every((x) => x === 0);
const bytesDiffering = (a: Buffer, b: Buffer): number => a.reduce((n, x, i) => n + (x === b[i] ? 0 : 1), 0);
const incompressible = (b: Buffer): boolean => deflateRawSync(b, { level: 9 }).length >= 0.98 * CHUNK;

/** The chunks that differ from the base, by position. */
function changed(base: Buffer[], launch: Buffer[]): Array<{ at: number; data: Buffer; base: Buffer }> {
  return launch.flatMap((data, at) => {
    const b = base[at] ?? Buffer.alloc(CHUNK);
    return b.equals(data) ? [] : [{ at, data, base: b }];
  });
}

describe('generateInstallPair', () => {
  test('is deterministic for a seed and differs between seeds', () => {
    const again = generateInstallPair(path.join(root, 'b'), opts);
    const other = generateInstallPair(path.join(root, 'c'), { ...opts, seed: opts.seed + 1 });
    for (const k of ['baseDisk', 'baseMem', 'launchRaw', 'launchMem'] as const) {
      expect(sha256File(again[k])).toBe(sha256File(pair[k]));
      expect(sha256File(other[k])).not.toBe(sha256File(pair[k]));
    }
    expect(again.disk).toEqual(pair.disk);
    expect(again.memory).toEqual(pair.memory);
  });

  test('changes exactly the requested fraction of each image, split by the model', () => {
    const diskChanged = changed(chunksOf(pair.baseDisk), chunksOf(pair.launchRaw));
    const memChanged = changed(chunksOf(pair.baseMem), chunksOf(pair.launchMem));
    expect(diskChanged.length).toBe(Math.round((opts.diskSize / CHUNK) * opts.fraction));
    expect(memChanged.length).toBe(Math.round((opts.memSize / CHUNK) * opts.fraction));
    expect(pair.disk.changed).toBe(diskChanged.length);
    expect(pair.memory.changed).toBe(memChanged.length);
    expect(pair.disk.byKind).toEqual(budgets(diskChanged.length, APP_INSTALL_MODEL.disk));
    expect(pair.memory.byKind).toEqual(budgets(memChanged.length, APP_INSTALL_MODEL.memory));
  });

  test('the disk changes are what an install writes: new files, incompressible archives, small edits, base copies, self-duplicates, zeroed blocks', () => {
    const base = chunksOf(pair.baseDisk);
    const diff = changed(base, chunksOf(pair.launchRaw));
    const baseAt = new Map(base.map((b, i) => [digest(b), i]));
    const seen = new Map<string, number>();
    for (const c of diff) seen.set(digest(c.data), (seen.get(digest(c.data)) ?? 0) + 1);
    const k = pair.disk.byKind;
    const zero = diff.filter((c) => isZero(c.data));
    const smallEdits = diff.filter((c) => !isZero(c.data) && bytesDiffering(c.data, c.base) <= 96);
    const baseCopies = diff.filter((c) => !isZero(c.data) && (baseAt.get(digest(c.data)) ?? c.at) !== c.at);
    const selfDuplicates = diff.filter((c) => !isZero(c.data) && (seen.get(digest(c.data)) ?? 0) > 1);
    const random = diff.filter((c) => incompressible(c.data) && !baseAt.has(digest(c.data)));
    // Freed blocks are the only changes that read as zero; every kind is present in its share.
    expect(zero.length).toBe(k.freed);
    expect(smallEdits.length).toBeGreaterThanOrEqual(k.metadata);
    expect(baseCopies.length).toBeGreaterThanOrEqual(k.baseCopy);
    expect(selfDuplicates.length).toBeGreaterThanOrEqual(2);
    // Archives: all their chunks but a file's zero-padded last one.
    expect(random.length).toBeGreaterThanOrEqual(0.7 * k.archive);
    expect(random.length).toBeLessThanOrEqual(k.archive);
    for (const n of [zero, smallEdits, baseCopies, selfDuplicates, random]) expect(n.length).toBeGreaterThan(0);
  });

  test('the memory changes hold the page cache of new and base files, heaps, edits, freed, moved and incompressible pages', () => {
    const diskBase = chunksOf(pair.baseDisk);
    const diskNew = new Set(changed(diskBase, chunksOf(pair.launchRaw)).map((c) => digest(c.data)));
    const inBaseDisk = new Set(diskBase.map(digest));
    const memBase = chunksOf(pair.baseMem);
    const memBaseAt = new Map(memBase.map((b, i) => [digest(b), i]));
    const diff = changed(memBase, chunksOf(pair.launchMem));
    const seen = new Map<string, number>();
    for (const c of diff) seen.set(digest(c.data), (seen.get(digest(c.data)) ?? 0) + 1);
    const k = pair.memory.byKind;
    const nonZero = diff.filter((c) => !isZero(c.data));
    const pageCacheOfNew = nonZero.filter((c) => diskNew.has(digest(c.data)));
    const inBase = nonZero.filter((c) => inBaseDisk.has(digest(c.data)) || (memBaseAt.get(digest(c.data)) ?? c.at) !== c.at);
    const smallEdits = nonZero.filter((c) => !isZero(c.base) && bytesDiffering(c.data, c.base) <= 64);
    const selfDuplicates = nonZero.filter((c) => (seen.get(digest(c.data)) ?? 0) > 1 && !diskNew.has(digest(c.data)));
    const random = nonZero.filter((c) => incompressible(c.data) && !diskNew.has(digest(c.data)) && !inBaseDisk.has(digest(c.data)));
    expect(diff.filter((c) => isZero(c.data)).length).toBe(k.freed);
    expect(pageCacheOfNew.length).toBeGreaterThanOrEqual(k.pageCacheNew);
    expect(inBase.length).toBeGreaterThanOrEqual(k.pageCacheBase + k.relocated);
    expect(smallEdits.length).toBeGreaterThanOrEqual(k.kernelEdit);
    expect(selfDuplicates.length).toBeGreaterThanOrEqual(k.forkDup);
    expect(random.length).toBeGreaterThanOrEqual(k.random);
    for (const n of [pageCacheOfNew, inBase, smallEdits, selfDuplicates, random]) expect(n.length).toBeGreaterThan(0);
  });

  test('the launch qcow2 holds only changed clusters over the base disk and reads as the launch disk', () => {
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', pair.launchQcow2]).toString()) as { 'backing-filename'?: string };
    expect(info['backing-filename']).toBe(pair.baseDisk);
    execFileSync('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', pair.launchQcow2, pair.launchRaw]);
    const map = JSON.parse(execFileSync('qemu-img', ['map', '--output=json', pair.launchQcow2]).toString()) as Array<{ start: number; length: number; depth: number }>;
    const top = map.filter((e) => e.depth === 0);
    const covered = (at: number): boolean => top.some((e) => at * CHUNK >= e.start && at * CHUNK < e.start + e.length);
    for (const c of changed(chunksOf(pair.baseDisk), chunksOf(pair.launchRaw))) expect(covered(c.at)).toBe(true);
    expect(top.reduce((a, e) => a + e.length, 0)).toBeLessThan(opts.diskSize / 2);
  });

  test('rejects sizes and fractions it cannot model', () => {
    const dir = path.join(root, 'bad');
    expect(() => generateInstallPair(dir, { ...opts, diskSize: 4096 * 1000 + 1 })).toThrow(/diskSize must be a multiple of 4096/);
    expect(() => generateInstallPair(dir, { ...opts, fraction: 0.5 })).toThrow(/fraction must be in \(0, 0.2\]/);
    expect(() => generateInstallPair(dir, { ...opts, memFraction: 0 })).toThrow(/memFraction must be in/);
  });
});

describe('generated content compresses like real files', () => {
  // Bands around xz -6 of this machine's /usr/bin + shared libraries (0.26), sources and /etc
  // (0.16–0.24), and non-zero pages of the test guest's memory (0.32).
  test.each([
    ['binary', 0.2, 0.34],
    ['text', 0.12, 0.28],
    ['heap', 0.15, 0.35],
    ['archive', 0.99, 1.01],
  ] as const)('%s: xz ratio in [%d, %d]', async (kind, lo, hi) => {
    const raw = sampleContent(kind, 256, 5);
    const ratio = (await xzCompress(raw, 6)).length / raw.length;
    expect(ratio).toBeGreaterThanOrEqual(lo);
    expect(ratio).toBeLessThanOrEqual(hi);
  });
});
