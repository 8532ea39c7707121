/**
 * The typed client of the cloudlet HTTP API. It implements CloudletService, so the CLI and tests
 * can use it or a local service alike; errors come back as CloudletErrors carrying the server's
 * code and message (CloudletApiError adds the HTTP status, the API's own code and the request id).
 */
import { MobilityApiClient } from './mobility-client';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { HandoffInstanceRequest } from '../service/handoff-types';
import type { ReadableStream as WebReadableStream } from 'node:stream/web';
import { CloudletError, type ErrorCode } from '../core/errors';
import type {
  BaseInfo,
  CloudletService,
  CreateOverlayRequest,
  DeployRequest,
  HostInfo,
  ImportBaseRequest,
  InstanceInfo,
  OperationRef,
  OperationStatus,
  OverlayInfo,
  Progress,
  ProvisionRequest,
  ResumeBaseRequest,
} from '../service/types';
import { isErrorCode } from './codes';
import type { RecipeScheduleDetail, RecipeScheduleSpec, RecipeScheduleSummary } from '../service/schedule-types';

export interface ApiClientOptions {
  /** Root of the API, e.g. http://127.0.0.1:8080 (a path prefix is kept). */
  baseUrl: string;
  /** Bearer token (one of the server's CLOUDLET_API_TOKENS). */
  token?: string;
  /** Per-request timeout for JSON calls (default 30 s); downloads have none. */
  timeoutMs?: number;
  /** Where basePackageFile/overlayFile put their downloads (default: the OS temp directory). */
  downloadDir?: string;
}

export interface ApiIssue {
  path: Array<string | number>;
  message: string;
  code: string;
}

/** A refusal or failure reported by the API (or the API being unreachable: status 0). */
export class CloudletApiError extends CloudletError {
  readonly status: number;
  /** The code the API sent (may be API-only: UNAUTHORIZED, INTERNAL, ...). */
  readonly apiCode: string;
  readonly requestId: string | undefined;
  readonly issues: ApiIssue[];

  constructor(status: number, apiCode: string, message: string, extra: { requestId?: string; issues?: ApiIssue[]; fix?: string; details?: Record<string, unknown>; cause?: unknown } = {}) {
    // Service errors arrive with "Fix: ..." in their message already; the API's own carry it apart.
    const fix = extra.fix !== undefined && !message.includes('Fix:') ? extra.fix : undefined;
    super(codeFor(status, apiCode), message, {
      ...(fix !== undefined ? { fix } : {}),
      details: { ...extra.details, httpStatus: status, apiCode, ...(extra.requestId ? { requestId: extra.requestId } : {}), ...(extra.fix ? { fix: extra.fix } : {}) },
      cause: extra.cause,
    });
    this.name = 'CloudletApiError';
    this.status = status;
    this.apiCode = apiCode;
    this.requestId = extra.requestId;
    this.issues = extra.issues ?? [];
  }
}

/** The ErrorCode of an API answer: the server's own when it is one, else by status. */
function codeFor(status: number, apiCode: string): ErrorCode {
  if (isErrorCode(apiCode)) return apiCode;
  if (status === 404) return 'NOT_FOUND';
  if (status === 409) return 'CONFLICT';
  if (status === 504) return 'TIMEOUT';
  if (status === 401) return 'UNAUTHORIZED';
  if (status >= 400 && status < 500) return 'BAD_INPUT'; // 413, 415, 416: the request must change
  return 'SERVICE_UNAVAILABLE'; // 5xx or unreachable: the service cannot serve now; retrying may help
}

export interface WaitOptions {
  /** Called whenever the progress or state changes. */
  onProgress?: (status: OperationStatus, progress: Progress | undefined) => void;
  /** Give up after this long (default 30 minutes): a CloudletError TIMEOUT. */
  timeoutMs?: number;
  /** First polling interval (default 250 ms), growing to at most `maxIntervalMs` (default 2 s). */
  intervalMs?: number;
  maxIntervalMs?: number;
  signal?: AbortSignal;
}

interface Accepted {
  operation: OperationRef;
  statusUrl: string;
}

