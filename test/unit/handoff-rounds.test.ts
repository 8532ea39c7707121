/**
 * Handoff rounds end to end on files: a source builds rounds from memory streams (crafted save
 * files, pages sent several times as in a live stream) and frozen qcow2 layers (made by qemu-img
 * and written by qemu-io); a destination applies them to a copy of the base and rebuilds a save
 * file and a disk that are byte for byte the last state.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { buildChunkIndex } from '../../src/core/chunk';
import { splitSnapshot } from '../../src/core/snapshot';
import { HandoffSource } from '../../src/core/handoff/source';
import { HandoffDestination } from '../../src/core/handoff/destination';
import { isCloudletError } from '../../src/core/errors';
import { craftSaveFile, pageData, type CraftRecord } from '../fixtures/snapshot/craft';

const PAGES = 64;
const DISK = 1024 * 1024;
let dir: string;

beforeEach(() => {
  dir = mkdtempSync(path.join(tmpdir(), 'handoff-rounds-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

/** A save file whose pc.ram holds `content(page)` (undefined = zero); `resend` pages appear twice, stale first. */
function saveFile(name: string, content: (p: number) => Buffer | undefined, resend: number[] = []): string {
  const records: CraftRecord[] = [];
  for (const p of resend) records.push({ block: 'pc.ram', page: p, kind: 'page', data: Buffer.alloc(4096, 0xee) });
  for (let p = 0; p < PAGES; p++) {
    const d = content(p);
    records.push(d ? { block: 'pc.ram', page: p, kind: 'page', data: d } : { block: 'pc.ram', page: p, kind: 'zero' });
  }
  const file = path.join(dir, name);
  writeFileSync(file, craftSaveFile({ blocks: [{ name: 'pc.ram', size: PAGES * 4096 }], parts: [records] }).file);
  return file;
}

const qemuIo = (file: string, cmd: string): void => void execFileSync('qemu-io', ['-f', 'qcow2', '-c', cmd, file], { stdio: 'ignore' });
const layer = (name: string, backing: string, fmt: 'raw' | 'qcow2'): string => {
  const file = path.join(dir, name);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', backing, '-F', fmt, file]);
  return file;
};
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
const guestDisk = (qcow: string): Buffer => {
  const raw = path.join(dir, `${path.basename(qcow)}.raw`);
  execFileSync('qemu-img', ['convert', '-O', 'raw', qcow, raw]);
  return readFileSync(raw);
};

async function setup() {
  const baseSave = saveFile('base.save', (p) => (p % 3 === 0 ? undefined : pageData('pc.ram', p, 1)));
  const baseMem = path.join(dir, 'base.memimg');
  await splitSnapshot(baseSave, baseMem);
  const baseDisk = path.join(dir, 'base.raw');
  const disk = Buffer.alloc(DISK);
  for (let c = 0; c < DISK / 4096; c += 2) pageData('disk', c, 7).copy(disk, c * 4096);
  writeFileSync(baseDisk, disk);
  const base = { id: 'b'.repeat(64), diskPath: baseDisk, memImagePath: baseMem, memIndex: await buildChunkIndex(baseMem), diskIndex: await buildChunkIndex(baseDisk) };
  return base;
}

