/**
 * An in-memory CloudletService for tests of the API, the client and the CLI. It behaves like the
 * real one where callers can see it: operations start at once and finish through stages, ids say
 * what they are, an Idempotency-Key returns the operation it started before (and is a conflict
 * when reused for another request), unknown ids are NOT_FOUND, unknown hosts UNKNOWN_HOST and
 * wrong states CONFLICT. Files (overlays, base packages) are real files in a temp directory.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { RecipeScheduleApi, RecipeScheduleDetail, RecipeScheduleSpec, RecipeScheduleSummary } from '../service/schedule-types';
import { CloudletError } from '../core/errors';
import type {
  BaseInfo,
  CloudletService,
  CreateOverlayRequest,
  HostInfo,
  ImportBaseRequest,
  InstanceInfo,
  DeployRequest,
  OperationKind,
  OperationRef,
  OperationStatus,
  OverlayInfo,
  ProvisionRequest,
  ResumeBaseRequest,
  TriggerOutcome,
} from './types';

export interface FakeServiceOptions {
  /** Host ids; all serving (default: host-a, host-b). */
  hosts?: string[];
  /** Where overlay and base package files are written (default: a new temp directory). */
  dir?: string;
  /** Advance a running operation by one stage on each getOperation call (default true). */
  autoAdvance?: boolean;
  /** Base URL the fake publishes overlays under (default http://127.0.0.1:1/overlays). */
  overlayBaseUrl?: string;
}

export interface FakeCall {
  method: keyof CloudletService;
  args: unknown[];
  idempotencyKey?: string;
}

const STAGES: Record<OperationKind, string[]> = {
  importBaseVm: ['fetch', 'verify', 'unpack', 'register'],
  resumeBaseVm: ['prepare disk', 'restore memory', 'replug NIC', 'verify CPU model'],
  createOverlay: ['save instance', 'build overlay', 'publish'],
  synthesizeVm: ['verify CPU model', 'check base', 'fetch overlay', 'decompress and apply', 'resume', 'replug NIC'],
  terminateVm: ['destroy'],
  rebuildOverlay: ['resume base', 'run recipe', 'create overlay', 'verify'],
  handoffVm: ['round 1', 'round 2', 'cut-over', 'remove the source VM'],
  receiveHandoff: ['prepare working files from the base', 'apply round 1', 'rebuild and verify the VM', 'resume'],
  deployOverlay: ['fetch the overlay once per host', 'synthesize', 'done'],
  reconcileHost: ['compare instance records with the hypervisor'],
};

interface FakeOperation {
  status: OperationStatus;
  stages: string[];
  next: number;
  /** Applied when the last stage finishes; returns the result. */
  complete: () => unknown;
  /** Applied when it fails (compensation). */
  abort: () => void;
}

export class FakeCloudletService implements CloudletService {
  readonly calls: FakeCall[] = [];
  readonly dir: string;
  private readonly autoAdvance: boolean;
  private readonly overlayBaseUrl: string;
  private readonly hosts = new Map<string, HostInfo>();
  private readonly bases = new Map<string, BaseInfo>();
  private readonly baseFiles = new Map<string, string>();
  private readonly overlays = new Map<string, OverlayInfo>();
  private readonly overlayFiles = new Map<string, string>();
  private readonly instances = new Map<string, InstanceInfo>();
  private readonly operations = new Map<string, FakeOperation>();
  private readonly idempotency = new Map<string, { request: string; ref: OperationRef }>();
  private counter = 0;