export class CloudletApiClient implements CloudletService {
  private readonly root: string;
  private readonly token: string | undefined;
  private readonly timeoutMs: number;
  private readonly downloadDir: string;

  /** Neighbours, RTT, the mobility controller, discovery (docs/mobility.md). */
  readonly mobility = new MobilityApiClient({
    json: (method, apiPath, opts) => this.json(method, apiPath, opts),
    noContent: (method, apiPath, body) => this.noContent(method, apiPath, body),
    orUndefined: (p) => this.orUndefined(p),
    health: () => this.health(),
  });

  constructor(options: ApiClientOptions) {
    let root: URL;
    try {
      root = new URL(options.baseUrl);
    } catch (cause) {
      throw new CloudletError('BAD_INPUT', `the API URL ${options.baseUrl} is not a URL`, { fix: 'pass e.g. http://127.0.0.1:8080', cause });
    }
    if (root.protocol !== 'http:' && root.protocol !== 'https:') {
      throw new CloudletError('BAD_INPUT', `the API URL ${options.baseUrl} is not http(s)`, { fix: 'pass e.g. http://127.0.0.1:8080' });
    }
    this.root = root.href.endsWith('/') ? root.href : `${root.href}/`;
    this.token = options.token;
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.downloadDir = options.downloadDir ?? os.tmpdir();
  }

  /** Absolute URL of an API path such as /v1/bases (or a statusUrl the API returned). */
  url(apiPath: string): string {
    return new URL(apiPath.replace(/^\/+/, ''), this.root).href;
  }

  // ---- CloudletService -------------------------------------------------------------------------

  async health(): Promise<boolean> {
    return (await this.json<{ ok: boolean }>('GET', '/healthz')).ok;
  }

  async listHosts(): Promise<HostInfo[]> {
    return (await this.json<{ hosts: HostInfo[] }>('GET', '/v1/hosts')).hosts;
  }

  async getHost(id: string): Promise<HostInfo | undefined> {
    return this.orUndefined(this.json<HostInfo>('GET', `/v1/hosts/${encodeURIComponent(id)}`));
  }

  async setPoolTarget(hostId: string, baseId: string, size: number): Promise<{ hostId: string; baseId: string; size: number }> {
    return this.json<{ hostId: string; baseId: string; size: number }>('POST', `/v1/hosts/${encodeURIComponent(hostId)}/pool`, { body: { baseId, size } });
  }

  async importBase(req: ImportBaseRequest, idempotencyKey?: string): Promise<OperationRef> {
    return (await this.json<Accepted>('POST', '/v1/bases', { body: req, idempotencyKey })).operation;
  }

  async listBases(): Promise<BaseInfo[]> {
    return (await this.json<{ bases: BaseInfo[] }>('GET', '/v1/bases')).bases;
  }

  async getBase(id: string): Promise<BaseInfo | undefined> {
    return this.orUndefined(this.json<BaseInfo>('GET', `/v1/bases/${encodeURIComponent(id)}`));
  }

  /** Downloads the base package into the download directory; its local path, or undefined if unknown. */
  async basePackageFile(id: string): Promise<string | undefined> {
    const dest = path.join(this.downloadDir, `${id}.cloudlet-base`);
    return this.orUndefined(this.downloadBasePackage(id, dest).then(() => dest));
  }

  async downloadBasePackage(id: string, destFile: string): Promise<{ bytes: number }> {
    return this.download(`/v1/bases/${encodeURIComponent(id)}/package`, destFile);
  }

  async resumeBase(req: ResumeBaseRequest, idempotencyKey?: string): Promise<OperationRef> {
    const body = req.appPort === undefined ? { hostId: req.hostId } : { hostId: req.hostId, appPort: req.appPort };
    return (await this.json<Accepted>('POST', `/v1/bases/${encodeURIComponent(req.baseId)}/instances`, { body, idempotencyKey })).operation;
  }

  async createOverlay(req: CreateOverlayRequest, idempotencyKey?: string): Promise<OperationRef> {
    return (await this.json<Accepted>('POST', '/v1/overlays', { body: req, idempotencyKey })).operation;
  }

