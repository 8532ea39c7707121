/**
 * The cloudlet story on two host workers, real Temporal and real libvirt: import the base on
 * host A and host B, resume it on A, customize the guest, create an overlay on A (published by
 * A over HTTP), synthesize on B from the overlay's URL, and the application on B answers with
 * the state set on A.
 */
import type { Client } from '@temporalio/client';
import { WorkflowFailedError } from '@temporalio/client';
import fs from 'node:fs';
import type { Config } from '../../src/config';
import { createHostWorker, type HostWorker } from '../../src/workers/host-worker';
import { startTestCluster, type TestCluster } from '../helpers/cluster';
import { createLogger } from '../../src/common/logger';
import { createOverlayVm, importBaseVm, resumeBaseVm, synthesizeVm, terminateVm } from '../../src/workflows';
import { GuestAppClient } from '../../src/guest/app-client';
import { testBasePackage } from '../helpers/test-base';
import { hostTaskQueue } from '../../src/common/names';

jest.setTimeout(20 * 60_000);

describe('cloudlet operations across two hosts', () => {
  let cluster: TestCluster;
  let hostA: string;
  let hostB: string;
  let suffix: string;
  let config: Config;
  let client: Client;
  let workers: HostWorker[];
  let pkg: { packageFile: string; baseId: string };

  beforeAll(async () => {
    pkg = await testBasePackage(256);
    cluster = await startTestCluster('ops', ['a', 'b']);
    [hostA = '', hostB = ''] = cluster.hosts;
    ({ suffix, config, client, workers } = cluster);
  });

  afterAll(async () => {
    await cluster?.stop();
  });

  const exec = <T>(wf: (...a: never[]) => Promise<T>, id: string, arg: unknown): Promise<T> =>
    client.workflow.execute(wf as (a: unknown) => Promise<T>, { taskQueue: config.workflowTaskQueue, workflowId: id, args: [arg] });

  it('provisions on B, from an overlay made on A, a VM that answers with the state set on A', async () => {
    for (const hostId of [hostA, hostB]) {
      const r = await exec(importBaseVm, `importBaseVm/${hostId}/${pkg.baseId.slice(0, 12)}`, { hostId, source: pkg.packageFile });
      expect(r.baseId).toBe(pkg.baseId);
    }

    const resumed = await exec(resumeBaseVm, `resumeBaseVm/${hostA}/dev1`, { hostId: hostA, baseId: pkg.baseId, instanceId: 'dev1' });
    expect(resumed.hostPort).toBeGreaterThan(0);
    const appA = new GuestAppClient(resumed.hostPort as number);
    const before = await appA.waitForState(60_000);
    const token = `token-${suffix}`;
    const message = `installed on ${hostA}`;
    await appA.set(token, message);

    const overlay = await exec(createOverlayVm, `createOverlay/${hostA}/dev1`, { hostId: hostA, instanceId: 'dev1' });
    expect(overlay.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/overlays\/[0-9a-f]{64}\.overlay$/);
    expect(overlay.bytes).toBeGreaterThan(0);

    const synth = await exec(synthesizeVm, `synthesizeVm/${hostB}/app1`, { hostId: hostB, instanceId: 'app1', overlayUrl: overlay.url });
    const state = await new GuestAppClient(synth.hostPort).state();
    expect(state.token).toBe(token);
    expect(state.disk).toBe(message);
    expect(state.bootId).toBe(before.state.bootId); // resumed, never rebooted
    expect(synth.timings.firstResponseMs).toBeGreaterThan(0);
    // Started on the shared workflow queue, the preflight is a regular activity on B's queue
    // (on B's own queue it is a local activity: test/integration/faults.test.ts).
    const history = (await client.workflow.getHandle(`synthesizeVm/${hostB}/app1`).fetchHistory()).events ?? [];
    const preflight = history.find((e) => e.activityTaskScheduledEventAttributes?.activityType?.name === 'preflightSynthesis');
    expect(preflight?.activityTaskScheduledEventAttributes?.taskQueue?.name).toBe(hostTaskQueue(hostB));

    // Operators find the run by its search attributes.
    const query = `WorkflowId = 'synthesizeVm/${hostB}/app1' AND CloudletHost = '${hostB}' AND CloudletBaseId = '${pkg.baseId}' AND CloudletStatus = 'succeeded'`;
    const deadline = Date.now() + 30_000;
    let found = 0;
    while (found === 0 && Date.now() < deadline) {
      for await (const _ of client.workflow.list({ query })) found++;
      if (found === 0) await new Promise((r) => setTimeout(r, 250));
    }
    expect(found).toBe(1);

    await exec(terminateVm, `terminateVm/${hostB}/app1`, { hostId: hostB, instanceId: 'app1' });
    expect(fs.existsSync(`${config.varDir}/hosts/${hostB}/instances/app1`)).toBe(false);
  });

  it('refuses, before any transfer, to synthesize on a host without the overlay\'s base', async () => {
    const hostC = `c-${suffix}`;
    const w = await createHostWorker(config, hostC, createLogger(`worker-${hostC}`, 'warn'));
    const r = w.run();
    try {
      const overlayFile = fs.readdirSync(`${config.varDir}/hosts/${hostA}/store/overlays`).find((f) => f.endsWith('.overlay'));
      expect(overlayFile).toBeDefined();
      const err = await exec(synthesizeVm, `synthesizeVm/${hostC}/x`, {
        hostId: hostC, instanceId: 'x', overlayUrl: `${workers[0]?.publicUrl}/overlays/${overlayFile}`,
      }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(WorkflowFailedError);
      const cause = (err as WorkflowFailedError).cause?.cause as { type?: string; message?: string } | undefined;
      expect(cause?.type).toBe('WRONG_BASE');
      expect(cause?.message).toMatch(/does not have base/);
    } finally {
      w.shutdown();
      await r;
      fs.rmSync(`${config.varDir}/hosts/${hostC}`, { recursive: true, force: true });
    }
  });

  it('refuses to run host B\'s local checks on host A when a run claims a queue it is not on', async () => {
    // onHostQueue says "this queue is B's", but the run is on A's queue: A's worker runs the
    // workflow and its local preflight, which finds it is on A, not B, and fails at once.
    const overlayFile = fs.readdirSync(`${config.varDir}/hosts/${hostA}/store/overlays`).find((f) => f.endsWith('.overlay'));
    const err = await client.workflow.execute(synthesizeVm, {
      taskQueue: hostTaskQueue(hostA),
      workflowId: `synthesizeVm/${hostB}/misplaced`,
      args: [{ hostId: hostB, onHostQueue: true, instanceId: 'misplaced', overlayUrl: `${workers[0]?.publicUrl}/overlays/${overlayFile}` }],
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(WorkflowFailedError);
    const cause = (err as WorkflowFailedError).cause as { type?: string; message?: string; nonRetryable?: boolean } | undefined;
    expect(cause?.type).toBe('BAD_INPUT');
    expect(cause?.message).toContain(`a check of host ${hostB} ran on host ${hostA}`);
    expect(fs.existsSync(`${config.varDir}/hosts/${hostB}/instances/misplaced`)).toBe(false);
    expect(fs.existsSync(`${config.varDir}/hosts/${hostA}/instances/misplaced`)).toBe(false);
  });
});
