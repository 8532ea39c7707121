/**
 * Overlay benchmark: `npx tsx bench/overlay.ts [guest|generated|generated-uniform|flat ...]`
 * (guest, generated and flat by default).
 *
 * Prints JSON lines. For each case, our overlay (dedup + LZMA segments) beside the NAIVE method of
 * the original prototype measured in the same run (xdelta3 over each whole image against the base,
 * then `xz -9`; apply = `xz -d` + `xdelta3 -d`): overlay size, create time, apply time and their
 * ratios (targets: size ≤ 0.5, apply ≤ 0.25), plus apply throughput against the parallel `xz -d`
 * bound on the same segments, and floors of our apply (its CPU time over the cores, writing the
 * save file's bytes, parallel `xz -d`) as ratios to the naive apply. `flat` shows apply time when
 * only the base disk grows.
 *
 * `generated` is a 1 GiB disk / 512 MiB memory pair modelling a back-end application installed on
 * a base VM (test/helpers/install-pair.ts: new files, metadata edits, copies of base files, freed
 * blocks; page cache of the new and of base files, heaps, kernel edits, freed and moved pages,
 * incompressible data; docs/benchmarks.md, "The generated pair"). `generated-uniform` (opt-in) is
 * the older pair with one uniform mutation mix for disk and memory (test/unit/overlay-fixture.ts).
 *
 * Environment: BENCH_DIR (default var/bench/overlay), BENCH_DISK_MIB (1024), BENCH_MEM_MIB (512),
 * BENCH_FRACTION (0.03), BENCH_LZMA (6), BENCH_SEGMENT_KIB (4096), BENCH_KEEP=1 to keep files;
 * BENCH_MEM_FRACTION (default BENCH_FRACTION) sets the memory's changed fraction of `generated`.
 */
import { execFile, execFileSync, spawn } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readFileSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { availableParallelism, loadavg } from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { promisify } from 'node:util';
import { buildChunkIndex } from '../src/core/chunk';
import { applyOverlayToParts } from '../src/core/overlay/apply';
import { createOverlayFromParts } from '../src/core/overlay/create';
import type { OverlayMeta } from '../src/core/overlay/format';
import type { BaseRef, CreateOverlayOptions, JoinSnapshot, LaunchMemory } from '../src/core/overlay/types';
import { importBase, openBase } from '../src/core/base';
import { applyOverlay, baseFilesOf, createOverlay } from '../src/core/overlay';
import { joinSnapshot, prewarmJoin } from '../src/core/snapshot';
import { encodeSkeleton } from '../src/core/snapshot/skeleton';
import { GuestAppClient } from '../src/guest/app-client';
import { loadGuestImage } from '../src/guest/manifest';
import { editDomainXml } from '../src/hypervisor/domain-xml';
import { LibvirtHypervisor } from '../src/hypervisor/libvirt';
import { ensureInfra, REPO } from '../test/helpers/infra';
import { testBasePackage } from '../test/helpers/test-base';
import { generatePair, sha256File } from '../test/unit/overlay-fixture';
import { generateInstallPair } from '../test/helpers/install-pair';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const cores = availableParallelism();
const env = (k: string, d: number): number => (process.env[k] ? Number(process.env[k]) : d);
const root = path.resolve(process.env['BENCH_DIR'] ?? path.join(__dirname, '..', 'var', 'bench', 'overlay'));

function emit(obj: Record<string, unknown>): void {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function r3(x: number): number {
  return Math.round(x * 1000) / 1000;
}

async function timed<T>(f: () => Promise<T>): Promise<[T, number]> {
  const t = performance.now();
  const v = await f();
  return [v, (performance.now() - t) / 1000];
}

const CLK_TCK = ((): number => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
})();

