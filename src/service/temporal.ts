/**
 * The CloudletService on Temporal. Operations are workflows started on the task queue of their
 * host (whose worker runs their workflow tasks and activities) with ids that say what they are
 * ("synthesizeVm/<host>/<instance>"). What exists (bases on hosts, overlays, instances) is derived
 * from the results of the operations that made and ended it: the ended ones recorded in the
 * cluster catalog (catalog-sync.ts; they outlive Temporal's retention), the running ones found in
 * visibility through their search attributes. Without a catalog, all of them come from visibility. An idempotency key becomes part of the workflow id
 * and duplicate ids are rejected, so a retried request returns the operation it started first.
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { WorkflowExecutionAlreadyStartedError, WorkflowNotFoundError, type Client, type WorkflowHandle } from '@temporalio/client';
import type { ClosedOperation, ClusterCatalog } from '../core/cluster-catalog';
import { OperationJournal, type Closed } from './operation-journal';
import { failureOf } from './failure';
import { assertHostServing } from '../client/connect';
import type { Config } from '../config';
import { hostDir } from '../config';
import { hostTaskQueue, SearchAttributes } from '../common/names';
import { CloudletError } from '../core/errors';
import { exportBase } from '../core/base';
import { screenSource } from '../core/fetch/import-path';
import { createOverlayVm, deployOverlay, hostStatsQuery, poolStateQuery, setPoolTargetSignal, importBaseVm, operationProgressQuery, resumeBaseVm, synthesizeVm, terminateVm, type OperationProgress } from '../workflows';
import type {
  BaseInfo,
  CloudletService,
  CreateOverlayRequest,
  DeployRequest,
  HostInfo,
  WarmPoolInfo,
  HostStats,
  ImportBaseRequest,
  InstanceInfo,
  OperationKind,
  OperationRef,
  OperationStatus,
  OverlayInfo,
  ProvisionRequest,
  ResumeBaseRequest,
} from './types';

const KEY = /^[A-Za-z0-9_-]{1,64}$/;
/** How long a status waits for the run's worker to answer its progress query. */
const PROGRESS_QUERY_MS = 3000;

export interface TemporalServiceOptions {
  /** Hosts the cluster has (listed even when no worker serves them right now). */
  hosts: string[];
  /** Where ended operations are recorded and read back from (docs/security.md, "The cluster catalog"). */
  catalog?: ClusterCatalog;
}

export class TemporalCloudletService implements CloudletService {
  private readonly journal: OperationJournal;

  constructor(
    private readonly client: Client,
    private readonly config: Config,
    private readonly options: TemporalServiceOptions,
  ) {
    this.journal = new OperationJournal(client, options.hosts, options.catalog);
  }

  /** Records the operations that ended since the last time in the catalog (none without one); how many. */
  async syncCatalog(): Promise<number> {
    return this.journal.sync();
  }

  private list(kinds: OperationKind[], status?: 'succeeded' | 'running'): Promise<Closed[]> {
    return this.journal.list(kinds, status);
  }

  private resultOf<T>(w: Closed | string): Promise<T> {
    return this.journal.resultOf<T>(w);
  }

  // ---- operations ------------------------------------------------------------------------------

  /**
   * The run's stages, from its progress query, answered by the worker of the run's host (its
   * queue). Within a few seconds or not at all: a host that is down must not hold up the status.
   */
  private progressOf(handle: WorkflowHandle): Promise<OperationProgress | undefined> {
    return this.client.withDeadline(Date.now() + PROGRESS_QUERY_MS, () => handle.query(operationProgressQuery)).catch(() => undefined);
  }

  async cancelOperation(id: string): Promise<void> {
    const handle = this.client.workflow.getHandle(id);
    let d;
    try {
      d = await handle.describe();
    } catch (e) {
      if (e instanceof WorkflowNotFoundError) throw new CloudletError('NOT_FOUND', `no operation ${id}`, { fix: 'list instances or look the id up in the Temporal Web UI' });
      throw e;
    }
    if (d.status.name !== 'RUNNING') throw new CloudletError('CONFLICT', `operation ${id} has ended (${d.status.name.toLowerCase()})`, { fix: 'nothing to cancel' });
    await handle.cancel();
  }

