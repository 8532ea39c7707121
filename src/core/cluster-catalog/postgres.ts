/**
 * The cluster catalog in PostgreSQL, for a cluster whose API and workers run on several machines:
 * one database they all use. Same tables as SQLite (schema.ts); the schema version is kept in a
 * table of its own, and the tables are made in one transaction under an advisory lock so two
 * processes starting together do not race.
 */
import { Pool, type PoolClient } from 'pg';
import { CloudletError } from '../errors';
import type { ClosedOperation, ClosedQuery, ClusterCatalog, HandoffTicketRecord, NewHandoffTicket, NewToken, Ownership, Quota, Reservation, TenantQuota, TicketEnd, TokenRecord } from './types';
import { CATALOG_SCHEMA_VERSION, catalogDdl, operationOf, operationRow, quotaOf, reservationOf, TICKET_COLUMNS, ticketOf, tokenOf, type OperationRow, type QuotaRow, type ReservationRow, type TicketRow, type TokenRow } from './schema';

/** An arbitrary constant: the advisory lock held while the schema is made. */
const SCHEMA_LOCK = 0x636c6f75;

export class PostgresClusterCatalog implements ClusterCatalog {
  private constructor(
    private readonly pool: Pool,
    private readonly where: string,
  ) {}

  /** Connects to `url` (postgres://user@host:port/db, or ?host=/socket/dir) and makes the tables. */
  static async open(url: string): Promise<PostgresClusterCatalog> {
    const where = redact(url);
    const pool = new Pool({ connectionString: url, max: 4, connectionTimeoutMillis: 5000 });
    // An idle client that loses its server must not crash the process; the next query reports it.
    pool.on('error', () => undefined);
    const catalog = new PostgresClusterCatalog(pool, where);
    try {
      await catalog.tx(async (c) => {
        await c.query('SELECT pg_advisory_xact_lock($1)', [SCHEMA_LOCK]);
        await c.query('CREATE TABLE IF NOT EXISTS catalog_schema (version INTEGER NOT NULL)');
        const v = (await c.query<{ version: number }>('SELECT version FROM catalog_schema')).rows[0]?.version;
        if (v !== undefined && v > CATALOG_SCHEMA_VERSION) throw new Error(`its schema is version ${v}; this cloudlet knows up to ${CATALOG_SCHEMA_VERSION}`);
        await c.query(catalogDdl('postgres'));
        // Upgraded from before the sync's mark: it got as far as the latest close it recorded.
        if (v !== undefined && v < 4) await c.query("INSERT INTO sync_marks (name, at) SELECT 'visibility', MAX(closed_at) FROM operations HAVING MAX(closed_at) IS NOT NULL ON CONFLICT (name) DO NOTHING");
        if (v === undefined) await c.query('INSERT INTO catalog_schema (version) VALUES ($1)', [CATALOG_SCHEMA_VERSION]);
        else if (v < CATALOG_SCHEMA_VERSION) await c.query('UPDATE catalog_schema SET version = $1', [CATALOG_SCHEMA_VERSION]);
      });
    } catch (e) {
      await pool.end().catch(() => undefined);
      throw catalog.unavailable(e);
    }
    return catalog;
  }

  private unavailable(e: unknown): CloudletError {
    if (e instanceof CloudletError) return e;
    return new CloudletError('CATALOG_UNAVAILABLE', `the cluster catalog at ${this.where} does not answer: ${(e as Error).message}`, {
      fix: 'check that the PostgreSQL server runs and CLOUDLET_CATALOG_URL names it, its user and database',
      cause: e,
    });
  }

  private async q<R extends object>(sql: string, params: unknown[] = []): Promise<R[]> {
    try {
      return (await this.pool.query<R>(sql, params)).rows;
    } catch (e) {
      throw this.unavailable(e);
    }
  }

  private async tx<T>(f: (c: PoolClient) => Promise<T>): Promise<T> {
    const c = await this.pool.connect();
    try {
      await c.query('BEGIN');
      const r = await f(c);
      await c.query('COMMIT');
      return r;
    } catch (e) {
      await c.query('ROLLBACK').catch(() => undefined);
      throw e;
    } finally {
      c.release();
    }
  }