  async listOverlays(): Promise<OverlayInfo[]> {
    return (await this.json<{ overlays: OverlayInfo[] }>('GET', '/v1/overlays')).overlays;
  }

  async getOverlay(id: string): Promise<OverlayInfo | undefined> {
    return this.orUndefined(this.json<OverlayInfo>('GET', `/v1/overlays/${encodeURIComponent(id)}`));
  }

  /** Downloads the overlay into the download directory; its local path, or undefined if unknown. */
  async overlayFile(id: string): Promise<string | undefined> {
    const dest = path.join(this.downloadDir, `${id}.overlay`);
    return this.orUndefined(this.downloadOverlay(id, dest).then(() => dest));
  }

  async downloadOverlay(id: string, destFile: string): Promise<{ bytes: number }> {
    return this.download(`/v1/overlays/${encodeURIComponent(id)}/content`, destFile);
  }

  /** Bytes start..end (inclusive; end omitted: to the end of the file) of an overlay, by HTTP Range. */
  async readOverlayRange(id: string, start: number, end?: number): Promise<Buffer> {
    const res = await this.send('GET', `/v1/overlays/${encodeURIComponent(id)}/content`, { headers: { range: `bytes=${start}-${end ?? ''}` }, timeout: false });
    if (res.status !== 206) {
      await res.body?.cancel();
      throw new CloudletApiError(res.status, 'BAD_INPUT', `the API answered ${res.status} instead of 206 to a Range request for overlay ${id}`);
    }
    return Buffer.from(await res.arrayBuffer());
  }

  async provisionInstance(req: ProvisionRequest, idempotencyKey?: string): Promise<OperationRef> {
    return (await this.json<Accepted>('POST', '/v1/instances', { body: req, idempotencyKey })).operation;
  }

  async deploy(req: DeployRequest, idempotencyKey?: string): Promise<OperationRef> {
    return (await this.json<Accepted>('POST', '/v1/deployments', { body: req, idempotencyKey })).operation;
  }

  async listInstances(): Promise<InstanceInfo[]> {
    return (await this.json<{ instances: InstanceInfo[] }>('GET', '/v1/instances')).instances;
  }

  /** Hands a running instance off to another cluster (follow it with waitForOperation; each round is a progress stage). */
  async handoffInstance(id: string, req: HandoffInstanceRequest): Promise<OperationRef> {
    return (await this.json<Accepted>('POST', `/v1/instances/${encodeURIComponent(id)}/handoff`, { body: req })).operation;
  }

  async getInstance(id: string): Promise<InstanceInfo | undefined> {
    return this.orUndefined(this.json<InstanceInfo>('GET', `/v1/instances/${encodeURIComponent(id)}`));
  }

  async terminateInstance(id: string, idempotencyKey?: string): Promise<OperationRef> {
    return (await this.json<Accepted>('DELETE', `/v1/instances/${encodeURIComponent(id)}`, { idempotencyKey })).operation;
  }

  async cancelOperation(id: string): Promise<void> {
    await this.json<unknown>('DELETE', `/v1/operations/${encodeURIComponent(id)}`);
  }

  async getOperation(id: string): Promise<OperationStatus | undefined> {
    return this.orUndefined(this.json<OperationStatus>('GET', `/v1/operations/${encodeURIComponent(id)}`));
  }

  // ---- recipe schedules ------------------------------------------------------------------------

  async createSchedule(recipe: unknown, spec: RecipeScheduleSpec): Promise<RecipeScheduleDetail> {
    return this.json<RecipeScheduleDetail>('POST', '/v1/schedules', { body: { recipe, ...spec } });
  }

  async listSchedules(): Promise<RecipeScheduleSummary[]> {
    return (await this.json<{ schedules: RecipeScheduleSummary[] }>('GET', '/v1/schedules')).schedules;
  }

  async getSchedule(recipeId: string): Promise<RecipeScheduleDetail | undefined> {
    return this.orUndefined(this.json<RecipeScheduleDetail>('GET', `/v1/schedules/${encodeURIComponent(recipeId)}`));
  }

