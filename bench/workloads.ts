/**
 * Workloads benchmark: the original system's kind of applications on a Debian 12 base VM,
 * synthesized over emulated edge links, beside the two baselines measured in the same run.
 *
 *   npx tsx bench/workloads.ts [--apps webdb,ocr,speech,face] [--links wifi38,mbit100,gbit1]
 *                              [--methods ours,naive,whole] [--runs N]      (npm run bench -- workloads)
 *   npx tsx bench/workloads.ts --semantic [--apps ...]   overlay sizes with/without discard and free page reporting
 *   npx tsx bench/workloads.ts --build-only [--apps ...] build (or find cached) the overlays and baselines, measure nothing
 *
 * Build (once per application and recipe, cached under var/cache/workloads-bench/): resume the
 * base on a scratch host, run the application's recipe in it (packages served by the host,
 * through qemu-guest-agent), time its real request on this launch VM, save it and build our
 * overlay; keep the launch VM's save file and flattened disk for the baselines (naive xdelta3+xz
 * overlay, whole VM copy; bench/workload-baselines.ts).
 *
 * Measure: one host worker (B) on the real Temporal dev server; a file server (its own process) on 127.0.0.1
 * serves every method's files; each link profile (src/links: namespaces, veth, tbf, relays that
 * add the RTT) stands between it and B. First response = from the start of the method until the
 * application's real request is answered correctly. Ours is `synthesizeVm` through the workflow.
 *
 * Prints JSON lines {"bench":"workloads",...}: per run, per application x link (medians), the
 * published figures for reference, and one line {"metric":"targets","targets":[...]} with
 * sizeRatio, firstResponseRatio and beyondTransferS (medians over the applications at 38 Mbit/s).
 * Writes the chart docs/figures/workloads-first-response.svg.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { loadavg } from 'node:os';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { z } from 'zod';
import { createInstanceActivities } from '../src/activities/instances';
import { createRecipeActivities, parseRecipe } from '../src/activities/recipes';
import { hostTaskQueue } from '../src/common/names';
import { createLogger } from '../src/common/logger';
import { hostDir, loadConfig } from '../src/config';
import { debianBasePackage } from '../src/guest/base-package';
import { preparePackageRepo } from '../src/guest/package-repo';
import { LibvirtHypervisor } from '../src/hypervisor/libvirt';
import { LINK_PROFILES, openLink, type LinkProfileName } from '../src/links';
import { importBaseVm, synthesizeVm, terminateVm } from '../src/workflows';
import { askWorkload, WORKLOAD_APP_PORT, WORKLOAD_NAMES, workloadRecipe, type WorkloadName } from '../src/workloads';
import { workloadInputs } from '../src/workloads/inputs';
import { startTestCluster } from '../test/helpers/cluster';
import { REPO } from '../test/helpers/infra';
import { groupedBarChart, type BarGroup } from './chart';
import { argRuns, median } from './lib';
import { startFileServer } from './file-server';
import { prepareBaselines, removeBaseline, runBaseline, type BaselineFiles } from './workload-baselines';

const run = promisify(execFile);
const METHODS = ['ours', 'naive', 'whole'] as const;
type Method = (typeof METHODS)[number];
const VAR = path.join(REPO, 'var');
const CACHE = path.join(VAR, 'cache', 'workloads-bench');
const INPUTS = path.join(VAR, 'cache', 'workload-inputs');
const r1 = (x: number): number => Math.round(x * 10) / 10;
const emit = (o: Record<string, unknown>): void => void process.stdout.write(`${JSON.stringify({ bench: 'workloads', ...o })}\n`);
const progress = (msg: string): void => void process.stderr.write(`[workloads] ${msg}\n`);

function argList<T extends string>(flag: string, all: readonly T[], dflt: readonly T[]): T[] {
  const i = process.argv.indexOf(flag);
  if (i < 0) return [...dflt];
  const got = (process.argv[i + 1] ?? '').split(',').filter(Boolean);
  for (const g of got) if (!all.includes(g as T)) throw new Error(`${flag}: "${g}" is not one of ${all.join(', ')}`);
  return got as T[];
}

interface Built {
  app: WorkloadName;
  dir: string;
  overlayFile: string;
  overlayBytes: number;
  /** The real request's time on the launch VM (median of 5), before the overlay was made. */
  requestMs: number;
  /** The Debian packages the recipe installed, as Debian ships them (.deb files, xz-compressed). */
  packages: { debs: number; bytes: number };
  baselines?: BaselineFiles;
}
type BuiltWithBaselines = Built & { baselines: BaselineFiles };

