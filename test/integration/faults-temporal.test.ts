/**
 * Faults of the Temporal server, and duplicate requests, on real parts: a Temporal dev server of
 * this test's own (its own SQLite state, started with infra/temporal.sh, so stopping it leaves the
 * shared one alone), two host workers, the HTTP API and libvirt.
 * 1. The server is stopped while a synthesis's download is held half-way, and started again: the
 *    run completes from its persisted state, with one VM that answers with the launch state.
 * 2. The same during an overlay creation: it completes, and the overlay is listed once.
 * 3. 50 concurrent requests with one Idempotency-Key start one operation and one VM.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { freePort } from '../../src/common/ports';
import { waitFor } from '../helpers/poll';
import { REPO } from '../helpers/infra';
import { domainsOf, expectOnlyVmOf } from '../helpers/libvirtd';
import { launchOverlay, startApiCluster, type ApiCluster } from '../helpers/api-cluster';
import { startStallingServer } from '../helpers/stalling-server';

jest.setTimeout(20 * 60_000);


describe('faults of the Temporal server, and duplicate requests', () => {
  let env: NodeJS.ProcessEnv;
  let state: string;
  let c: ApiCluster;
  let hostA: string;
  let hostB: string;
  let overlayUrl: string;
  let baseId: string;
  const token = `restart-${process.pid}`;

  const temporal = (cmd: 'start' | 'stop'): void => {
    execFileSync('bash', ['infra/temporal.sh', cmd], { cwd: REPO, env, stdio: ['ignore', 'ignore', 'inherit'], timeout: 120_000 });
  };

  beforeAll(async () => {
    const [port, uiPort] = [await freePort(), await freePort()];
    state = fs.mkdtempSync(path.join(REPO, 'var', 'temporal-fault-'));
    env = { ...process.env, CLOUDLET_TEMPORAL_ADDRESS: `127.0.0.1:${port}`, CLOUDLET_TEMPORAL_UI_PORT: String(uiPort), CLOUDLET_TEMPORAL_STATE: state, CLOUDLET_CLUSTER_NAMESPACES: 'default' };
    temporal('start');
    c = await startApiCluster('tfault', ['ta', 'tb'], { env: { CLOUDLET_TEMPORAL_ADDRESS: `127.0.0.1:${port}`, CLOUDLET_TEMPORAL_UI_PORT: String(uiPort) } });
    [hostA = '', hostB = ''] = c.cluster.hosts;
    ({ baseId, overlayUrl } = await launchOverlay(c, token));
  });

  afterAll(async () => {
    await c?.stop();
    temporal('stop');
    fs.rmSync(state, { recursive: true, force: true });
  });

  it('completes a synthesis across a server restart half-way, with one VM', async () => {
    const held = await startStallingServer(Buffer.from(await (await fetch(overlayUrl)).arrayBuffer()));
    try {
      const op = await c.cloud.provisionInstance({ hostId: hostB, overlayUrl: held.url });
      await waitFor('the download to be held half-way', async () => held.holding(), 120_000);
      // Down while the apply runs: its heartbeats and its completion wait for the server.
      const t0 = Date.now();
      temporal('stop');
      held.release();
      const t1 = Date.now();
      temporal('start');
      const t2 = Date.now();
      const result = await c.done(op.id);
      process.stderr.write(`[faults-temporal] synthesis: server stop ${t1 - t0} ms, start ${t2 - t1} ms, run done ${Date.now() - t2} ms after the start\n`);
      expectOnlyVmOf(hostB, result);
      expect((await (await c.appOf(String(result.instanceId))).state()).token).toBe(token);
      await c.done((await c.cloud.terminateInstance(String(result.instanceId))).id);
      expect(domainsOf(hostB)).toEqual([]);
    } finally {
      await held.close();
    }
  });

  it('completes an overlay creation across a server restart, and lists the overlay once', async () => {
    const dev = await c.done((await c.cloud.resumeBase({ hostId: hostA, baseId })).id);
    await (await c.appOf(String(dev.instanceId))).set('second-token', 'made before the restart');
    const before = (await c.cloud.listOverlays()).length;
    const op = await c.cloud.createOverlay({ instanceId: String(dev.instanceId) });
    // Stop once the run is in its snapshot stage (the host saves the VM and builds the overlay).
    await waitFor('the overlay creation to reach its snapshot stage', async () => {
      const s = await c.cloud.getOperation(op.id);
      return s?.state === 'running' && s.progress?.stage === 'snapshot and build overlay';
    }, 120_000, 100);
    const t0 = Date.now();
    temporal('stop');
    const t1 = Date.now();
    temporal('start');
    const t2 = Date.now();
    const made = await c.done(op.id);
    process.stderr.write(`[faults-temporal] overlay creation: server stop ${t1 - t0} ms, start ${t2 - t1} ms, run done ${Date.now() - t2} ms after the start\n`);
    const overlays = await c.cloud.listOverlays();
    expect(overlays.length).toBe(before + 1);
    expect(overlays.filter((o) => o.id === made.overlayId)).toHaveLength(1);
    // And it is a good overlay: B synthesizes the state set before the restart from it.
    const url = overlays.find((o) => o.id === made.overlayId)?.url ?? '';
    const synth = await c.done((await c.cloud.provisionInstance({ hostId: hostB, overlayUrl: url })).id);
    expect((await (await c.appOf(String(synth.instanceId))).state()).token).toBe('second-token');
    await c.done((await c.cloud.terminateInstance(String(synth.instanceId))).id);
  });

  it('starts one operation and one VM for 50 concurrent requests with one Idempotency-Key', async () => {
    const refs = await Promise.all(Array.from({ length: 50 }, () => c.cloud.provisionInstance({ hostId: hostB, overlayUrl }, `dup-${c.cluster.suffix}`)));
    const ids = new Set(refs.map((r) => r.id));
    expect(ids.size).toBe(1);
    const [id] = [...ids] as [string];
    const runs: string[] = [];
    for await (const w of c.cluster.client.workflow.list({ query: `WorkflowId = '${id}'` })) runs.push(w.runId);
    expect(runs).toHaveLength(1);
    const result = await c.done(id);
    expectOnlyVmOf(hostB, result);
    expect((await (await c.appOf(String(result.instanceId))).state()).token).toBe(token);
    await c.done((await c.cloud.terminateInstance(String(result.instanceId))).id);
  });
});