  async addToken(t: NewToken, now = new Date()): Promise<TokenRecord> {
    const rows = await this.q('INSERT INTO tokens (id, digest, tenant, role, name, created_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING id', [t.id, t.digest, t.tenant, t.role, t.name, now.toISOString()]);
    if (rows.length === 0) throw new CloudletError('CONFLICT', `a token with id ${t.id} exists`, { fix: 'mint another token' });
    return { id: t.id, tenant: t.tenant, role: t.role, name: t.name, createdAt: now.toISOString() };
  }

  async tokenByDigest(digest: string): Promise<TokenRecord | undefined> {
    const [r] = await this.q<TokenRow>('SELECT id, tenant, role, name, created_at, revoked_at FROM tokens WHERE digest = $1 AND revoked_at IS NULL', [digest]);
    return r ? tokenOf(r) : undefined;
  }

  async listTokens(): Promise<TokenRecord[]> {
    return (await this.q<TokenRow>('SELECT id, tenant, role, name, created_at, revoked_at FROM tokens ORDER BY tenant, created_at')).map(tokenOf);
  }

  async revokeToken(id: string, now = new Date()): Promise<boolean> {
    return (await this.q('UPDATE tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL RETURNING id', [now.toISOString(), id])).length > 0;
  }

  async recordOwner(operationId: string, tenant: string | undefined, now = new Date()): Promise<void> {
    await this.q('INSERT INTO owners (operation_id, tenant, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING', [operationId, tenant ?? null, now.toISOString()]);
  }

  async ownersOf(operationIds: readonly string[]): Promise<Map<string, Ownership>> {
    const out = new Map<string, Ownership>();
    if (operationIds.length === 0) return out;
    const rows = await this.q<{ operation_id: string; tenant: string | null; created_at: string }>('SELECT operation_id, tenant, created_at FROM owners WHERE operation_id = ANY($1)', [[...new Set(operationIds)]]);
    for (const r of rows) out.set(r.operation_id, { operationId: r.operation_id, ...(r.tenant !== null ? { tenant: r.tenant } : {}), createdAt: r.created_at });
    return out;
  }

  async recordClosed(ops: readonly ClosedOperation[]): Promise<void> {
    if (ops.length === 0) return;
    try {
      await this.tx(async (c) => {
        for (const o of ops) {
          await c.query(
            `INSERT INTO operations (id, kind, type, host, status, started_at, closed_at, parent_id, result, error)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, type = excluded.type, host = excluded.host, status = excluded.status,
               started_at = excluded.started_at, closed_at = excluded.closed_at, parent_id = excluded.parent_id, result = excluded.result, error = excluded.error
             WHERE excluded.closed_at >= operations.closed_at`,
            operationRow(o),
          );
        }
      });
    } catch (e) {
      throw this.unavailable(e);
    }
  }

  async closedOperations(q: ClosedQuery): Promise<ClosedOperation[]> {
    if (q.kinds.length === 0 || q.hosts.length === 0) return [];
    const rows = await this.q<OperationRow>(
      `SELECT * FROM operations WHERE kind = ANY($1) AND host = ANY($2)${q.status ? ' AND status = $3' : ''} ORDER BY started_at DESC`,
      [[...q.kinds], [...q.hosts], ...(q.status ? [q.status] : [])],
    );
    return rows.map(operationOf);
  }

  async closedOperation(id: string): Promise<ClosedOperation | undefined> {
    const [r] = await this.q<OperationRow>('SELECT * FROM operations WHERE id = $1', [id]);
    return r ? operationOf(r) : undefined;
  }

  async knownClosed(ids: readonly string[]): Promise<Set<string>> {
    if (ids.length === 0) return new Set();
    return new Set((await this.q<{ id: string }>('SELECT id FROM operations WHERE id = ANY($1)', [[...new Set(ids)]])).map((r) => r.id));
  }

  async syncMark(): Promise<string | undefined> {
    const [r] = await this.q<{ at: string }>("SELECT at FROM sync_marks WHERE name = 'visibility'");
    return r?.at;
  }

  async advanceSyncMark(at: string): Promise<void> {
    await this.q("INSERT INTO sync_marks (name, at) VALUES ('visibility', $1) ON CONFLICT (name) DO UPDATE SET at = excluded.at WHERE excluded.at > sync_marks.at", [at]);
  }

