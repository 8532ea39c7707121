/**
 * The real backend of the API: a Temporal client and the Temporal-backed service, with the
 * cluster's hosts from CLOUDLET_HOSTS (comma-separated; default: this machine's host id).
 */
import { z } from 'zod';
import { loadConfig } from '../config';
import { connectClient } from '../client/connect';
import { HOST_ID_PATTERN } from '../common/names';
import { CloudletError } from '../core/errors';
import { TemporalCloudletService } from './temporal';
import { RecipeSchedules } from './schedules';
import type { CloudletService } from './types';
import { TemporalHandoffService } from './handoff';
import type { HandoffService } from './handoff-types';
import { loadHandoffSecret } from '../common/handoff-secret';
import { TemporalMobilityService } from './mobility';
import type { MobilityService } from './mobility-types';
import { SqliteNeighbourRegistry } from '../core/mobility/registry';
import { openClusterCatalog, type ClusterCatalog } from '../core/cluster-catalog';
import { createLogger } from '../common/logger';

export { TemporalCloudletService } from './temporal';

/** How often the API records ended operations in the catalog on its own. */
const SYNC_EVERY_MS = 30_000;

export async function createTemporalBackend(env: NodeJS.ProcessEnv = process.env): Promise<{ service: CloudletService; schedules: RecipeSchedules; handoffs: HandoffService; mobility: MobilityService; temporalUi: { url: string; namespace: string }; catalog: ClusterCatalog; close: () => Promise<void> }> {
  const config = loadConfig(env);
  const hosts = z.array(z.string().regex(HOST_ID_PATTERN)).safeParse((env.CLOUDLET_HOSTS ?? config.hostId).split(',').map((h) => h.trim()).filter(Boolean));
  if (!hosts.success) {
    throw new CloudletError('BAD_INPUT', `CLOUDLET_HOSTS must list host ids separated by commas (got "${env.CLOUDLET_HOSTS}")`, { fix: 'e.g. CLOUDLET_HOSTS=host-a,host-b' });
  }
  const catalog = await openClusterCatalog(config.catalog);
  const client = await connectClient(config);
  const service = new TemporalCloudletService(client, config, { hosts: hosts.data, catalog });
  // Ended operations reach the catalog even when no one lists (retention is days; this is 30 s).
  const log = createLogger('cloudlet-catalog-sync', config.logLevel);
  const syncing = setInterval(() => void service.syncCatalog().catch((e: unknown) => log.warn({ err: (e as Error).message }, 'recording ended operations in the cluster catalog failed; the next sync tries again')), SYNC_EVERY_MS);
  syncing.unref();
  const registry = new SqliteNeighbourRegistry(config.mobility.registryFile);
  const schedules = new RecipeSchedules(client, { workflowTaskQueue: config.workflowTaskQueue });
  const mobility = new TemporalMobilityService(client, service, {
    cluster: config.namespace,
    hosts: hosts.data,
    workflowTaskQueue: config.workflowTaskQueue,
    registry,
    ...(config.mobility.probeFrom ? { probeFrom: config.mobility.probeFrom } : {}),
    neighbourHosts: config.mobility.neighbourHosts,
    recipes: schedules,
    catalog,
  });
  // A cluster with neighbours measures them every minute (the Schedule is made when the first is
  // added); one without has no such Schedule (one left from an earlier registry goes).
  if ((await registry.list()).length > 0) await mobility.ensureRefreshSchedule();
  else await mobility.deleteRefreshSchedule();
  return {
    mobility,
    service,
    handoffs: new TemporalHandoffService(client, service, { hosts: hosts.data, secret: loadHandoffSecret(config.varDir, config.namespace, env), catalog }),
    schedules,
    temporalUi: { url: config.webUiUrl, namespace: config.namespace },
    catalog,
    close: async () => {
      clearInterval(syncing);
      await registry.close();
      await catalog.close();
      await client.connection.close();
    },
  };
}
