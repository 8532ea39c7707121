/**
 * Warm pool benchmark (docs/warm-pool.md): synthesis of the test guest on host B, client-side
 * first response through the synthesizeVm workflow, with B's warm pool serving the VM and with the
 * pool disabled for the request (`warmPool: false`), interleaved in the same run; and the restore
 * of a pool-served VM (the whole save streamed into its waiting QEMU, then resumed) beside QEMU's
 * own restore of a plain-synthesized VM's save file (QEMU started by hand with libvirt's command
 * line, bench/qemu-restore.ts).
 *
 *   npx tsx bench/warm-pool.ts [--runs N]      (npm run bench -- warm-pool; 3 runs)
 *
 * Two host workers run as their own processes. Before each run the pool is full again and nothing
 * else runs (the refill's QEMU start would slow the next run). Prints JSON lines {"bench":"warm-pool",
 * "metric",...} with medians and every run, and ends with one line {"metric":"targets","targets":
 * [{name,value,limit}]}: poolFirstResponseRatio (pool / no pool, limit 0.5) and poolRestoreOverQemu
 * (pool-served restore / QEMU's own, limit 1.5).
 */
import fs from 'node:fs';
import { loadavg } from 'node:os';
import path from 'node:path';
import type { Client } from '@temporalio/client';
import { hostTaskQueue } from '../src/common/names';
import { connectClient } from '../src/client/connect';
import { createLogger } from '../src/common/logger';
import { hostDir, loadConfig, type Config } from '../src/config';
import { GuestAppClient } from '../src/guest/app-client';
import { LibvirtHypervisor } from '../src/hypervisor/libvirt';
import { createOverlayVm, importBaseVm, poolStateQuery, resumeBaseVm, setPoolTargetSignal, synthesizeVm, terminateVm } from '../src/workflows';
import { ensureInfra, removeHostDomains, uniqueSuffix } from '../test/helpers/infra';
import { testBasePackage } from '../test/helpers/test-base';
import { firstAnswer, instancePortWatcher } from './first-answer';
import { argRuns, median } from './lib';
import { hostExec, startWorkerProcesses, type WorkerProcesses } from './worker-processes';
import { lastQemuArgv, qemuRestoreMs } from './qemu-restore';

