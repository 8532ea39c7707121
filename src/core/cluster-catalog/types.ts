/**
 * The cluster catalog: who may use the cloudlet and what belongs to whom. Tokens (stored as
 * sha256 digests, never in clear), the tenant and role each one acts as, per-tenant quotas, and
 * the owner of every operation started through the API (an instance, overlay or base belongs to
 * the tenant whose operation made it). Behind the async `ClusterCatalog` interface: SQLite for one
 * machine (sqlite.ts), PostgreSQL for a cluster of many (postgres.ts). docs/security.md.
 */

export const ROLES = ['admin', 'member', 'reader'] as const;
/** admin: everything, every tenant; member: its tenant's resources; reader: reads them only. */
export type Role = (typeof ROLES)[number];

/** Tenant names: lower-case letters, digits and "-", up to 63 characters. */
export const TENANT_NAME = /^[a-z0-9][a-z0-9-]{0,62}$/;

export interface TokenRecord {
  /** Public id of the token (also its prefix), for listing and revoking. */
  id: string;
  tenant: string;
  role: Role;
  /** Who or what holds it (free text, e.g. "ci" or "alice's laptop"). */
  name: string;
  createdAt: string;
  revokedAt?: string;
}

export interface NewToken {
  id: string;
  /** sha256 (hex) of the whole token. */
  digest: string;
  tenant: string;
  role: Role;
  name: string;
}

export interface Quota {
  /** Instances provisioning or running at once. */
  instances?: number;
  /** Guest memory of those instances, MiB. */
  memoryMiB?: number;
}

export interface TenantQuota extends Quota {
  tenant: string;
}

/**
 * Who made an operation. `tenant` is undefined for the cluster's own (an admin acting for no
 * tenant, a schedule): its bases and overlays are shared with every tenant, its instances are
 * the admins' alone.
 */
export interface Ownership {
  operationId: string;
  tenant?: string;
  createdAt: string;
}

/**
 * An operation that has ended, as the catalog keeps it: what it was, on which host, how it ended
 * and its result. What the API lists (bases, overlays, instances and their states) is derived
 * from these, so it outlives the Temporal server's retention of the runs.
 */
export interface ClosedOperation {
  /** The workflow id. */
  id: string;
  /** The operation kind (the CloudletOperation search attribute). */
  kind: string;
  /** The workflow type. */
  type: string;
  hostId: string;
  status: 'succeeded' | 'failed';
  startedAt: string;
  closedAt: string;
  parentId?: string;
  /** The workflow's result (succeeded) or its failure (failed). */
  result?: unknown;
  error?: { type: string; message: string; nonRetryable?: boolean };
}

export interface ClosedQuery {
  kinds: readonly string[];
  hosts: readonly string[];
  status?: ClosedOperation['status'];
}

/**
 * What an operation started within a tenant's quota will make (a deployment: `instances` VMs),
 * counted against the quota until the operation has ended: its instances may not be listed yet.
 */
export interface Reservation {
  operationId: string;
  tenant: string;
  instances: number;
  /** Guest memory of all of them. */
  memoryMiB: number;
  createdAt: string;
}

/**
 * A handoff ticket as the destination's catalog keeps it: which handoff it opens, for whom, until
 * when, and how it ended. The ticket itself is never stored, only its sha256 (like a token's).
 */
export interface HandoffTicketRecord {
  handoffId: string;
  hostId: string;
  instanceId: string;
  /** The tenant the VM will belong to here; undefined: the admins'. */
  tenant?: string;
  createdAt: string;
  expiresAt: string;
  /** When it stopped being good, and why: used (the VM arrived), aborted, or revoked by an admin. */
  endedAt?: string;
  ended?: TicketEnd;
}

export type TicketEnd = 'used' | 'aborted' | 'revoked';

export interface NewHandoffTicket extends Omit<HandoffTicketRecord, 'createdAt' | 'endedAt' | 'ended'> {
  /** sha256 (hex) of the whole ticket. */
  digest: string;
}

export interface ClusterCatalog {
  addToken(token: NewToken): Promise<TokenRecord>;
  /** The live (not revoked) token with this digest. */
  tokenByDigest(digest: string): Promise<TokenRecord | undefined>;
  listTokens(): Promise<TokenRecord[]>;
  /** Marks a token revoked (kept for the record); false when there is no live token with this id. */
  revokeToken(id: string): Promise<boolean>;

  /** Records who made an operation; the first record wins (a retried request keeps its owner). */
  recordOwner(operationId: string, tenant: string | undefined): Promise<void>;
  /** Owners of the given operations that have a record. */
  ownersOf(operationIds: readonly string[]): Promise<Map<string, Ownership>>;

  /** Records ended operations (a later record of the same id replaces an earlier one). */
  recordClosed(ops: readonly ClosedOperation[]): Promise<void>;
  /** Ended operations of some kinds on some hosts, the most recently started first. */
  closedOperations(q: ClosedQuery): Promise<ClosedOperation[]>;
  closedOperation(id: string): Promise<ClosedOperation | undefined>;
  /** Which of these ids the catalog holds as ended. */
  knownClosed(ids: readonly string[]): Promise<Set<string>>;
  /**
   * How far the sync from Temporal's visibility got (ISO close time), where the next one may start
   * from; undefined before the first. Operations recorded by their own workflows do not move it.
   */
  syncMark(): Promise<string | undefined>;
  /** Moves the sync's mark forward to `at` (never back). */
  advanceSyncMark(at: string): Promise<void>;

  /** Records a reservation; the first record of an operation wins (a retried request keeps it). */
  reserve(r: Omit<Reservation, 'createdAt'>): Promise<void>;
  reservationsOf(tenant: string): Promise<Reservation[]>;
  dropReservations(operationIds: readonly string[]): Promise<void>;
  /**
   * Takes the tenant's lock for `holder` until `ttlMs` from now, unless another holder has it and
   * it has not expired; true when taken. Every process of the cluster sees the same lock.
   */
  tryLockTenant(tenant: string, holder: string, ttlMs: number): Promise<boolean>;
  /** Gives the lock back if `holder` has it. */
  unlockTenant(tenant: string, holder: string): Promise<void>;

  /** Records a ticket issued for a handoff (one per handoff). */
  addTicket(t: NewHandoffTicket): Promise<void>;
  /** The ticket with this digest, whatever its state. */
  ticketByDigest(digest: string): Promise<HandoffTicketRecord | undefined>;
  /** The ticket of a handoff, whatever its state. */
  ticketOfHandoff(handoffId: string): Promise<HandoffTicketRecord | undefined>;
  /** Ends a handoff's ticket (it is good no more); false when it had ended already or is unknown. */
  endTicket(handoffId: string, why: TicketEnd): Promise<boolean>;
  /** Tickets, the most recently issued first (at most `limit`, default 200). */
  listTickets(limit?: number): Promise<HandoffTicketRecord[]>;

  setQuota(tenant: string, quota: Quota): Promise<void>;
  quotaOf(tenant: string): Promise<Quota | undefined>;
  listQuotas(): Promise<TenantQuota[]>;

  close(): Promise<void>;
}