  ref(id: string, kind: OperationKind): OperationRef {
    return { id, kind, webUiUrl: `${this.config.webUiUrl}/namespaces/${this.config.namespace}/workflows/${encodeURIComponent(id)}` };
  }

  private opId(kind: OperationKind, hostId: string, key: string | undefined, object: string): string {
    if (key !== undefined && !KEY.test(key)) throw new CloudletError('BAD_INPUT', `invalid idempotency key "${key}"`, { fix: 'use 1-64 letters, digits, "_" or "-"' });
    return `${kind}/${hostId}/${object}${key ? `/${key}` : ''}`;
  }

  /** Starts an operation's workflow on its host's queue (also used by the handoff service). */
  async start(kind: OperationKind, workflow: (input: never) => Promise<unknown>, id: string, input: { hostId: string } & Record<string, unknown>, summary: string): Promise<OperationRef> {
    try {
      await this.client.workflow.start(workflow as (input: unknown) => Promise<unknown>, {
        // The host's own queue: its worker runs the workflow tasks beside the activities
        // (local checks, eager dispatch; see src/workers/host-worker.ts).
        taskQueue: hostTaskQueue(input.hostId),
        workflowId: id,
        // onHostQueue: the run's short checks are local activities (see HostOperationInput).
        args: [{ ...input, onHostQueue: true }],
        // Set at start so the run is findable (and its host known) before its first task runs.
        typedSearchAttributes: [
          { key: SearchAttributes.host, value: input.hostId },
          { key: SearchAttributes.operation, value: kind },
          { key: SearchAttributes.status, value: 'running' },
        ],
        workflowIdReusePolicy: 'REJECT_DUPLICATE',
        staticSummary: summary,
      });
    } catch (e) {
      if (!(e instanceof WorkflowExecutionAlreadyStartedError)) throw e;
      // Same idempotency key: the operation that was started first.
    }
    return this.ref(id, kind);
  }

  async getOperation(id: string): Promise<OperationStatus | undefined> {
    const handle: WorkflowHandle = this.client.workflow.getHandle(id);
    let d;
    try {
      d = await handle.describe();
    } catch (e) {
      if ((e as Error).name !== 'WorkflowNotFoundError') throw e;
      // Past the server's retention: as the catalog recorded it.
      const rec = await this.options.catalog?.closedOperation(id);
      return rec ? this.statusOf(rec) : undefined;
    }
    // Workflow types are named after operations, but for createOverlayVm (a name free of the
    // core's createOverlay).
    const kind = (d.type === 'createOverlayVm' ? 'createOverlay' : d.type) as OperationKind;
    const hostId = String(d.searchAttributes?.CloudletHost?.[0] ?? id.split('/')[1] ?? '');
    const status: OperationStatus = {
      ...this.ref(id, kind),
      hostId,
      ...(d.parentExecution?.workflowId ? { parentOperationId: d.parentExecution.workflowId } : {}),
      state: 'running',
      startedAt: d.startTime.toISOString(),
      ...(d.closeTime ? { closedAt: d.closeTime.toISOString() } : {}),
    };
    const name = d.status.name;
    if (name === 'RUNNING') {
      const p = await this.progressOf(handle);
      if (p) status.progress = { stage: p.stage, done: p.done };
      const pending = d.raw.pendingActivities?.[0];
      const details = pending?.heartbeatDetails?.payloads?.[0]?.data;
      if (details && status.progress) {
        try {
          const h = JSON.parse(Buffer.from(details).toString('utf8')) as { bytesDone?: number; bytesTotal?: number };
          if (typeof h.bytesDone === 'number') status.progress.bytesDone = h.bytesDone;
          if (typeof h.bytesTotal === 'number') status.progress.bytesTotal = h.bytesTotal;
        } catch {
          // heartbeat details of another shape
        }
      }
      return status;
    }
    // A closed run still answers the progress query (from its history): the stages it went through.
    const p = await this.progressOf(handle);
    if (p) status.progress = { stage: p.stage, done: p.done };
    if (name === 'COMPLETED') {
      status.state = 'succeeded';
      status.result = await handle.result();
      return status;
    }
    status.state = name === 'CANCELLED' ? 'cancelled' : 'failed';
    try {
      await handle.result();
    } catch (e) {
      status.error = failureOf(e, name);
    }
    return status;
  }

