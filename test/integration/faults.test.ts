/**
 * Faults, on real Temporal and real libvirt:
 * 0. host B's worker process is killed (SIGKILL) during each long activity other than the apply:
 *    a base import (its download held half-way), a resume, an overlay creation; started again,
 *    each operation completes, with no stray domain or file;
 * 1. host B's worker process is killed (SIGKILL) during synthesis and started again: the
 *    workflow completes by itself and no stray or partial file remains on B;
 *    (its history then replays deterministically);
 * 2. a synthesis is cancelled while its download is held half-way: it stops, and no VM or file
 *    remains;
 * 3. the overlay URL serves corrupted bytes: the workflow fails non-retryably, naming the bad
 *    segment, and leaves nothing behind.
 * The synthesis runs on B's own queue (as the service starts it) in 1 and 2.
 */
import type { Client, WorkflowHandle } from '@temporalio/client';
import { WorkflowFailedError } from '@temporalio/client';
import { Worker } from '@temporalio/worker';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { loadConfig, type Config } from '../../src/config';
import { assertHostServing, connectClient } from '../../src/client/connect';
import { createHostWorker, type HostWorker } from '../../src/workers/host-worker';
import { startPublisher, type Publisher } from '../../src/workers/publisher';
import { createLogger } from '../../src/common/logger';
import { createOverlayVm, importBaseVm, resumeBaseVm, synthesizeVm } from '../../src/workflows';
import { readOverlayMeta } from '../../src/core/overlay';
import { GuestAppClient } from '../../src/guest/app-client';
import { REPO, ensureInfra, removeHostDomains, uniqueSuffix, workerCommand } from '../helpers/infra';
import { testBasePackage } from '../helpers/test-base';
import { pollUntil } from '../helpers/poll';
import { startStallingServer } from '../helpers/stalling-server';
import { hostTaskQueue } from '../../src/common/names';
import { domainsOf } from '../helpers/libvirtd';

jest.setTimeout(20 * 60_000);

/** What a host's warm pool directory holds (none when it has none). */
function poolFiles(hostId: string): string[] {
  try {
    return fs.readdirSync(path.join(loadConfig().varDir, 'hosts', hostId, 'pool'));
  } catch {
    return [];
  }
}

