/**
 * A real edge workload end to end, on the real Temporal dev server and libvirt: the Debian 12
 * base VM is imported on hosts A and B; the web+db application (Flask over SQLite) is installed
 * inside a VM resumed from that base on A by its overlay recipe (Debian packages served by A,
 * run through qemu-guest-agent), which makes, publishes and verifies the overlay; B synthesizes
 * a VM from it over an emulated 38 Mbit/s, 20 ms link (network namespaces, veth, tbf), and the
 * synthesized VM answers the application's real request, resumed (not booted) with the state
 * the recipe left.
 */
import fs from 'node:fs';
import path from 'node:path';
import { importBaseVm, rebuildOverlay, synthesizeVm, terminateVm } from '../../src/workflows';
import type { RebuildOverlayResult } from '../../src/workflows/rebuild';
import { parseRecipe } from '../../src/activities/recipes';
import { hostTaskQueue } from '../../src/common/names';
import { LibvirtHypervisor } from '../../src/hypervisor/libvirt';
import { debianBasePackage } from '../../src/guest/base-package';
import { openLink, type Link } from '../../src/links';
import { askWorkload, workloadRecipe, WORKLOAD_APP_PORT } from '../../src/workloads';
import { workloadInputs } from '../../src/workloads/inputs';
import { startTestCluster, type TestCluster } from '../helpers/cluster';
import { REPO } from '../helpers/infra';

jest.setTimeout(60 * 60_000);

describe('a real workload synthesized over an emulated edge link', () => {
  let cluster: TestCluster;
  let link: Link | undefined;
  let pkg: { packageFile: string; baseId: string };
  const varDir = path.join(REPO, 'var');
  const inputsDir = path.join(varDir, 'cache', 'workload-inputs');

  beforeAll(async () => {
    const hv = new LibvirtHypervisor();
    try {
      pkg = await debianBasePackage(hv, varDir);
    } finally {
      await hv.close();
    }
    cluster = await startTestCluster('wl', ['wa', 'wb']);
    for (const hostId of cluster.hosts) {
      await cluster.client.workflow.execute(importBaseVm, {
        taskQueue: hostTaskQueue(hostId),
        workflowId: `importBaseVm/${hostId}/${pkg.baseId.slice(0, 12)}`,
        args: [{ hostId, source: pkg.packageFile, onHostQueue: true }],
      });
    }
  });

  afterAll(async () => {
    await link?.close();
    await cluster?.stop();
  });

  it('installs web+db in the Debian base VM, and a VM synthesized over 38 Mbit/s answers its real request', async () => {
    const [hostA, hostB] = cluster.hosts as [string, string];
    const recipe = parseRecipe(await workloadRecipe('webdb', { hostId: hostA, baseId: pkg.baseId, recipeId: `webdb-${cluster.suffix}`, inputsDir }));
    const built: RebuildOverlayResult = await cluster.client.workflow.execute(rebuildOverlay, {
      taskQueue: cluster.config.workflowTaskQueue,
      workflowId: `rebuildOverlay/${recipe.recipeId}`,
      args: [recipe],
    });
    expect(built.overlayId).toMatch(/^[0-9a-f]{64}$/);
    // The recipe's output names the boot id its application started under.
    const bootAtBuild = /health: ok boot=(\S+)/.exec(built.recipeOutput ?? '')?.[1];
    expect(bootAtBuild).toMatch(/^[0-9a-f-]{36}$/);

    // A's publisher behind the emulated WiFi link; B fetches the overlay through it.
    const published = new URL(built.url);
    link = await openLink({ profile: 'wifi38', target: { host: '127.0.0.1', port: Number(published.port) } });
    const overlayUrl = link.url(published.pathname);
    const instanceId = `wl-${cluster.suffix}`;
    const synth = await cluster.client.workflow.execute(synthesizeVm, {
      taskQueue: hostTaskQueue(hostB),
      workflowId: `synthesizeVm/${hostB}/${instanceId}`,
      args: [{ hostId: hostB, instanceId, overlayUrl, appPort: WORKLOAD_APP_PORT, onHostQueue: true }],
    });
    const stats = await link.stats();
    // The overlay really crossed the link (and only once: its bytes, plus headers).
    expect(stats.down.bytes).toBeGreaterThanOrEqual(built.bytes);
    expect(stats.down.bytes).toBeLessThan(built.bytes * 1.2 + 1_000_000);

    const app = `http://127.0.0.1:${synth.hostPort}`;
    const inputs = await workloadInputs(inputsDir);
    const answer = await askWorkload('webdb', app, inputs);
    expect(answer.why).toBeUndefined();
    expect(answer.ok).toBe(true);
    // Resumed, not booted: the same application process, under the launch VM's boot id.
    const health = await (await fetch(`${app}/health`)).text();
    expect(health.trim()).toBe(`ok boot=${bootAtBuild}`);
    // The database the recipe loaded came along on the disk.
    const search = (await (await fetch(`${app}/search?q=solar%20drone`)).json()) as { count: number };
    expect(search.count).toBeGreaterThan(0);

    await cluster.client.workflow.execute(terminateVm, {
      taskQueue: hostTaskQueue(hostB),
      workflowId: `terminateVm/${hostB}/${instanceId}`,
      args: [{ hostId: hostB, instanceId, onHostQueue: true }],
    });
    expect(fs.existsSync(path.join(cluster.config.varDir, 'hosts', hostB, 'instances', instanceId))).toBe(false);
  });
});