  /** Rebuild now: the operation started (follow it with getOperation/waitForOperation), or the running rebuilds it was skipped for. */
  async triggerSchedule(recipeId: string): Promise<{ operation?: OperationRef; skippedWhileRunning?: string[] }> {
    return this.json<{ operation?: OperationRef; skippedWhileRunning?: string[] }>('POST', `/v1/schedules/${encodeURIComponent(recipeId)}/trigger`);
  }

  async pauseSchedule(recipeId: string, note?: string): Promise<void> {
    await this.noContent('POST', `/v1/schedules/${encodeURIComponent(recipeId)}/pause`, note === undefined ? undefined : { note });
  }

  async unpauseSchedule(recipeId: string, note?: string): Promise<void> {
    await this.noContent('POST', `/v1/schedules/${encodeURIComponent(recipeId)}/unpause`, note === undefined ? undefined : { note });
  }

  async deleteSchedule(recipeId: string): Promise<void> {
    await this.noContent('DELETE', `/v1/schedules/${encodeURIComponent(recipeId)}`);
  }

  /**
   * Poll an operation until it closes. Resolves with the final status when it succeeded; throws a
   * CloudletError with the workflow's failure type and message when it failed or was cancelled,
   * NOT_FOUND when the operation does not exist, TIMEOUT after `timeoutMs`. Transient failures of
   * the status request (API unreachable, 5xx) are retried until the deadline.
   */
  async waitForOperation(id: string, options: WaitOptions = {}): Promise<OperationStatus> {
    const deadline = Date.now() + (options.timeoutMs ?? 30 * 60_000);
    let interval = options.intervalMs ?? 250;
    const maxInterval = options.maxIntervalMs ?? 2000;
    let lastSeen = '';
    for (;;) {
      options.signal?.throwIfAborted();
      let status: OperationStatus | undefined;
      try {
        status = await this.getOperation(id);
      } catch (e) {
        // The API or Temporal behind it hiccuped (unreachable, 5xx): keep polling until the deadline.
        if (!(e instanceof CloudletApiError && (e.status === 0 || e.status >= 500)) || Date.now() >= deadline) throw e;
        await sleep(Math.min(interval, Math.max(0, deadline - Date.now())), options.signal);
        interval = Math.min(maxInterval, Math.ceil(interval * 1.5));
        continue;
      }
      if (!status) throw new CloudletError('NOT_FOUND', `operation ${id} does not exist`, { fix: 'check the id (the operation.id of a 202 answer)' });
      const seen = JSON.stringify([status.state, status.progress]);
      if (seen !== lastSeen) {
        lastSeen = seen;
        options.onProgress?.(status, status.progress);
      }
      if (status.state === 'succeeded') return status;
      if (status.state === 'failed' || status.state === 'cancelled') {
        const type = status.error?.type ?? '';
        const code: ErrorCode = isErrorCode(type) ? type : status.state === 'cancelled' ? 'CONFLICT' : 'HYPERVISOR';
        const why = status.error?.message ?? (status.state === 'cancelled' ? 'it was cancelled' : 'no message');
        throw new CloudletError(code, `operation ${id} ${status.state}: ${why}`, { details: { operation: status } });
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new CloudletError('TIMEOUT', `operation ${id} is still ${status.state} (stage ${status.progress?.stage ?? '?'}) after ${options.timeoutMs ?? 30 * 60_000} ms`, {
          fix: 'wait longer, or look at the run in the Temporal Web UI',
          details: { operation: status },
        });
      }
      await sleep(Math.min(interval, left), options.signal);
      interval = Math.min(maxInterval, Math.ceil(interval * 1.5));
    }
  }

  // ---- transport -------------------------------------------------------------------------------