function listFiles(dir: string): string[] {
  if (!fs.existsSync(dir)) return [];
  return fs.readdirSync(dir, { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).map((e) => path.join(e.parentPath, e.name));
}

describe('faults during synthesis', () => {
  const suffix = uniqueSuffix();
  const hostA = `fa-${suffix}`;
  const hostB = `fb-${suffix}`;
  let config: Config;
  let client: Client;
  let workerA: HostWorker;
  let runA: Promise<void>;
  let workerB: ChildProcess | undefined;
  let overlayUrl: string;
  let token: string;
  let pkg: { packageFile: string; baseId: string };

  const startWorkerB = (): ChildProcess => {
    const { command, args } = workerCommand(hostB);
    const child = spawn(command, args, {
      cwd: REPO,
      env: { ...process.env, CLOUDLET_WORKFLOW_QUEUE: config.workflowTaskQueue, CLOUDLET_VAR: config.varDir, CLOUDLET_LOG_LEVEL: 'warn' },
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    return child;
  };
  const exec = <T>(wf: (...a: never[]) => Promise<T>, id: string, arg: unknown): Promise<T> =>
    client.workflow.execute(wf as (a: unknown) => Promise<T>, { taskQueue: config.workflowTaskQueue, workflowId: id, args: [arg] });

  beforeAll(async () => {
    ensureInfra();
    config = { ...loadConfig({ CLOUDLET_LOG_LEVEL: 'warn' }), workflowTaskQueue: `wf-faults-${suffix}` };
    pkg = await testBasePackage(256);
    client = await connectClient(config);
    workerA = await createHostWorker(config, hostA, createLogger(`worker-${hostA}`, 'warn'));
    runA = workerA.run();
    workerB = startWorkerB();
    await pollUntil(`host ${hostB} to serve`, 120_000, async () => (await assertHostServing(client, hostB), true));
    // B's import is the first test's (its worker is killed during it).
    await exec(importBaseVm, `importBaseVm/${hostA}`, { hostId: hostA, source: pkg.packageFile });
    const r = await exec(resumeBaseVm, `resumeBaseVm/${hostA}/dev`, { hostId: hostA, baseId: pkg.baseId, instanceId: 'dev' });
    token = `fault-${suffix}`;
    await new GuestAppClient(r.hostPort as number).set(token, 'before the fault');
    overlayUrl = (await exec(createOverlayVm, `createOverlay/${hostA}/dev`, { hostId: hostA, instanceId: 'dev' })).url;
  });

  afterAll(async () => {
    workerB?.kill('SIGKILL');
    workerA?.shutdown();
    await runA;
    await client?.connection.close();
    removeHostDomains([hostA, hostB]);
    for (const h of [hostA, hostB]) fs.rmSync(path.join(config.varDir, 'hosts', h), { recursive: true, force: true });
  });

  const killB = async (): Promise<void> => {
    workerB?.kill('SIGKILL');
    await pollUntil('worker B to exit', 30_000, async () => (workerB?.exitCode !== null || workerB?.signalCode !== null ? true : undefined));
  };
  /** Waits until the run's pending activity `type` has started on a worker (and `also` holds). */
  const activityStarted = (handle: WorkflowHandle, type: string, also: () => boolean = () => true) =>
    pollUntil(`activity ${type} of ${handle.workflowId} to be running`, 120_000, async () => {
      const d = await handle.describe();
      const p = d.raw.pendingActivities?.find((a) => a.activityType?.name === type);
      return p && String(p.state) !== 'PENDING_ACTIVITY_STATE_SCHEDULED' && p.state !== 1 && also() ? true : undefined;
    }, 20);
  /** Attempts of activity `type` that started, from the run's history. */
  const attemptsOf = async (handle: WorkflowHandle, type: string): Promise<number> => {
    const events = (await handle.fetchHistory()).events ?? [];
    const scheduled = new Set(events.filter((e) => e.activityTaskScheduledEventAttributes?.activityType?.name === type).map((e) => String(e.eventId)));
    return Math.max(0, ...events.filter((e) => e.activityTaskStartedEventAttributes && scheduled.has(String(e.activityTaskStartedEventAttributes.scheduledEventId))).map((e) => e.activityTaskStartedEventAttributes?.attempt ?? 1));
  };
  const strayFiles = (): string[] => listFiles(path.join(config.varDir, 'hosts', hostB)).map((f) => path.relative(path.join(config.varDir, 'hosts', hostB), f)).filter((f) => /\.tmp$|\.partial$|download-|^store\/tmp\//.test(f));

  it('completes a base import whose host worker was killed half-way through the download', async () => {
    const stall = await startStallingServer(fs.readFileSync(pkg.packageFile), 'base.cloudletbase', { stallFirst: true });
    try {
      const handle = await client.workflow.start(importBaseVm, { taskQueue: config.workflowTaskQueue, workflowId: `importBaseVm/${hostB}`, args: [{ hostId: hostB, source: stall.url }] });
      await pollUntil('B to be half-way through the package download', 120_000, async () => (stall.holding() ? true : undefined));
      await killB();
      stall.release();
      workerB = startWorkerB();
      const r = await handle.result();
      expect(r.baseId).toBe(pkg.baseId);
      expect(await attemptsOf(handle, 'importBasePackage')).toBeGreaterThanOrEqual(2);
      expect(strayFiles()).toEqual([]);
      expect(fs.existsSync(path.join(config.varDir, 'hosts', hostB, 'store', 'bases', pkg.baseId))).toBe(true);
    } finally {
      await stall.close();
    }
  });

  it('completes a resume and an overlay creation whose host worker was killed during each: one VM, the overlay right, nothing stray', async () => {
    // The resume: killed once its activity runs on B (creating the disk, copying the memory, restoring).
    const resume = await client.workflow.start(resumeBaseVm, { taskQueue: config.workflowTaskQueue, workflowId: `resumeBaseVm/${hostB}/rk`, args: [{ hostId: hostB, baseId: pkg.baseId, instanceId: 'rk' }] });
    await activityStarted(resume, 'resumeBaseInstance');
    await killB();
    workerB = startWorkerB();
    const resumed = await resume.result();
    expect(await attemptsOf(resume, 'resumeBaseInstance')).toBeGreaterThanOrEqual(2);
    expect(domainsOf(hostB)).toEqual([`cl-${hostB}-rk`]);
    const app = new GuestAppClient(resumed.hostPort as number);
    await app.waitForState(60_000);
    const mark = `killed-${suffix}`;
    await app.set(mark, 'made on B');

    // The overlay creation: killed once its activity has begun saving the VM's memory.
    const instanceDir = path.join(config.varDir, 'hosts', hostB, 'instances', 'rk');
    const create = await client.workflow.start(createOverlayVm, { taskQueue: config.workflowTaskQueue, workflowId: `createOverlay/${hostB}/rk`, args: [{ hostId: hostB, instanceId: 'rk' }] });
    await activityStarted(create, 'createInstanceOverlay', () => ['launch.sav.partial', 'launch.sav'].some((f) => fs.existsSync(path.join(instanceDir, f))));
    await killB();
    workerB = startWorkerB();
    const made = await create.result();
    expect(await attemptsOf(create, 'createInstanceOverlay')).toBeGreaterThanOrEqual(2);
    expect(domainsOf(hostB)).toEqual([]);
    expect(fs.existsSync(instanceDir)).toBe(false);
    expect(strayFiles()).toEqual([]);
    // The overlay is the VM's: A synthesizes it and answers with what was set on B.
    const s = await exec(synthesizeVm, `synthesizeVm/${hostA}/from-rk`, { hostId: hostA, instanceId: 'from-rk', overlayUrl: made.url });
    const state = await new GuestAppClient(s.hostPort).state();
    expect(state.token).toBe(mark);
    expect(state.disk).toBe('made on B');
  });

  it('completes a synthesis whose host worker was killed half-way, leaving no stray file', async () => {
    const id = `synthesizeVm/${hostB}/k1`;
    // The overlay comes through a server that sends the first half of the first data-area
    // download and then holds it, so B is certainly mid-apply when it is killed.
    const stall = await startStallingServer(Buffer.from(await (await fetch(overlayUrl)).arrayBuffer()));
    try {
      // On B's own queue, as the service starts it: B's worker runs the workflow too, and it is
      // the workflow's only worker while it is down.
      const handle = await client.workflow.start(synthesizeVm, { taskQueue: hostTaskQueue(hostB), workflowId: id, args: [{ hostId: hostB, onHostQueue: true, instanceId: 'k1', overlayUrl: stall.url }] });
      await pollUntil('B to be half-way through the download', 120_000, async () => (stall.holding() ? true : undefined));
      workerB?.kill('SIGKILL');
      await pollUntil('worker B to exit', 30_000, async () => (workerB?.exitCode !== null || workerB?.signalCode !== null ? true : undefined));
      stall.release();
      workerB = startWorkerB();
      await checkCompleted(handle);
    } finally {
      await stall.close();
    }
  });

  const checkCompleted = async (handle: WorkflowHandle<typeof synthesizeVm>): Promise<void> => {
    const result = await handle.result();
    // The apply activity really was cut off: it completed on a later attempt, on the new worker.
    const events = (await handle.fetchHistory()).events ?? [];
    const scheduled = events.find((e) => e.activityTaskScheduledEventAttributes?.activityType?.name === 'synthesizeInstanceFiles');
    const started = events.find((e) => e.activityTaskStartedEventAttributes && String(e.activityTaskStartedEventAttributes.scheduledEventId) === String(scheduled?.eventId));
    expect(started?.activityTaskStartedEventAttributes?.attempt).toBeGreaterThanOrEqual(2);
    // On the host's queue the preflight, the admission and, last, the record of the run's end in
    // the catalog ran as local activities: markers, no activity tasks.
    const localTypes = events
      .filter((e) => e.markerRecordedEventAttributes?.markerName === 'core_local_activity')
      .map((e) => (JSON.parse(Buffer.from(e.markerRecordedEventAttributes?.details?.data?.payloads?.[0]?.data ?? []).toString('utf8')) as { activity_type?: string }).activity_type);
    expect(localTypes).toEqual(['preflightSynthesis', 'admitInstance', 'recordOperationEnd']);
    expect(events.some((e) => ['preflightSynthesis', 'admitInstance', 'recordOperationEnd'].includes(e.activityTaskScheduledEventAttributes?.activityType?.name ?? ''))).toBe(false);
    expect(result.localActivitiesMs).toBeGreaterThanOrEqual(0);
    expect(result.localActivitiesMs).toBeLessThan(result.timings.firstResponseMs ?? 0);
    // The path taken (local checks) is in the input, so a replay on another queue is deterministic.
    await Worker.runReplayHistory({ workflowsPath: require.resolve('../../src/workflows') }, await handle.fetchHistory(), handle.workflowId);
    const state = await new GuestAppClient(result.hostPort).state();
    expect(state.token).toBe(token);
    expect(state.disk).toBe('before the fault');

    const files = listFiles(path.join(config.varDir, 'hosts', hostB)).map((f) => path.relative(path.join(config.varDir, 'hosts', hostB), f));
    expect(files.filter((f) => /\.tmp$|\.partial$|download-/.test(f))).toEqual([]);
    // The VM it started for itself (early start) is the only one; the killed attempt's went.
    const early = result.earlyStart === 'own' ? ['instances/k1/pool-claim.json', 'instances/k1/pool-loaded'] : [];
    expect(files.filter((f) => f.startsWith('instances/')).sort()).toEqual(
      ['instances/k1/disk.qcow2', 'instances/k1/instance.json', 'instances/k1/memory.sav', 'instances/k1/serial.log', 'instances/k1/synthesized', ...early].sort(),
    );
    expect(domainsOf(hostB)).toHaveLength(1);
    // In the pool: at most the live instance's entry path (and its socket), nothing of the killed attempt.
    const pool = poolFiles(hostB).filter((n) => /^(\.new-)?p[0-9a-f]{8}$|^\.in-p[0-9a-f]{8}\.sock$/.test(n));
    const own = result.earlyStart === 'own' ? 1 : 0;
    expect(pool.filter((n) => /^p[0-9a-f]{8}$/.test(n))).toHaveLength(own);
    expect(pool.filter((n) => n.startsWith('.new-'))).toEqual([]);
    expect(pool.filter((n) => n.endsWith('.sock')).length).toBeLessThanOrEqual(own);
  };

  it('leaves no half-made VM or file when a synthesis is cancelled mid-download', async () => {
    const id = `synthesizeVm/${hostB}/x1`;
    // Held half-way through its download (see startStallingServer): the cancellation reaches the
    // apply through its heartbeats and stops the download; nothing is ever released.
    const stall = await startStallingServer(Buffer.from(await (await fetch(overlayUrl)).arrayBuffer()));
    try {
      const before = domainsOf(hostB);
      const poolOfB = (): string[] => poolFiles(hostB).sort();
      const poolBefore = poolOfB();
      const handle = await client.workflow.start(synthesizeVm, { taskQueue: hostTaskQueue(hostB), workflowId: id, args: [{ hostId: hostB, onHostQueue: true, instanceId: 'x1', overlayUrl: stall.url }] });
      await pollUntil('B to be half-way through the download', 120_000, async () => (stall.holding() ? true : undefined));
      await handle.cancel();
      const err = await handle.result().catch((e: unknown) => e);
      expect(err).toBeInstanceOf(WorkflowFailedError);
      expect((err as WorkflowFailedError).cause?.name).toBe('CancelledFailure');
      expect((await handle.describe()).status.name).toBe('CANCELLED');
      // The apply stopped on its first attempt (cancelled, not timed out and retried).
      const events = (await handle.fetchHistory()).events ?? [];
      expect(events.some((e) => e.activityTaskCanceledEventAttributes)).toBe(true);
      expect(events.filter((e) => e.activityTaskStartedEventAttributes).map((e) => e.activityTaskStartedEventAttributes?.attempt)).not.toContain(2);
      expect(fs.existsSync(path.join(config.varDir, 'hosts', hostB, 'instances', 'x1'))).toBe(false);
      // No VM of its own either: neither one named after it nor one it started early.
      expect(domainsOf(hostB)).toEqual(before);
      expect(poolOfB()).toEqual(poolBefore);
    } finally {
      await stall.close();
    }
  });

  it('fails non-retryably, naming the bad segment, when the overlay URL serves corrupted bytes', async () => {
    const meta = await readOverlayMeta(overlayUrl);
    const seg = meta.segments[Math.floor(meta.segments.length / 2)];
    expect(seg).toBeDefined();
    const segIndex = meta.segments.indexOf(seg!);
    const bad = path.join(config.varDir, 'hosts', hostA, `corrupt-${suffix}`);
    const overlaysDir = path.join(bad, 'overlays');
    fs.mkdirSync(overlaysDir, { recursive: true });
    const bytes = Buffer.from(await (await fetch(overlayUrl)).arrayBuffer());
    const at = seg!.offset + Math.floor(seg!.length / 2);
    bytes[at] = (bytes[at] ?? 0) ^ 0xff;
    fs.writeFileSync(path.join(overlaysDir, 'bad.overlay'), bytes);
    let pub: Publisher | undefined;
    try {
      pub = await startPublisher(bad);
      const err = await exec(synthesizeVm, `synthesizeVm/${hostB}/c1`, { hostId: hostB, instanceId: 'c1', overlayUrl: `${pub.url}/overlays/bad.overlay` }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(WorkflowFailedError);
      const cause = (err as WorkflowFailedError).cause?.cause as { type?: string; message?: string; nonRetryable?: boolean } | undefined;
      expect(cause?.type).toBe('DIGEST_MISMATCH');
      expect(cause?.nonRetryable).toBe(true);
      expect(cause?.message).toContain(`segment ${segIndex} does not match its sha256`);
      // The run was not retried (one attempt) and nothing of instance c1 remains.
      const history = await client.workflow.getHandle(`synthesizeVm/${hostB}/c1`).fetchHistory();
      const attempts = (history.events ?? []).filter((e) => e.activityTaskStartedEventAttributes).map((e) => e.activityTaskStartedEventAttributes?.attempt);
      expect(Math.max(...attempts.map((a) => a ?? 1))).toBe(1);
      expect(fs.existsSync(path.join(config.varDir, 'hosts', hostB, 'instances', 'c1'))).toBe(false);
    } finally {
      await pub?.close();
    }
  });
});