const load = (): number[] => loadavg().map((x) => Math.round(x * 10) / 10);
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function main(): Promise<void> {
  const runs = argRuns();
  ensureInfra();
  const emit = (obj: Record<string, unknown>): void => {
    process.stdout.write(`${JSON.stringify({ bench: 'warm-pool', ...obj })}\n`);
  };
  const progress = (msg: string): void => {
    process.stderr.write(`[bench warm-pool ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
  };
  const hv = new LibvirtHypervisor({ logger: createLogger('bench-hv', 'warn') });
  const suffix = uniqueSuffix();
  const hostA = `bpa-${suffix}`;
  const hostB = `bpb-${suffix}`;
  const config: Config = { ...loadConfig({ CLOUDLET_LOG_LEVEL: 'warn' }), workflowTaskQueue: `wf-bench-pool-${suffix}` };
  let workers: WorkerProcesses | undefined;
  let client: Client | undefined;
  const m: Record<string, number[]> = { pool_first_response_ms: [], no_pool_first_response_ms: [], pool_restore_ms: [], qemu_restore_ms: [], no_pool_restore_ms: [] };
  const stages: Record<string, number[]> = {};
  const push = (into: Record<string, number[]>, k: string, v: number): void => {
    (into[k] ??= []).push(v);
  };
  emit({ metric: 'environment', virtType: await hv.virtType(), runs, loadAverage: load(), started: new Date().toISOString() });
  const scratch = fs.mkdtempSync(path.join(hostDir(config, hostB) + '-qemu'));
  try {
    const pkg = await testBasePackage(256);
    client = await connectClient(config);
    const c = client;
    workers = await startWorkerProcesses(c, config, [hostA, hostB], { CLOUDLET_WARM_POOL_EVERY_MS: '1000' });
    const exec = hostExec(c);
    for (const hostId of [hostA, hostB]) {
      progress(`import the base on ${hostId}`);
      await exec(importBaseVm, `bench-pool/import/${hostId}`, { hostId, source: pkg.packageFile });
    }
    progress(`resume the base on ${hostA}, set a token, make the overlay`);
    const resumed = await exec(resumeBaseVm, `bench-pool/resume/${hostA}`, { hostId: hostA, baseId: pkg.baseId, instanceId: 'dev1' });
    const token = `pool-bench-${suffix}`;
    await new GuestAppClient(resumed.hostPort as number).set(token, 'the launch state');
    const overlay = await exec(createOverlayVm, `bench-pool/overlay/${hostA}`, { hostId: hostA, instanceId: 'dev1' });

    const pool = c.workflow.getHandle(`warmPool/${hostB}`);
    await pool.signal(setPoolTargetSignal, { baseId: pkg.baseId, size: 1 });
    const poolFull = async (): Promise<void> => {
      const deadline = Date.now() + 120_000;
      for (;;) {
        const s = await pool.query(poolStateQuery).catch(() => undefined);
        if (s && s.entries.length >= 1) return;
        if (Date.now() > deadline) throw new Error(`the warm pool of ${hostB} did not fill within 120 s: ${s?.short ?? 'no report'}`);
        await sleep(200);
      }
    };

    const synth = async (r: number, warm: boolean): Promise<void> => {
      await poolFull();
      const instanceId = `${warm ? 'p' : 'n'}${r}`;
      const portOf = instancePortWatcher(path.join(hostDir(config, hostB), 'instances', instanceId, 'instance.json'));
      const t0 = performance.now();
      const handle = await c.workflow.start(synthesizeVm, { taskQueue: hostTaskQueue(hostB), workflowId: `bench-pool/synthesize/${hostB}/${instanceId}`, args: [{ hostId: hostB, onHostQueue: true, instanceId, overlayUrl: overlay.url, ...(warm ? {} : { warmPool: false }) }] });
      const answer = await firstAnswer(portOf, 300_000);
      const ms = performance.now() - t0;
      if (answer.state.token !== token) throw new Error(`run ${r}: the VM answered ${JSON.stringify(answer.state)}, not token ${token}`);
      const result = await handle.result();
      if (warm !== (result.poolEntry !== undefined)) throw new Error(`run ${r}: ${warm ? 'the pool did not serve the VM' : 'the pool served an opted-out VM'}`);
      push(m, warm ? 'pool_first_response_ms' : 'no_pool_first_response_ms', ms);
      // The application's answer on a VM that has answered once (TCG has translated its code by
      // then): what the first answer costs beyond it is the fresh QEMU's, whatever the method.
      const a0 = performance.now();
      await new GuestAppClient(answer.port).state(5000);
      push(m, warm ? 'pool_second_answer_ms' : 'no_pool_second_answer_ms', performance.now() - a0);
      for (const [k, v] of Object.entries(result.timings)) push(stages, `${warm ? 'pool' : 'noPool'}.${k}`, v);
      for (const [k, v] of Object.entries(result.applyTimings)) push(stages, `${warm ? 'pool' : 'noPool'}.apply.${k}`, v);
      if (warm) {
        // Early start: the pool VM loaded the save while it was rebuilt; what is left after the
        // apply is the held-back tail (and the disk installed), then the resume.
        const preloaded = result.applyTimings['load the rest into the warm pool VMMs'];
        push(m, 'pool_restore_ms', preloaded !== undefined ? preloaded + (result.timings['resume the warm pool VMMs'] ?? NaN) : result.timings['load memory into the warm pool VMMs'] ?? NaN);
        push(m, 'pool_stream_during_apply_ms', result.applyTimings['stream into the warm pool VMMs'] ?? NaN);
      } else {
        push(m, 'no_pool_restore_ms', result.timings['resume and replug NICMs'] ?? NaN);
        // QEMU's own restore of this VM's save file, with the command line libvirt gave it.
        const rec = JSON.parse(fs.readFileSync(path.join(hostDir(config, hostB), 'instances', instanceId, 'instance.json'), 'utf8')) as { domain: string };
        const argv = lastQemuArgv(rec.domain);
        await hv.destroy(rec.domain);
        push(m, 'qemu_restore_ms', await qemuRestoreMs(argv, path.join(hostDir(config, hostB), 'instances', instanceId, 'memory.sav'), scratch));
      }
      await exec(terminateVm, `bench-pool/terminate/${hostB}/${instanceId}`, { hostId: hostB, instanceId });
      progress(`run ${r + 1}/${runs} ${warm ? 'pool' : 'no pool'}: first response ${Math.round(ms)} ms, load ${load().join(' ')}`);
    };
    for (let r = 0; r < runs; r++) {
      // Alternating which goes first, so that load drift hits both alike.
      for (const warm of r % 2 === 0 ? [true, false] : [false, true]) await synth(r, warm);
    }
    for (const [metric, values] of Object.entries(m)) emit({ metric, unit: 'ms', median: Math.round(median(values)), runs: values.map(Math.round) });
    emit({ metric: 'stages_ms', medians: Object.fromEntries(Object.entries(stages).map(([k, v]) => [k, Math.round(median(v))])) });
    const r2 = (x: number): number => Math.round(x * 100) / 100;
    const ratio = r2(median(m.pool_first_response_ms ?? []) / median(m.no_pool_first_response_ms ?? []));
    const restore = r2(median(m.pool_restore_ms ?? []) / median(m.qemu_restore_ms ?? []));
    emit({ metric: 'load_average_end', loadAverage: load() });
    emit({ metric: 'targets', targets: [{ name: 'poolFirstResponseRatio', value: ratio, limit: 0.5 }, { name: 'poolRestoreOverQemu', value: restore, limit: 1.5 }] });
  } finally {
    progress('clean up');
    await workers?.stop();
    await client?.connection.close();
    await hv.close();
    removeHostDomains([hostA, hostB]);
    for (const h of [hostA, hostB]) fs.rmSync(hostDir(config, h), { recursive: true, force: true });
    fs.rmSync(scratch, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
