/**
 * A test cluster with the HTTP API in front of it, and the story most fault tests start from: the
 * test base imported on every host, resumed on the first, a token set in its application, and an
 * overlay made of it.
 */
import { startApi, type RunningApi } from '../../src/api/server';
import { CloudletApiClient } from '../../src/api/client';
import { TemporalCloudletService } from '../../src/service';
import { createLogger } from '../../src/common/logger';
import { GuestAppClient } from '../../src/guest/app-client';
import { startTestCluster, type TestCluster, type TestClusterOptions } from './cluster';
import { testBasePackage } from './test-base';

export interface ApiCluster {
  cluster: TestCluster;
  api: RunningApi;
  cloud: CloudletApiClient;
  /** Waits for an operation; fails the test unless it succeeded; its result. */
  done(id: string): Promise<Record<string, unknown>>;
  /** The application of a running instance. */
  appOf(instanceId: string): Promise<GuestAppClient>;
  stop(): Promise<void>;
}

export async function startApiCluster(name: string, hostPrefixes: string[], options: TestClusterOptions = {}): Promise<ApiCluster> {
  const cluster = await startTestCluster(name, hostPrefixes, options);
  const apiToken = `${name}-token-${cluster.suffix}-0123456789`;
  const api = await startApi(new TemporalCloudletService(cluster.client, cluster.config, { hosts: cluster.hosts }), { tokens: [apiToken], port: 0, logger: createLogger('api', 'warn') });
  const cloud = new CloudletApiClient({ baseUrl: api.url, token: apiToken });
  const done = async (id: string): Promise<Record<string, unknown>> => {
    const s = await cloud.waitForOperation(id, { timeoutMs: 15 * 60_000 });
    expect(s.state).toBe('succeeded');
    return s.result as Record<string, unknown>;
  };
  const appOf = async (instanceId: string): Promise<GuestAppClient> => {
    const inst = await cloud.getInstance(instanceId);
    expect(inst?.state).toBe('running');
    return new GuestAppClient(Number((inst?.appEndpoint ?? '').split(':')[1]));
  };
  return {
    cluster,
    api,
    cloud,
    done,
    appOf,
    async stop() {
      await api.close();
      await cluster.stop();
    },
  };
}

/** Imports the test base on every host, sets `token` in a VM resumed on the first, and makes its overlay (the VM goes). */
export async function launchOverlay(c: ApiCluster, token: string): Promise<{ baseId: string; overlayUrl: string }> {
  const pkg = await testBasePackage(256);
  for (const hostId of c.cluster.hosts) await c.done((await c.cloud.importBase({ hostId, source: pkg.packageFile })).id);
  const dev = await c.done((await c.cloud.resumeBase({ hostId: c.cluster.hosts[0] ?? '', baseId: pkg.baseId })).id);
  await (await c.appOf(String(dev.instanceId))).set(token, 'the launch state');
  const made = await c.done((await c.cloud.createOverlay({ instanceId: String(dev.instanceId) })).id);
  return { baseId: pkg.baseId, overlayUrl: (await c.cloud.getOverlay(String(made.overlayId)))?.url ?? '' };
}
