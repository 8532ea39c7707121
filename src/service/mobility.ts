/**
 * Mobility on Temporal (docs/mobility.md): the neighbour registry, RTT probes from this cluster,
 * one mobilityController run per watched instance (started by its first RTT sample or by an
 * operator), discovery, and the Schedule that refreshes the neighbours' RTTs.
 */
import { ScheduleAlreadyRunning, ScheduleNotFoundError, ScheduleOverlapPolicy, WorkflowExecutionAlreadyStartedError, WorkflowNotFoundError, WorkflowUpdateFailedError, type Client, type WorkflowHandle } from '@temporalio/client';
import { NeighbourPeer, type ClusterInfo, type DeviceRttAnswer } from '../client/neighbour-peer';
import { CloudletError } from '../core/errors';
import { tenantOfOperations, type ClusterCatalog } from '../core/cluster-catalog';
import { DEFAULT_MOBILITY_POLICY, mergePolicy, type MobilityPolicy } from '../workflows/mobility-policy';
import { neighbourView, parseNeighbourUrl, type NeighbourRegistry, type NeighbourView } from '../core/mobility/registry';
import { formatDeviceAddress, measureDeviceRtt, parseDeviceAddress } from '../core/mobility/rtt';
import { mobilityController, mobilityStateQuery, moveNowUpdate, pauseSignal, refreshNeighbours, rttSamplesSignal, setPolicyUpdate, stopSignal, type MobilityDecision, type MobilityState } from '../workflows';
import type { Discovery, DiscoveredCluster, MobilityService, WatchRequest } from './mobility-types';
import type { CloudletService } from './types';
import type { RecipeScheduleApi } from './schedule-types';

export interface MobilityServiceOptions {
  cluster: string;
  hosts: string[];
  workflowTaskQueue: string;
  registry: NeighbourRegistry;
  probeFrom?: string;
  /** Hosts a neighbour URL may name (empty: any). */
  neighbourHosts?: string[];
  /** A neighbour measured longer ago than this is stale (default 3 min). */
  staleAfterMs?: number;
  /** Discovery: RTTs within this count as equal, and the cluster holding the base goes first (default 5 ms). */
  tieMs?: number;
  /** How often the refresh Schedule measures the neighbours (default 1 min). */
  refreshEveryMs?: number;
  /** Recipe schedules, so discovery also takes a recipe id (its base and last verified overlay). */
  recipes?: Pick<RecipeScheduleApi, 'get'>;
  /** A controller continues as new past this many history events (default 4000; tests lower it). */
  controllerHistoryLimit?: number;
  /** The cluster catalog: a moved VM stays its tenant's at the neighbour. */
  catalog?: Pick<ClusterCatalog, 'ownersOf'>;
}

export const mobilityWorkflowId = (instanceId: string): string => `mobility/${instanceId}`;
export const refreshScheduleId = (cluster: string): string => `neighbour-rtt/${cluster}`;

export class TemporalMobilityService implements MobilityService {
  constructor(
    private readonly client: Client,
    private readonly service: CloudletService,
    private readonly options: MobilityServiceOptions,
  ) {}

  private get staleAfterMs(): number {
    return this.options.staleAfterMs ?? 180_000;
  }

  async clusterInfo(): Promise<ClusterInfo> {
    const hosts = (await this.service.listHosts()).filter((h) => this.options.hosts.includes(h.id));
    const serving = hosts.filter((h) => h.serving);
    const mem = serving.flatMap((h) => (h.stats ? [h.stats.memAvailableBytes] : []));
    return { cluster: this.options.cluster, hosts: this.options.hosts.length, servingHosts: serving.length, ...(mem.length ? { memAvailableBytes: Math.max(...mem) } : {}) };
  }

  // ---- neighbours ------------------------------------------------------------------------------------

  async addNeighbour(n: { name: string; apiUrl: string; token: string }): Promise<NeighbourView> {
    const apiUrl = parseNeighbourUrl(n.apiUrl, this.options.neighbourHosts ?? []);
    // A cluster with neighbours measures them on a Schedule (made before the neighbour is added:
    // a failure here leaves the registry as it was).
    await this.ensureRefreshSchedule();
    const added = await this.options.registry.add({ ...n, apiUrl });
    return neighbourView(added, Date.now(), this.staleAfterMs);
  }

  async listNeighbours(): Promise<NeighbourView[]> {
    const now = Date.now();
    return (await this.options.registry.list()).map((n) => neighbourView(n, now, this.staleAfterMs));
  }