  private async json<T>(method: string, apiPath: string, opts: { body?: unknown; idempotencyKey?: string | undefined } = {}): Promise<T> {
    const headers: Record<string, string> = { accept: 'application/json' };
    if (opts.body !== undefined) headers['content-type'] = 'application/json';
    if (opts.idempotencyKey !== undefined) headers['idempotency-key'] = opts.idempotencyKey;
    const res = await this.send(method, apiPath, { headers, body: opts.body === undefined ? undefined : JSON.stringify(opts.body), timeout: true });
    const text = await res.text();
    try {
      return JSON.parse(text) as T;
    } catch (cause) {
      throw new CloudletApiError(res.status, 'BAD_RESPONSE', `${method} ${apiPath} answered ${res.status} with a body that is not JSON`, { cause });
    }
  }

  private async noContent(method: string, apiPath: string, body?: unknown): Promise<void> {
    const headers: Record<string, string> = {};
    if (body !== undefined) headers['content-type'] = 'application/json';
    const res = await this.send(method, apiPath, { headers, body: body === undefined ? undefined : JSON.stringify(body), timeout: true });
    await res.arrayBuffer();
  }

  /** Send a request; resolves only for 2xx/3xx, else throws the API's error as a CloudletApiError. */
  private async send(method: string, apiPath: string, opts: { headers?: Record<string, string>; body?: string | undefined; timeout: boolean }): Promise<Response> {
    const headers: Record<string, string> = { ...opts.headers };
    if (this.token !== undefined) headers.authorization = `Bearer ${this.token}`;
    const url = this.url(apiPath);
    let res: Response;
    try {
      res = await fetch(url, {
        method,
        headers,
        ...(opts.body !== undefined ? { body: opts.body } : {}),
        ...(opts.timeout ? { signal: AbortSignal.timeout(this.timeoutMs) } : {}),
      });
    } catch (cause) {
      const why = cause instanceof Error ? ((cause.cause as Error | undefined)?.message ?? cause.message) : String(cause);
      throw new CloudletApiError(0, 'UNREACHABLE', `cannot reach the cloudlet API at ${url} (${why})`, {
        fix: 'check the --api URL and that the API server runs',
        cause,
      });
    }
    if (res.status < 400) return res;
    const text = await res.text().catch(() => '');
    let error: { code?: string; message?: string; fix?: string; requestId?: string; issues?: ApiIssue[]; details?: Record<string, unknown> } | undefined;
    try {
      error = (JSON.parse(text) as { error?: typeof error }).error;
    } catch {
      error = undefined;
    }
    const extra: ConstructorParameters<typeof CloudletApiError>[3] = {};
    const requestId = error?.requestId ?? res.headers.get('x-request-id') ?? undefined;
    if (requestId !== undefined) extra.requestId = requestId;
    if (error?.issues) extra.issues = error.issues;
    if (error?.fix) extra.fix = error.fix;
    if (error?.details) extra.details = error.details;
    throw new CloudletApiError(res.status, error?.code ?? `HTTP_${res.status}`, error?.message ?? `${method} ${apiPath} answered HTTP ${res.status}`, extra);
  }

  private async download(apiPath: string, destFile: string): Promise<{ bytes: number }> {
    const res = await this.send('GET', apiPath, { timeout: false });
    if (!res.body) throw new CloudletApiError(res.status, 'BAD_RESPONSE', `GET ${apiPath} answered without a body`);
    const part = `${destFile}.part-${process.pid}`;
    try {
      await pipeline(Readable.fromWeb(res.body as unknown as WebReadableStream), fs.createWriteStream(part));
      const { size } = await fs.promises.stat(part);
      const expected = res.headers.get('content-length');
      if (expected !== null && Number(expected) !== size) {
        throw new CloudletApiError(res.status, 'BAD_RESPONSE', `GET ${apiPath} ended after ${size} of ${expected} bytes`, { fix: 'retry the download' });
      }
      await fs.promises.rename(part, destFile);
      return { bytes: size };
    } finally {
      await fs.promises.rm(part, { force: true });
    }
  }

  private async orUndefined<T>(p: Promise<T>): Promise<T | undefined> {
    try {
      return await p;
    } catch (e) {
      if (e instanceof CloudletApiError && e.status === 404) return undefined;
      throw e;
    }
  }
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(signal?.reason);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
