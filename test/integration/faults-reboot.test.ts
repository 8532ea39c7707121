/**
 * A host "reboot", on real parts: host B's worker stops, libvirtd is killed, B's QEMU processes
 * are killed, then libvirtd and B's worker start again. The worker's reconciliation run finds the
 * instance whose VM is gone: the API lists it as lost, its files, domain and admission are gone,
 * and B synthesizes again. And without any restart: host A's periodic reconciliation (its monitor
 * reads every 200 ms here, so it reconciles every 12 s) finds a VM whose QEMU died, and reports a
 * domain nothing accounts for.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createLogger } from '../../src/common/logger';
import { hostDir } from '../../src/config';
import { createHostWorker, type HostWorker } from '../../src/workers/host-worker';
import { launchOverlay, startApiCluster, type ApiCluster } from '../helpers/api-cluster';
import { domainsOf, killLibvirtd, startLibvirtd } from '../helpers/libvirtd';
import { waitFor } from '../helpers/poll';

jest.setTimeout(20 * 60_000);

/** SIGKILL the QEMU process of a running domain (its pid file is libvirt's). */
function killQemu(domain: string): void {
  const pid = Number(fs.readFileSync(`/run/libvirt/qemu/${domain}.pid`, 'utf8').trim());
  if (!(pid > 1)) throw new Error(`no QEMU pid for ${domain}`);
  process.kill(pid, 'SIGKILL');
}

describe('a host that comes back after a reboot', () => {
  let c: ApiCluster;
  let hostB: string;
  let overlayUrl: string;
  let again: { worker: HostWorker; run: Promise<void> } | undefined;
  const token = `reboot-${process.pid}`;

  beforeAll(async () => {
    c = await startApiCluster('rfault', ['ra', 'rb'], { env: { CLOUDLET_HOST_STATS_EVERY_MS: '200' } });
    hostB = c.cluster.hosts[1] ?? '';
    ({ overlayUrl } = await launchOverlay(c, token));
  });

  afterAll(async () => {
    startLibvirtd();
    again?.worker.shutdown();
    await again?.run;
    await c?.stop();
  });

  it('lists the instance whose VM is gone as lost, frees what it held, and synthesizes again', async () => {
    const made = await c.done((await c.cloud.provisionInstance({ hostId: hostB, overlayUrl })).id);
    const instanceId = String(made.instanceId);
    const dir = path.join(hostDir(c.cluster.config, hostB), 'instances', instanceId);
    const admission = path.join(hostDir(c.cluster.config, hostB), 'admitted', `${instanceId}.json`);
    expect(fs.existsSync(dir) && fs.existsSync(admission)).toBe(true);
    const [domain] = domainsOf(hostB, true) as [string];

    // The "reboot": the worker goes, libvirtd dies, the VM's QEMU dies; then libvirtd comes back.
    c.cluster.workers[1]?.shutdown();
    killLibvirtd();
    killQemu(domain);
    startLibvirtd();
    await waitFor(`${domain} to be down`, async () => domainsOf(hostB, true).length === 0, 60_000);
    expect((await c.cloud.getInstance(instanceId))?.state).toBe('running'); // nothing knows yet

    // B's worker starts again and reconciles.
    const worker = await createHostWorker(c.cluster.config, hostB, createLogger(`worker-${hostB}-again`, 'warn'));
    again = { worker, run: worker.run() };
    await waitFor('the API to list the instance as lost', async () => (await c.cloud.getInstance(instanceId))?.state === 'lost', 120_000);
    expect(fs.existsSync(dir)).toBe(false);
    expect(fs.existsSync(admission)).toBe(false);
    expect(domainsOf(hostB)).toEqual([]);

    // Its memory and files are free again: a new synthesis on B answers with the launch state.
    const next = await c.done((await c.cloud.provisionInstance({ hostId: hostB, overlayUrl })).id);
    expect((await (await c.appOf(String(next.instanceId))).state()).token).toBe(token);
    await c.done((await c.cloud.terminateInstance(String(next.instanceId))).id);
  });

  it('finds a VM that died and a domain without a record while the worker runs (periodic reconciliation)', async () => {
    const hostA = c.cluster.hosts[0] ?? '';
    const made = await c.done((await c.cloud.provisionInstance({ hostId: hostA, overlayUrl })).id);
    const instanceId = String(made.instanceId);
    const stray = `cl-${hostA}-stray`;
    const xml = path.join(os.tmpdir(), `${stray}.xml`);
    fs.writeFileSync(xml, `<domain type='qemu'><name>${stray}</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os></domain>`);
    const virsh = (...args: string[]): string => execFileSync('virsh', ['-c', 'qemu:///system', ...args], { encoding: 'utf8' });
    virsh('define', xml);
    try {
      const since = Date.now();
      killQemu(domainsOf(hostA, true).find((d) => d.endsWith(instanceId)) ?? '');
      await waitFor('the API to list the instance as lost', async () => (await c.cloud.getInstance(instanceId))?.state === 'lost', 120_000);
      // A run that began after the kill reported the stray domain, and left it.
      await waitFor('a reconciliation to report the stray domain', async () => {
        for await (const w of c.cluster.client.workflow.list({ query: `WorkflowId STARTS_WITH "reconcileHost/${hostA}/" AND ExecutionStatus = "Completed"` })) {
          if (w.startTime.getTime() < since) continue;
          const r = (await c.cluster.client.workflow.getHandle(w.workflowId, w.runId).result()) as { orphans?: Array<{ domain: string; state: string }> };
          if (r.orphans?.some((o) => o.domain === stray && o.state === 'shut off')) return true;
        }
        return false;
      }, 120_000, 1000);
      expect(virsh('domstate', stray).trim()).toBe('shut off');
    } finally {
      virsh('undefine', stray);
      fs.rmSync(xml, { force: true });
    }
  });
});
