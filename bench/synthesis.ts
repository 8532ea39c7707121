/**
 * Synthesis benchmark: provisioning a VM on host B from an overlay made on host A (our synthesizeVm
 * workflow) beside the NAIVE method measured in the same run (ship the launch VM's whole disk,
 * flattened to raw, and its whole libvirt save file over loopback HTTP, then restore them), both
 * until the guest's application answers with the state set on A.
 *
 *   npx tsx bench/synthesis.ts [--runs N] [--disk-mib guest,4096]   (npm run bench -- synthesis; 3 runs)
 *
 * Each case grows the base VM's disk image to M MiB (zeros past the guest's 64 MiB file system);
 * `guest` keeps the test guest's 64 MiB. By default both run: the tiny CI guest, and a 4 GiB disk
 * of the size a real base VM has (the naive method ships the whole image; the overlay does not).
 *
 * Two host workers (A and B) run as their own processes (src/workers/main.ts, as in production)
 * against the real Temporal dev server and libvirt. Prints JSON lines {"bench":"synthesis","metric",...}
 * with medians over the runs: time to first response for both methods (from the client's
 * workflow start, and the workflow's own result), their ratio (target ≤ 0.3), bytes transferred,
 * where our synthesis spends its time (per-stage timings), and the orchestration overhead of the
 * workflow from its history (wall time minus its activities' time; target ≤ 5%). Progress goes to
 * stderr. One guest VM runs at a time; every domain (cl-<host>-*) and file it makes is removed.
 */
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { availableParallelism, loadavg } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import type { Client } from '@temporalio/client';
import { temporal } from '@temporalio/proto';
import { randomMac } from '../src/activities/guest';
import { hostTaskQueue } from '../src/common/names';
import { connectClient } from '../src/client/connect';
import { createLogger } from '../src/common/logger';
import { hostDir, loadConfig, type Config } from '../src/config';
import { readSaveHeader, rewriteSaveHeaderXml } from '../src/core/snapshot';
import { GuestAppClient, type GuestState } from '../src/guest/app-client';
import { editDomainXml } from '../src/hypervisor/domain-xml';
import { LibvirtHypervisor } from '../src/hypervisor/libvirt';
import { createOverlayVm, importBaseVm, resumeBaseVm, synthesizeVm, terminateVm } from '../src/workflows';
import { ensureInfra, removeHostDomains, uniqueSuffix } from '../test/helpers/infra';
import { testBasePackage } from '../test/helpers/test-base';
import { argRuns, median } from './lib';
import { hostExec, startWorkerProcesses, type WorkerProcesses } from './worker-processes';
import { firstAnswer, instancePortWatcher } from './first-answer';

const run = promisify(execFile);
const EventType = temporal.api.enums.v1.EventType;
const APP_PORT = 8080;

type Timestamp = { seconds?: { toNumber(): number } | number | null; nanos?: number | null } | null | undefined;

const r1 = (x: number): number => Math.round(x * 10) / 10;
const load = (): number[] => loadavg().map(r1);

function tsMs(ts: Timestamp): number {
  if (!ts) throw new Error('history event without a time');
  const s = ts.seconds;
  const secs = typeof s === 'number' ? s : s ? s.toNumber() : 0;
  return secs * 1000 + (ts.nanos ?? 0) / 1e6;
}