/** CPU seconds of this process (all its threads) and of its reaped children (xz, xdelta3), from /proc/self/stat. */
function cpuTimes(): { self: number; children: number } {
  // Fields after the command's closing parenthesis: utime, stime, cutime, cstime are the 12th-15th.
  const stat = readFileSync('/proc/self/stat', 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ').map(Number);
  const at = (i: number): number => f[i] ?? 0;
  return { self: (at(11) + at(12)) / CLK_TCK, children: (at(13) + at(14)) / CLK_TCK };
}

/** Wall and CPU seconds of f: CPU is this process's threads plus the children it waited for. */
async function timedCpu<T>(f: () => Promise<T>): Promise<[T, number, number]> {
  const c0 = cpuTimes();
  const [v, wall] = await timed(f);
  const c1 = cpuTimes();
  return [v, wall, c1.self - c0.self + (c1.children - c0.children)];
}

/**
 * The least any apply that produces the launch VM's save file pays: writing its bytes into a new
 * file on the same filesystem (8 MiB writes from memory, after a sync, as before each apply).
 */
function saveFileWriteS(dir: string, savePath: string): number {
  const bytes = readFileSync(savePath);
  const out = path.join(dir, 'write-floor.tmp');
  rmSync(out, { force: true });
  dropCaches();
  const t = performance.now();
  const fd = openSync(out, 'w');
  try {
    for (let at = 0; at < bytes.length; ) at += writeSync(fd, bytes, at, Math.min(8 * MiB, bytes.length - at), at);
  } finally {
    closeSync(fd);
  }
  const s = (performance.now() - t) / 1000;
  rmSync(out, { force: true });
  dropCaches();
  return s;
}

function dropCaches(): void {
  // Best effort: measure with warm base files either way (a host keeps its bases hot), but do not
  // let one method profit from the other's writes.
  try {
    execFileSync('sync');
  } catch {
    /* ignore */
  }
}

/**
 * xdelta3's source window: its default (64 MiB, as the prototype ran it) unless BENCH_NAIVE_WINDOW=full,
 * which lets xdelta3 see the whole base (slower, smaller deltas).
 */
const NAIVE_WINDOW = process.env['BENCH_NAIVE_WINDOW'] === 'full' ? 'full' : 'default';
function naiveWindow(base: string): string[] {
  return NAIVE_WINDOW === 'full' ? ['-B', String(Math.min(2 ** 31, Math.max(64 * MiB, statSync(base).size)))] : [];
}

/** The naive method: xdelta3 over each whole image against its base, then xz -9. */
async function naive(dir: string, pairs: Array<{ name: string; base: string; launch: string }>): Promise<NaiveResult> {
  mkdirSync(dir, { recursive: true });
  let size = 0;
  const [, createS] = await timed(async () => {
    for (const p of pairs) {
      const delta = path.join(dir, `${p.name}.vcdiff`);
      await run('xdelta3', ['-e', '-f', ...naiveWindow(p.base), '-s', p.base, p.launch, delta], { maxBuffer: 1 << 20 });
      await run('xz', ['-9', '-f', '-T1', delta]);
      size += statSync(`${delta}.xz`).size;
    }
  });
  dropCaches();
  let exact = true;
  const [, applyS, applyCpuS] = await timedCpu(async () => {
    for (const p of pairs) {
      const delta = path.join(dir, `${p.name}.vcdiff`);
      const out = path.join(dir, `${p.name}.out`);
      await run('xz', ['-d', '-k', '-f', '-T1', `${delta}.xz`]);
      await run('xdelta3', ['-d', '-f', ...naiveWindow(p.base), '-s', p.base, delta, out]);
    }
  });
  for (const p of pairs) {
    const out = path.join(dir, `${p.name}.out`);
    exact &&= sha256File(out) === sha256File(p.launch);
    rmSync(out, { force: true });
  }
  return { size, createS, applyS, applyCpuS, exact };
}

interface NaiveResult {
  size: number;
  createS: number;
  applyS: number;
  applyCpuS: number;
  exact: boolean;
}

/** Decompress the overlay's segments with `xz -d`, `cores` processes at once: the machine's bound. */
async function xzBound(overlay: string, meta: OverlayMeta, dir: string): Promise<{ rawBytes: number; seconds: number; mbps: number }> {
  mkdirSync(dir, { recursive: true });
  const bytes = readFileSync(overlay);
  const header = bytes.readUInt32LE(16);
  const dataStart = 64 + header;
  const files = meta.segments.map((s, i) => {
    const f = path.join(dir, `seg-${i}.xz`);
    writeFileSync(f, bytes.subarray(dataStart + s.offset, dataStart + s.offset + s.length));
    return f;
  });
  const rawBytes = meta.segments.reduce((a, s) => a + s.rawLength, 0);
  const queue = [...files];
  const worker = async (): Promise<void> => {
    for (let f = queue.shift(); f; f = queue.shift()) {
      await new Promise<void>((resolve, reject) => {
        const p = spawn('xz', ['-d', '-c', '-T1', f], { stdio: ['ignore', 'ignore', 'inherit'] });
        p.on('error', reject);
        p.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`xz -d exited ${code}`))));
      });
    }
  };
  const [, seconds] = await timed(() => Promise.all(Array.from({ length: cores }, worker)).then(() => undefined));
  rmSync(dir, { recursive: true, force: true });
  return { rawBytes, seconds, mbps: rawBytes / MiB / seconds };
}