  async reserve(r: Omit<Reservation, 'createdAt'>, now = new Date()): Promise<void> {
    await this.q('INSERT INTO reservations (operation_id, tenant, instances, memory_mib, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING', [r.operationId, r.tenant, r.instances, r.memoryMiB, now.toISOString()]);
  }

  async reservationsOf(tenant: string): Promise<Reservation[]> {
    return (await this.q<ReservationRow>('SELECT * FROM reservations WHERE tenant = $1 ORDER BY created_at', [tenant])).map(reservationOf);
  }

  async dropReservations(operationIds: readonly string[]): Promise<void> {
    if (operationIds.length > 0) await this.q('DELETE FROM reservations WHERE operation_id = ANY($1)', [[...operationIds]]);
  }

  async tryLockTenant(tenant: string, holder: string, ttlMs: number, now = new Date()): Promise<boolean> {
    const expires = new Date(now.getTime() + ttlMs).toISOString();
    const rows = await this.q<{ tenant: string }>(
      'INSERT INTO tenant_locks (tenant, holder, expires_at) VALUES ($1, $2, $3) ON CONFLICT (tenant) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at WHERE tenant_locks.expires_at < $4 OR tenant_locks.holder = excluded.holder RETURNING tenant',
      [tenant, holder, expires, now.toISOString()],
    );
    return rows.length > 0;
  }

  async unlockTenant(tenant: string, holder: string): Promise<void> {
    await this.q('DELETE FROM tenant_locks WHERE tenant = $1 AND holder = $2', [tenant, holder]);
  }

  async addTicket(t: NewHandoffTicket, now = new Date()): Promise<void> {
    await this.q('INSERT INTO handoff_tickets (handoff_id, digest, host, instance_id, tenant, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)', [
      t.handoffId,
      t.digest,
      t.hostId,
      t.instanceId,
      t.tenant ?? null,
      now.toISOString(),
      t.expiresAt,
    ]);
  }

  async ticketByDigest(digest: string): Promise<HandoffTicketRecord | undefined> {
    const [r] = await this.q<TicketRow>(`SELECT ${TICKET_COLUMNS} FROM handoff_tickets WHERE digest = $1`, [digest]);
    return r ? ticketOf(r) : undefined;
  }

  async ticketOfHandoff(handoffId: string): Promise<HandoffTicketRecord | undefined> {
    const [r] = await this.q<TicketRow>(`SELECT ${TICKET_COLUMNS} FROM handoff_tickets WHERE handoff_id = $1`, [handoffId]);
    return r ? ticketOf(r) : undefined;
  }

  async endTicket(handoffId: string, why: TicketEnd, now = new Date()): Promise<boolean> {
    return (await this.q('UPDATE handoff_tickets SET ended_at = $1, ended = $2 WHERE handoff_id = $3 AND ended IS NULL RETURNING handoff_id', [now.toISOString(), why, handoffId])).length > 0;
  }

  async listTickets(limit = 200): Promise<HandoffTicketRecord[]> {
    return (await this.q<TicketRow>(`SELECT ${TICKET_COLUMNS} FROM handoff_tickets ORDER BY created_at DESC, handoff_id LIMIT $1`, [limit])).map(ticketOf);
  }

  async setQuota(tenant: string, q: Quota): Promise<void> {
    await this.q('INSERT INTO quotas (tenant, instances, memory_mib) VALUES ($1, $2, $3) ON CONFLICT (tenant) DO UPDATE SET instances = excluded.instances, memory_mib = excluded.memory_mib', [tenant, q.instances ?? null, q.memoryMiB ?? null]);
  }

  async quotaOf(tenant: string): Promise<Quota | undefined> {
    const [r] = await this.q<QuotaRow>('SELECT tenant, instances, memory_mib FROM quotas WHERE tenant = $1', [tenant]);
    return r ? quotaOf(r) : undefined;
  }

  async listQuotas(): Promise<TenantQuota[]> {
    return (await this.q<QuotaRow>('SELECT tenant, instances, memory_mib FROM quotas ORDER BY tenant')).map((r) => ({ tenant: r.tenant, ...quotaOf(r) }));
  }

  async close(): Promise<void> {
    await this.pool.end();
  }
}

/** The URL without its password, for messages. */
function redact(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return '(an unparsable CLOUDLET_CATALOG_URL)';
  }
}