  /** The status of an operation as the catalog recorded it when it ended. */
  private statusOf(rec: ClosedOperation): OperationStatus {
    const kind = (rec.type === 'createOverlayVm' ? 'createOverlay' : rec.kind || rec.type) as OperationKind;
    return {
      ...this.ref(rec.id, kind),
      hostId: rec.hostId,
      ...(rec.parentId ? { parentOperationId: rec.parentId } : {}),
      state: rec.status === 'succeeded' ? 'succeeded' : rec.error?.type === 'CANCELLED' ? 'cancelled' : 'failed',
      startedAt: rec.startedAt,
      closedAt: rec.closedAt,
      ...(rec.result !== undefined ? { result: rec.result } : {}),
      ...(rec.error ? { error: { type: rec.error.type, message: rec.error.message, nonRetryable: rec.error.nonRetryable ?? true } } : {}),
    };
  }

  // ---- hosts -------------------------------------------------------------------------------------

  async listHosts(): Promise<HostInfo[]> {
    return Promise.all(this.options.hosts.map((id) => this.hostInfo(id)));
  }

  async getHost(id: string): Promise<HostInfo | undefined> {
    return this.options.hosts.includes(id) ? this.hostInfo(id) : undefined;
  }

  private async hostInfo(id: string): Promise<HostInfo> {
    const serving = await assertHostServing(this.client, id).then(() => true, () => false);
    const [stats, pool] = serving ? await Promise.all([this.hostStats(id), this.poolState(id)]) : [undefined, undefined];
    return { id, serving, ...(stats ? { stats } : {}), ...(pool ? { pool } : {}) };
  }

  /** The latest report of a serving host's warm pool (its warmPool run), if it answers within 2 s. */
  private async poolState(hostId: string): Promise<WarmPoolInfo | undefined> {
    const r = await this.client
      .withDeadline(Date.now() + 2000, () => this.client.workflow.getHandle(`warmPool/${hostId}`).query(poolStateQuery))
      .catch(() => undefined);
    if (!r) return undefined;
    return { targets: r.targets, entries: r.entries, taken: r.taken, discarded: r.discarded, memory: r.memory, at: r.at, ...(r.short ? { short: r.short } : {}) };
  }

  async setPoolTarget(hostId: string, baseId: string, size: number): Promise<{ hostId: string; baseId: string; size: number }> {
    if (!this.options.hosts.includes(hostId)) throw new CloudletError('UNKNOWN_HOST', `host ${hostId} is not a host of this cluster`, { fix: `choose from ${this.options.hosts.join(', ')}` });
    await this.requireHost(hostId);
    await this.client.workflow.getHandle(`warmPool/${hostId}`).signal(setPoolTargetSignal, { baseId, size }).catch((e: unknown) => {
      throw new CloudletError('SERVICE_UNAVAILABLE', `host ${hostId}'s warm pool run (warmPool/${hostId}) is not running: ${(e as Error).message}`, { fix: "restart the host's worker; it starts the run", cause: e });
    });
    return { hostId, baseId, size };
  }

  /** The latest stats of a serving host (its hostMonitor run), if it answers within 2 s. */
  async hostStats(hostId: string): Promise<HostStats | undefined> {
    return this.client
      .withDeadline(Date.now() + 2000, () => this.client.workflow.getHandle(`hostMonitor/${hostId}`).query(hostStatsQuery))
      .catch(() => undefined);
  }

