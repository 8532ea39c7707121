/**
 * A full disk during apply, on real parts: host B's directory is a tmpfs of its own; once the base
 * is imported there, the tmpfs is shrunk to leave no room for a synthesized VM. The synthesis fails
 * with NO_SPACE (not retried for ever), leaves no partial file, and gives the space back; with
 * room again, the same request succeeds.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { hostDir } from '../../src/config';
import { isCloudletError } from '../../src/core/errors';
import { launchOverlay, startApiCluster, type ApiCluster } from '../helpers/api-cluster';

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
  let c: ApiCluster;
  let hostB: string;
  let mount = '';
  let overlayUrl: string;
  const token = `disk-${process.pid}`;

  beforeAll(async () => {
    c = await startApiCluster('dfault', ['da', 'db']);
    hostB = c.cluster.hosts[1] ?? '';
    // B's directory becomes a tmpfs before anything is stored there (its worker makes what it needs on demand).
    mount = hostDir(c.cluster.config, hostB);
    fs.mkdirSync(mount, { recursive: true });
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1024m', `cloudlet-${hostB}`, mount]);
    ({ overlayUrl } = await launchOverlay(c, token));
  });

  afterAll(async () => {
    // Detach the tmpfs first: the cluster then removes B's (now empty) directory as usual.
    if (mount) execFileSync('umount', ['-l', mount]);
    await c?.stop();
  });

  it('fails with NO_SPACE, leaves no partial file, gives the space back, and succeeds once there is room', async () => {
    const used = usedBytes(mount);
    const filesBefore = filesUnder(mount).sort();
    // Room for a few MiB more than what is there: far less than the VM's memory file needs.
    execFileSync('mount', ['-o', `remount,size=${Math.ceil(used / 4096) * 4096 + 4 * 1024 * 1024}`, mount]);
    const op = await c.cloud.provisionInstance({ hostId: hostB, overlayUrl });
    const err = await c.cloud.waitForOperation(op.id, { timeoutMs: 5 * 60_000 }).catch((e: unknown) => e);
    expect(isCloudletError(err) && err.code).toBe('NO_SPACE');
    expect(String(err)).toMatch(new RegExp(`host ${hostB}'s disk is full \\(${mount}: \\d+ MiB free .*Fix: free space on the file system of ${mount}`));
    const status = await c.cloud.getOperation(op.id);
    expect(status?.state).toBe('failed');
    expect(status?.error?.nonRetryable).toBe(true);
    // Nothing left: the files are those from before, and the space is back (to within a page).
    expect(filesUnder(mount).sort()).toEqual(filesBefore);
    expect(usedBytes(mount)).toBeLessThanOrEqual(used + 4096);
    expect((await c.cloud.listInstances()).filter((i) => i.hostId === hostB && i.state === 'running')).toEqual([]);

    execFileSync('mount', ['-o', 'remount,size=1024m', mount]);
    const again = await c.done((await c.cloud.provisionInstance({ hostId: hostB, overlayUrl })).id);
    expect((await (await c.appOf(String(again.instanceId))).state()).token).toBe(token);
    await c.done((await c.cloud.terminateInstance(String(again.instanceId))).id);
  });
});