interface OursResult {
  meta: OverlayMeta;
  size: number;
  createS: number;
  applyS: number;
  applyCpuS: number;
  /** Writing the save file's bytes to a new file (see saveFileWriteS). */
  writeFloorS: number;
  timings: Record<string, number>;
  exact: boolean;
}

async function ours(
  dir: string,
  base: BaseRef,
  launchDisk: string,
  memory: LaunchMemory,
  join: JoinSnapshot,
  expected: { diskRaw?: string; saveSha256: string },
  options: CreateOverlayOptions,
): Promise<OursResult> {
  mkdirSync(dir, { recursive: true });
  const overlay = path.join(dir, 'launch.overlay');
  rmSync(overlay, { force: true });
  const [meta, createS] = await timed(() => createOverlayFromParts({ base, launchDiskPath: launchDisk, memory, outPath: overlay, options }));
  const disk = path.join(dir, 'synth.qcow2');
  const save = path.join(dir, 'synth.sav');
  rmSync(disk, { force: true });
  rmSync(save, { force: true });
  dropCaches();
  const [{ timings }, applyS, applyCpuS] = await timedCpu(() => applyOverlayToParts({ base: baseFilesOf(base), overlay, outDiskPath: disk, outSavePath: save, join }));
  let exact = sha256File(save) === expected.saveSha256;
  const writeFloorS = saveFileWriteS(dir, save);
  if (expected.diskRaw) {
    try {
      execFileSync('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', disk, expected.diskRaw]);
    } catch {
      exact = false;
    }
  }
  rmSync(save, { force: true });
  return { meta, size: statSync(overlay).size, createS, applyS, applyCpuS, writeFloorS, timings, exact };
}

async function indexBase(id: string, diskPath: string, memImagePath: string): Promise<BaseRef> {
  return { id, diskPath, diskIndex: await buildChunkIndex(diskPath), memImagePath, memIndex: await buildChunkIndex(memImagePath) };
}

function report(caseName: string, o: OursResult, n: NaiveResult, bound: { mbps: number; rawBytes: number; seconds: number }, extra: Record<string, unknown> = {}): void {
  const rawBytes = o.meta.segments.reduce((a, s) => a + s.rawLength, 0);
  const applyMbps = rawBytes / MiB / o.applyS;
  const streamMbps = rawBytes / MiB / ((o.timings['stream'] ?? o.applyS * 1000) / 1000);
  emit({
    case: caseName,
    ...extra,
    overlayBytes: o.size,
    naiveBytes: n.size,
    sizeRatio: r3(o.size / n.size),
    createS: r3(o.createS),
    naiveCreateS: r3(n.createS),
    createRatio: r3(o.createS / n.createS),
    applyS: r3(o.applyS),
    naiveApplyS: r3(n.applyS),
    applyRatio: r3(o.applyS / n.applyS),
    // Floors of our apply time, as ratios to the naive apply: its CPU time spread over every core
    // (this implementation, perfectly parallel), writing the save file's bytes (any method that
    // produces the file), decompressing the segments with parallel xz -d (the throughput bound).
    applyCpuS: r3(o.applyCpuS),
    naiveApplyCpuS: r3(n.applyCpuS),
    floors: {
      cpuOverCoresS: r3(o.applyCpuS / cores),
      writeSaveFileS: r3(o.writeFloorS),
      xzBoundS: r3(bound.seconds),
    },
    floorRatios: {
      cpuOverCores: r3(o.applyCpuS / cores / n.applyS),
      writeSaveFile: r3(o.writeFloorS / n.applyS),
      xzBound: r3(bound.seconds / n.applyS),
    },
    segments: o.meta.segments.length,
    segmentRawBytes: rawBytes,
    applyMiBps: r3(applyMbps),
    streamMiBps: r3(streamMbps),
    xzParallelBoundMiBps: r3(bound.mbps),
    applyVsBound: r3(bound.mbps / applyMbps),
    streamVsBound: r3(bound.mbps / streamMbps),
    changedChunks: { disk: o.meta.launch.disk.changedChunks, memory: o.meta.launch.memory.changedChunks },
    kinds: o.meta.stats,
    applyTimingsMs: o.timings,
    exact: o.exact,
    naiveExact: n.exact,
    naiveXdelta3Window: NAIVE_WINDOW,
    targets: { sizeRatio: 0.5, applyRatio: 0.25, applyVsBound: 2 },
  });
}

