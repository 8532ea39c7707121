/**
 * Admission by memory under concurrency, on real parts (Temporal, two host workers, the HTTP API,
 * libvirt): each host gives its VMs 800 MiB, room for three 256 MiB test guests. 20 synthesis
 * requests at once over the two hosts: the hosts never run more than three at a time, the others
 * wait (holding no worker slot) and start as VMs are terminated; none is lost, every one answers.
 * A VM resumed from a base is admitted the same way: a fourth one waits until one of three goes.
 */
import { execFileSync } from 'node:child_process';
import { launchOverlay, startApiCluster, type ApiCluster } from '../helpers/api-cluster';
import { waitFor } from '../helpers/poll';

jest.setTimeout(20 * 60_000);

function runningDomains(hostId: string): number {
  const out = execFileSync('virsh', ['-c', 'qemu:///system', 'list', '--name'], { encoding: 'utf8' });
  return out.split('\n').filter((n) => n.trim().startsWith(`cl-${hostId}-`)).length;
}

describe('admission by memory', () => {
  let c: ApiCluster;
  let hosts: [string, string];
  let overlayUrl: string;
  let baseId: string;
  const token = `admission-${process.pid}`;

  beforeAll(async () => {
    c = await startApiCluster('admit', ['ma', 'mb'], { env: { CLOUDLET_VM_MEMORY_MIB: '800' } });
    hosts = [c.cluster.hosts[0] ?? '', c.cluster.hosts[1] ?? ''];
    ({ overlayUrl, baseId } = await launchOverlay(c, token));
  });

  afterAll(async () => {
    await c?.stop();
  });

  it('runs at most three 256 MiB VMs per host at a time for 20 concurrent requests; all 20 answer', async () => {
    const ops = await Promise.all(Array.from({ length: 20 }, (_, i) => c.cloud.provisionInstance({ hostId: hosts[i % 2] as string, overlayUrl })));
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
          const s = await c.cloud.getOperation(id);
          if (!s || s.state === 'running') continue;
          pending.delete(id);
          expect(s.state).toBe('succeeded');
          const result = s.result as { instanceId: string; timings: Record<string, number> };
          expect((await (await c.appOf(result.instanceId)).state()).token).toBe(token);
          answered.push(result.instanceId);
          waited.push(result.timings['wait for memoryMs'] ?? 0);
          await c.done((await c.cloud.terminateInstance(result.instanceId)).id);
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

  it('admits VMs resumed from a base like synthesized ones: a fourth waits until one of three goes', async () => {
    const host = hosts[0];
    const resume = async (): Promise<string> => (await c.cloud.resumeBase({ hostId: host, baseId })).id;
    const first = await Promise.all([resume(), resume(), resume()]);
    const three = await Promise.all(first.map((id) => c.done(id)));
    expect(runningDomains(host)).toBe(3);
    const fourth = await resume();
    await waitFor('the fourth resume to wait for memory', async () => (await c.cloud.getOperation(fourth))?.progress?.stage === 'wait for memory', 120_000);
    expect(runningDomains(host)).toBe(3);
    await c.done((await c.cloud.terminateInstance(String(three[0]?.instanceId))).id);
    const r = await c.done(fourth);
    expect(runningDomains(host)).toBe(3);
    for (const x of [...three.slice(1), r]) await c.done((await c.cloud.terminateInstance(String(x.instanceId))).id);
    expect(runningDomains(host)).toBe(0);
  });
});