  private async requireHost(hostId: string): Promise<void> {
    await assertHostServing(this.client, hostId);
  }

  // ---- bases ---------------------------------------------------------------------------------------

  async importBase(req: ImportBaseRequest, key?: string): Promise<OperationRef> {
    screenSource('base package', req.source, this.config.fetch);
    await this.requireHost(req.hostId);
    const id = this.opId('importBaseVm', req.hostId, key, key ? 'base' : `base-${randomBytes(4).toString('hex')}`);
    return this.start('importBaseVm', importBaseVm, id, { hostId: req.hostId, source: req.source }, `Import a base VM package on host ${req.hostId} from ${req.source}`);
  }

  async listBases(): Promise<BaseInfo[]> {
    const byId = new Map<string, BaseInfo>();
    for (const w of await this.list(['importBaseVm'], 'succeeded')) {
      const r = await this.resultOf<{ baseId: string; hostId: string; diskBytes: number; memoryBytes: number; cpuModel?: string }>(w);
      const b = byId.get(r.baseId) ?? { id: r.baseId, hostIds: [], diskBytes: r.diskBytes, memoryBytes: r.memoryBytes, ...(r.cpuModel ? { cpuModel: r.cpuModel } : {}), importedAt: (w.closeTime ?? w.startTime).toISOString(), operationIds: [] };
      if (!b.hostIds.includes(r.hostId)) b.hostIds.push(r.hostId);
      b.operationIds.push(w.id);
      byId.set(r.baseId, b);
    }
    return [...byId.values()];
  }

  async getBase(id: string): Promise<BaseInfo | undefined> {
    return (await this.listBases()).find((b) => b.id === id);
  }

  async basePackageFile(id: string): Promise<string | undefined> {
    const base = await this.getBase(id);
    const hostId = base?.hostIds[0];
    if (!base || !hostId) return undefined;
    // Development topology: the hosts' stores are on this machine. A production API would ask the
    // host to export and publish the package instead.
    const out = path.join(this.config.varDir, 'cluster', 'exports', `${id}.cloudletbase`);
    if (!fs.existsSync(out)) {
      fs.mkdirSync(path.dirname(out), { recursive: true });
      await exportBase(path.join(hostDir(this.config, hostId), 'store'), id, `${out}.tmp`);
      fs.renameSync(`${out}.tmp`, out);
    }
    return out;
  }

  // ---- instances and overlays ------------------------------------------------------------------------

  private newInstanceId(key: string | undefined): string {
    return key ? `i-${key.toLowerCase().replace(/[^a-z0-9-]/g, '-').slice(0, 40)}` : `i-${randomBytes(4).toString('hex')}`;
  }

  async resumeBase(req: ResumeBaseRequest, key?: string): Promise<OperationRef> {
    await this.requireHost(req.hostId);
    const instanceId = this.newInstanceId(key);
    return this.start('resumeBaseVm', resumeBaseVm, `resumeBaseVm/${req.hostId}/${instanceId}`, { hostId: req.hostId, baseId: req.baseId, instanceId, ...(req.appPort ? { appPort: req.appPort } : {}) }, `Resume base ${req.baseId.slice(0, 12)} on host ${req.hostId} as instance ${instanceId}`);
  }

  async provisionInstance(req: ProvisionRequest, key?: string): Promise<OperationRef> {
    screenSource('overlay', req.overlayUrl, this.config.fetch);
    await this.requireHost(req.hostId);
    const instanceId = this.newInstanceId(key);
    return this.start('synthesizeVm', synthesizeVm, `synthesizeVm/${req.hostId}/${instanceId}`, {
      hostId: req.hostId, instanceId, overlayUrl: req.overlayUrl, waitForApp: true, ...(req.waitForAppPort ? { appPort: req.waitForAppPort } : {}), ...(req.warmPool === false ? { warmPool: false } : {}),
    }, `Synthesize instance ${instanceId} on host ${req.hostId} from ${req.overlayUrl}`);
  }

