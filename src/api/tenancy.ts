/**
 * What a request may see and change, by tenant. Every operation started through the API is
 * recorded in the cluster catalog with the tenant of the token that started it; an instance,
 * overlay or base belongs to the tenant of the operation that made it (or of the deployment whose
 * step made it). A member or reader sees its tenant's objects only, and bases and overlays of no
 * tenant (the operators' and the schedules': shared); another tenant's object answers 404, as if
 * absent, so its ids do not leak. Admins see everything. Without a catalog every principal is an
 * admin (configured tokens only) and nothing is filtered.
 */
import { createHash, randomUUID } from 'node:crypto';
import { tenantOfOperations, type ClusterCatalog, type Quota } from '../core/cluster-catalog';
import type { BaseInfo, CloudletService, InstanceInfo, OperationRef, OperationStatus, OverlayInfo } from '../service/types';
import type { Principal } from './auth';
import { ApiError, notFound } from './errors';

const MiB = 1024 * 1024;

/** Instances that count against a quota. */
const LIVE: ReadonlySet<InstanceInfo['state']> = new Set(['provisioning', 'running', 'terminating']);

export class TenantScope {
  constructor(
    readonly principal: Principal,
    private readonly catalog: ClusterCatalog | undefined,
    private readonly locks: TenantLocks,
  ) {}

  /** The same checks as a member of `tenant` (an admin counting a tenant's usage). */
  forTenant(tenant: string): TenantScope {
    return new TenantScope({ role: 'member', tenant, tokenId: this.principal.tokenId }, this.catalog, this.locks);
  }

  get isAdmin(): boolean {
    return this.principal.role === 'admin';
  }

  /**
   * Records that the principal's tenant owns an operation it started; or `tenant`, an admin's
   * choice, where null is no tenant (shared bases and overlays).
   */
  async own(ref: OperationRef | string, tenant?: string | null): Promise<void> {
    const owner = tenant === undefined ? this.principal.tenant : (tenant ?? undefined);
    await this.catalog?.recordOwner(typeof ref === 'string' ? ref : ref.id, owner);
  }

  /**
   * The Idempotency-Key as the service sees it. Ids of operations and instances derive from it, so
   * a tenant's key is made its own (a hash with the tenant's name): another tenant sending the
   * same key, or a key spelling another tenant's instance id, can never reach that tenant's
   * operation or instance.
   */
  keyFor(key: string | undefined): string | undefined {
    if (key === undefined || this.principal.tenant === undefined) return key;
    return `t${createHash('sha256').update(`${this.principal.tenant}\n${key}`).digest('hex').slice(0, 31)}`;
  }

  /**
   * Whether the principal sees an object made by these operations. `shared`: objects of no tenant
   * (bases, overlays) are everyone's; otherwise (instances, operations) they are the admins'.
   */
  async sees(operationIds: ReadonlyArray<string | undefined>, shared: boolean): Promise<boolean> {
    return (await this.visibleOf([operationIds], shared))[0] === true;
  }

  private async visibleOf(sets: ReadonlyArray<ReadonlyArray<string | undefined>>, shared: boolean): Promise<boolean[]> {
    if (this.isAdmin || !this.catalog) return sets.map(() => true);
    const ids = sets.flatMap((s) => s.filter((x): x is string => x !== undefined));
    const owners = await this.catalog.ownersOf(ids);
    const mine = this.principal.tenant;
    return sets.map((s) => {
      const present = s.filter((x): x is string => x !== undefined);
      const tenants = present.map((id) => owners.get(id)?.tenant);
      if (tenants.some((t) => t !== undefined && t === mine)) return true;
      // Shared: made for no tenant, on the record (the operators' through the API), or by a
      // schedule's rebuild. An operation with no record at all (started outside the API, or
      // whose record was not written) is the admins' alone.
      return shared && present.length > 0 && present.every((id) => (owners.has(id) ? owners.get(id)?.tenant === undefined : id.startsWith('rebuildOverlay/')));
    });
  }

  async instances(list: InstanceInfo[]): Promise<InstanceInfo[]> {
    const ok = await this.visibleOf(list.map((i) => [i.operationId, i.parentOperationId]), false);
    return list.filter((_, k) => ok[k]);
  }

  async overlays(list: OverlayInfo[]): Promise<OverlayInfo[]> {
    const ok = await this.visibleOf(list.map((o) => [o.operationId]), true);
    return list.filter((_, k) => ok[k]);
  }

  async bases(list: BaseInfo[]): Promise<BaseInfo[]> {
    const ok = await this.visibleOf(list.map((b) => b.operationIds), true);
    return list.filter((_, k) => ok[k]);
  }