  async removeNeighbour(name: string): Promise<void> {
    if (!(await this.options.registry.remove(name))) throw new CloudletError('NOT_FOUND', `no neighbour named ${name}`, { fix: 'list them with GET /v1/neighbours' });
    // Without neighbours there is nothing to measure.
    if ((await this.options.registry.list()).length === 0) await this.deleteRefreshSchedule();
  }

  async refreshNeighbours(): Promise<NeighbourView[]> {
    await this.client.workflow.execute(refreshNeighbours, {
      taskQueue: this.options.workflowTaskQueue,
      workflowId: `neighbour-rtt/${this.options.cluster}/now-${Date.now().toString(36)}`,
      workflowExecutionTimeout: '3 minutes',
    });
    return this.listNeighbours();
  }

  /**
   * The Schedule that refreshes the neighbours' RTTs, while the cluster has neighbours (idempotent;
   * a paused schedule stays paused). createTemporalBackend calls it at start when there are some.
   */
  async ensureRefreshSchedule(): Promise<void> {
    const spec = { intervals: [{ every: this.options.refreshEveryMs ?? 60_000 }] };
    const action = { type: 'startWorkflow' as const, workflowType: refreshNeighbours, taskQueue: this.options.workflowTaskQueue, workflowExecutionTimeout: 180_000 };
    try {
      await this.client.schedule.create({
        scheduleId: refreshScheduleId(this.options.cluster),
        spec,
        action,
        policies: { overlap: ScheduleOverlapPolicy.SKIP, catchupWindow: '1 minute' },
        state: { note: 'measures the RTT to every neighbour cluster (docs/mobility.md)' },
      });
    } catch (e) {
      if (!(e instanceof ScheduleAlreadyRunning)) throw e;
      // Made by an earlier process: it runs on this cluster's queue and interval from now on.
      await this.client.schedule.getHandle(refreshScheduleId(this.options.cluster)).update((prev) => ({ ...prev, spec, action }));
    }
  }

  async deleteRefreshSchedule(): Promise<void> {
    await this.client.schedule.getHandle(refreshScheduleId(this.options.cluster)).delete().catch((e: unknown) => {
      if (!(e instanceof ScheduleNotFoundError)) throw e;
    });
  }

  // ---- RTT -------------------------------------------------------------------------------------------

  async probeDevice(device: string, baseId?: string): Promise<DeviceRttAnswer> {
    const addr = parseDeviceAddress(device);
    const [m, info, base] = await Promise.all([
      measureDeviceRtt(addr, { samples: 5, ...(this.options.probeFrom ? { localAddress: this.options.probeFrom } : {}) }),
      this.clusterInfo(),
      baseId ? this.service.getBase(baseId) : Promise.resolve(undefined),
    ]);
    return {
      cluster: this.options.cluster,
      device: formatDeviceAddress(addr),
      rttMs: m.medianMs,
      minMs: m.minMs,
      samples: m.samples,
      servingHosts: info.servingHosts,
      ...(info.memAvailableBytes !== undefined ? { memAvailableBytes: info.memAvailableBytes } : {}),
      ...(baseId ? { holdsBase: (base?.hostIds.length ?? 0) > 0 } : {}),
    };
  }

  /** The instance, running, with what the controller needs to know of it. */
  private async runningInstance(instanceId: string): Promise<{ instanceId: string; hostId: string; baseId: string; memoryBytes?: number; tenant?: string }> {
    const inst = await this.service.getInstance(instanceId);
    if (!inst) throw new CloudletError('NOT_FOUND', `instance ${instanceId} does not exist in this cluster`, { fix: 'list instances with GET /v1/instances' });
    if (inst.state !== 'running') throw new CloudletError('CONFLICT', `instance ${instanceId} is ${inst.state}; only a running instance is watched`, { fix: 'report RTT for a running instance' });
    const base = await this.service.getBase(inst.baseId);
    const tenant = this.options.catalog ? await tenantOfOperations(this.options.catalog, [inst.operationId, inst.parentOperationId]) : undefined;
    return { instanceId, hostId: inst.hostId, baseId: inst.baseId, ...(base ? { memoryBytes: base.memoryBytes } : {}), ...(tenant ? { tenant } : {}) };
  }

  private handle(instanceId: string): WorkflowHandle<typeof mobilityController> {
    return this.client.workflow.getHandle<typeof mobilityController>(mobilityWorkflowId(instanceId));
  }

