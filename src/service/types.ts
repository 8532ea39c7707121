/**
 * The cloudlet service: what the HTTP API (src/api) and the CLI's `--api` mode offer, independent
 * of how it is carried out. The Temporal-backed implementation starts workflows on the hosts'
 * queues; tests of the API use a fake.
 *
 * Long operations return an OperationRef at once; their progress and outcome are read with
 * getOperation. An idempotency key makes a retried request return the same operation.
 */
import type { HostStats } from '../activities/host-stats';
import type { PoolReport } from '../activities/warm-pool';

export type { HostStats };

export type OperationKind = 'importBaseVm' | 'resumeBaseVm' | 'createOverlay' | 'synthesizeVm' | 'terminateVm' | 'rebuildOverlay' | 'handoffVm' | 'receiveHandoff' | 'deployOverlay' | 'reconcileHost';

export type OperationState = 'running' | 'succeeded' | 'failed' | 'cancelled';

export interface OperationRef {
  /** The workflow id; it says what the operation is, e.g. "synthesizeVm/host-b/inst-1a2b". */
  id: string;
  kind: OperationKind;
  /** Link to the run in the Temporal Web UI. */
  webUiUrl?: string;
}

/**
 * What triggering a recipe's schedule did: started one rebuild, or none because one was running
 * (overlap policy SKIP). Neither when the scheduler had not acted yet after ~10 s.
 */
export interface TriggerOutcome {
  /** Workflow id of the rebuild it started (the operation id for /v1/operations/{id}). */
  started?: string;
  /** Rebuilds of the recipe that were running, so nothing started. */
  skippedWhileRunning?: string[];
}

export interface Progress {
  stage: string;
  /** Stages finished so far, in order. */
  done: string[];
  bytesDone?: number;
  bytesTotal?: number;
}

export interface OperationStatus extends OperationRef {
  state: OperationState;
  hostId: string;
  /** The operation that started this one, when it is a step of another (a deployment's synthesis). */
  parentOperationId?: string;
  startedAt: string;
  closedAt?: string;
  progress?: Progress;
  /** The operation's result when it succeeded (shape depends on kind). */
  result?: unknown;
  /** When it failed: the failure's type (e.g. CORRUPT, WRONG_BASE) and message. */
  error?: { type: string; message: string; nonRetryable: boolean };
}

export interface HostInfo {
  id: string;
  /** True when a worker polls the host's task queue. */
  serving: boolean;
  /** The host's latest stats (its hostMonitor run), when its worker serves and has read them. */
  stats?: HostStats;
  /** The host's warm pool as its warmPool run last saw it (docs/warm-pool.md). */
  pool?: WarmPoolInfo;
}

/** A host's warm pool: targets per base, ready VMs, and why it is short of its targets if it is. */
export type WarmPoolInfo = Pick<PoolReport, 'targets' | 'entries' | 'taken' | 'discarded' | 'memory' | 'at'> & { short?: string };

export interface BaseInfo {
  id: string;
  hostIds: string[];
  diskBytes: number;
  memoryBytes: number;
  cpuModel?: string;
  importedAt: string;
  /** The import operations that brought it to its hosts (whose owners decide who sees it). */
  operationIds: string[];
}

export interface OverlayInfo {
  /** sha256 of the overlay file. */
  id: string;
  baseId: string;
  bytes: number;
  /** Where hosts fetch it (HTTP, Range requests supported). */
  url: string;
  createdAt: string;
  fromInstanceId?: string;
  /** The operation that made it (createOverlay or rebuildOverlay). */
  operationId: string;
}

export interface InstanceInfo {
  id: string;
  hostId: string;
  /** lost: its VM stopped without a terminate (the host crashed or rebooted); reconciliation removed it. */
  state: 'provisioning' | 'running' | 'terminating' | 'terminated' | 'failed' | 'lost';
  baseId: string;
  overlayId?: string;
  /** 127.0.0.1:port where the guest's application port is forwarded (dev networking). */
  appEndpoint?: string;
  /** Milliseconds per stage of synthesis, "first response" included. */
  timings?: Record<string, number>;
  operationId: string;
  /** The operation that started `operationId`, when it is a step of another (a deployment). */
  parentOperationId?: string;
}

export interface ImportBaseRequest {
  hostId: string;
  /** A base package: a path on the host or an http(s) URL. */
  source: string;
}

export interface ResumeBaseRequest {
  hostId: string;
  baseId: string;
  /** Guest port to reach from the host (the application's port). */
  appPort?: number;
}

export interface CreateOverlayRequest {
  instanceId: string;
  /** Keep the instance running after its snapshot is taken (default false: destroy it). */
  keepInstance?: boolean;
}

export interface ProvisionRequest {
  hostId: string;
  /** The overlay to synthesize from (the original system's overlay_url). */
  overlayUrl: string;
  /** Wait until the guest's application answers on this port before reporting success. */
  waitForAppPort?: number;
  /** false: restore as usual even when the host's warm pool has a VM ready (default true). */
  warmPool?: boolean;
}

export interface DeployRequest {
  /** The overlay every VM is synthesized from; each host fetches it once. */
  overlayUrl: string;
  /** The hosts to spread the VMs over (each must serve and hold the overlay's base). */
  hosts: string[];
  /** How many VMs in all, spread evenly over the hosts (the first hosts get one more). */
  count: number;
  /** The application's guest port to wait for. */
  waitForAppPort?: number;
}

/** Thrown by services for unknown ids (404) and conflicts (409); the API maps codes to statuses. */
export interface CloudletService {
  listHosts(): Promise<HostInfo[]>;
  /** One host with its stats and warm pool; undefined when it is not a host of this cluster. */
  getHost(id: string): Promise<HostInfo | undefined>;
  /** Sets how many ready VMs of base `baseId` host `hostId` keeps (0: none); the pool follows within seconds. */
  setPoolTarget(hostId: string, baseId: string, size: number): Promise<{ hostId: string; baseId: string; size: number }>;

  importBase(req: ImportBaseRequest, idempotencyKey?: string): Promise<OperationRef>;
  listBases(): Promise<BaseInfo[]>;
  getBase(id: string): Promise<BaseInfo | undefined>;
  /** Local path of the base package file, for download (exported on demand). */
  basePackageFile(id: string): Promise<string | undefined>;

  resumeBase(req: ResumeBaseRequest, idempotencyKey?: string): Promise<OperationRef>;
  createOverlay(req: CreateOverlayRequest, idempotencyKey?: string): Promise<OperationRef>;
  listOverlays(): Promise<OverlayInfo[]>;
  getOverlay(id: string): Promise<OverlayInfo | undefined>;
  /** Local path of the overlay file, for download with Range. */
  overlayFile(id: string): Promise<string | undefined>;

  provisionInstance(req: ProvisionRequest, idempotencyKey?: string): Promise<OperationRef>;
  listInstances(): Promise<InstanceInfo[]>;
  getInstance(id: string): Promise<InstanceInfo | undefined>;
  terminateInstance(id: string, idempotencyKey?: string): Promise<OperationRef>;
  /** The same application on many hosts at once (deployOverlay); docs/deployments.md. */
  deploy(req: DeployRequest, idempotencyKey?: string): Promise<OperationRef>;

  getOperation(id: string): Promise<OperationStatus | undefined>;
  /** Ask a running operation to stop (it compensates: removes what it made); NOT_FOUND, or CONFLICT when it has ended. */
  cancelOperation(id: string): Promise<void>;
}