/**
 * A generated memory image stands for a save file the codec keeps opaque (the save file is the
 * image itself), so applying builds it with the real joinSnapshot, as for a real save file.
 */
function opaqueMemory(memPath: string): { memory: LaunchMemory; save: { size: number; sha256: string } } {
  const size = statSync(memPath).size;
  const sha256 = sha256File(memPath);
  const skeleton = encodeSkeleton({ mode: 'opaque', saveFileSize: size, saveFileSha256: sha256, memImageSize: size, pageSize: 4096, blocks: [], reason: 'generated pair: the memory image stands for the save file' }, []);
  return { memory: { memImagePath: memPath, skeleton, mode: 'opaque', domainXml: '<domain/>', cpuModel: undefined, saveFileSize: size, saveFileSha256: sha256 }, save: { size, sha256 } };
}

/** (b) A generated pair: the app-install model (`generated`) or the older uniform mix (`generated-uniform`). */
async function generatedCase(model: 'app-install' | 'uniform'): Promise<void> {
  const diskMiB = env('BENCH_DISK_MIB', 1024);
  const memMiB = env('BENCH_MEM_MIB', 512);
  const fraction = env('BENCH_FRACTION', 0.03);
  const caseName = model === 'uniform' ? 'generated-uniform' : 'generated';
  const dir = path.join(root, caseName);
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const memFraction = model === 'uniform' ? fraction : env('BENCH_MEM_FRACTION', fraction);
  const sizes = { diskSize: diskMiB * MiB, memSize: memMiB * MiB, fraction, seed: 1 };
  const [{ pair, composition }, genS] = await timed(async () => {
    if (model === 'uniform') return { pair: generatePair(dir, sizes), composition: undefined };
    const p = generateInstallPair(dir, { ...sizes, memFraction });
    return { pair: p, composition: { disk: p.disk.byKind, memory: p.memory.byKind } };
  });
  const base = await indexBase('generated-base', pair.baseDisk, pair.baseMem);
  const { memory, save } = opaqueMemory(pair.launchMem);
  const n = await naive(path.join(dir, 'naive'), [
    { name: 'disk', base: pair.baseDisk, launch: pair.launchRaw },
    { name: 'memory', base: pair.baseMem, launch: pair.launchMem },
  ]);
  for (const delta of [false, true]) {
    const o = await ours(path.join(dir, 'ours'), base, pair.launchQcow2, memory, joinSnapshot, { diskRaw: pair.launchRaw, saveSha256: save.sha256 }, { lzmaLevel: env('BENCH_LZMA', 6), delta, segmentSize: env('BENCH_SEGMENT_KIB', 4096) * 1024 });
    const bound = await xzBound(path.join(dir, 'ours', 'launch.overlay'), o.meta, path.join(dir, 'xzbound'));
    report(caseName, o, n, bound, { model, delta, diskMiB, memMiB, fraction, memFraction, generateS: r3(genS), ...(composition ? { composition } : {}) });
  }
  if (!process.env['BENCH_KEEP']) rmSync(dir, { recursive: true, force: true });
}

