/**
 * A full disk during apply, on real parts: host B's directory is a tmpfs of its own; once the base
 * is imported there, the tmpfs is shrunk to leave no room for a synthesized VM. The synthesis fails
 * with NO_SPACE (not retried for ever), leaves no partial file, and gives the space back; with
 * room again, the same request succeeds.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { startApi, type RunningApi } from '../../src/api/server';
import { CloudletApiClient } from '../../src/api/client';
import { TemporalCloudletService } from '../../src/service';
import { createLogger } from '../../src/common/logger';
import { hostDir } from '../../src/config';
import { isCloudletError } from '../../src/core/errors';
import { GuestAppClient } from '../../src/guest/app-client';
import { startTestCluster, type TestCluster } from '../helpers/cluster';
import { testBasePackage } from '../helpers/test-base';

jest.setTimeout(20 * 60_000);

function usedBytes(dir: string): number {
  const s = fs.statfsSync(dir);
  return (s.blocks - s.bfree) * s.bsize;
}

function filesUnder(dir: string): string[] {
  if (!fs.existsSync(dir)) return [];
  return fs.readdirSync(dir, { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).map((e) => path.relative(dir, path.join(e.parentPath, e.name)));
}

describe('a full disk during apply', () => {
  let cluster: TestCluster;
  let api: RunningApi;
  let cloud: CloudletApiClient;
  let hostA: string;
  let hostB: string;
  let mount = '';
  let overlayUrl: string;
  const token = `disk-${process.pid}`;
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
    cluster = await startTestCluster('dfault', ['da', 'db']);
    [hostA = '', hostB = ''] = cluster.hosts;
    // B's directory becomes a tmpfs before anything is stored there (its worker makes what it needs on demand).
    mount = hostDir(cluster.config, hostB);
    fs.mkdirSync(mount, { recursive: true });
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1024m', `cloudlet-${hostB}`, mount]);
    const apiToken = `dfault-token-${cluster.suffix}-0123456789`;
    api = await startApi(new TemporalCloudletService(cluster.client, cluster.config, { hosts: cluster.hosts }), { tokens: [apiToken], port: 0, logger: createLogger('api', 'warn') });
    cloud = new CloudletApiClient({ baseUrl: api.url, token: apiToken });
    const pkg = await testBasePackage(256);
    for (const hostId of [hostA, hostB]) await done((await cloud.importBase({ hostId, source: pkg.packageFile })).id);
    const dev = await done((await cloud.resumeBase({ hostId: hostA, baseId: pkg.baseId })).id);
    await (await appOf(String(dev.instanceId))).set(token, 'made before the disk filled');
    const made = await done((await cloud.createOverlay({ instanceId: String(dev.instanceId) })).id);
    overlayUrl = (await cloud.getOverlay(String(made.overlayId)))?.url ?? '';
  });

  afterAll(async () => {
    await api?.close();
    // Detach the tmpfs first: the cluster then removes B's (now empty) directory as usual.
    if (mount) execFileSync('umount', ['-l', mount]);
    await cluster?.stop();
  });

  it('fails with NO_SPACE, leaves no partial file, gives the space back, and succeeds once there is room', async () => {
    const used = usedBytes(mount);
    const filesBefore = filesUnder(mount).sort();
    // Room for a few MiB more than what is there: far less than the VM's memory file needs.
    execFileSync('mount', ['-o', `remount,size=${Math.ceil(used / 4096) * 4096 + 4 * 1024 * 1024}`, mount]);
    const op = await cloud.provisionInstance({ hostId: hostB, overlayUrl });
    const err = await cloud.waitForOperation(op.id, { timeoutMs: 5 * 60_000 }).catch((e: unknown) => e);
    expect(isCloudletError(err) && err.code).toBe('NO_SPACE');
    expect(String(err)).toMatch(new RegExp(`host ${hostB}'s disk is full \\(${mount}: \\d+ MiB free .*Fix: free space on the file system of ${mount}`));
    const status = await cloud.getOperation(op.id);
    expect(status?.state).toBe('failed');
    expect(status?.error?.nonRetryable).toBe(true);
    // Nothing left: the files are those from before, and the space is back (to within a page).
    expect(filesUnder(mount).sort()).toEqual(filesBefore);
    expect(usedBytes(mount)).toBeLessThanOrEqual(used + 4096);
    expect((await cloud.listInstances()).filter((i) => i.hostId === hostB && i.state === 'running')).toEqual([]);

    execFileSync('mount', ['-o', 'remount,size=1024m', mount]);
    const again = await done((await cloud.provisionInstance({ hostId: hostB, overlayUrl })).id);
    expect((await (await appOf(String(again.instanceId))).state()).token).toBe(token);
    await done((await cloud.terminateInstance(String(again.instanceId))).id);
  });
});