  private async running(instanceId: string): Promise<boolean> {
    try {
      return (await this.handle(instanceId).describe()).status.name === 'RUNNING';
    } catch (e) {
      if (e instanceof WorkflowNotFoundError) return false;
      throw e;
    }
  }

  private startOptions(instanceId: string, args: Parameters<typeof mobilityController>[0]) {
    return {
      taskQueue: this.options.workflowTaskQueue,
      workflowId: mobilityWorkflowId(instanceId),
      args: [{ ...args, ...(this.options.controllerHistoryLimit ? { historyLimit: this.options.controllerHistoryLimit } : {}) }] as [typeof args],
      workflowIdReusePolicy: 'ALLOW_DUPLICATE' as const,
      staticSummary: `Follow the user of instance ${instanceId}: hand it off to a nearer cluster when the RTT passes the threshold`,
    };
  }

  async reportRtt(instanceId: string, samples: number[], device?: string): Promise<MobilityState> {
    const inst = await this.runningInstance(instanceId);
    const dev = device !== undefined ? formatDeviceAddress(parseDeviceAddress(device)) : undefined;
    const at = Date.now();
    await this.client.workflow.signalWithStart(mobilityController, {
      ...this.startOptions(instanceId, { ...inst, ...(dev ? { device: dev } : {}) }),
      signal: rttSamplesSignal,
      signalArgs: [{ samples: samples.map((rttMs) => ({ rttMs, at })), ...(dev ? { device: dev } : {}) }],
    });
    return this.state(instanceId);
  }

  async watch(instanceId: string, req: WatchRequest): Promise<MobilityState> {
    const inst = await this.runningInstance(instanceId);
    const dev = req.device !== undefined ? formatDeviceAddress(parseDeviceAddress(req.device)) : undefined;
    const policy = req.policy ? checkedPolicy(DEFAULT_MOBILITY_POLICY, req.policy) : undefined;
    if (!(await this.running(instanceId))) {
      try {
        await this.client.workflow.start(mobilityController, this.startOptions(instanceId, {
          ...inst,
          ...(dev ? { device: dev } : {}),
          ...(policy ? { policy } : {}),
          ...(req.cooldownMs !== undefined ? { cooldownMs: req.cooldownMs } : {}),
        }));
        return await this.state(instanceId);
      } catch (e) {
        if (!(e instanceof WorkflowExecutionAlreadyStartedError)) throw e;
      }
    }
    // Running already: change what was asked.
    if (req.policy) await this.setPolicy(instanceId, req.policy);
    if (dev) await this.handle(instanceId).signal(rttSamplesSignal, { samples: [], device: dev });
    return this.state(instanceId);
  }

  async state(instanceId: string): Promise<MobilityState> {
    try {
      return await this.handle(instanceId).query(mobilityStateQuery);
    } catch (e) {
      if (e instanceof WorkflowNotFoundError) throw notWatched(instanceId);
      throw e;
    }
  }

  private async requireRunning(instanceId: string): Promise<void> {
    if (!(await this.running(instanceId))) throw notWatched(instanceId);
  }

  async setPolicy(instanceId: string, patch: Partial<MobilityPolicy>): Promise<MobilityPolicy> {
    await this.requireRunning(instanceId);
    try {
      return await this.handle(instanceId).executeUpdate(setPolicyUpdate, { args: [patch] });
    } catch (e) {
      if (e instanceof WorkflowUpdateFailedError) throw new CloudletError('BAD_INPUT', rejected(e), { fix: 'see docs/mobility.md for the policy fields and their limits' });
      throw e;
    }
  }

  async pause(instanceId: string, paused: boolean): Promise<MobilityState> {
    await this.requireRunning(instanceId);
    await this.handle(instanceId).signal(pauseSignal, { paused });
    return this.state(instanceId);
  }

  async moveNow(instanceId: string, neighbour?: string): Promise<MobilityDecision> {
    await this.requireRunning(instanceId);
    if (neighbour !== undefined && !(await this.options.registry.get(neighbour))) throw new CloudletError('NOT_FOUND', `no neighbour named ${neighbour}`, { fix: 'list them with GET /v1/neighbours' });
    try {
      return await this.handle(instanceId).executeUpdate(moveNowUpdate, { args: [neighbour !== undefined ? { neighbour } : {}] });
    } catch (e) {
      if (e instanceof WorkflowUpdateFailedError) throw new CloudletError('CONFLICT', rejected(e), { fix: 'look at GET /v1/instances/{id}/mobility' });
      throw e;
    }
  }

