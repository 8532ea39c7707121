/**
 * Fan-out (docs/deployments.md) on the real Temporal server and libvirt: one request synthesizes
 * the same overlay on several hosts at once. Checked: 6 VMs over 2 hosts all answer with the
 * launch VM's state, and the overlay server's access log shows one fetch per host; a host that
 * cannot synthesize (it lacks the base) is reported per VM while the other host's VMs run; a
 * deployment cancelled as a whole leaves no VM and no copy of the overlay behind.
 */
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import type { AddressInfo } from 'node:net';
import { startApi, type RunningApi } from '../../src/api/server';
import { CloudletApiClient } from '../../src/api/client';
import { createLogger } from '../../src/common/logger';
import { GuestAppClient } from '../../src/guest/app-client';
import { TemporalCloudletService } from '../../src/service';
import { startTestCluster, type TestCluster } from '../helpers/cluster';
import { SqliteClusterCatalog } from '../../src/core/cluster-catalog';
import { testBasePackage } from '../helpers/test-base';
import { pollUntil } from '../helpers/poll';

jest.setTimeout(30 * 60_000);

interface DeployResult {
  requested: number;
  answering: number;
  failed: number;
  allAnsweringMs?: number;
  hosts: Array<{ hostId: string; fetchedBytes?: number; fetchMs?: number; error?: string; vms: Array<{ instanceId: string; hostId: string; hostPort?: number; firstResponseMs?: number; error?: string }> }>;
}

