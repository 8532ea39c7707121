import type { ClosedOperation, HandoffTicketRecord, Quota, Reservation, Role, TicketEnd, TokenRecord } from './types';

/**
 * The catalog's tables, written once for both engines (docs/security.md describes them). Times
 * are ISO-8601 text so both engines store and return them alike.
 */
/**
 * 1: tokens, owners, quotas. 2: ended operations. 3: quota reservations of operations in flight,
 * and per-tenant locks. 4: the visibility sync's mark (ended operations are also recorded by their
 * workflows, so the latest close recorded is no longer where the sync got to), and handoff
 * tickets. Later tables are made on open when missing.
 */
export const CATALOG_SCHEMA_VERSION = 4;

export interface TokenRow {
  id: string;
  tenant: string;
  role: Role;
  name: string;
  created_at: string;
  revoked_at: string | null;
}

/** Counts come back as numbers from SQLite and as strings from PostgreSQL's BIGINT (pg does not guess at 64-bit numbers). */
export interface QuotaRow {
  tenant: string;
  instances: number | string | null;
  memory_mib: number | string | null;
}

export interface ReservationRow {
  operation_id: string;
  tenant: string;
  instances: number | string;
  memory_mib: number | string;
  created_at: string;
}

export function reservationOf(r: ReservationRow): Reservation {
  return { operationId: r.operation_id, tenant: r.tenant, instances: Number(r.instances), memoryMiB: Number(r.memory_mib), createdAt: r.created_at };
}

export interface TicketRow {
  handoff_id: string;
  host: string;
  instance_id: string;
  tenant: string | null;
  created_at: string;
  expires_at: string;
  ended_at: string | null;
  ended: TicketEnd | null;
}

export const TICKET_COLUMNS = 'handoff_id, host, instance_id, tenant, created_at, expires_at, ended_at, ended';

export function ticketOf(r: TicketRow): HandoffTicketRecord {
  return {
    handoffId: r.handoff_id,
    hostId: r.host,
    instanceId: r.instance_id,
    ...(r.tenant !== null ? { tenant: r.tenant } : {}),
    createdAt: r.created_at,
    expiresAt: r.expires_at,
    ...(r.ended_at !== null ? { endedAt: r.ended_at } : {}),
    ...(r.ended !== null ? { ended: r.ended } : {}),
  };
}

export function tokenOf(r: TokenRow): TokenRecord {
  return { id: r.id, tenant: r.tenant, role: r.role, name: r.name, createdAt: r.created_at, ...(r.revoked_at ? { revokedAt: r.revoked_at } : {}) };
}

export function quotaOf(r: QuotaRow): Quota {
  return { ...(r.instances !== null ? { instances: Number(r.instances) } : {}), ...(r.memory_mib !== null ? { memoryMiB: Number(r.memory_mib) } : {}) };
}

export interface OperationRow {
  id: string;
  kind: string;
  type: string;
  host: string;
  status: 'succeeded' | 'failed';
  started_at: string;
  closed_at: string;
  parent_id: string | null;
  result: string | null;
  error: string | null;
}

export function operationOf(r: OperationRow): ClosedOperation {
  return {
    id: r.id,
    kind: r.kind,
    type: r.type,
    hostId: r.host,
    status: r.status,
    startedAt: r.started_at,
    closedAt: r.closed_at,
    ...(r.parent_id !== null ? { parentId: r.parent_id } : {}),
    ...(r.result !== null ? { result: JSON.parse(r.result) as unknown } : {}),
    ...(r.error !== null ? { error: JSON.parse(r.error) as ClosedOperation['error'] } : {}),
  };
}

export function operationRow(o: ClosedOperation): unknown[] {
  return [o.id, o.kind, o.type, o.hostId, o.status, o.startedAt, o.closedAt, o.parentId ?? null, o.result === undefined ? null : JSON.stringify(o.result), o.error === undefined ? null : JSON.stringify(o.error)];
}

export function catalogDdl(engine: 'sqlite' | 'postgres'): string {
  const int = engine === 'postgres' ? 'BIGINT' : 'INTEGER';
  return `
    CREATE TABLE IF NOT EXISTS tokens (
      id TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
      role TEXT NOT NULL CHECK (role IN ('admin', 'member', 'reader')), name TEXT NOT NULL,
      created_at TEXT NOT NULL, revoked_at TEXT);
    CREATE TABLE IF NOT EXISTS owners (
      operation_id TEXT PRIMARY KEY, tenant TEXT, created_at TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS owners_by_tenant ON owners (tenant);
    CREATE TABLE IF NOT EXISTS quotas (
      tenant TEXT PRIMARY KEY, instances ${int}, memory_mib ${int});
    CREATE TABLE IF NOT EXISTS operations (
      id TEXT PRIMARY KEY, kind TEXT NOT NULL, type TEXT NOT NULL, host TEXT NOT NULL,
      status TEXT NOT NULL CHECK (status IN ('succeeded', 'failed')), started_at TEXT NOT NULL,
      closed_at TEXT NOT NULL, parent_id TEXT, result TEXT, error TEXT);
    CREATE INDEX IF NOT EXISTS operations_by_kind ON operations (kind, host);
    CREATE INDEX IF NOT EXISTS operations_by_close ON operations (closed_at);
    CREATE TABLE IF NOT EXISTS reservations (
      operation_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, instances ${int} NOT NULL,
      memory_mib ${int} NOT NULL, created_at TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS reservations_by_tenant ON reservations (tenant);
    CREATE TABLE IF NOT EXISTS tenant_locks (
      tenant TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS sync_marks (
      name TEXT PRIMARY KEY, at TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS handoff_tickets (
      handoff_id TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, host TEXT NOT NULL, instance_id TEXT NOT NULL,
      tenant TEXT, created_at TEXT NOT NULL, expires_at TEXT NOT NULL, ended_at TEXT,
      ended TEXT CHECK (ended IN ('used', 'aborted', 'revoked')));
  `;
}
