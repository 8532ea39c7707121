/**
 * Admission by memory under concurrency, on real parts (Temporal, two host workers, the HTTP API,
 * libvirt): each host gives its VMs 800 MiB, room for three 256 MiB test guests. 20 synthesis
 * requests at once over the two hosts: the hosts never run more than three at a time, the others
 * wait (holding no worker slot) and start as VMs are terminated; none is lost, every one answers.
 */
import { execFileSync } from 'node:child_process';
import { startApi, type RunningApi } from '../../src/api/server';
import { CloudletApiClient } from '../../src/api/client';
import { TemporalCloudletService } from '../../src/service';
import { createLogger } from '../../src/common/logger';
import { GuestAppClient } from '../../src/guest/app-client';
import { startTestCluster, type TestCluster } from '../helpers/cluster';
import { testBasePackage } from '../helpers/test-base';

jest.setTimeout(20 * 60_000);

function runningDomains(hostId: string): number {
  const out = execFileSync('virsh', ['-c', 'qemu:///system', 'list', '--name'], { encoding: 'utf8' });
  return out.split('\n').filter((n) => n.trim().startsWith(`cl-${hostId}-`)).length;
}

describe('admission by memory', () => {
  let cluster: TestCluster;
  let api: RunningApi;
  let cloud: CloudletApiClient;
  let hosts: [string, string];
  let overlayUrl: string;
  const token = `admission-${process.pid}`;
  const done = async (id: string): Promise<Record<string, unknown>> => {
    const s = await cloud.waitForOperation(id, { timeoutMs: 15 * 60_000 });
    expect(s.state).toBe('succeeded');
    return s.result as Record<string, unknown>;
  };

  beforeAll(async () => {
    cluster = await startTestCluster('admit', ['ma', 'mb'], { env: { CLOUDLET_VM_MEMORY_MIB: '800' } });
    hosts = [cluster.hosts[0] ?? '', cluster.hosts[1] ?? ''];
    const apiToken = `admit-token-${cluster.suffix}-0123456789`;
    api = await startApi(new TemporalCloudletService(cluster.client, cluster.config, { hosts: cluster.hosts }), { tokens: [apiToken], port: 0, logger: createLogger('api', 'warn') });
    cloud = new CloudletApiClient({ baseUrl: api.url, token: apiToken });
    const pkg = await testBasePackage(256);
    for (const hostId of hosts) await done((await cloud.importBase({ hostId, source: pkg.packageFile })).id);
    const dev = await done((await cloud.resumeBase({ hostId: hosts[0], baseId: pkg.baseId })).id);
    const inst = await cloud.getInstance(String(dev.instanceId));
    await new GuestAppClient(Number((inst?.appEndpoint ?? '').split(':')[1])).set(token, 'the launch state');
    const made = await done((await cloud.createOverlay({ instanceId: String(dev.instanceId) })).id);
    overlayUrl = (await cloud.getOverlay(String(made.overlayId)))?.url ?? '';
  });

  afterAll(async () => {
    await api?.close();
    await cluster?.stop();
  });

  it('runs at most three 256 MiB VMs per host at a time for 20 concurrent requests; all 20 answer', async () => {
    const ops = await Promise.all(Array.from({ length: 20 }, (_, i) => cloud.provisionInstance({ hostId: hosts[i % 2] as string, overlayUrl })));
    const pending = new Set(ops.map((o) => o.id));
    const most = { [hosts[0]]: 0, [hosts[1]]: 0 };
    const answered: string[] = [];
    const waited: number[] = [];
    // Sample the hosts' running VMs every 100 ms while the requests are served.
    const sampler = setInterval(() => {
      for (const h of hosts) most[h] = Math.max(most[h] ?? 0, runningDomains(h));
    }, 100);
    // Terminate each VM once it answers with the launch state, so the queue drains.
    try {
      while (pending.size > 0) {
        for (const id of [...pending]) {
          const s = await cloud.getOperation(id);
          if (!s || s.state === 'running') continue;
          pending.delete(id);
          expect(s.state).toBe('succeeded');
          const result = s.result as { instanceId: string; timings: Record<string, number> };
          const inst = await cloud.getInstance(result.instanceId);
          const state = await new GuestAppClient(Number((inst?.appEndpoint ?? '').split(':')[1])).state();
          expect(state.token).toBe(token);
          answered.push(result.instanceId);
          waited.push(result.timings['wait for memoryMs'] ?? 0);
          await done((await cloud.terminateInstance(result.instanceId)).id);
        }
        await new Promise((r) => setTimeout(r, 200)); // between two looks at the operations
      }
    } finally {
      clearInterval(sampler);
    }
    expect(answered).toHaveLength(20);
    expect(new Set(answered).size).toBe(20);
    for (const h of hosts) {
      expect(most[h]).toBeGreaterThan(0);
      expect(most[h]).toBeLessThanOrEqual(3);
    }
    // Ten requests per host and room for three: most of them waited for memory.
    expect(waited.filter((w) => w > 0).length).toBeGreaterThanOrEqual(8);
    for (const h of hosts) expect(runningDomains(h)).toBe(0);
  });
});
