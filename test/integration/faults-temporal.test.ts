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
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { startApi, type RunningApi } from '../../src/api/server';
import { CloudletApiClient } from '../../src/api/client';
import { TemporalCloudletService } from '../../src/service';
import { createLogger } from '../../src/common/logger';
import { freePort } from '../../src/common/ports';
import { GuestAppClient } from '../../src/guest/app-client';
import { startTestCluster, type TestCluster } from '../helpers/cluster';
import { testBasePackage } from '../helpers/test-base';
import { waitFor } from '../helpers/poll';
import { REPO } from '../helpers/infra';

jest.setTimeout(20 * 60_000);

function domainsOf(hostId: string): string[] {
  const out = execFileSync('virsh', ['-c', 'qemu:///system', 'list', '--all', '--name'], { encoding: 'utf8' });
  return out.split('\n').map((s) => s.trim()).filter((n) => n.startsWith(`cl-${hostId}-`));
}

/** Serves `bytes` with Range; the first request for the data area gets half, then waits for release(). */
async function stallingServer(bytes: Buffer): Promise<{ url: string; holding(): boolean; release(): void; close(): Promise<void> }> {
  let held: http.ServerResponse | undefined;
  let stalled = false;
  const server = http.createServer((req, res) => {
    const m = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
    const from = m ? Number(m[1]) : 0;
    const to = m && m[2] ? Math.min(Number(m[2]), bytes.length - 1) : bytes.length - 1;
    res.writeHead(m ? 206 : 200, { 'Content-Length': to - from + 1, ...(m ? { 'Content-Range': `bytes ${from}-${to}/${bytes.length}` } : {}) });
    if (!stalled && from > 0 && to === bytes.length - 1) {
      stalled = true;
      held = res;
      res.write(bytes.subarray(from, from + Math.floor((to - from + 1) / 2)));
      return;
    }
    res.end(bytes.subarray(from, to + 1));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/held.overlay`,
    holding: () => held !== undefined,
    release: () => held?.destroy(),
    close: () =>
      new Promise<void>((resolve) => {
        held?.destroy();
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

describe('faults of the Temporal server, and duplicate requests', () => {
  let env: NodeJS.ProcessEnv;
  let state: string;
  let cluster: TestCluster;
  let api: RunningApi;
  let cloud: CloudletApiClient;
  let hostA: string;
  let hostB: string;
  let overlayUrl: string;
  let baseId: string;
  const token = `restart-${process.pid}`;
  const done = async (id: string): Promise<Record<string, unknown>> => {
    const s = await cloud.waitForOperation(id, { timeoutMs: 10 * 60_000 });
    expect(s.state).toBe('succeeded');
    return s.result as Record<string, unknown>;
  };
  const appOf = async (instanceId: string): Promise<GuestAppClient> => {
    const inst = await cloud.getInstance(instanceId);
    expect(inst?.state).toBe('running');
    return new GuestAppClient(Number((inst?.appEndpoint ?? '').split(':')[1]));
  };

  const temporal = (cmd: 'start' | 'stop'): void => {
    execFileSync('bash', ['infra/temporal.sh', cmd], { cwd: REPO, env, stdio: ['ignore', 'ignore', 'inherit'], timeout: 120_000 });
  };

  beforeAll(async () => {
    const [port, uiPort] = [await freePort(), await freePort()];
    state = fs.mkdtempSync(path.join(REPO, 'var', 'temporal-fault-'));
    env = { ...process.env, CLOUDLET_TEMPORAL_ADDRESS: `127.0.0.1:${port}`, CLOUDLET_TEMPORAL_UI_PORT: String(uiPort), CLOUDLET_TEMPORAL_STATE: state, CLOUDLET_CLUSTER_NAMESPACES: 'default' };
    temporal('start');
    cluster = await startTestCluster('tfault', ['ta', 'tb'], { env: { CLOUDLET_TEMPORAL_ADDRESS: `127.0.0.1:${port}`, CLOUDLET_TEMPORAL_UI_PORT: String(uiPort) } });
    [hostA = '', hostB = ''] = cluster.hosts;
    const apiToken = `tfault-token-${cluster.suffix}-0123456789`;
    api = await startApi(new TemporalCloudletService(cluster.client, cluster.config, { hosts: cluster.hosts }), { tokens: [apiToken], port: 0, logger: createLogger('api', 'warn') });
    cloud = new CloudletApiClient({ baseUrl: api.url, token: apiToken });
    const pkg = await testBasePackage(256);
    baseId = pkg.baseId;
    for (const hostId of [hostA, hostB]) await done((await cloud.importBase({ hostId, source: pkg.packageFile })).id);
    const dev = await done((await cloud.resumeBase({ hostId: hostA, baseId })).id);
    await (await appOf(String(dev.instanceId))).set(token, 'made before the faults');
    const made = await done((await cloud.createOverlay({ instanceId: String(dev.instanceId) })).id);
    overlayUrl = (await cloud.getOverlay(String(made.overlayId)))?.url ?? '';
  });

  afterAll(async () => {
    await api?.close();
    await cluster?.stop();
    temporal('stop');
    fs.rmSync(state, { recursive: true, force: true });
  });

  it('completes a synthesis across a server restart half-way, with one VM', async () => {
    const held = await stallingServer(Buffer.from(await (await fetch(overlayUrl)).arrayBuffer()));
    try {
      const op = await cloud.provisionInstance({ hostId: hostB, overlayUrl: held.url });
      await waitFor('the download to be held half-way', async () => held.holding(), 120_000);
      // Down while the apply runs: its heartbeats and its completion wait for the server.
      const t0 = Date.now();
      temporal('stop');
      held.release();
      const t1 = Date.now();
      temporal('start');
      const t2 = Date.now();
      const result = await done(op.id);
      process.stderr.write(`[faults-temporal] synthesis: server stop ${t1 - t0} ms, start ${t2 - t1} ms, run done ${Date.now() - t2} ms after the start\n`);
      // The held request was the apply's: the activity had started and the restart did not repeat it.
      expect(domainsOf(hostB)).toEqual([`cl-${hostB}-${String(result.instanceId)}`]);
      expect((await (await appOf(String(result.instanceId))).state()).token).toBe(token);
      await done((await cloud.terminateInstance(String(result.instanceId))).id);
      expect(domainsOf(hostB)).toEqual([]);
    } finally {
      await held.close();
    }
  });

  it('completes an overlay creation across a server restart, and lists the overlay once', async () => {
    const dev = await done((await cloud.resumeBase({ hostId: hostA, baseId })).id);
    await (await appOf(String(dev.instanceId))).set('second-token', 'made before the restart');
    const before = (await cloud.listOverlays()).length;
    const op = await cloud.createOverlay({ instanceId: String(dev.instanceId) });
    // Stop once the run is in its snapshot stage (the host saves the VM and builds the overlay).
    await waitFor('the overlay creation to reach its snapshot stage', async () => {
      const s = await cloud.getOperation(op.id);
      return s?.state === 'running' && s.progress?.stage === 'snapshot and build overlay';
    }, 120_000, 100);
    const t0 = Date.now();
    temporal('stop');
    const t1 = Date.now();
    temporal('start');
    const t2 = Date.now();
    const made = await done(op.id);
    process.stderr.write(`[faults-temporal] overlay creation: server stop ${t1 - t0} ms, start ${t2 - t1} ms, run done ${Date.now() - t2} ms after the start\n`);
    const overlays = await cloud.listOverlays();
    expect(overlays.length).toBe(before + 1);
    expect(overlays.filter((o) => o.id === made.overlayId)).toHaveLength(1);
    // And it is a good overlay: B synthesizes the state set before the restart from it.
    const url = overlays.find((o) => o.id === made.overlayId)?.url ?? '';
    const synth = await done((await cloud.provisionInstance({ hostId: hostB, overlayUrl: url })).id);
    expect((await (await appOf(String(synth.instanceId))).state()).token).toBe('second-token');
    await done((await cloud.terminateInstance(String(synth.instanceId))).id);
  });

  it('starts one operation and one VM for 50 concurrent requests with one Idempotency-Key', async () => {
    const refs = await Promise.all(Array.from({ length: 50 }, () => cloud.provisionInstance({ hostId: hostB, overlayUrl }, `dup-${cluster.suffix}`)));
    const ids = new Set(refs.map((r) => r.id));
    expect(ids.size).toBe(1);
    const [id] = [...ids] as [string];
    const runs: string[] = [];
    for await (const w of cluster.client.workflow.list({ query: `WorkflowId = '${id}'` })) runs.push(w.runId);
    expect(runs).toHaveLength(1);
    const result = await done(id);
    expect(domainsOf(hostB)).toEqual([`cl-${hostB}-${String(result.instanceId)}`]);
    expect((await (await appOf(String(result.instanceId))).state()).token).toBe(token);
    await done((await cloud.terminateInstance(String(result.instanceId))).id);
  });
});