/** Workflow wall time and the time its activities ran, from its event history. */
async function orchestration(client: Client, workflowId: string): Promise<{ wallMs: number; activitiesMs: number; activities: number; localActivities: number; scheduleToStartMs: number; workflowTasksMs: number; workflowTasks: number }> {
  const history = await client.workflow.getHandle(workflowId).fetchHistory();
  const events = history.events ?? [];
  let started: number | undefined;
  let completed: number | undefined;
  const activityStart = new Map<string, number>();
  const scheduled = new Map<string, number>();
  let activitiesMs = 0;
  let activities = 0;
  let scheduleToStartMs = 0;
  let workflowTasksMs = 0;
  let workflowTasks = 0;
  let localActivities = 0;
  for (const e of events) {
    const t = tsMs(e.eventTime as Timestamp);
    const id = String(e.eventId);
    if (e.eventType === EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED) started = t;
    else if (e.eventType === EventType.EVENT_TYPE_MARKER_RECORDED && e.markerRecordedEventAttributes?.markerName === 'core_local_activity') localActivities++;
    else if (e.eventType === EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED) completed = t;
    else if (e.eventType === EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED || e.eventType === EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED) scheduled.set(id, t);
    else if (e.eventType === EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED) {
      const s = scheduled.get(String(e.workflowTaskCompletedEventAttributes?.scheduledEventId));
      if (s !== undefined) {
        workflowTasksMs += t - s;
        workflowTasks++;
      }
    } else if (e.eventType === EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED) {
      activityStart.set(id, t);
      const s = scheduled.get(String(e.activityTaskStartedEventAttributes?.scheduledEventId));
      if (s !== undefined) scheduleToStartMs += t - s;
    }
    else if (e.eventType === EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED) {
      const s = activityStart.get(String(e.activityTaskCompletedEventAttributes?.startedEventId));
      if (s === undefined) throw new Error(`activity completion ${id} of ${workflowId} has no started event`);
      activitiesMs += t - s;
      activities++;
    }
  }
  if (started === undefined || completed === undefined) throw new Error(`workflow ${workflowId} has not completed`);
  return { wallMs: completed - started, activitiesMs, activities, localActivities, scheduleToStartMs, workflowTasksMs, workflowTasks };
}