/** Apply time when only the base disk grows: the same changes over bases of 1, 4 and 16 GiB. */
async function flatCase(): Promise<void> {
  const dir = path.join(root, 'flat');
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const pair = generatePair(dir, { diskSize: 256 * MiB, memSize: 128 * MiB, fraction: 0.03, seed: 2 });
  const { memory, save } = opaqueMemory(pair.launchMem);
  for (const gib of [1, 4, 16]) {
    // The grown base: the same data then a sparse zero tail; the launch disk: the same top layer, resized.
    const baseDisk = path.join(dir, `base-${gib}g.raw`);
    execFileSync('cp', ['--sparse=always', pair.baseDisk, baseDisk]);
    execFileSync('truncate', ['-s', `${gib}G`, baseDisk]);
    const launch = path.join(dir, `launch-${gib}g.qcow2`);
    execFileSync('cp', [pair.launchQcow2, launch]);
    execFileSync('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', baseDisk, '-F', 'raw', launch]);
    execFileSync('qemu-img', ['resize', '-q', '-f', 'qcow2', launch, `${gib}G`]);
    const [base, indexS] = await timed(() => indexBase(`flat-${gib}`, baseDisk, pair.baseMem));
    const o = await ours(path.join(dir, `ours-${gib}`), base, launch, memory, joinSnapshot, { saveSha256: save.sha256 }, { lzmaLevel: env('BENCH_LZMA', 6) });
    emit({
      case: 'flat-base-growth',
      baseDiskGiB: gib,
      overlayBytes: o.size,
      createS: r3(o.createS),
      applyS: r3(o.applyS),
      applyTimingsMs: o.timings,
      indexBaseS: r3(indexS),
      exact: o.exact,
    });
    rmSync(path.join(dir, `ours-${gib}`), { recursive: true, force: true });
    rmSync(baseDisk);
    rmSync(launch);
  }
  if (!process.env['BENCH_KEEP']) rmSync(dir, { recursive: true, force: true });
}

export const CUSTOMIZE_RECIPE = [
  'mkdir -p /data/app/www /data/app/bin',
  'cp /bin/busybox /data/app/bin/server',
  'i=0; while [ $i -lt 300 ]; do echo "<p>page $i of the cloudlet demo application, served by busybox httpd</p>" > /data/app/www/page$i.html; i=$((i+1)); done',
  'dd if=/dev/urandom of=/data/app/key.bin bs=4k count=16 2>/dev/null',
  'i=0; while [ $i -lt 20000 ]; do echo "$i,user$i,$((i * 7 % 1000)),ok"; i=$((i+1)); done > /data/app/data.csv',
  'cat /data/app/www/*.html > /run/app-cache.html',
  '(/data/app/bin/server httpd -f -p 8081 -h /data/app/www &) ; sleep 1',
  'sync; echo done',
];

/**
 * (a) The real test guest, customized as a developer would: resume the base VM (its save file with
 * a qcow2 over its disk), add an application and data through /cgi-bin/exec, set the token, save.
 */
