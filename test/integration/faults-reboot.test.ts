/**
 * A host "reboot", on real parts: host B's worker stops, libvirtd is killed, B's QEMU processes
 * are killed, then libvirtd and B's worker start again. The worker's reconciliation run finds the
 * instance whose VM is gone: the API lists it as lost, its files, domain and admission are gone,
 * and B synthesizes again.
 */
import fs from 'node:fs';
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
    c = await startApiCluster('rfault', ['ra', 'rb']);
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
});