  async stop(instanceId: string): Promise<void> {
    await this.requireRunning(instanceId);
    await this.handle(instanceId).signal(stopSignal);
  }

  // ---- discovery -------------------------------------------------------------------------------------

  async discover(app: string, device: string, selfUrl: string): Promise<Discovery> {
    const dev = formatDeviceAddress(parseDeviceAddress(device));
    const overlay = await this.application(app);
    const tieMs = this.options.tieMs ?? 5;
    const clusters: DiscoveredCluster[] = [];
    const skipped: Discovery['skipped'] = [];
    const entry = (a: DeviceRttAnswer, apiUrl: string, self: boolean): DiscoveredCluster => ({
      cluster: a.cluster,
      apiUrl,
      rttMs: a.rttMs,
      holdsBase: a.holdsBase === true,
      servingHosts: a.servingHosts,
      provisionUrl: `${apiUrl}/v1/instances`,
      self,
    });
    const own = this.probeDevice(dev, overlay.baseId).then(
      (a) => (a.servingHosts > 0 ? clusters.push(entry(a, selfUrl, true)) : skipped.push({ cluster: this.options.cluster, error: 'no serving host' })),
      (e: unknown) => skipped.push({ cluster: this.options.cluster, error: (e as Error).message }),
    );
    const registry = this.options.registry;
    const others = (await registry.list()).map(async (n) => {
      try {
        const a = await new NeighbourPeer(n.apiUrl, (await registry.token(n.name)) ?? '').deviceRtt(dev, overlay.baseId);
        if (a.servingHosts > 0) clusters.push(entry(a, n.apiUrl, false));
        else skipped.push({ cluster: n.name, error: 'no serving host' });
      } catch (e) {
        skipped.push({ cluster: n.name, error: (e as Error).message.slice(0, 300) });
      }
    });
    await Promise.all([own, ...others]);
    const bucket = (x: number): number => (tieMs > 0 ? Math.floor(x / tieMs) : x);
    clusters.sort((a, b) => bucket(a.rttMs) - bucket(b.rttMs) || Number(b.holdsBase) - Number(a.holdsBase) || a.rttMs - b.rttMs);
    return { app, baseId: overlay.baseId, ...(overlay.url ? { overlayUrl: overlay.url } : {}), device: dev, clusters, skipped };
  }

  /** What `app` names: an overlay, a recipe (its base and last verified overlay), or a base. */
  private async application(app: string): Promise<{ baseId: string; url: string | undefined }> {
    const overlay = /^[0-9a-f]{64}$/.test(app) ? await this.service.getOverlay(app) : undefined;
    if (overlay) return { baseId: overlay.baseId, url: overlay.url };
    if (this.options.recipes && !/^[0-9a-f]{64}$/.test(app)) {
      const r = await this.options.recipes.get(app).catch(() => undefined);
      const baseId = (r?.recipe as { baseId?: unknown } | undefined)?.baseId;
      const url = (r?.lastSucceeded?.result as { url?: unknown } | undefined)?.url;
      if (typeof baseId === 'string') return { baseId, url: typeof url === 'string' ? url : undefined };
    }
    const base = /^[0-9a-f]{64}$/.test(app) ? await this.service.getBase(app) : undefined;
    if (base) return { baseId: base.id, url: undefined };
    throw new CloudletError('NOT_FOUND', `no overlay, recipe or base ${app} in this cluster`, { fix: 'give an overlay id (GET /v1/overlays), a recipe id (GET /v1/schedules) or a base id (GET /v1/bases)' });
  }
}

function notWatched(instanceId: string): CloudletError {
  return new CloudletError('NOT_FOUND', `instance ${instanceId} has no mobility controller here`, { fix: 'start one with PUT /v1/instances/{id}/mobility, or report an RTT sample' });
}

function rejected(e: WorkflowUpdateFailedError): string {
  let c: unknown = e;
  let message = e.message;
  while (c instanceof Error) {
    message = c.message || message;
    c = c.cause;
  }
  return message;
}

function checkedPolicy(base: MobilityPolicy, patch: Partial<MobilityPolicy>): MobilityPolicy {
  const r = mergePolicy(base, patch);
  if ('error' in r) throw new CloudletError('BAD_INPUT', r.error, { fix: 'see docs/mobility.md for the policy fields and their limits' });
  return r.policy;
}