  constructor(options: FakeServiceOptions = {}) {
    for (const id of options.hosts ?? ['host-a', 'host-b']) this.hosts.set(id, { id, serving: true });
    this.dir = options.dir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'cloudlet-fake-'));
    this.autoAdvance = options.autoAdvance ?? true;
    this.overlayBaseUrl = options.overlayBaseUrl ?? 'http://127.0.0.1:1/overlays';
  }

  // ---- test helpers ----------------------------------------------------------------------------

  /** Add a base directly (as if imported), with a package file of the given bytes. */
  addBase(hostIds: string[], packageBytes: Buffer = Buffer.from('fake base package'), operationId?: string): BaseInfo {
    const id = sha256(packageBytes);
    const base: BaseInfo = { id, hostIds: [...hostIds], diskBytes: 1 << 30, memoryBytes: 256 << 20, cpuModel: 'qemu64', importedAt: now(), operationIds: [operationId ?? `importBaseVm/${hostIds[0] ?? 'host'}/${id.slice(0, 12)}`] };
    this.bases.set(id, base);
    const file = path.join(this.dir, `${id}.cloudlet-base`);
    fs.writeFileSync(file, packageBytes);
    this.baseFiles.set(id, file);
    return base;
  }

  /** Add an overlay directly (as if created), its file holding `content`. */
  addOverlay(baseId: string, content: Buffer, fromInstanceId?: string, operationId?: string): OverlayInfo {
    const id = sha256(content);
    const file = path.join(this.dir, `${id}.overlay`);
    fs.writeFileSync(file, content);
    const o: OverlayInfo = { id, baseId, bytes: content.length, url: `${this.overlayBaseUrl}/${id}.overlay`, createdAt: now(), operationId: operationId ?? `createOverlay/host/${id.slice(0, 12)}` };
    if (fromInstanceId !== undefined) o.fromInstanceId = fromInstanceId;
    this.overlays.set(id, o);
    this.overlayFiles.set(id, file);
    return o;
  }

  /** Add a running instance directly. */
  addInstance(hostId: string, baseId: string): InstanceInfo {
    const id = this.newInstanceId();
    const inst: InstanceInfo = { id, hostId, state: 'running', baseId, operationId: `resumeBaseVm/${hostId}/${id}`, appEndpoint: '127.0.0.1:40000' };
    this.instances.set(id, inst);
    return inst;
  }

  /** Finish one stage of a running operation (or all of them with `toEnd`). */
  advance(operationId: string, toEnd = false): OperationStatus {
    const op = this.operations.get(operationId);
    if (!op) throw new CloudletError('NOT_FOUND', `fake operation ${operationId} does not exist`);
    do this.step(op);
    while (toEnd && op.status.state === 'running');
    return op.status;
  }

  /** Run every running operation to its end. */
  completeAll(): void {
    for (const id of this.operations.keys()) if (this.operations.get(id)?.status.state === 'running') this.advance(id, true);
  }

  /** Make a running operation fail the way a workflow fails (the error is reported by getOperation). */
  fail(operationId: string, type: string, message: string, nonRetryable = true): void {
    const op = this.operations.get(operationId);
    if (!op || op.status.state !== 'running') throw new CloudletError('CONFLICT', `fake operation ${operationId} is not running`);
    op.abort();
    op.status.state = 'failed';
    op.status.closedAt = now();
    op.status.error = { type, message, nonRetryable };
  }

  /** Start a rebuildOverlay operation (what a recipe schedule's action does). */
  startRebuild(recipeId: string, hostId: string): OperationRef {
    this.requireHost(hostId);
    this.counter += 1;
    return this.start('rebuildOverlay', hostId, `${recipeId}-${this.counter}`, () => ({ recipeId, hostId }));
  }

  /** Remove every file the fake wrote. */
  cleanup(): void {
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  // ---- CloudletService -------------------------------------------------------------------------

  async listHosts(): Promise<HostInfo[]> {
    this.record('listHosts', []);
    return [...this.hosts.values()].map((h) => ({ ...h }));
  }

  async getHost(id: string): Promise<HostInfo | undefined> {
    this.record('getHost', [id]);
    const h = this.hosts.get(id);
    return h ? { ...h } : undefined;
  }

  async setPoolTarget(hostId: string, baseId: string, size: number): Promise<{ hostId: string; baseId: string; size: number }> {
    this.record('setPoolTarget', [hostId, baseId, size]);
    this.requireHost(hostId);
    const h = this.hosts.get(hostId) as HostInfo;
    const targets = { ...(h.pool?.targets ?? {}) };
    if (size === 0) delete targets[baseId];
    else targets[baseId] = size;
    const capacityBytes = 8 * 1024 ** 3;
    h.pool = { ...(h.pool ?? { entries: [], taken: 0, discarded: [], memory: { capacityBytes, admittedBytes: 0, poolBytes: 0, availableBytes: capacityBytes, reserveBytes: 1024 ** 3 } }), targets, at: Date.now() };
    return { hostId, baseId, size };
  }

  async importBase(req: ImportBaseRequest, idempotencyKey?: string): Promise<OperationRef> {
    this.record('importBase', [req], idempotencyKey);
    return this.idempotent('importBase', req, idempotencyKey, () => {
      this.requireHost(req.hostId);
      const bytes = Buffer.from(`fake base package from ${req.source}`);
      const baseId = sha256(bytes);
      return this.start('importBaseVm', req.hostId, baseId.slice(0, 12), () => {
        const existing = this.bases.get(baseId);
        if (existing) {
          if (!existing.hostIds.includes(req.hostId)) existing.hostIds.push(req.hostId);
          existing.operationIds.push(`importBaseVm/${req.hostId}/${baseId.slice(0, 12)}`);
        } else {
          this.addBase([req.hostId], bytes, `importBaseVm/${req.hostId}/${baseId.slice(0, 12)}`);
        }
        return { hostId: req.hostId, baseId, alreadyPresent: existing !== undefined };
      });
    });
  }

  async listBases(): Promise<BaseInfo[]> {
    this.record('listBases', []);
    return [...this.bases.values()].map((b) => ({ ...b, hostIds: [...b.hostIds] }));
  }

  async getBase(id: string): Promise<BaseInfo | undefined> {
    this.record('getBase', [id]);
    const b = this.bases.get(id);
    return b && { ...b, hostIds: [...b.hostIds] };
  }

  async basePackageFile(id: string): Promise<string | undefined> {
    this.record('basePackageFile', [id]);
    return this.baseFiles.get(id);
  }

  async resumeBase(req: ResumeBaseRequest, idempotencyKey?: string): Promise<OperationRef> {
    this.record('resumeBase', [req], idempotencyKey);
    return this.idempotent('resumeBase', req, idempotencyKey, () => {
      this.requireHost(req.hostId);
      const base = this.bases.get(req.baseId);
      if (!base) throw new CloudletError('NOT_FOUND', `base ${req.baseId} does not exist`, { fix: 'import it first (POST /v1/bases)' });
      if (!base.hostIds.includes(req.hostId)) {
        throw new CloudletError('CONFLICT', `base ${req.baseId} is not imported on host ${req.hostId}`, { fix: `import it on ${req.hostId} first` });
      }
      const id = this.newInstanceId();
      const opId = `resumeBaseVm/${req.hostId}/${id}`;
      const inst: InstanceInfo = { id, hostId: req.hostId, state: 'provisioning', baseId: req.baseId, operationId: opId };
      this.instances.set(id, inst);
      return this.start(
        'resumeBaseVm',
        req.hostId,
        id,
        () => {
          inst.state = 'running';
          if (req.appPort !== undefined) inst.appEndpoint = `127.0.0.1:${40000 + this.counter}`;
          return { hostId: req.hostId, instanceId: id, baseId: req.baseId };
        },
        () => (inst.state = 'failed'),
      );
    });
  }

  async createOverlay(req: CreateOverlayRequest, idempotencyKey?: string): Promise<OperationRef> {
    this.record('createOverlay', [req], idempotencyKey);
    return this.idempotent('createOverlay', req, idempotencyKey, () => {
      const inst = this.instances.get(req.instanceId);
      if (!inst) throw new CloudletError('NOT_FOUND', `instance ${req.instanceId} does not exist`, { fix: 'list instances with GET /v1/instances' });
      if (inst.state !== 'running') {
        throw new CloudletError('CONFLICT', `instance ${req.instanceId} is ${inst.state}, not running`, { fix: 'wait until it runs (GET /v1/instances/{id})' });
      }
      return this.start('createOverlay', inst.hostId, inst.id, () => {
        const o = this.addOverlay(inst.baseId, Buffer.from(`fake overlay of ${inst.id} made at ${now()} #${++this.counter}`), inst.id, `createOverlay/${inst.hostId}/${inst.id}`);
        if (!req.keepInstance) inst.state = 'terminated';
        return { hostId: inst.hostId, instanceId: inst.id, overlayId: o.id, url: o.url };
      });
    });
  }

  async listOverlays(): Promise<OverlayInfo[]> {
    this.record('listOverlays', []);
    return [...this.overlays.values()].map((o) => ({ ...o }));
  }

  async getOverlay(id: string): Promise<OverlayInfo | undefined> {
    this.record('getOverlay', [id]);
    const o = this.overlays.get(id);
    return o && { ...o };
  }

  async overlayFile(id: string): Promise<string | undefined> {
    this.record('overlayFile', [id]);
    return this.overlayFiles.get(id);
  }

  async provisionInstance(req: ProvisionRequest, idempotencyKey?: string): Promise<OperationRef> {
    this.record('provisionInstance', [req], idempotencyKey);
    return this.idempotent('provisionInstance', req, idempotencyKey, () => {
      this.requireHost(req.hostId);
      const overlay = [...this.overlays.values()].find((o) => o.url === req.overlayUrl);
      const id = this.newInstanceId();
      const opId = `synthesizeVm/${req.hostId}/${id}`;
      const inst: InstanceInfo = { id, hostId: req.hostId, state: 'provisioning', baseId: overlay?.baseId ?? 'unknown', operationId: opId };
      if (overlay) inst.overlayId = overlay.id;
      this.instances.set(id, inst);
      return this.start(
        'synthesizeVm',
        req.hostId,
        id,
        () => {
          inst.state = 'running';
          inst.appEndpoint = `127.0.0.1:${40000 + this.counter}`;
          inst.timings = { 'fetch overlay': 120, 'decompress and apply': 800, resume: 700, 'first response': 1900 };
          return { hostId: req.hostId, instanceId: id, timings: inst.timings };
        },
        () => (inst.state = 'failed'),
      );
    });
  }

  async deploy(req: DeployRequest, idempotencyKey?: string): Promise<OperationRef> {
    this.record('deploy', [req], idempotencyKey);
    return this.idempotent('deploy', req, idempotencyKey, () => {
      for (const h of req.hosts) this.requireHost(h);
      const hostId = req.hosts[0] ?? '';
      return this.start('deployOverlay', hostId, `d-${++this.counter}`, () => ({ requested: req.count, answering: req.count, failed: 0, hosts: req.hosts.map((h) => ({ hostId: h, vms: [] })) }));
    });
  }

  async listInstances(): Promise<InstanceInfo[]> {
    this.record('listInstances', []);
    return [...this.instances.values()].map((i) => ({ ...i }));
  }

  async getInstance(id: string): Promise<InstanceInfo | undefined> {
    this.record('getInstance', [id]);
    const i = this.instances.get(id);
    return i && { ...i };
  }

  async terminateInstance(id: string, idempotencyKey?: string): Promise<OperationRef> {
    this.record('terminateInstance', [id], idempotencyKey);
    return this.idempotent('terminateInstance', id, idempotencyKey, () => {
      const inst = this.instances.get(id);
      if (!inst) throw new CloudletError('NOT_FOUND', `instance ${id} does not exist`, { fix: 'list instances with GET /v1/instances' });
      if (inst.state === 'terminating' || inst.state === 'terminated') {
        throw new CloudletError('CONFLICT', `instance ${id} is already ${inst.state}`, { fix: 'nothing to do' });
      }
      inst.state = 'terminating';
      return this.start('terminateVm', inst.hostId, id, () => {
        inst.state = 'terminated';
        return { hostId: inst.hostId, instanceId: id };
      });
    });
  }

  async getOperation(id: string): Promise<OperationStatus | undefined> {
    this.record('getOperation', [id]);
    const op = this.operations.get(id);
    if (!op) return undefined;
    if (this.autoAdvance && op.status.state === 'running') this.step(op);
    return structuredClone(op.status);
  }

  async cancelOperation(id: string): Promise<void> {
    this.record('cancelOperation', [id]);
    const op = this.operations.get(id);
    if (!op) throw new CloudletError('NOT_FOUND', `no operation ${id}`);
    if (op.status.state !== 'running') throw new CloudletError('CONFLICT', `operation ${id} has ended (${op.status.state})`);
    op.status.state = 'cancelled';
  }

  // ---- internals -------------------------------------------------------------------------------

  private record(method: keyof CloudletService, args: unknown[], idempotencyKey?: string): void {
    this.calls.push(idempotencyKey === undefined ? { method, args } : { method, args, idempotencyKey });
  }

  private idempotent(method: string, req: unknown, key: string | undefined, startIt: () => OperationRef): OperationRef {
    if (key === undefined) return startIt();
    const request = JSON.stringify([method, req]);
    const seen = this.idempotency.get(key);
    if (seen) {
      if (seen.request !== request) {
        throw new CloudletError('CONFLICT', `Idempotency-Key ${key} was used before for another request`, { fix: 'use a new key for a new request' });
      }
      return { ...seen.ref };
    }
    const ref = startIt();
    this.idempotency.set(key, { request, ref });
    return { ...ref };
  }

  private requireHost(hostId: string): void {
    if (!this.hosts.has(hostId)) {
      throw new CloudletError('UNKNOWN_HOST', `host ${hostId} is not part of this cloudlet`, { fix: `use one of ${[...this.hosts.keys()].join(', ')}` });
    }
  }

  private start(kind: OperationKind, hostId: string, object: string, complete: () => unknown, abort: () => void = () => undefined): OperationRef {
    const id = `${kind}/${hostId}/${object}`;
    if (this.operations.get(id)?.status.state === 'running') {
      throw new CloudletError('CONFLICT', `operation ${id} is already running`, { fix: `follow it with GET /v1/operations/${encodeURIComponent(id)}` });
    }
    const stages = STAGES[kind];
    const status: OperationStatus = {
      id,
      kind,
      webUiUrl: `http://127.0.0.1:8233/namespaces/default/workflows/${encodeURIComponent(id)}`,
      state: 'running',
      hostId,
      startedAt: now(),
      progress: { stage: stages[0] ?? 'starting', done: [] },
    };
    this.operations.set(id, { status, stages, next: 0, complete, abort });
    return { id, kind, ...(status.webUiUrl ? { webUiUrl: status.webUiUrl } : {}) };
  }

  private step(op: FakeOperation): void {
    if (op.status.state !== 'running') return;
    const progress = op.status.progress ?? { stage: '', done: [] };
    progress.done.push(op.stages[op.next] ?? 'step');
    op.next += 1;
    const stage = op.stages[op.next];
    if (stage !== undefined) {
      progress.stage = stage;
      progress.bytesDone = op.next * 1000;
      progress.bytesTotal = op.stages.length * 1000;
      op.status.progress = progress;
      return;
    }
    progress.stage = 'done';
    op.status.progress = progress;
    op.status.state = 'succeeded';
    op.status.closedAt = now();
    op.status.result = op.complete();
  }

  private newInstanceId(): string {
    this.counter += 1;
    return `inst-${this.counter.toString(16).padStart(4, '0')}`;
  }
}