  async deploy(req: DeployRequest, key?: string): Promise<OperationRef> {
    screenSource('overlay', req.overlayUrl, this.config.fetch);
    const hosts = [...new Set(req.hosts)];
    for (const h of hosts) {
      if (!this.options.hosts.includes(h)) throw new CloudletError('UNKNOWN_HOST', `host ${h} is not a host of this cluster`, { fix: `choose from ${this.options.hosts.join(', ')}` });
      await this.requireHost(h);
    }
    const per = hosts.map((hostId, i) => ({ hostId, count: Math.floor(req.count / hosts.length) + (i < req.count % hosts.length ? 1 : 0) })).filter((h) => h.count > 0);
    // A key maps to its own id (hashed: keys differing only in case or "_" vs "-" stay apart).
    const deploymentId = `d-${key ? createHash('sha256').update(key).digest('hex').slice(0, 16) : randomBytes(4).toString('hex')}`;
    const id = `deployOverlay/${deploymentId}`;
    try {
      await this.client.workflow.start(deployOverlay, {
        // The shared queue: the deployment is of no one host; its steps run on each host's queue.
        taskQueue: this.config.workflowTaskQueue,
        workflowId: id,
        args: [{ deploymentId, overlayUrl: req.overlayUrl, hosts: per, ...(req.waitForAppPort ? { appPort: req.waitForAppPort } : {}) }],
        typedSearchAttributes: [
          { key: SearchAttributes.host, value: per[0]?.hostId ?? '' },
          { key: SearchAttributes.operation, value: 'deployOverlay' },
          { key: SearchAttributes.status, value: 'running' },
        ],
        workflowIdReusePolicy: 'REJECT_DUPLICATE',
        staticSummary: `Deploy ${req.count} VMs of ${req.overlayUrl} over ${per.map((h) => `${h.hostId} (${h.count})`).join(', ')}`,
      });
    } catch (e) {
      if (!(e instanceof WorkflowExecutionAlreadyStartedError)) throw e;
    }
    return this.ref(id, 'deployOverlay');
  }

  async listInstances(): Promise<InstanceInfo[]> {
    const made = await this.list(['resumeBaseVm', 'synthesizeVm', 'receiveHandoff']);
    // host/instance -> when it last went away (terminated, snapshotted without keeping, handed off)
    const gone = new Map<string, number>();
    const goneAt = (key: string, w: Closed): void => {
      const at = (w.closeTime ?? w.startTime).getTime();
      gone.set(key, Math.max(gone.get(key) ?? 0, at));
    };
    for (const w of await this.list(['terminateVm', 'createOverlay', 'handoffVm'], 'succeeded')) {
      if (w.type === 'terminateVm' || w.type === 'handoffVm') goneAt(`${w.host}/${w.id.split('/')[2]}`, w);
      else {
        // createOverlay destroys its instance unless asked to keep it (its result says which).
        const r = await this.resultOf<{ instanceId: string; hostId: string; kept?: boolean }>(w);
        if (!r.kept) goneAt(`${r.hostId}/${r.instanceId}`, w);
      }
    }
    // host/instance -> when a reconciliation found its VM gone (the host crashed or rebooted)
    const lost = new Map<string, number>();
    for (const w of await this.list(['reconcileHost'], 'succeeded')) {
      const r = await this.resultOf<{ hostId: string; lost: Array<{ instanceId: string }> }>(w);
      for (const l of r.lost) lost.set(`${r.hostId}/${l.instanceId}`, (w.closeTime ?? w.startTime).getTime());
    }
    const out: InstanceInfo[] = [];
    for (const w of made) {
      const [, hostId = '', instanceId = ''] = w.id.split('/');
      const info: InstanceInfo = { id: instanceId, hostId, state: 'provisioning', baseId: '', operationId: w.id, ...(w.parentId ? { parentOperationId: w.parentId } : {}) };
      if (w.status === 'failed') info.state = 'failed';
      if (w.status === 'succeeded') {
        const r = await this.resultOf<{ baseId: string; hostPort?: number; timings?: Record<string, number> }>(w);
        info.baseId = r.baseId;
        const key = `${hostId}/${instanceId}`;
        info.state = (gone.get(key) ?? 0) > w.startTime.getTime() ? 'terminated' : (lost.get(key) ?? 0) > w.startTime.getTime() ? 'lost' : 'running';
        if (r.hostPort) info.appEndpoint = `127.0.0.1:${r.hostPort}`;
        if (r.timings) info.timings = r.timings;
      }
      // A handoff that did not bring its VM made no instance.
      if (w.type === 'receiveHandoff' && info.state !== 'running' && info.state !== 'provisioning') continue;
      out.push(info);
    }
    // The newest record of an id first (an instance that came back by handoff has several).
    return out.sort((a, b) => (a.state === 'running' ? 0 : 1) - (b.state === 'running' ? 0 : 1));
  }