const BuildInfo = z.object({ overlayFile: z.string(), requestMs: z.number() });

/**
 * How the launch VM is made: `default` as users get it; `nodiscard` with the guest's root file
 * system remounted without discard before the recipe (deleted files keep their blocks in the qcow2
 * layer); `nofpr` on a base VM saved without free page reporting. The last two only measure the
 * overlay's size (--semantic).
 */
type Variant = 'default' | 'nodiscard' | 'nofpr';

/** Build (or find cached) the application's launch VM, our overlay and (default variant) the baselines. */
/** `withBaselines: false`: only the overlay (the handoff bench needs no baselines). */
export async function build(app: WorkloadName, hv: LibvirtHypervisor, base: { packageFile: string; baseId: string }, variant: Variant = 'default', withBaselines = true): Promise<Built> {
  const recipe = parseRecipe(await workloadRecipe(app, { hostId: 'bench-build', baseId: base.baseId, inputsDir: INPUTS }));
  const digest = createHash('sha256').update(JSON.stringify(recipe)).digest('hex').slice(0, 12);
  const dir = path.join(CACHE, base.baseId.slice(0, 12), `${app}-${digest}${variant === 'default' ? '' : `-${variant}`}`);
  const infoFile = path.join(dir, 'build.json');
  const buildHost = path.join(VAR, 'hosts', 'bench-build');
  const store = path.join(buildHost, 'store');
  const baseFiles = { disk: path.join(store, 'bases', base.baseId, 'disk.raw'), save: path.join(store, 'bases', base.baseId, 'memory.sav') };
  const log = createLogger('bench-build', 'warn');
  const acts = createInstanceActivities({ hostId: 'bench-build', dataDir: buildHost, hypervisor: hv, publicUrl: () => 'http://127.0.0.1:0', log, fetchPolicy: loadConfig().fetch });
  await acts.importBasePackage({ source: base.packageFile });
  if (!fs.existsSync(infoFile)) {
    progress(`${app}: building the launch VM (recipe ${recipe.recipeId}, ${recipe.packages.length} packages; installing under emulation takes minutes)`);
    const recipes = createRecipeActivities({ hostId: 'bench-build', dataDir: buildHost, hypervisor: hv, log });
    const instanceId = `wl-${app}`;
    await acts.terminateInstance({ instanceId });
    try {
      const resumed = await acts.resumeBaseInstance({ instanceId, baseId: base.baseId, appPort: WORKLOAD_APP_PORT });
      if (variant === 'nodiscard') {
        const r = await hv.guestExec(resumed.domain, { path: '/bin/mount', args: ['-o', 'remount,nodiscard', '/'], timeoutMs: 60_000 });
        if (r.exitCode !== 0) throw new Error(`remount without discard failed: ${r.stderr}`);
      }
      const ran = await recipes.runRecipeInGuest({ instanceId, recipe });
      progress(`${app}: recipe ran in ${r1(ran.ms / 1000)} s`);
      const { hostPort } = await acts.getInstance({ instanceId });
      const inputs = await workloadInputs(INPUTS);
      const times: number[] = [];
      for (let i = 0; i < 5; i++) {
        const a = await askWorkload(app, `http://127.0.0.1:${hostPort}`, inputs);
        if (!a.ok) throw new Error(`${app} on its launch VM: ${a.why}`);
        times.push(a.ms);
      }
      const made = await acts.createInstanceOverlay({ instanceId, keepInstance: false });
      fs.mkdirSync(dir, { recursive: true });
      const overlayFile = path.join(dir, 'ours.overlay');
      fs.copyFileSync(path.join(store, 'overlays', `${made.overlayId}.overlay`), overlayFile);
      const idir = path.join(buildHost, 'instances', instanceId);
      fs.copyFileSync(path.join(idir, 'launch.sav'), path.join(dir, 'launch.sav'));
      await run('qemu-img', ['convert', '-O', 'raw', path.join(idir, 'disk.qcow2'), path.join(dir, 'launch-disk.raw')]);
      fs.writeFileSync(infoFile, JSON.stringify({ overlayFile, requestMs: median(times) }));
    } finally {
      await acts.terminateInstance({ instanceId });
    }
  }
  const info = BuildInfo.parse(JSON.parse(fs.readFileSync(infoFile, 'utf8')));
  const overlayBytes = fs.statSync(info.overlayFile).size;
  const packages = await packagesOf(recipe.packages, path.join(buildHost, 'cache', 'guest-packages'));
  if (variant !== 'default' || !withBaselines) return { app, dir, overlayFile: info.overlayFile, overlayBytes, requestMs: info.requestMs, packages };
  progress(`${app}: making the baselines (xdelta3 + xz -9 of whole images: minutes, once)`);
  const baselines = await prepareBaselines(dir, baseFiles, { diskRaw: path.join(dir, 'launch-disk.raw'), save: path.join(dir, 'launch.sav') });
  return { app, dir, overlayFile: info.overlayFile, overlayBytes, requestMs: info.requestMs, packages, baselines };
}

