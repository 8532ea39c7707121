/**
 * The steps the observability tests share before a synthesis: import the test base on two hosts,
 * resume it on the first, and make an overlay of it there, through the API.
 */
import type { CloudletApiClient } from '../../src/api/client';
import { testBasePackage } from './test-base';

export interface OverlayStory {
  pkg: { packageFile: string; baseId: string };
  overlayUrl: string;
  /** Waits for an operation and returns its result (fails the test unless it succeeded). */
  done(id: string): Promise<Record<string, unknown>>;
}

export async function overlayOnFirstHost(cloud: CloudletApiClient, hosts: [string, string]): Promise<OverlayStory> {
  const pkg = await testBasePackage(256);
  const done = async (id: string): Promise<Record<string, unknown>> => {
    const s = await cloud.waitForOperation(id, { timeoutMs: 10 * 60_000 });
    if (s.state !== 'succeeded') throw new Error(`operation ${id} ended ${s.state}: ${s.error?.message ?? ''}`);
    return s.result as Record<string, unknown>;
  };
  for (const hostId of hosts) await done((await cloud.importBase({ hostId, source: pkg.packageFile })).id);
  const dev = await done((await cloud.resumeBase({ hostId: hosts[0], baseId: pkg.baseId })).id);
  const made = await done((await cloud.createOverlay({ instanceId: String(dev.instanceId) })).id);
  const overlay = await cloud.getOverlay(String(made.overlayId));
  if (!overlay) throw new Error(`overlay ${String(made.overlayId)} is not listed`);
  return { pkg, overlayUrl: overlay.url, done };
}