  async getInstance(id: string): Promise<InstanceInfo | undefined> {
    return (await this.listInstances()).find((i) => i.id === id);
  }

  async terminateInstance(id: string, key?: string): Promise<OperationRef> {
    const inst = await this.getInstance(id);
    if (!inst) throw new CloudletError('NOT_FOUND', `instance ${id} does not exist`, { fix: 'list instances with GET /v1/instances' });
    return this.start('terminateVm', terminateVm, this.opId('terminateVm', inst.hostId, key, id), { hostId: inst.hostId, instanceId: id }, `Terminate instance ${id} on host ${inst.hostId}`);
  }

  async createOverlay(req: CreateOverlayRequest, key?: string): Promise<OperationRef> {
    const inst = await this.getInstance(req.instanceId);
    if (!inst) throw new CloudletError('NOT_FOUND', `instance ${req.instanceId} does not exist`, { fix: 'resume a base first (POST /v1/bases/{id}/instances)' });
    if (inst.state !== 'running') throw new CloudletError('CONFLICT', `instance ${req.instanceId} is ${inst.state}`, { fix: 'create overlays from a running instance' });
    return this.start('createOverlay', createOverlayVm, this.opId('createOverlay', inst.hostId, key, req.instanceId), {
      hostId: inst.hostId, instanceId: req.instanceId, keepInstance: req.keepInstance ?? false,
    }, `Create and publish an overlay of instance ${req.instanceId} on host ${inst.hostId}`);
  }

  async listOverlays(): Promise<OverlayInfo[]> {
    const out = new Map<string, OverlayInfo>();
    for (const w of await this.list(['createOverlay', 'rebuildOverlay'], 'succeeded')) {
      const r = await this.resultOf<{ overlayId: string; url: string; bytes: number; baseId: string; instanceId?: string }>(w);
      if (!r.overlayId || out.has(r.overlayId)) continue;
      out.set(r.overlayId, { id: r.overlayId, baseId: r.baseId, bytes: r.bytes, url: r.url, createdAt: (w.closeTime ?? w.startTime).toISOString(), ...(r.instanceId ? { fromInstanceId: r.instanceId } : {}), operationId: w.id });
    }
    return [...out.values()];
  }

  async getOverlay(id: string): Promise<OverlayInfo | undefined> {
    return (await this.listOverlays()).find((o) => o.id === id);
  }

  async overlayFile(id: string): Promise<string | undefined> {
    if (!/^[0-9a-f]{64}$/.test(id)) return undefined;
    // Development topology: every host's store is on this machine.
    const hostsDir = path.join(this.config.varDir, 'hosts');
    for (const h of fs.existsSync(hostsDir) ? fs.readdirSync(hostsDir) : []) {
      const f = path.join(hostsDir, h, 'store', 'overlays', `${id}.overlay`);
      if (fs.existsSync(f)) return f;
    }
    return undefined;
  }
}