/**
 * The .deb files a recipe's packages add to the Debian base (the recipe's own cache of them, keyed
 * by the package list and the guest's dpkg status: the base image's, which the guest still has).
 * Their bytes are a floor for any overlay that carries the installed files: they are those files
 * as Debian compresses them (xz), with nothing else.
 */
async function packagesOf(packages: string[], cacheRoot: string): Promise<{ debs: number; bytes: number }> {
  if (packages.length === 0) return { debs: 0, bytes: 0 };
  const repo = await preparePackageRepo({ guestStatus: fs.readFileSync(path.join(VAR, 'debian', 'dpkg-status'), 'utf8'), packages, cacheRoot });
  return { debs: repo.debs.length, bytes: repo.bytes };
}

/**
 * Ask until the answer is right (the VM may not answer yet); the time of the first right answer.
 * As a client would: short GET /health probes until the application answers at all (right after
 * a resume the forward accepts a connection the guest cannot take yet, and such a request hangs
 * for seconds), then the real request, with the time it needs.
 */
async function firstRightAnswer(app: WorkloadName, port: () => number | undefined, inputs: Awaited<ReturnType<typeof workloadInputs>>, deadlineMs: number): Promise<number> {
  const deadline = Date.now() + deadlineMs;
  let last = 'no port yet';
  for (;;) {
    const p = port();
    if (p !== undefined) {
      try {
        await fetch(`http://127.0.0.1:${p}/health`, { signal: AbortSignal.timeout(500) }).then((r) => r.arrayBuffer());
        const a = await askWorkload(app, `http://127.0.0.1:${p}`, inputs, 60_000);
        if (a.ok) return performance.now();
        last = a.why ?? '';
      } catch (e) {
        last = (e as Error).message;
      }
    }
    if (Date.now() > deadline) throw new Error(`${app} did not answer its request right within ${deadlineMs} ms (last: ${last})`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const InstanceFile = z.object({ hostPort: z.number().int().optional() });

async function main(): Promise<void> {
  const apps = argList('--apps', WORKLOAD_NAMES, WORKLOAD_NAMES);
  const links = argList('--links', Object.keys(LINK_PROFILES) as LinkProfileName[], ['wifi38', 'mbit100', 'gbit1']);
  const methods = argList('--methods', METHODS, METHODS);
  const runs = argRuns();
  emit({ metric: 'environment', apps, links, methods, runs, load: loadavg().map(r1) });
  const hv = new LibvirtHypervisor({ logger: createLogger('bench', 'warn') });
  const base = await debianBasePackage(hv, VAR, progress);
  progress(`base ${base.baseId.slice(0, 12)}`);
  if (process.argv.includes('--semantic')) {
    // Overlay sizes with and without each way of closing the semantic gap; no measurement runs.
    const noFpr = await debianBasePackage(hv, VAR, progress, { freePageReporting: false });
    for (const app of apps) {
      const sizes: Record<string, number> = {};
      for (const [variant, b] of [['default', base], ['nodiscard', base], ['nofpr', noFpr]] as const) sizes[variant] = (await build(app, hv, b, variant)).overlayBytes;
      emit({ metric: 'semantic', app, overlayBytes: sizes, discardSaves: (sizes.nodiscard ?? 0) - (sizes.default ?? 0), freePageReportingSaves: (sizes.nofpr ?? 0) - (sizes.default ?? 0) });
    }
    await hv.close();
    return;
  }
  const built: BuiltWithBaselines[] = [];
  for (const app of apps) {
    const b = await build(app, hv, base);
    if (!b.baselines) throw new Error(`${app}: no baselines were made`);
    built.push({ ...b, baselines: b.baselines });
  }
  for (const b of built) {
    emit({
      metric: 'sizes', app: b.app, oursBytes: b.overlayBytes, naiveBytes: b.baselines.naive.bytes, wholeBytes: b.baselines.whole.bytes, requestMs: r1(b.requestMs),
      packageDebs: b.packages.debs, packageBytes: b.packages.bytes, oursOverPackages: b.packages.bytes ? Math.round((b.overlayBytes / b.packages.bytes) * 1000) / 1000 : null,
    });
  }
  if (process.argv.includes('--build-only')) {
    await hv.close();
    return;
  }

  // The file server every method downloads from (Range for our overlay's segments).
  const served = path.join(CACHE, 'served');
  fs.rmSync(served, { recursive: true, force: true });
  fs.mkdirSync(served, { recursive: true });
  for (const b of built) {
    for (const f of [b.overlayFile, b.baselines.naive.disk, b.baselines.naive.memory, b.baselines.whole.disk, b.baselines.whole.memory]) {
      fs.linkSync(f, path.join(served, `${b.app}-${path.basename(f)}`));
    }
  }
  // In a process of its own, like an overlay server on another machine (bench/file-server.mjs).
  const server = await startFileServer(served);
  const serverPort = server.port;

  // CLOUDLET_BENCH_LOG_LEVEL=info shows host B's step logs (on stderr, beside the JSON lines).
  const cluster = await startTestCluster('wlbench', ['wlb'], { env: { CLOUDLET_LOG_LEVEL: process.env.CLOUDLET_BENCH_LOG_LEVEL ?? 'warn' } });
  const [hostB] = cluster.hosts as [string];
  const results: Array<{ app: WorkloadName; link: LinkProfileName; method: Method; firstResponseMs: number; bytes: number; stages: Record<string, number> }> = [];
  try {
    await cluster.client.workflow.execute(importBaseVm, { taskQueue: hostTaskQueue(hostB), workflowId: `importBaseVm/${hostB}/${base.baseId.slice(0, 12)}`, args: [{ hostId: hostB, source: base.packageFile, onHostQueue: true }] });
    const baseOnB = path.join(hostDir(cluster.config, hostB), 'store', 'bases', base.baseId);
    const inputs = await workloadInputs(INPUTS);
    // Warm-up, not measured: the first VM a host starts after its worker did (QEMU and its
    // libraries not yet in the page cache) took 2.7 s to start where the next took 1.1 s.
    const first = built[0];
    if (first) {
      progress(`warm-up: one synthesis of ${first.app} on B without a link (not measured)`);
      const warm = { hostId: hostB, instanceId: 'wl-warmup', onHostQueue: true };
      await cluster.client.workflow.execute(synthesizeVm, { taskQueue: hostTaskQueue(hostB), workflowId: `synthesizeVm/${hostB}/wl-warmup-${Date.now()}`, args: [{ ...warm, overlayUrl: `http://127.0.0.1:${serverPort}/${first.app}-ours.overlay`, appPort: WORKLOAD_APP_PORT, waitForApp: false }] });
      await cluster.client.workflow.execute(terminateVm, { taskQueue: hostTaskQueue(hostB), workflowId: `terminateVm/${hostB}/wl-warmup-${Date.now()}`, args: [warm] });
    }
    for (const linkName of links) {
      const link = await openLink({ profile: linkName, target: { host: '127.0.0.1', port: serverPort } });
      try {
        for (const b of built) {
          for (let r = 0; r < runs; r++) {
            // Rotate the order of the methods between runs, so that drift hits them alike.
            const order = methods.map((_, i) => methods[(i + r) % methods.length] as Method);
            for (const method of order) {
              const id = `${b.app}-${linkName}-${method}-${r}`;
              progress(`${id}: start (load ${loadavg().map(r1).join(' ')})`);
              const t0 = performance.now();
              if (method === 'ours') {
                const instanceId = `wl-${b.app}-${r}`.replace(/[^a-z0-9-]/g, '');
                const file = path.join(hostDir(cluster.config, hostB), 'instances', instanceId, 'instance.json');
                const handle = await cluster.client.workflow.start(synthesizeVm, {
                  taskQueue: hostTaskQueue(hostB),
                  workflowId: `synthesizeVm/${hostB}/${instanceId}-${Date.now()}`,
                  args: [{ hostId: hostB, instanceId, overlayUrl: link.url(`/${b.app}-ours.overlay`), appPort: WORKLOAD_APP_PORT, waitForApp: false, onHostQueue: true }],
                });
                const port = (): number | undefined => {
                  try {
                    return InstanceFile.parse(JSON.parse(fs.readFileSync(file, 'utf8'))).hostPort;
                  } catch {
                    return undefined;
                  }
                };
                const t1 = await firstRightAnswer(b.app, port, inputs, 20 * 60_000);
                const res = await handle.result();
                results.push({ app: b.app, link: linkName, method, firstResponseMs: t1 - t0, bytes: b.overlayBytes, stages: { ...res.timings, ...res.applyTimings } });
                await cluster.client.workflow.execute(terminateVm, { taskQueue: hostTaskQueue(hostB), workflowId: `terminateVm/${hostB}/${instanceId}-${Date.now()}`, args: [{ hostId: hostB, instanceId, onHostQueue: true }] });
              } else {
                const workDir = path.join(hostDir(cluster.config, hostB), 'baselines', id);
                const domain = `cl-${hostB}-${method}-${r}`;
                const files: BaselineFiles = {
                  naive: { ...b.baselines.naive, disk: `${b.app}-${path.basename(b.baselines.naive.disk)}`, memory: `${b.app}-${path.basename(b.baselines.naive.memory)}` },
                  whole: { ...b.baselines.whole, disk: `${b.app}-${path.basename(b.baselines.whole.disk)}`, memory: `${b.app}-${path.basename(b.baselines.whole.memory)}` },
                };
                try {
                  const br = await runBaseline(hv, method, { baseUrl: link.url(''), workDir, domain, base: { disk: path.join(baseOnB, 'disk.raw'), save: path.join(baseOnB, 'memory.sav') }, files, appPort: WORKLOAD_APP_PORT });
                  const t1 = await firstRightAnswer(b.app, () => br.hostPort, inputs, 20 * 60_000);
                  results.push({ app: b.app, link: linkName, method, firstResponseMs: t1 - t0, bytes: b.baselines[method].bytes, stages: { transferMs: br.transferMs, decodeMs: br.decodeMs, restoreMs: br.restoreMs, replugMs: br.replugMs } });
                } finally {
                  await removeBaseline(hv, { domain, workDir });
                }
              }
              const last = results[results.length - 1];
              if (last) emit({ metric: 'run', ...last, firstResponseMs: Math.round(last.firstResponseMs), stages: Object.fromEntries(Object.entries(last.stages).map(([k, v]) => [k, Math.round(v)])) });
            }
          }
        }
      } finally {
        await link.close();
      }
    }
  } finally {
    await cluster.stop();
    await server.close();
    await hv.close();
  }

  // Medians per application x link x method, ratios, targets.
  const med = (app: string, link: string, method: Method): number | undefined => {
    const xs = results.filter((x) => x.app === app && x.link === link && x.method === method).map((x) => x.firstResponseMs);
    return xs.length ? median(xs) : undefined;
  };
  const groups: BarGroup[] = [];
  for (const linkName of links) {
    for (const b of built) {
      const values: Record<string, number | undefined> = {};
      for (const m of methods) values[m] = (med(b.app, linkName, m) ?? NaN) / 1000;
      const ours = med(b.app, linkName, 'ours');
      const naive = med(b.app, linkName, 'naive');
      const rate = LINK_PROFILES[linkName].rateMbit * 1e6;
      emit({
        metric: 'summary', app: b.app, link: linkName,
        firstResponseS: Object.fromEntries(methods.map((m) => [m, values[m] !== undefined && Number.isFinite(values[m]) ? r1(values[m] as number) : null])),
        bytes: { ours: b.overlayBytes, naive: b.baselines.naive.bytes, whole: b.baselines.whole.bytes },
        sizeRatio: b.overlayBytes / b.baselines.naive.bytes,
        firstResponseRatio: ours !== undefined && naive !== undefined ? ours / naive : null,
        beyondTransferS: ours !== undefined ? (ours - (b.overlayBytes * 8 * 1000) / rate - b.requestMs) / 1000 : null,
      });
      groups.push({ label: `${b.app} @ ${linkName}`, values: Object.fromEntries(Object.entries(values).map(([k, v]) => [k, Number.isFinite(v) ? v : undefined])) });
    }
  }
  emit({ metric: 'published', note: 'published, not measured here: MobiSys 2013 (Ha et al.), 38 Mbit/s WiFi', FACE: { naiveFirstResponseS: 37, optimizedFirstResponseS: 8 }, overlaySizeOfNaive: 0.28 });
  const wifi = links.includes('wifi38') ? 'wifi38' : undefined;
  if (wifi) {
    const sizeRatios = built.map((b) => b.overlayBytes / b.baselines.naive.bytes);
    const frRatios = built.map((b) => { const o = med(b.app, wifi, 'ours'); const n = med(b.app, wifi, 'naive'); return o !== undefined && n !== undefined ? o / n : NaN; }).filter(Number.isFinite);
    const beyond = built.map((b) => { const o = med(b.app, wifi, 'ours'); return o === undefined ? NaN : (o - (b.overlayBytes * 8 * 1000) / (LINK_PROFILES.wifi38.rateMbit * 1e6) - b.requestMs) / 1000; }).filter(Number.isFinite);
    emit({
      metric: 'targets',
      apps: built.map((b) => b.app),
      targets: [
        { name: 'sizeRatio', value: median(sizeRatios), limit: 0.3 },
        ...(frRatios.length ? [{ name: 'firstResponseRatio', value: median(frRatios), limit: 0.25 }] : []),
        ...(beyond.length ? [{ name: 'beyondTransferS', value: median(beyond), limit: 3 }] : []),
      ],
    });
    // What no overlay that carries the installed files can go under: the packages' own .deb bytes.
    const floors = built.map((b) => b.packages.bytes / b.baselines.naive.bytes);
    emit({ metric: 'floors', note: 'the Debian packages each recipe installed (.deb bytes) over the naive overlay: a floor for sizeRatio', apps: built.map((b) => b.app), packagesOverNaive: floors.map((x) => Math.round(x * 1000) / 1000), median: median(floors) });
  }
  const chart = groupedBarChart('First response (s): ours vs naive overlay vs whole VM copy', 'seconds', [...methods], groups);
  const out = path.join(REPO, 'docs', 'figures', 'workloads-first-response.svg');
  fs.mkdirSync(path.dirname(out), { recursive: true });
  fs.writeFileSync(out, chart);
  progress(`chart written to ${path.relative(REPO, out)}`);
}

if (require.main === module) {
  main().catch((e: unknown) => {
    process.stderr.write(`[workloads] failed: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
    process.exit(1);
  });
}