/** The naive original system's "server": hands out whole files over loopback HTTP. */
async function startFileServer(dir: string): Promise<{ url: string; close(): Promise<void> }> {
  const server = http.createServer((req, res) => {
    const name = path.basename(decodeURIComponent(req.url ?? '/'));
    const file = path.join(dir, name);
    fs.stat(file, (err, st) => {
      if (err || !st.isFile()) {
        res.writeHead(404).end();
        return;
      }
      res.writeHead(200, { 'content-length': st.size, 'content-type': 'application/octet-stream' });
      fs.createReadStream(file).pipe(res);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

/**
 * The naive copy's client: curl in its own process (as an operator would copy an image), not this
 * process's event loop, which also runs the host workers (in-process fetch moved ~150 MB/s here,
 * curl ~450 MB/s).
 */
async function download(url: string, file: string): Promise<number> {
  await run('curl', ['--fail', '--silent', '--show-error', '--output', file, url]);
  return fs.statSync(file).size;
}

interface Runs {
  [metric: string]: number[];
}
const push = (m: Runs, k: string, v: number): void => {
  (m[k] ??= []).push(v);
};

/**
 * The cases: `--disk-mib` takes a comma list of disk sizes in MiB, or `guest` for the test guest's
 * own 64 MiB disk. Default: both the test guest and a 4 GiB disk, so that one run shows the
 * methods on the tiny CI guest and on a disk of the size a real base VM has.
 */
function argCases(): Array<number | undefined> {
  const i = process.argv.indexOf('--disk-mib');
  const raw = i >= 0 ? process.argv[i + 1] ?? '' : 'guest,4096';
  return raw.split(',').map((x) => {
    if (x === 'guest') return undefined;
    const n = Number(x);
    if (!Number.isInteger(n) || n < 64) throw new Error(`--disk-mib "${raw}": give a comma list of disk sizes in MiB (each at least 64, the guest's file system) or "guest", e.g. --disk-mib guest,4096`);
    return n;
  });
}

interface CaseVerdict { case: string; ratio: number; overheadPct: number }

async function main(): Promise<void> {
  const runs = argRuns();
  const cases = argCases();
  ensureInfra();
  const hv = new LibvirtHypervisor({ logger: createLogger('bench-hv', 'warn') });
  process.stdout.write(`${JSON.stringify({ bench: 'synthesis', metric: 'environment', cores: availableParallelism(), loadAverage: load(), node: process.version, virtType: await hv.virtType(), runs, cases: cases.map(caseName), started: new Date().toISOString() })}\n`);
  const verdicts: CaseVerdict[] = [];
  try {
    for (const diskMiB of cases) verdicts.push(await runCase(hv, runs, diskMiB));
  } finally {
    await hv.close();
  }
  // One line per target and case: what the issue asks, what this run measured.
  for (const v of verdicts) {
    process.stdout.write(`${JSON.stringify({ bench: 'synthesis', metric: 'targets', case: v.case, ratio_ours_over_naive: v.ratio, ratioTarget: 0.3, ratioMet: v.ratio <= 0.3, orchestration_overhead_pct: v.overheadPct, overheadTarget: 5, overheadMet: v.overheadPct <= 5 })}\n`);
  }
}

const caseName = (diskMiB: number | undefined): string => (diskMiB === undefined ? 'test-guest (64 MiB disk)' : `disk-${diskMiB}-mib`);

async function runCase(hv: LibvirtHypervisor, runs: number, diskMiB: number | undefined): Promise<CaseVerdict> {
  const name = caseName(diskMiB);
  const emit = (obj: Record<string, unknown>): void => {
    process.stdout.write(`${JSON.stringify({ bench: 'synthesis', case: name, ...obj })}\n`);
  };
  const progress = (msg: string): void => {
    process.stderr.write(`[bench synthesis ${new Date().toISOString().slice(11, 19)}] ${name}: ${msg}\n`);
  };
  const suffix = uniqueSuffix();
  const hostA = `bsa-${suffix}`;
  const hostB = `bsb-${suffix}`;
  const config: Config = { ...loadConfig({ CLOUDLET_LOG_LEVEL: 'warn' }), workflowTaskQueue: `wf-bench-synth-${suffix}` };
  const naiveRoot = path.join(hostDir(config, hostB), 'naive');
  const naiveServed = path.join(hostDir(config, hostA), 'naive-served');
  let workers: WorkerProcesses | undefined;
  let client: Client | undefined;
  let server: { url: string; close(): Promise<void> } | undefined;
  const m: Runs = {};
  const stages: Runs = {};
  emit({ metric: 'case', diskMiB: diskMiB ?? 64, loadAverage: load() });
  try {
    progress('base package of the test guest (cached)');
    const pkg = await testBasePackage(256, diskMiB);
    client = await connectClient(config);
    const c = client;
    // One worker process per host, as in production (src/workers/main.ts): the hosts' event loops
    // are not shared with each other nor with this process's pollers and naive-method client.
    workers = await startWorkerProcesses(c, config, [hostA, hostB]);
    const exec = hostExec(c);

    for (const hostId of [hostA, hostB]) {
      progress(`import the base on ${hostId}`);
      await exec(importBaseVm, `bench-synth/import/${hostId}`, { hostId, source: pkg.packageFile });
    }

    // The developer's launch VM on A: resumed from the base, customized, then saved.
    progress(`resume the base on ${hostA} and customize it`);
    const resumed = await exec(resumeBaseVm, `bench-synth/resume/${hostA}`, { hostId: hostA, baseId: pkg.baseId, instanceId: 'dev1' });
    const appA = new GuestAppClient(resumed.hostPort as number);
    const before = await appA.waitForState(60_000);
    const token = `bench-${suffix}`;
    const message = `installed on ${hostA}`;
    await appA.set(token, message);

    // Save it ourselves so that both methods ship the very same launch VM: createInstanceOverlay
    // builds the overlay from this launch.sav (the domain is then gone), and the naive method
    // ships this disk (flattened) and this save file.
    const devDir = path.join(hostDir(config, hostA), 'instances', 'dev1');
    progress('save the launch VM; flatten its disk for the naive method');
    await hv.save(resumed.domain, path.join(devDir, 'launch.sav.partial'));
    fs.renameSync(path.join(devDir, 'launch.sav.partial'), path.join(devDir, 'launch.sav'));
    fs.mkdirSync(naiveServed, { recursive: true });
    await run('qemu-img', ['convert', '-O', 'raw', path.join(devDir, 'disk.qcow2'), path.join(naiveServed, 'disk.raw')]);
    fs.copyFileSync(path.join(devDir, 'launch.sav'), path.join(naiveServed, 'memory.sav'));
    const naiveBytes = { disk: fs.statSync(path.join(naiveServed, 'disk.raw')).size, memory: fs.statSync(path.join(naiveServed, 'memory.sav')).size };

    progress(`create the overlay on ${hostA}`);
    const overlay = await exec(createOverlayVm, `bench-synth/overlay/${hostA}`, { hostId: hostA, instanceId: 'dev1' });
    progress(`overlay ${overlay.bytes} bytes at ${overlay.url}`);
    const served = await startFileServer(naiveServed);
    server = served;
    const check = (s: GuestState, what: string): void => {
      if (s.token !== token || s.disk !== message || s.bootId !== before.state.bootId) {
        throw new Error(`${what}: the application answered ${JSON.stringify(s)}, not the launch VM's state (token ${token}, disk "${message}", boot ${before.state.bootId})`);
      }
    };

    // --- OUR synthesis: client.workflow.start -> the application answers (client side and result).
    const oursRun = async (r: number): Promise<number> => {
      const instanceId = `s${r}`;
      const workflowId = `bench-synth/synthesize/${hostB}/${instanceId}`;
      progress(`run ${r + 1}/${runs}: synthesizeVm on ${hostB}`);
      const portOf = instancePortWatcher(path.join(hostDir(config, hostB), 'instances', instanceId, 'instance.json'));
      const t0 = performance.now();
      const handle = await c.workflow.start(synthesizeVm, { taskQueue: hostTaskQueue(hostB), workflowId, args: [{ hostId: hostB, onHostQueue: true, instanceId, overlayUrl: overlay.url }] });
      let clientMs = NaN;
      const [clientState, result] = await Promise.all([
        firstAnswer(portOf, 300_000).then((a) => {
          clientMs = performance.now() - t0;
          push(m, 'ours_client_first_response_ms', clientMs);
          push(stages, 'ours.longestFailedGetMs', a.longestFailedMs);
          return a.state;
        }),
        handle.result().then((res) => {
          push(m, 'ours_workflow_result_ms', performance.now() - t0);
          return res;
        }),
      ]);
      check(clientState, 'synthesized VM');
      push(m, 'ours_workflow_first_response_ms', result.timings.firstResponseMs ?? NaN);
      for (const [k, v] of Object.entries(result.timings)) push(stages, k, v);
      for (const [k, v] of Object.entries(result.applyTimings ?? {})) push(stages, `apply.${k}`, v);
      const o = await orchestration(c, workflowId);
      // The preflight runs as a local activity (no start/complete events): its own run time, as it
      // measured it, counts as activity time; the SDK's handling of it counts as overhead.
      const activitiesMs = o.activitiesMs + result.localActivitiesMs;
      push(m, 'orchestration_wall_ms', o.wallMs);
      push(m, 'orchestration_activities_ms', activitiesMs);
      push(m, 'orchestration_overhead_ms', o.wallMs - activitiesMs);
      push(m, 'orchestration_overhead_pct', (100 * (o.wallMs - activitiesMs)) / o.wallMs);
      // Where the overhead goes: activity tasks waiting in their queue, and workflow tasks
      // (scheduled -> completed; they overlap the activity queue waits only at the edges).
      push(stages, 'orchestration.activities', o.activities);
      push(stages, 'orchestration.localActivities', o.localActivities);
      push(stages, 'orchestration.activityScheduleToStartMs', o.scheduleToStartMs);
      push(stages, 'orchestration.workflowTasks', o.workflowTasks);
      push(stages, 'orchestration.workflowTasksMs', o.workflowTasksMs);
      await exec(terminateVm, `bench-synth/terminate/${hostB}/${instanceId}`, { hostId: hostB, instanceId });
      return clientMs;
    };

    // --- NAIVE: fetch the whole disk and save file, restore, replug the NIC, forward, answer.
    const naiveRun = async (r: number): Promise<number> => {
      progress(`run ${r + 1}/${runs}: naive restore on ${hostB}`);
      const dir = path.join(naiveRoot, `n${r}`);
      const domain = `cl-${hostB}-naive${r}`;
      const disk = path.join(dir, 'disk.raw');
      const save = path.join(dir, 'memory.sav');
      const n0 = performance.now();
      fs.mkdirSync(dir, { recursive: true });
      await Promise.all([download(`${served.url}/disk.raw`, disk), download(`${served.url}/memory.sav`, save)]);
      const n1 = performance.now();
      const header = await readSaveHeader(save);
      await rewriteSaveHeaderXml(save, editDomainXml(header.domainXml, { name: domain, uuid: randomUUID(), diskPath: disk, diskFormat: 'raw', serialPath: path.join(dir, 'serial.log') }));
      await hv.restore(save);
      const n2 = performance.now();
      await hv.replugNic(domain, { mac: randomMac() });
      const naivePort = (await hv.forwardPort(domain, { guestPort: APP_PORT })).hostPort;
      const n3 = performance.now();
      const naiveAnswer = await firstAnswer(() => naivePort, 300_000);
      const n4 = performance.now();
      check(naiveAnswer.state, 'naive restored VM');
      push(stages, 'naive.longestFailedGetMs', naiveAnswer.longestFailedMs);
      push(m, 'naive_first_response_ms', n4 - n0);
      push(stages, 'naive.transferMs', n1 - n0);
      push(stages, 'naive.restoreMs', n2 - n1);
      push(stages, 'naive.replugAndForwardMs', n3 - n2);
      push(stages, 'naive.waitForAppMs', n4 - n3);
      await hv.destroy(domain);
      await hv.undefine(domain);
      fs.rmSync(dir, { recursive: true, force: true });
      return n4 - n0;
    };

    // Interleaved, alternating which method goes first, so that load drift hits both alike.
    for (let r = 0; r < runs; r++) {
      let oursMs: number;
      let naiveMs: number;
      if (r % 2 === 0) {
        oursMs = await oursRun(r);
        naiveMs = await naiveRun(r);
      } else {
        naiveMs = await naiveRun(r);
        oursMs = await oursRun(r);
      }
      push(m, 'ratio_ours_over_naive', oursMs / naiveMs);
      progress(`run ${r + 1}/${runs}: ours ${Math.round(oursMs)} ms, naive ${Math.round(naiveMs)} ms, load ${load().join(' ')}`);
    }

    const units: Record<string, string> = { ratio_ours_over_naive: 'ratio', orchestration_overhead_pct: '%' };
    const targets: Record<string, string> = { ratio_ours_over_naive: '<= 0.3', orchestration_overhead_pct: '<= 5' };
    for (const [metric, values] of Object.entries(m)) {
      const digits = units[metric] ? 100 : 1;
      emit({
        metric, unit: units[metric] ?? 'ms', median: Math.round(median(values) * digits) / digits, runs: values.map((v) => Math.round(v * digits) / digits),
        ...(targets[metric] ? { target: targets[metric] } : {}),
      });
    }
    emit({
      metric: 'bytes_transferred', unit: 'bytes', ours: overlay.bytes, naive: naiveBytes.disk + naiveBytes.memory,
      naiveDisk: naiveBytes.disk, naiveMemory: naiveBytes.memory, ratio: Math.round((overlay.bytes / (naiveBytes.disk + naiveBytes.memory)) * 1000) / 1000,
    });
    // Computed, not measured: the same runs with the loopback transfer replaced by bytes / link
    // rate (ours fetches its overlay during "fetch and apply"; its loopback time is negligible).
    // 38 Mbit/s is the link of the Elijah paper's measurements.
    const naiveTransferMs = median(stages['naive.transferMs'] ?? []);
    for (const mbit of [38, 100, 1000]) {
      const linkMs = (bytes: number): number => (bytes * 8) / (mbit * 1000);
      const ours = median(m.ours_client_first_response_ms ?? []) + linkMs(overlay.bytes);
      const naive = median(m.naive_first_response_ms ?? []) - naiveTransferMs + linkMs(naiveBytes.disk + naiveBytes.memory);
      emit({ metric: 'projected_ratio_at_link', linkMbit: mbit, unit: 'ratio', computed: true, oursMs: Math.round(ours), naiveMs: Math.round(naive), ratio: Math.round((ours / naive) * 100) / 100, target: '<= 0.3' });
    }
    emit({ metric: 'stages_ms', unit: 'ms', medians: Object.fromEntries(Object.entries(stages).map(([k, v]) => [k, Math.round(median(v))])) });
    emit({ metric: 'load_average_end', loadAverage: load() });
    const r2 = (x: number): number => Math.round(x * 100) / 100;
    return { case: name, ratio: r2(median(m.ratio_ours_over_naive ?? [])), overheadPct: r2(median(m.orchestration_overhead_pct ?? [])) };
  } finally {
    progress('clean up');
    await server?.close();
    await workers?.stop();
    await client?.connection.close();
    removeHostDomains([hostA, hostB]);
    for (const h of [hostA, hostB]) fs.rmSync(hostDir(config, h), { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
