/**
 * The warm pool on real parts (Temporal, a host worker, the HTTP API, libvirt and QEMU): the
 * host gives its VMs 800 MiB (three 256 MiB test guests) and steps its pool every second. A pool
 * is created, used by a synthesis (the VM answers with the launch state) and refilled; a pool VM
 * whose QEMU is killed is discarded and never used; a request that opts out restores as before;
 * with the pool empty a synthesis starts a VM of its own early; a VM taken for an app on another
 * port keeps no forward of the default one; an admitted VM takes memory back from the pool, which
 * grows again when the VM goes.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { launchOverlay, startApiCluster, type ApiCluster } from '../helpers/api-cluster';
import { pollUntil } from '../helpers/poll';
import type { WarmPoolInfo } from '../../src/service/types';
import { registry } from '../../src/common/metrics';
import { synthesizeVm } from '../../src/workflows';
import { hostTaskQueue } from '../../src/common/names';

jest.setTimeout(20 * 60_000);

function domainState(name: string): string {
  try {
    return execFileSync('virsh', ['-c', 'qemu:///system', 'domstate', name], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return 'absent';
  }
}

describe('warm pool', () => {
  let c: ApiCluster;
  let host: string;
  let baseId: string;
  let overlayUrl: string;
  const token = `pool-${process.pid}`;

  const pool = async (): Promise<WarmPoolInfo> => {
    const h = await c.cloud.getHost(host);
    if (!h?.pool) throw new Error(`host ${host} shows no pool yet`);
    return h.pool;
  };
  /** Waits until the pool's last report passes `check`; that report. */
  const poolWhere = (what: string, check: (p: WarmPoolInfo) => boolean, timeoutMs = 120_000): Promise<WarmPoolInfo> =>
    pollUntil(`the pool of ${host} to have ${what}`, timeoutMs, async () => {
      const p = await pool();
      return check(p) ? p : undefined;
    }, 250);
  type Synthesized = { instanceId: string; poolEntry?: string; earlyStart?: 'pool' | 'own'; timings: Record<string, number>; applyTimings: Record<string, number> };
  const synthesize = async (opts: { warmPool?: boolean } = {}): Promise<Synthesized> => {
    const r = await c.done((await c.cloud.provisionInstance({ hostId: host, overlayUrl, ...opts })).id);
    const out = r as Synthesized;
    // The synthesized VM answers with the launch VM's state, without a boot.
    expect((await (await c.appOf(out.instanceId)).state()).token).toBe(token);
    return out;
  };

  beforeAll(async () => {
    c = await startApiCluster('pool', ['wp'], { env: { CLOUDLET_VM_MEMORY_MIB: '800', CLOUDLET_WARM_POOL_EVERY_MS: '1000' } });
    host = c.cluster.hosts[0] ?? '';
    ({ baseId, overlayUrl } = await launchOverlay(c, token));
  });

  afterAll(async () => {
    await c?.stop();
  });

  it('is created, used by a synthesis, and refilled', async () => {
    expect((await c.cloud.setPoolTarget(host, baseId, 2)).size).toBe(2);
    const full = await poolWhere('two ready VMs', (p) => p.entries.length === 2);
    for (const e of full.entries) {
      expect(e.baseId).toBe(baseId);
      expect(domainState(e.domain)).toBe('paused');
    }
    // The worker's Prometheus gauges say the same (read at scrape).
    const scraped = await registry.metrics();
    expect(scraped).toContain(`cloudlet_warm_pool_vms{host="${host}",base="${baseId}",kind="ready"} 2`);
    expect(scraped).toContain(`cloudlet_warm_pool_vms{host="${host}",base="${baseId}",kind="target"} 2`);
    const r = await synthesize();
    expect(full.entries.map((e) => e.entryId)).toContain(r.poolEntry);
    // Early start: the pool VM loaded the save while the apply rebuilt it, and got its last bytes
    // once the digests were checked; the resume only ran it. Its user-mode NIC is a new one
    // already (its own QEMU's network), so nothing was hot-plugged.
    expect(r.applyTimings['load the rest into the warm pool VMMs']).toBeGreaterThan(0);
    expect(r.applyTimings['stream into the warm pool VMMs']).toBeGreaterThan(0);
    expect(r.timings['resume the warm pool VMMs']).toBeGreaterThanOrEqual(0);
    expect(r.timings['resume and replug NICMs']).toBeUndefined();
    expect(r.timings['start QEMU for the device stateMs']).toBeUndefined();
    const inst = await c.cloud.getInstance(r.instanceId);
    expect(inst?.state).toBe('running');
    // Refilled: two ready again, none of them the one taken; the taken one counts while it runs.
    const refilled = await poolWhere('two ready VMs again and one taken', (p) => p.entries.length === 2 && p.taken === 1);
    expect(refilled.entries.map((e) => e.entryId)).not.toContain(r.poolEntry);
    await c.done((await c.cloud.terminateInstance(r.instanceId)).id);
    await poolWhere('no VM taken', (p) => p.taken === 0);
  });

  it('discards a VM whose QEMU was killed and never uses it', async () => {
    const full = await poolWhere('two ready VMs', (p) => p.entries.length === 2);
    const victim = full.entries[0];
    if (!victim) throw new Error('no pool entry');
    const pid = Number(fs.readFileSync(`/run/libvirt/qemu/${victim.domain}.pid`, 'utf8').trim());
    process.kill(pid, 'SIGKILL');
    await pollUntil(`${victim.domain} to be gone`, 30_000, async () => (domainState(victim.domain) !== 'paused' ? true : undefined));
    const r = await synthesize();
    expect(r.poolEntry).toBeDefined();
    expect(r.poolEntry).not.toBe(victim.entryId);
    const healed = await poolWhere('two ready VMs, the killed one replaced', (p) => p.entries.length === 2 && !p.entries.some((e) => e.entryId === victim.entryId));
    for (const e of healed.entries) expect(domainState(e.domain)).toBe('paused');
    await c.done((await c.cloud.terminateInstance(r.instanceId)).id);
  });

  it('forwards only the app\'s own port of a VM taken for an app on another port', async () => {
    const full = await poolWhere('two ready VMs', (p) => p.entries.length === 2);
    const instanceId = `i-port-${process.pid}`;
    // Through a Temporal client: the API's requests wait for the app, which the test guest serves
    // on 8080 only.
    const r = (await c.cluster.client.workflow.execute(synthesizeVm, {
      taskQueue: hostTaskQueue(host),
      workflowId: `synthesizeVm/${host}/${instanceId}`,
      args: [{ hostId: host, instanceId, overlayUrl, appPort: 9090, waitForApp: false, onHostQueue: true }],
    })) as unknown as Synthesized & { hostPort: number };
    expect(full.entries.map((e) => e.entryId)).toContain(r.poolEntry);
    const domain = full.entries.find((e) => e.entryId === r.poolEntry)?.domain ?? '';
    const usernet = execFileSync('virsh', ['-c', 'qemu:///system', 'qemu-monitor-command', domain, '--hmp', 'info usernet'], { encoding: 'utf8' });
    const forwards = usernet.split('\n').filter((l) => /HOST_FORWARD/.test(l));
    // One forward: the instance's host port to guest port 9090; the one made ahead for 8080 went.
    expect(forwards).toHaveLength(1);
    expect(forwards[0]).toMatch(new RegExp(`127\\.0\\.0\\.1\\s+${r.hostPort}\\s+10\\.0\\.2\\.15\\s+9090`));
    await c.done((await c.cloud.terminateInstance(instanceId)).id);
  });

  it('restores as before when the request opts out; with the pool empty, starts a VM of its own early', async () => {
    const ready = await poolWhere('two ready VMs', (p) => p.entries.length === 2);
    const optOut = await synthesize({ warmPool: false });
    expect(optOut.poolEntry).toBeUndefined();
    expect(optOut.earlyStart).toBeUndefined();
    expect(optOut.applyTimings['stream into the warm pool VMMs']).toBeUndefined();
    expect(optOut.applyTimings['stream into the started VMMs']).toBeUndefined();
    expect(optOut.timings['resume and replug NICMs']).toBeGreaterThan(0);
    expect((await pool()).entries.map((e) => e.entryId).sort()).toEqual(ready.entries.map((e) => e.entryId).sort());
    await c.done((await c.cloud.terminateInstance(optOut.instanceId)).id);

    await c.cloud.setPoolTarget(host, baseId, 0);
    await poolWhere('no ready VM and no target', (p) => p.entries.length === 0 && Object.keys(p.targets).length === 0);
    for (const e of ready.entries) expect(domainState(e.domain)).toBe('absent');
    // No ready VM: the synthesis starts one for itself while the overlay arrives (early start
    // without a pool) and streams the save into it; no restore of a whole file, no replug.
    const plain = await synthesize();
    expect(plain.poolEntry).toBeUndefined();
    expect(plain.earlyStart).toBe('own');
    expect(plain.applyTimings['start a VM for early startMs']).toBeGreaterThan(0);
    expect(plain.applyTimings['stream into the started VMMs']).toBeGreaterThan(0);
    expect(plain.timings['resume the started VMMs']).toBeGreaterThanOrEqual(0);
    expect(plain.timings['resume and replug NICMs']).toBeUndefined();
    // It is no ready VM of the pool, and goes with its instance, leaving nothing in the pool.
    expect((await pool()).entries).toHaveLength(0);
    const own = fs.readdirSync(path.join(c.cluster.config.varDir, 'hosts', host, 'pool')).filter((n) => /^p[0-9a-f]{8}$/.test(n));
    expect(own).toHaveLength(1);
    const ownDomain = `cl-${host}-pool-${own[0]}`;
    expect(domainState(ownDomain)).toBe('running');
    await c.done((await c.cloud.terminateInstance(plain.instanceId)).id);
    expect(domainState(ownDomain)).toBe('absent');
    expect(fs.readdirSync(path.join(c.cluster.config.varDir, 'hosts', host, 'pool')).filter((n) => /^p[0-9a-f]{8}$/.test(n))).toHaveLength(0);
  });

  it('gives memory back to an admitted VM and grows again when it goes', async () => {
    await c.cloud.setPoolTarget(host, baseId, 3);
    const full = await poolWhere('three ready VMs', (p) => p.entries.length === 3);
    expect(full.memory.poolBytes).toBe(3 * 256 * 1024 * 1024);
    // 256 MiB admitted + three ready 256 MiB VMs would pass the 800 MiB the host gives VMs.
    const vm = await synthesize({ warmPool: false });
    const shrunk = await poolWhere('two ready VMs beside the admitted one', (p) => p.entries.length === 2 && p.memory.admittedBytes === 256 * 1024 * 1024);
    expect(shrunk.memory.admittedBytes + shrunk.memory.poolBytes).toBeLessThanOrEqual(shrunk.memory.capacityBytes);
    expect(shrunk.short).toMatch(/no memory/);
    await c.done((await c.cloud.terminateInstance(vm.instanceId)).id);
    await poolWhere('three ready VMs again', (p) => p.entries.length === 3);
    await c.cloud.setPoolTarget(host, baseId, 0);
    await poolWhere('no ready VM', (p) => p.entries.length === 0);
  });
});
