/**
 * All activities of one host, created with that host's dependencies. Workflows see only the
 * types (see ./guest for GuestActivities); the worker registers the implementations.
 */
import path from 'node:path';
import type { Logger } from 'pino';
import type { Config } from '../config';
import { loadGuestImage } from '../guest/manifest';
import { LibvirtHypervisor } from '../hypervisor/libvirt';
import { createGuestActivities } from './guest';
import { createInstanceActivities } from './instances';
import { withFailureMapping } from './failures';
import { createRecipeActivities } from './recipes';
import { createHandoffSourceActivities } from './handoff-source';
import { createHandoffDestinationActivities } from './handoff-destination';
import { createHostStatsActivities } from './host-stats';
import { createOverlayCacheActivities } from './overlay-cache';
import { createAdmissionActivities } from './admission';
import { createReconcileActivities } from './reconcile';
import { createWarmPoolActivities } from './warm-pool';
import { catalogAt, createOperationRecordActivities } from './operation-records';

export interface HostActivityDeps {
  hostId: string;
  dataDir: string;
  config: Config;
  log: Logger;
  /** Base URL of this host's overlay publisher. */
  publicUrl: () => string;
}

export function createHostActivities(deps: HostActivityDeps) {
  const hypervisor = new LibvirtHypervisor({ logger: deps.log });
  // Probe KVM once now, so the first CPU-model check of a synthesis does not pay for it.
  void hypervisor.virtType().catch(() => undefined);
  const guestDir = path.join(deps.config.varDir, 'guest');
  const guest = createGuestActivities({
    hostId: deps.hostId,
    dataDir: deps.dataDir,
    hypervisor,
    guestImage: () => loadGuestImage(guestDir),
    log: deps.log,
  });
  const instances = createInstanceActivities({
    hostId: deps.hostId,
    dataDir: deps.dataDir,
    hypervisor,
    publicUrl: deps.publicUrl,
    log: deps.log,
    fetchPolicy: deps.config.fetch,
  });
  const recipes = createRecipeActivities({ hostId: deps.hostId, dataDir: deps.dataDir, log: deps.log, hypervisor, temporal: { address: deps.config.temporalAddress, namespace: deps.config.namespace } });
  const handoffSource = createHandoffSourceActivities({ hostId: deps.hostId, dataDir: deps.dataDir, hypervisor, log: deps.log });
  const handoffDestination = createHandoffDestinationActivities({ hostId: deps.hostId, dataDir: deps.dataDir, hypervisor, publicUrl: deps.publicUrl, log: deps.log });
  const stats = createHostStatsActivities({ hostId: deps.hostId, dataDir: deps.dataDir, hypervisor });
  const overlayCache = createOverlayCacheActivities({ dataDir: deps.dataDir, fetchPolicy: deps.config.fetch });
  const admission = createAdmissionActivities({ hostId: deps.hostId, dataDir: deps.dataDir, admission: deps.config.admission });
  const reconcile = createReconcileActivities({ hostId: deps.hostId, dataDir: deps.dataDir, hypervisor, log: deps.log });
  const pool = createWarmPoolActivities({ hostId: deps.hostId, dataDir: deps.dataDir, hypervisor, log: deps.log, admission: deps.config.admission });
  const records = createOperationRecordActivities({ catalog: catalogAt(deps.config.catalog) });
  return withFailureMapping({ ...guest, ...instances, ...recipes, ...handoffSource, ...handoffDestination, ...stats, ...overlayCache, ...admission, ...reconcile, ...pool, ...records }, { hostId: deps.hostId, dataDir: deps.dataDir });
}

export type HostActivities = ReturnType<typeof createHostActivities>;
