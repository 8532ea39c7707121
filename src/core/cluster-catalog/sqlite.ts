/**
 * The cluster catalog in SQLite: one file every process of the cluster on this machine opens
 * (WAL), mode 0600 like the other files that hold credentials' digests.
 */
import type Database from 'better-sqlite3';
import { openPrivateSqlite } from '../private-sqlite';
import { CloudletError } from '../errors';
import type { ClosedOperation, ClosedQuery, ClusterCatalog, HandoffTicketRecord, NewHandoffTicket, NewToken, Ownership, Quota, Reservation, TenantQuota, TicketEnd, TokenRecord } from './types';
import { CATALOG_SCHEMA_VERSION, catalogDdl, operationOf, operationRow, quotaOf, reservationOf, TICKET_COLUMNS, ticketOf, tokenOf, type OperationRow, type QuotaRow, type ReservationRow, type TicketRow, type TokenRow } from './schema';

export class SqliteClusterCatalog implements ClusterCatalog {
  private readonly db: Database.Database;

  /** `file` ":memory:" keeps the catalog in this process (tests). */
  constructor(readonly file: string) {
    try {
      this.db = openPrivateSqlite(file);
      const version = this.db.pragma('user_version', { simple: true }) as number;
      if (version > CATALOG_SCHEMA_VERSION) {
        throw new Error(`its schema is version ${version}; this cloudlet knows up to ${CATALOG_SCHEMA_VERSION}`);
      }
      this.db.exec(catalogDdl('sqlite'));
      if (version > 0 && version < 4) {
        // Upgraded from before the sync's mark: it got as far as the latest close it recorded.
        const last = (this.db.prepare('SELECT MAX(closed_at) AS at FROM operations').get() as { at: string | null }).at;
        if (last) this.db.prepare("INSERT INTO sync_marks (name, at) VALUES ('visibility', ?) ON CONFLICT (name) DO NOTHING").run(last);
      }
      this.db.pragma(`user_version = ${CATALOG_SCHEMA_VERSION}`);
    } catch (e) {
      throw new CloudletError('CATALOG_UNAVAILABLE', `cannot open the cluster catalog ${file}: ${(e as Error).message}`, {
        fix: 'check that its directory exists and is writable (CLOUDLET_VAR, CLOUDLET_CATALOG_DB), or use a newer cloudlet',
        cause: e,
      });
    }
  }

  async addToken(t: NewToken, now = new Date()): Promise<TokenRecord> {
    const r = this.db.prepare('INSERT INTO tokens (id, digest, tenant, role, name, created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING').run(t.id, t.digest, t.tenant, t.role, t.name, now.toISOString());
    if (r.changes === 0) throw new CloudletError('CONFLICT', `a token with id ${t.id} exists`, { fix: 'mint another token' });
    return { id: t.id, tenant: t.tenant, role: t.role, name: t.name, createdAt: now.toISOString() };
  }

  async tokenByDigest(digest: string): Promise<TokenRecord | undefined> {
    const r = this.db.prepare('SELECT id, tenant, role, name, created_at, revoked_at FROM tokens WHERE digest = ? AND revoked_at IS NULL').get(digest) as TokenRow | undefined;
    return r ? tokenOf(r) : undefined;
  }

  async listTokens(): Promise<TokenRecord[]> {
    return (this.db.prepare('SELECT id, tenant, role, name, created_at, revoked_at FROM tokens ORDER BY tenant, created_at').all() as TokenRow[]).map(tokenOf);
  }

  async revokeToken(id: string, now = new Date()): Promise<boolean> {
    return this.db.prepare('UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL').run(now.toISOString(), id).changes > 0;
  }

  async recordOwner(operationId: string, tenant: string | undefined, now = new Date()): Promise<void> {
    this.db.prepare('INSERT INTO owners (operation_id, tenant, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING').run(operationId, tenant ?? null, now.toISOString());
  }

  async ownersOf(operationIds: readonly string[]): Promise<Map<string, Ownership>> {
    const out = new Map<string, Ownership>();
    const stmt = this.db.prepare('SELECT operation_id, tenant, created_at FROM owners WHERE operation_id = ?');
    for (const id of new Set(operationIds)) {
      const r = stmt.get(id) as { operation_id: string; tenant: string | null; created_at: string } | undefined;
      if (r) out.set(id, { operationId: id, ...(r.tenant !== null ? { tenant: r.tenant } : {}), createdAt: r.created_at });
    }
    return out;
  }

  async recordClosed(ops: readonly ClosedOperation[]): Promise<void> {
    const stmt = this.db.prepare(`INSERT INTO operations (id, kind, type, host, status, started_at, closed_at, parent_id, result, error)
      VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
      ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, type = excluded.type, host = excluded.host, status = excluded.status,
        started_at = excluded.started_at, closed_at = excluded.closed_at, parent_id = excluded.parent_id, result = excluded.result, error = excluded.error
      WHERE excluded.closed_at >= operations.closed_at`);
    this.db.transaction(() => {
      for (const o of ops) stmt.run(...operationRow(o));
    })();
  }

  async closedOperations(q: ClosedQuery): Promise<ClosedOperation[]> {
    if (q.kinds.length === 0 || q.hosts.length === 0) return [];
    const marks = (n: number) => Array.from({ length: n }, () => '?').join(', ');
    const sql = `SELECT * FROM operations WHERE kind IN (${marks(q.kinds.length)}) AND host IN (${marks(q.hosts.length)})${q.status ? ' AND status = ?' : ''} ORDER BY started_at DESC`;
    return (this.db.prepare(sql).all(...q.kinds, ...q.hosts, ...(q.status ? [q.status] : [])) as OperationRow[]).map(operationOf);
  }