test('live rounds then a final round rebuild the exact save file and disk at the destination', async () => {
  const base = await setup();
  const src = await HandoffSource.open(path.join(dir, 'src'), 'h1', base);
  const dst = await HandoffDestination.open(path.join(dir, 'dst'), base);

  // The instance disk: a qcow2 over the base, written; then frozen by a "snapshot" into L2, L3.
  const l1 = layer('l1.qcow2', base.diskPath, 'raw');
  qemuIo(l1, 'write -P 0x11 0 64k');
  const l2 = layer('l2.qcow2', l1, 'qcow2');
  // Round 1: memory with half the pages changed, 3 pages resent (stale copy first), disk L1.
  const m1 = saveFile('m1.save', (p) => (p % 3 === 0 ? undefined : pageData('pc.ram', p, p < 32 ? 2 : 1)), [5, 6, 7]);
  const r1 = await src.buildRound({ round: 1, memorySave: m1, diskLayers: [l1], outPath: path.join(dir, 'r1'), compression: { codec: 'xz', level: 1 } });
  await src.commit();
  expect(r1.meta.stats.memRaw).toBeGreaterThan(15);
  expect(r1.meta.stats.diskRaw).toBe(16);
  await dst.applyRound(path.join(dir, 'r1'), { handoffId: 'h1', round: 1 });
  // A VM started ahead after round 1: its RAM file is filled from the image (here: a copy of the
  // image's first 40 pages), and later rounds write their pages of that range into it too.
  const mirror = { path: path.join(dir, 'ram.mirror'), offset: 0, length: 40 * 4096 };
  writeFileSync(mirror.path, readFileSync(dst.memPath).subarray(0, mirror.length));

  // Round 2: a few pages change again, one page goes back to the base, the disk gets a zeroed range and new data.
  qemuIo(l2, 'write -P 0x22 128k 8k');
  qemuIo(l2, 'write -z 0 4k');
  const l3 = layer('l3.qcow2', l2, 'qcow2');
  const m2content = (p: number): Buffer | undefined => (p === 4 ? pageData('pc.ram', p, 1) : p % 3 === 0 ? undefined : pageData('pc.ram', p, p < 32 ? (p < 8 ? 3 : 2) : 1));
  const m2 = saveFile('m2.save', m2content);
  const r2 = await src.buildRound({ round: 2, memorySave: m2, diskLayers: [l2], outPath: path.join(dir, 'r2'), compression: { codec: 'zstd', level: 3 } });
  await src.commit();
  expect(r2.meta.stats.memBase).toBe(1);
  expect(r2.meta.stats.memRaw).toBeLessThan(8);
  await dst.applyRound(path.join(dir, 'r2'), { handoffId: 'h1', round: 2 }, mirror);
  // Applying a round again is harmless.
  await dst.applyRound(path.join(dir, 'r2'), { handoffId: 'h1', round: 2 }, mirror);

  // Final round: nothing changed in memory since m2 except page 9; disk L3 gets one write.
  qemuIo(l3, 'write -P 0x33 4k 4k');
  // Page 9 gets new content; page 10 gets the content of base disk chunk 6 and page 11 that of base page 13.
  const m3 = saveFile('m3.save', (p) => (p === 9 ? pageData('pc.ram', p, 9) : p === 10 ? pageData('disk', 6, 7) : p === 11 ? pageData('pc.ram', 13, 1) : m2content(p)));
  const r3 = await src.buildRound({ round: 3, memorySave: m3, diskLayers: [l3], outPath: path.join(dir, 'r3'), compression: { codec: 'xz', level: 6 }, final: true });
  expect(r3.meta.stats.memRaw).toBe(1);
  expect(r3.meta.stats.memBase).toBe(2);
  await dst.applyRound(path.join(dir, 'r3'), { handoffId: 'h1', round: 3 }, mirror);
  expect(readFileSync(mirror.path).equals(readFileSync(dst.memPath).subarray(0, mirror.length))).toBe(true);

  // The disk is rewritten in place: the file a VM started ahead holds open keeps its inode.
  const out = { diskPath: path.join(dir, 'out.qcow2'), savePath: path.join(dir, 'out.save'), inPlaceDisk: true };
  writeFileSync(out.diskPath, 'an empty layer a VM holds open');
  const inode = statSync(out.diskPath).ino;
  await dst.finish(out);
  expect(statSync(out.diskPath).ino).toBe(inode);
  expect(sha(readFileSync(out.savePath))).toBe(sha(readFileSync(m3)));
  expect(sha(guestDisk(out.diskPath))).toBe(sha(guestDisk(l3)));
});

test('a round out of order is refused, and a tampered round is CORRUPT', async () => {
  const base = await setup();
  const src = await HandoffSource.open(path.join(dir, 'src'), 'h2', base);
  const dst = await HandoffDestination.open(path.join(dir, 'dst'), base);
  const l1 = layer('l1.qcow2', base.diskPath, 'raw');
  qemuIo(l1, 'write -P 0x44 0 4k');
  const m1 = saveFile('m1.save', (p) => pageData('pc.ram', p, 5));
  await src.buildRound({ round: 2, memorySave: m1, diskLayers: [l1], outPath: path.join(dir, 'r2'), compression: { codec: 'none' } });
  await expect(dst.applyRound(path.join(dir, 'r2'), { handoffId: 'h2', round: 2 })).rejects.toMatchObject({ code: 'CONFLICT' });
  const src2 = await HandoffSource.open(path.join(dir, 'src2'), 'h2', base);
  await src2.buildRound({ round: 1, memorySave: m1, diskLayers: [l1], outPath: path.join(dir, 'r1'), compression: { codec: 'none' } });
  const bytes = readFileSync(path.join(dir, 'r1'));
  bytes[100] = (bytes[100] ?? 0) ^ 0xff;
  writeFileSync(path.join(dir, 'r1'), bytes);
  const err = await dst.applyRound(path.join(dir, 'r1'), { handoffId: 'h2', round: 1 }).catch((e: unknown) => e);
  expect(isCloudletError(err) && err.code).toBe('CORRUPT');
  await expect(dst.finish({ diskPath: path.join(dir, 'o.qcow2'), savePath: path.join(dir, 'o.save') })).rejects.toMatchObject({ code: 'CONFLICT' });
});

test('zstd blobs round-trip, and one that inflates past its declared size is CORRUPT', async () => {
  const { zstdCompress, zstdDecompress } = await import('../../src/core/zstd');
  const data = Buffer.concat([Buffer.alloc(100_000, 7), Buffer.from('edge'.repeat(5000))]);
  const packed = await zstdCompress(data, 3);
  expect(packed.length).toBeLessThan(data.length / 10);
  expect((await zstdDecompress(packed, data.length)).equals(data)).toBe(true);
  await expect(zstdDecompress(packed, data.length - 1)).rejects.toMatchObject({ code: 'CORRUPT' });
  await expect(zstdDecompress(Buffer.from('not zstd at all'), 100)).rejects.toMatchObject({ code: 'CORRUPT' });
});