  /** Refuses (404) an instance id the principal does not see; admins pass unchecked (the service says whether it exists). */
  async guardInstance(service: CloudletService, id: string): Promise<void> {
    if (!this.isAdmin && this.catalog) await this.instance(service, id);
  }

  /**
   * Refuses (404) an overlay URL of this cluster whose overlay the principal does not see: the
   * hosts publish overlays by digest, so a URL learnt elsewhere must not open another tenant's.
   */
  async guardOverlayUrl(service: CloudletService, url: string): Promise<void> {
    if (this.isAdmin || !this.catalog) return;
    const digest = /\/overlays\/([0-9a-f]{64})\.overlay$/.exec(url.split(/[?#]/)[0] ?? '')?.[1];
    const o = (await service.listOverlays()).find((x) => x.url === url || x.id === digest);
    if (o && !(await this.sees([o.operationId], true))) throw notFound('overlay', o.id === digest ? digest : url);
  }

  /** The tenant an instance belongs to (none: the admins'), from the owners of the operations that made it. */
  async tenantOfInstance(service: CloudletService, id: string): Promise<string | undefined> {
    if (!this.catalog) return undefined;
    const inst = await service.getInstance(id);
    return inst ? tenantOfOperations(this.catalog, [inst.operationId, inst.parentOperationId]) : undefined;
  }

  /** The instance if the principal sees it; else 404 (also for another tenant's). */
  async instance(service: CloudletService, id: string): Promise<InstanceInfo> {
    const inst = await service.getInstance(id);
    if (!inst || !(await this.sees([inst.operationId, inst.parentOperationId], false))) throw notFound('instance', id);
    return inst;
  }

  async overlay(service: CloudletService, id: string): Promise<OverlayInfo> {
    const o = await service.getOverlay(id);
    if (!o || !(await this.sees([o.operationId], true))) throw notFound('overlay', id);
    return o;
  }

  async base(service: CloudletService, id: string): Promise<BaseInfo> {
    const b = await service.getBase(id);
    if (!b || !(await this.sees(b.operationIds, true))) throw notFound('base', id);
    return b;
  }

  async operation(service: CloudletService, id: string): Promise<OperationStatus> {
    const op = await service.getOperation(id);
    if (!op || !(await this.sees([op.id, op.parentOperationId], false))) throw notFound('operation', id);
    return op;
  }

  /**
   * Starts operations that make `count` instances of `memoryBytes` each, within the tenant's
   * quota: checked and started under the tenant's lock (so two requests cannot both take the last
   * place), then recorded as the tenant's. Admins and tenants without a quota are not limited.
   */
  async startWithinQuota(service: CloudletService, count: number, memoryBytes: number, start: () => Promise<OperationRef>): Promise<OperationRef> {
    const tenant = this.principal.tenant;
    if (!this.catalog || tenant === undefined) {
      const ref = await start();
      await this.own(ref);
      return ref;
    }
    const catalog = this.catalog;
    // One request of the tenant at a time in this process, and in the whole cluster (the
    // catalog's lock: API processes sharing a catalog).
    return this.locks.with(tenant, () => withTenantLock(catalog, tenant, async () => {
      const quota = await catalog.quotaOf(tenant);
      if (quota) await this.checkQuota(service, tenant, quota, count, memoryBytes);
      const ref = await start();
      await this.own(ref);
      // Counted until the operation ends: a deployment's VMs are listed only as it makes them.
      if (quota) await catalog.reserve({ operationId: ref.id, tenant, instances: count, memoryMiB: Math.ceil((count * memoryBytes) / MiB) });
      return ref;
    }));
  }

  private async checkQuota(service: CloudletService, tenant: string, quota: Quota, count: number, memoryBytes: number): Promise<void> {
    const usage = await this.usage(service, memoryBytes);
    if (quota.instances !== undefined && usage.instances + count > quota.instances) {
      throw new ApiError(429, 'QUOTA_EXCEEDED', `tenant ${tenant} has ${usage.instances} instance(s) of the ${quota.instances} its quota allows; this request needs ${count} more`, {
        fix: 'terminate instances you no longer need (DELETE /v1/instances/{id}), or ask an admin to raise the quota',
      });
    }
    const wanted = Math.ceil((count * memoryBytes) / MiB);
    if (quota.memoryMiB !== undefined && usage.memoryMiB + wanted > quota.memoryMiB) {
      throw new ApiError(429, 'QUOTA_EXCEEDED', `tenant ${tenant} uses ${usage.memoryMiB} MiB of guest memory of the ${quota.memoryMiB} MiB its quota allows; this request needs ${wanted} MiB more`, {
        fix: 'terminate instances you no longer need (DELETE /v1/instances/{id}), or ask an admin to raise the quota',
      });
    }
  }

  /**
   * The tenant's live instances and their guest memory (their base's; `unknownBytes` for one
   * whose base is not known yet).
   */
  async usage(service: CloudletService, unknownBytes: number): Promise<{ instances: number; memoryMiB: number }> {
    const [instances, bases] = await Promise.all([service.listInstances(), service.listBases()]);
    const memory = new Map(bases.map((b) => [b.id, b.memoryBytes]));
    const mine = (await this.instances(instances)).filter((i) => LIVE.has(i.state));
    const bytes = mine.reduce((sum, i) => sum + (memory.get(i.baseId) ?? unknownBytes), 0);
    const pending = await this.reserved(service, mine);
    return { instances: mine.length + pending.instances, memoryMiB: Math.ceil(bytes / MiB) + pending.memoryMiB };
  }

  /**
   * What the tenant's operations in flight will still make beyond the instances already listed
   * for them. Reservations of operations that have ended are dropped.
   */
  private async reserved(service: CloudletService, mine: InstanceInfo[]): Promise<{ instances: number; memoryMiB: number }> {
    const tenant = this.principal.tenant;
    if (!this.catalog || tenant === undefined) return { instances: 0, memoryMiB: 0 };
    const ended: string[] = [];
    let instances = 0;
    let memoryMiB = 0;
    for (const r of await this.catalog.reservationsOf(tenant)) {
      const op = await service.getOperation(r.operationId);
      if (!op || op.state !== 'running') {
        ended.push(r.operationId);
        continue;
      }
      const made = mine.filter((i) => i.operationId === r.operationId || i.parentOperationId === r.operationId).length;
      const left = Math.max(0, r.instances - made);
      instances += left;
      memoryMiB += r.instances > 0 ? Math.ceil((r.memoryMiB * left) / r.instances) : 0;
    }
    if (ended.length > 0) await this.catalog.dropReservations(ended);
    return { instances, memoryMiB };
  }
}

/**
 * The guest memory a synthesis from `overlayUrl` will need: its base's, when the cluster knows the
 * overlay; otherwise the largest base's (a quota errs on the side of the cluster).
 */
export async function memoryOfOverlay(service: CloudletService, overlayUrl: string): Promise<number> {
  const [overlays, bases] = await Promise.all([service.listOverlays(), service.listBases()]);
  const baseId = overlays.find((o) => o.url === overlayUrl)?.baseId;
  const base = bases.find((b) => b.id === baseId);
  return base ? base.memoryBytes : Math.max(0, ...bases.map((b) => b.memoryBytes));
}

/** How long a holder keeps the catalog's tenant lock at most (a process that died lets go then). */
const TENANT_LOCK_TTL_MS = 30_000;
/** How long a request waits for the tenant's lock before it is refused. */
const TENANT_LOCK_WAIT_MS = 10_000;

/** Runs `f` holding the catalog's lock of `tenant` (shared by every API process of the cluster). */
async function withTenantLock<T>(catalog: ClusterCatalog, tenant: string, f: () => Promise<T>): Promise<T> {
  const holder = randomUUID();
  const deadline = Date.now() + TENANT_LOCK_WAIT_MS;
  while (!(await catalog.tryLockTenant(tenant, holder, TENANT_LOCK_TTL_MS))) {
    if (Date.now() > deadline) {
      throw new ApiError(503, 'SERVICE_UNAVAILABLE', `tenant ${tenant}'s quota lock was held by other requests for ${TENANT_LOCK_WAIT_MS / 1000} s`, {
        fix: 'retry the request; if this persists, another API process may be stuck holding it (it expires 30 s after it was taken)',
        headers: { 'retry-after': '1' },
      });
    }
    await new Promise((r) => setTimeout(r, 20 + Math.random() * 30));
  }
  try {
    return await f();
  } finally {
    await catalog.unlockTenant(tenant, holder).catch(() => undefined);
  }
}

/** One promise chain per tenant: quota checks and the starts they allow run one at a time. */
export class TenantLocks {
  private readonly tails = new Map<string, Promise<unknown>>();

  async with<T>(tenant: string, f: () => Promise<T>): Promise<T> {
    const prev = this.tails.get(tenant) ?? Promise.resolve();
    const run = prev.then(f, f);
    const tail = run.catch(() => undefined);
    this.tails.set(tenant, tail);
    try {
      return await run;
    } finally {
      if (this.tails.get(tenant) === tail) this.tails.delete(tenant);
    }
  }
}