function sha256(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

function now(): string {
  return new Date().toISOString();
}

/** In-memory recipe schedules over a FakeCloudletService: a trigger starts a rebuildOverlay operation. */
export class FakeRecipeSchedules implements RecipeScheduleApi {
  private readonly schedules = new Map<string, RecipeScheduleDetail>();

  constructor(private readonly service: FakeCloudletService) {}

  async create(recipe: unknown, spec: RecipeScheduleSpec): Promise<RecipeScheduleDetail> {
    const r = recipe as { recipeId?: unknown; hostId?: unknown };
    if (typeof r.recipeId !== 'string' || typeof r.hostId !== 'string') {
      throw new CloudletError('BAD_INPUT', 'invalid overlay recipe (recipeId and hostId are required)');
    }
    const m = /^(\d+)\s*(s|m|h|d)$/.exec(spec.every);
    const ms = m ? Number(m[1]) * ({ s: 1e3, m: 6e4, h: 3.6e6, d: 8.64e7 }[m[2] as 's' | 'm' | 'h' | 'd']) : 0;
    if (ms < 10_000) throw new CloudletError('BAD_INPUT', `invalid recipe schedule (every: at least 10 s, not ${spec.every})`);
    if (this.schedules.has(r.recipeId)) {
      throw new CloudletError('CONFLICT', `recipe ${r.recipeId} already has a schedule (recipe-${r.recipeId})`, { fix: 'delete it first, or trigger it' });
    }
    if (!(await this.service.listHosts()).some((h) => h.id === r.hostId)) {
      throw new CloudletError('UNKNOWN_HOST', `host ${r.hostId} is not part of this cloudlet`);
    }
    const s: RecipeScheduleDetail = {
      recipeId: r.recipeId,
      scheduleId: `recipe-${r.recipeId}`,
      recipe: structuredClone(recipe),
      every: spec.every,
      paused: spec.paused ?? false,
      recentRuns: [],
      nextRunAt: new Date(Date.now() + ms).toISOString(),
      runningWorkflowIds: [],
      actionsTaken: 0,
      skippedOverlap: 0,
    };
    if (spec.note !== undefined) s.note = spec.note;
    this.schedules.set(r.recipeId, s);
    if (spec.triggerImmediately) await this.trigger(r.recipeId);
    return structuredClone(s);
  }

  async list(): Promise<RecipeScheduleSummary[]> {
    return [...this.schedules.values()].map(({ recipeId, scheduleId, recipe, every, paused, note, recentRuns }) => ({
      recipeId,
      scheduleId,
      recipe,
      every,
      paused,
      ...(note !== undefined ? { note } : {}),
      recentRuns: [...recentRuns],
    }));
  }

  async get(recipeId: string): Promise<RecipeScheduleDetail> {
    return structuredClone(this.require(recipeId));
  }

  async trigger(recipeId: string): Promise<TriggerOutcome> {
    const s = this.require(recipeId);
    const ref = this.service.startRebuild(recipeId, (s.recipe as { hostId: string }).hostId);
    const at = new Date().toISOString();
    s.recentRuns.push({ workflowId: ref.id, runId: `run-${s.recentRuns.length + 1}`, scheduledAt: at, startedAt: at });
    s.actionsTaken = (s.actionsTaken ?? 0) + 1;
    return { started: ref.id };
  }

  async pause(recipeId: string, note = 'paused through the cloudlet service'): Promise<void> {
    const s = this.require(recipeId);
    s.paused = true;
    s.note = note;
  }

  async unpause(recipeId: string, note = 'unpaused through the cloudlet service'): Promise<void> {
    const s = this.require(recipeId);
    s.paused = false;
    s.note = note;
  }

  async delete(recipeId: string): Promise<void> {
    this.require(recipeId);
    this.schedules.delete(recipeId);
  }

  private require(recipeId: string): RecipeScheduleDetail {
    const s = this.schedules.get(recipeId);
    if (!s) throw new CloudletError('NOT_FOUND', `there is no schedule for recipe ${recipeId}`, { fix: 'list the recipe schedules, or create one' });
    return s;
  }
}