  async closedOperation(id: string): Promise<ClosedOperation | undefined> {
    const r = this.db.prepare('SELECT * FROM operations WHERE id = ?').get(id) as OperationRow | undefined;
    return r ? operationOf(r) : undefined;
  }

  async knownClosed(ids: readonly string[]): Promise<Set<string>> {
    const stmt = this.db.prepare('SELECT 1 FROM operations WHERE id = ?');
    return new Set(ids.filter((id) => stmt.get(id) !== undefined));
  }

  async syncMark(): Promise<string | undefined> {
    return (this.db.prepare("SELECT at FROM sync_marks WHERE name = 'visibility'").get() as { at: string } | undefined)?.at;
  }

  async advanceSyncMark(at: string): Promise<void> {
    this.db.prepare("INSERT INTO sync_marks (name, at) VALUES ('visibility', ?) ON CONFLICT (name) DO UPDATE SET at = excluded.at WHERE excluded.at > sync_marks.at").run(at);
  }

  async reserve(r: Omit<Reservation, 'createdAt'>, now = new Date()): Promise<void> {
    this.db.prepare('INSERT INTO reservations (operation_id, tenant, instances, memory_mib, created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING').run(r.operationId, r.tenant, r.instances, r.memoryMiB, now.toISOString());
  }

  async reservationsOf(tenant: string): Promise<Reservation[]> {
    return (this.db.prepare('SELECT * FROM reservations WHERE tenant = ? ORDER BY created_at').all(tenant) as ReservationRow[]).map(reservationOf);
  }

  async dropReservations(operationIds: readonly string[]): Promise<void> {
    const stmt = this.db.prepare('DELETE FROM reservations WHERE operation_id = ?');
    this.db.transaction(() => {
      for (const id of operationIds) stmt.run(id);
    })();
  }

  async tryLockTenant(tenant: string, holder: string, ttlMs: number, now = new Date()): Promise<boolean> {
    const expires = new Date(now.getTime() + ttlMs).toISOString();
    // Taken when free, expired (its holder died), or already this holder's.
    const r = this.db
      .prepare('INSERT INTO tenant_locks (tenant, holder, expires_at) VALUES (?, ?, ?) ON CONFLICT (tenant) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at WHERE tenant_locks.expires_at < ? OR tenant_locks.holder = excluded.holder')
      .run(tenant, holder, expires, now.toISOString());
    return r.changes > 0;
  }

  async unlockTenant(tenant: string, holder: string): Promise<void> {
    this.db.prepare('DELETE FROM tenant_locks WHERE tenant = ? AND holder = ?').run(tenant, holder);
  }

  async addTicket(t: NewHandoffTicket, now = new Date()): Promise<void> {
    this.db
      .prepare('INSERT INTO handoff_tickets (handoff_id, digest, host, instance_id, tenant, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)')
      .run(t.handoffId, t.digest, t.hostId, t.instanceId, t.tenant ?? null, now.toISOString(), t.expiresAt);
  }

  async ticketByDigest(digest: string): Promise<HandoffTicketRecord | undefined> {
    const r = this.db.prepare(`SELECT ${TICKET_COLUMNS} FROM handoff_tickets WHERE digest = ?`).get(digest) as TicketRow | undefined;
    return r ? ticketOf(r) : undefined;
  }

  async ticketOfHandoff(handoffId: string): Promise<HandoffTicketRecord | undefined> {
    const r = this.db.prepare(`SELECT ${TICKET_COLUMNS} FROM handoff_tickets WHERE handoff_id = ?`).get(handoffId) as TicketRow | undefined;
    return r ? ticketOf(r) : undefined;
  }

  async endTicket(handoffId: string, why: TicketEnd, now = new Date()): Promise<boolean> {
    return this.db.prepare('UPDATE handoff_tickets SET ended_at = ?, ended = ? WHERE handoff_id = ? AND ended IS NULL').run(now.toISOString(), why, handoffId).changes > 0;
  }

  async listTickets(limit = 200): Promise<HandoffTicketRecord[]> {
    return (this.db.prepare(`SELECT ${TICKET_COLUMNS} FROM handoff_tickets ORDER BY created_at DESC, handoff_id LIMIT ?`).all(limit) as TicketRow[]).map(ticketOf);
  }

  async setQuota(tenant: string, q: Quota): Promise<void> {
    this.db
      .prepare('INSERT INTO quotas (tenant, instances, memory_mib) VALUES (?, ?, ?) ON CONFLICT (tenant) DO UPDATE SET instances = excluded.instances, memory_mib = excluded.memory_mib')
      .run(tenant, q.instances ?? null, q.memoryMiB ?? null);
  }

  async quotaOf(tenant: string): Promise<Quota | undefined> {
    const r = this.db.prepare('SELECT tenant, instances, memory_mib FROM quotas WHERE tenant = ?').get(tenant) as QuotaRow | undefined;
    return r ? quotaOf(r) : undefined;
  }

  async listQuotas(): Promise<TenantQuota[]> {
    return (this.db.prepare('SELECT tenant, instances, memory_mib FROM quotas ORDER BY tenant').all() as QuotaRow[]).map((r) => ({ tenant: r.tenant, ...quotaOf(r) }));
  }

  async close(): Promise<void> {
    this.db.close();
  }
}