async function guestCase(): Promise<void> {
  ensureInfra(['libvirt', 'guest']);
  const guest = loadGuestImage(path.join(REPO, 'var', 'guest'));
  const pkg = await testBasePackage();
  const dir = path.join(root, 'guest');
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  await importBase(path.join(dir, 'store'), pkg.packageFile);
  const base = await openBase(path.join(dir, 'store'), pkg.baseId);
  const hv = new LibvirtHypervisor();
  const launchDisk = path.join(dir, 'launch.qcow2');
  const launchSave = path.join(dir, 'launch.sav');
  let domain: string | undefined;
  const token = `bench-${Date.now()}`;
  try {
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base.diskPath, '-F', 'raw', launchDisk]);
    const xml = editDomainXml(await hv.saveFileXml(base.savePath), { diskPath: launchDisk, diskFormat: 'qcow2', serialPath: path.join(dir, 'serial.log') });
    domain = (await hv.restore(base.savePath, { xml })).name;
    const fwd = await hv.forwardPort(domain, { guestPort: guest.appPort });
    const app = new GuestAppClient(fwd.hostPort);
    await app.waitForState(60_000);
    // The "application": its binary (a copy of busybox, run from the data disk), a web root of
    // pages, a small random key, a data file; a cache of the pages and the running server in memory.
    const recipe = CUSTOMIZE_RECIPE.join('\n');
    const res = await fetch(`http://127.0.0.1:${fwd.hostPort}/cgi-bin/exec`, { method: 'POST', body: recipe, signal: AbortSignal.timeout(120_000) });
    if (!res.ok) throw new Error(`customization failed: HTTP ${res.status} ${await res.text()}`);
    await app.set(token, 'customized by bench/overlay.ts');
    await hv.save(domain, launchSave);
  } finally {
    if (domain) {
      await hv.destroy(domain).catch(() => undefined);
      await hv.undefine(domain).catch(() => undefined);
    }
    await hv.close();
  }
  const launchRaw = path.join(dir, 'launch.raw');
  execFileSync('qemu-img', ['convert', '-O', 'raw', launchDisk, launchRaw]);
  const n = await naive(path.join(dir, 'naive'), [
    { name: 'disk', base: base.diskPath, launch: launchRaw },
    { name: 'memory', base: base.savePath, launch: launchSave },
  ]);
  const saveSha = sha256File(launchSave);
  for (const delta of [false, true]) {
    const overlay = path.join(dir, `launch-${delta}.overlay`);
    const [meta, createS] = await timed(() => createOverlay({ base, launchDiskPath: launchDisk, launchSavePath: launchSave, outPath: overlay, options: { lzmaLevel: env('BENCH_LZMA', 6), delta, segmentSize: env('BENCH_SEGMENT_KIB', 4096) * 1024 } }));
    const outDisk = path.join(dir, 'synth.qcow2');
    const outSave = path.join(dir, 'synth.sav');
    rmSync(outDisk, { force: true });
    rmSync(outSave, { force: true });
    dropCaches();
    const [{ timings }, applyS, applyCpuS] = await timedCpu(() => applyOverlay({ base: baseFilesOf(base), overlay, outDiskPath: outDisk, outSavePath: outSave }));
    let exact = sha256File(outSave) === saveSha;
    const writeFloorS = saveFileWriteS(dir, outSave);
    try {
      execFileSync('qemu-img', ['compare', '-q', outDisk, launchDisk]);
    } catch {
      exact = false;
    }
    const bound = await xzBound(overlay, meta, path.join(dir, 'xzbound'));
    report('guest', { meta, size: statSync(overlay).size, createS, applyS, applyCpuS, writeFloorS, timings, exact }, n, bound, {
      delta,
      memoryMiB: Math.round(meta.launch.memory.imageSize / MiB),
      diskMiB: Math.round(meta.launch.disk.virtualSize / MiB),
      saveFileBytes: meta.launch.memory.saveFileSize,
      customization: 'busybox copied as the app binary and started as an httpd, 300 pages, 64 KiB random key, 20000-line CSV, page cache in tmpfs; token set',
    });
  }
  if (!process.env['BENCH_KEEP']) rmSync(dir, { recursive: true, force: true });
}

async function main(): Promise<void> {
  const cases = process.argv.slice(2).filter((a) => !a.startsWith('-'));
  const defaults = ['guest', 'generated', 'flat'];
  const want = (c: string): boolean => (cases.length === 0 ? defaults.includes(c) : cases.includes(c));
  mkdirSync(root, { recursive: true });
  // As a host worker does at start (src/workers/host-worker.ts): our applies run in a warm process.
  await prewarmJoin();
  emit({ bench: 'overlay', cores, loadAverage: loadavg().map((x) => Math.round(x * 10) / 10), node: process.version, xz: execFileSync('xz', ['--version']).toString().split('\n')[0], started: new Date().toISOString() });
  if (want('guest')) await guestCase();
  if (want('generated')) await generatedCase('app-install');
  if (want('generated-uniform')) await generatedCase('uniform');
  if (want('flat')) await flatCase();
}

main().catch((e: unknown) => {
  process.stderr.write(`${(e as Error).stack ?? String(e)}\n`);
  process.exit(1);
});
