/**
 * libvirtd killed (SIGKILL) and started again, on real parts (Temporal, two host workers, the HTTP
 * API, libvirt and QEMU):
 * 1. during a synthesis, while its download is held half-way: the run completes, with one VM
 *    that answers with the launch state;
 * 2. during the resume of a synthesis (the restore is under way): the run completes, or fails
 *    cleanly; either way no domain is left that the API does not list as running.
 * A running VM of another instance keeps running through both (QEMU does not depend on libvirtd).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { startApi, type RunningApi } from '../../src/api/server';
import { CloudletApiClient } from '../../src/api/client';
import { TemporalCloudletService } from '../../src/service';
import { createLogger } from '../../src/common/logger';
import { GuestAppClient } from '../../src/guest/app-client';
import { startTestCluster, type TestCluster } from '../helpers/cluster';
import { waitFor } from '../helpers/poll';
import { REPO } from '../helpers/infra';
import { testBasePackage } from '../helpers/test-base';

jest.setTimeout(20 * 60_000);

const virsh = (...args: string[]): string => execFileSync('virsh', ['-c', 'qemu:///system', ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });

function domainsOf(hostId: string): string[] {
  return virsh('list', '--all', '--name').split('\n').map((s) => s.trim()).filter((n) => n.startsWith(`cl-${hostId}-`));
}

/** SIGKILL of the running libvirtd (whoever started it); then infra/libvirt.sh starts a new one. */
function killLibvirtd(): void {
  const pid = Number(fs.readFileSync('/run/libvirtd.pid', 'utf8').trim());
  if (!(pid > 1) || fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim() !== 'libvirtd') throw new Error(`/run/libvirtd.pid names ${pid}, not a libvirtd`);
  process.kill(pid, 'SIGKILL');
}
function startLibvirtd(): void {
  execFileSync('bash', ['infra/libvirt.sh', 'start'], { cwd: REPO, stdio: ['ignore', 'ignore', 'inherit'], timeout: 120_000 });
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

describe('libvirtd killed and started again', () => {
  let cluster: TestCluster;
  let api: RunningApi;
  let cloud: CloudletApiClient;
  let hostA: string;
  let hostB: string;
  let overlayUrl: string;
  let bystander: GuestAppClient;
  const token = `libvirtd-${process.pid}`;
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

  beforeAll(async () => {
    cluster = await startTestCluster('lvfault', ['la', 'lb']);
    [hostA = '', hostB = ''] = cluster.hosts;
    const apiToken = `lvfault-token-${cluster.suffix}-0123456789`;
    api = await startApi(new TemporalCloudletService(cluster.client, cluster.config, { hosts: cluster.hosts }), { tokens: [apiToken], port: 0, logger: createLogger('api', 'warn') });
    cloud = new CloudletApiClient({ baseUrl: api.url, token: apiToken });
    const pkg = await testBasePackage(256);
    for (const hostId of [hostA, hostB]) await done((await cloud.importBase({ hostId, source: pkg.packageFile })).id);
    const dev = await done((await cloud.resumeBase({ hostId: hostA, baseId: pkg.baseId })).id);
    await (await appOf(String(dev.instanceId))).set(token, 'made before the faults');
    const made = await done((await cloud.createOverlay({ instanceId: String(dev.instanceId) })).id);
    overlayUrl = (await cloud.getOverlay(String(made.overlayId)))?.url ?? '';
    // A VM on A that has nothing to do with the faults: it must keep answering through them.
    const other = await done((await cloud.resumeBase({ hostId: hostA, baseId: pkg.baseId })).id);
    bystander = await appOf(String(other.instanceId));
  });

  afterAll(async () => {
    // Whatever happened, leave a libvirtd that answers for the next suite.
    startLibvirtd();
    await api?.close();
    await cluster?.stop();
  });

  it('completes a synthesis during which libvirtd was killed and started again', async () => {
    const held = await stallingServer(Buffer.from(await (await fetch(overlayUrl)).arrayBuffer()));
    try {
      const op = await cloud.provisionInstance({ hostId: hostB, overlayUrl: held.url });
      await waitFor('the download to be held half-way', async () => held.holding(), 120_000);
      killLibvirtd();
      startLibvirtd();
      held.release();
      const result = await done(op.id);
      expect(domainsOf(hostB)).toEqual([`cl-${hostB}-${String(result.instanceId)}`]);
      expect((await (await appOf(String(result.instanceId))).state()).token).toBe(token);
      expect((await bystander.state()).bootId).toBeTruthy();
      await done((await cloud.terminateInstance(String(result.instanceId))).id);
      expect(domainsOf(hostB)).toEqual([]);
    } finally {
      await held.close();
    }
  });

  it('completes a synthesis, or fails it cleanly, when libvirtd is killed during its resume', async () => {
    const op = await cloud.provisionInstance({ hostId: hostB, overlayUrl });
    await waitFor('the synthesis to reach its resume', async () => {
      const s = await cloud.getOperation(op.id);
      return s?.state !== 'running' || /resume/.test(s.progress?.stage ?? '');
    }, 120_000, 50);
    const stage = (await cloud.getOperation(op.id))?.progress?.stage;
    killLibvirtd();
    startLibvirtd();
    const s = await cloud.waitForOperation(op.id, { timeoutMs: 10 * 60_000 }).catch((e: unknown) => e);
    const status = await cloud.getOperation(op.id);
    process.stderr.write(`[faults-libvirtd] killed in stage "${stage ?? '?'}"; the run ended ${status?.state}${status?.error ? ` (${status.error.type}: ${status.error.message})` : ''}\n`);
    if (status?.state === 'succeeded') {
      const instanceId = String((status.result as Record<string, unknown>).instanceId);
      expect(domainsOf(hostB)).toEqual([`cl-${hostB}-${instanceId}`]);
      expect((await (await appOf(instanceId)).state()).token).toBe(token);
      await done((await cloud.terminateInstance(instanceId)).id);
    } else {
      expect(s).toBeInstanceOf(Error);
      expect(status?.state).toBe('failed');
    }
    // Either way nothing is left behind on B.
    expect(domainsOf(hostB)).toEqual([]);
    expect((await bystander.state()).bootId).toBeTruthy();
  });
});