describe('deployments: one overlay, many hosts', () => {
  let cluster: TestCluster;
  let api: RunningApi;
  let cloud: CloudletApiClient;
  let server: http.Server;
  const access: string[] = [];
  let overlayUrl = '';
  const token = `deploy-token-${Date.now()}-0123456789`;
  const appToken = `deployed-${Date.now().toString(36)}`;
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'deploy-'));
  let hostA = '';
  let hostB = '';
  let hostC = '';
  const figures: Record<string, unknown> = {};

  const done = async (id: string): Promise<Record<string, unknown>> => {
    const s = await cloud.waitForOperation(id, { timeoutMs: 15 * 60_000 });
    if (s.state !== 'succeeded') throw new Error(`operation ${id} ended ${s.state}: ${s.error?.message ?? ''}`);
    return s.result as Record<string, unknown>;
  };

  beforeAll(async () => {
    const pkg = await testBasePackage(256);
    // hostC never imports the base: syntheses there fail.
    cluster = await startTestCluster('deploy', ['da', 'db', 'dc']);
    [hostA = '', hostB = '', hostC = ''] = cluster.hosts;
    api = await startApi(new TemporalCloudletService(cluster.client, cluster.config, { hosts: cluster.hosts }), { tokens: [token], port: 0, logger: createLogger('api', 'warn') });
    cloud = new CloudletApiClient({ baseUrl: api.url, token });
    for (const h of [hostA, hostB]) await done((await cloud.importBase({ hostId: h, source: pkg.packageFile })).id);
    // The launch VM: its application holds a state every deployed VM must answer with.
    const dev = await done((await cloud.resumeBase({ hostId: hostA, baseId: pkg.baseId })).id);
    const app = new GuestAppClient(Number(dev.hostPort));
    await app.waitForState(60_000);
    await app.set(appToken, 'set in the launch VM');
    const made = await done((await cloud.createOverlay({ instanceId: String(dev.instanceId) })).id);
    // The overlay, served by a server of the test's own that keeps an access log.
    const file = path.join(tmp, `${String(made.overlayId)}.overlay`);
    await cloud.downloadOverlay(String(made.overlayId), file);
    server = http.createServer((req, res) => {
      access.push(`${req.method ?? ''} ${req.url ?? ''}`);
      if (req.url !== `/overlays/${path.basename(file)}`) return void res.writeHead(404).end();
      res.writeHead(200, { 'content-length': fs.statSync(file).size });
      fs.createReadStream(file).pipe(res);
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    overlayUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}/overlays/${path.basename(file)}`;
  });

  afterAll(async () => {
    console.log(`deployment figures: ${JSON.stringify(figures)}`);
    await new Promise<void>((r) => (server ? server.close(() => r()) : r()));
    await api?.close();
    await cluster?.stop();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  const ofDeployment = async (deploymentId: string) => (await cloud.listInstances()).filter((i) => i.id.startsWith(`i-${deploymentId.slice(2)}-`));
  const cacheDirs = (deploymentId: string): string[] => cluster.hosts.map((h) => path.join(cluster.config.varDir, 'hosts', h, 'deployments', deploymentId)).filter((d) => fs.existsSync(d));

  it('6 VMs over 2 hosts all answer with the launch VM\'s state; each host fetched the overlay once', async () => {
    access.length = 0;
    const op = await cloud.deploy({ overlayUrl, hosts: [hostA, hostB], count: 6 });
    expect(op.kind).toBe('deployOverlay');
    const r = (await done(op.id)) as unknown as DeployResult;
    expect([r.requested, r.answering, r.failed]).toEqual([6, 6, 0]);
    expect(r.hosts.map((h) => [h.hostId, h.vms.length])).toEqual([[hostA, 3], [hostB, 3]]);
    for (const vm of r.hosts.flatMap((h) => h.vms)) {
      const st = await new GuestAppClient(vm.hostPort ?? 0).state();
      expect([vm.instanceId, st.token, st.disk]).toEqual([vm.instanceId, appToken, 'set in the launch VM']);
    }
    // The access log: one GET per host, none per VM.
    expect(access.filter((a) => a.startsWith('GET ')).length).toBe(2);
    const deploymentId = op.id.split('/')[1] ?? '';
    expect((await ofDeployment(deploymentId)).filter((i) => i.state === 'running')).toHaveLength(6);
    expect(cacheDirs(deploymentId)).toEqual([]);
    // Every VM is an operation of its own, and the deployment's progress names each.
    const status = await cloud.getOperation(op.id);
    expect(status?.progress?.done.filter((d) => / answers \(first response/.test(d))).toHaveLength(6);
    // The deployment and each of its syntheses recorded their ends in the cluster catalog the
    // workers use (this API keeps none: nothing else writes there).
    const catalog = new SqliteClusterCatalog(cluster.config.catalog.file);
    try {
      expect(await catalog.closedOperation(op.id)).toMatchObject({ kind: 'deployOverlay', hostId: hostA, status: 'succeeded', result: { requested: 6, answering: 6 } });
      const children = await catalog.closedOperations({ kinds: ['synthesizeVm'], hosts: [hostA, hostB] });
      expect(children.filter((c) => c.parentId === op.id && c.status === 'succeeded')).toHaveLength(6);
    } finally {
      await catalog.close();
    }
    figures.sixOverTwo = { allAnsweringMs: r.allAnsweringMs, firstResponseMs: r.hosts.flatMap((h) => h.vms.map((v) => v.firstResponseMs)), fetchMs: r.hosts.map((h) => h.fetchMs) };
    for (const i of await ofDeployment(deploymentId)) await done((await cloud.terminateInstance(i.id)).id);
  });

  it('a host that cannot synthesize is reported per VM; the other host\'s VMs run', async () => {
    const op = await cloud.deploy({ overlayUrl, hosts: [hostA, hostC], count: 4 });
    const r = (await done(op.id)) as unknown as DeployResult;
    expect([r.requested, r.answering, r.failed]).toEqual([4, 2, 2]);
    const c = r.hosts.find((h) => h.hostId === hostC);
    expect(c?.vms.every((v) => v.hostPort === undefined && /base/.test(v.error ?? ''))).toBe(true);
    const a = r.hosts.find((h) => h.hostId === hostA);
    for (const vm of a?.vms ?? []) expect((await new GuestAppClient(vm.hostPort ?? 0).state()).token).toBe(appToken);
    const deploymentId = op.id.split('/')[1] ?? '';
    expect((await ofDeployment(deploymentId)).filter((i) => i.state === 'running').map((i) => i.hostId).sort()).toEqual([hostA, hostA]);
    for (const i of (await ofDeployment(deploymentId)).filter((x) => x.state === 'running')) await done((await cloud.terminateInstance(i.id)).id);
  });

  it('bad requests are refused and start nothing; a deployment cancelled as a whole leaves no VM and no copy behind', async () => {
    const post = async (body: unknown): Promise<number> =>
      (await fetch(`${api.url}/v1/deployments`, { method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, body: JSON.stringify(body) })).status;
    expect(await post({ overlayUrl, hosts: [hostA], count: 0 })).toBe(400);
    expect(await post({ overlayUrl: '/etc/passwd', hosts: [hostA], count: 1 })).toBe(400);
    expect(await post({ overlayUrl, hosts: ['no-such-host'], count: 1 })).toBe(422);

    const op = await cloud.deploy({ overlayUrl, hosts: [hostA, hostB], count: 4 });
    await pollUntil('a host to have fetched the overlay', 5 * 60_000, async () => ((await cloud.getOperation(op.id))?.progress?.done.some((d) => /overlay fetched once/.test(d)) ? true : undefined), 100);
    await cloud.cancelOperation(op.id);
    const s = await pollUntil('the deployment to end', 5 * 60_000, async () => {
      const st = await cloud.getOperation(op.id);
      return st && st.state !== 'running' ? st : undefined;
    }, 250);
    expect(s.state).toBe('cancelled');
    const deploymentId = op.id.split('/')[1] ?? '';
    await pollUntil('its syntheses to have removed what they made', 5 * 60_000, async () =>
      (await ofDeployment(deploymentId)).every((i) => i.state !== 'running' && i.state !== 'provisioning') && cacheDirs(deploymentId).length === 0 ? true : undefined, 500);
    // No instance directory of the deployment is left on any host.
    const leftovers = cluster.hosts.flatMap((h) => fs.existsSync(path.join(cluster.config.varDir, 'hosts', h, 'instances')) ? fs.readdirSync(path.join(cluster.config.varDir, 'hosts', h, 'instances')).filter((d) => d.startsWith(`i-${deploymentId.slice(2)}-`)) : []);
    expect(leftovers).toEqual([]);
    await expect(cloud.cancelOperation(op.id)).rejects.toMatchObject({ status: 409 });
    const catalog = new SqliteClusterCatalog(cluster.config.catalog.file);
    try {
      expect(await catalog.closedOperation(op.id)).toMatchObject({ kind: 'deployOverlay', status: 'failed', error: { type: 'CANCELLED' } });
    } finally {
      await catalog.close();
    }
  });
});
