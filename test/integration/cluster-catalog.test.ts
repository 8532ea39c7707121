/**
 * The cluster catalog's contract, on both engines: SQLite (a file) and a real PostgreSQL server
 * (Debian's package, started by the test). Then two API servers sharing one PostgreSQL catalog,
 * as the API nodes of a multi-node cluster do: a token minted on one works on the other at once,
 * and a revocation on one is refused by the other on its next request.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Client } from 'pg';
import { buildServer } from '../../src/api/server';
import { CloudletError } from '../../src/core/errors';
import { digestToken, mintToken, PostgresClusterCatalog, SqliteClusterCatalog, type ClusterCatalog } from '../../src/core/cluster-catalog';
import { FakeCloudletService } from '../../src/service/fake';
import { startPostgres, type RunningPostgres } from '../helpers/postgres';

jest.mock('cookie', () => ({
  stringifySetCookie: (name: string, value: string) => `${name}=${encodeURIComponent(value)}`,
}));

let pg: RunningPostgres;
let dir: string;
let seq = 0;

beforeAll(async () => {
  pg = await startPostgres();
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cloudlet-catalog-'));
}, 120_000);

afterAll(async () => {
  await pg?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

type Engine = [string, () => Promise<{ open: () => Promise<ClusterCatalog> }>];
const engines: Engine[] = [
  ['sqlite', async () => {
    const file = path.join(dir, `catalog-${(seq += 1)}.sqlite`);
    return { open: async () => new SqliteClusterCatalog(file) };
  }],
  ['postgres', async () => {
    const url = await pg.newDatabase(`contract_${(seq += 1)}`);
    return { open: () => PostgresClusterCatalog.open(url) };
  }],
];

describe.each(engines)('the %s catalog', (_name, make) => {
  let where: { open: () => Promise<ClusterCatalog> };
  let a: ClusterCatalog;
  let b: ClusterCatalog;

  beforeEach(async () => {
    where = await make();
    a = await where.open();
    // A second connection, as another process of the cluster has.
    b = await where.open();
  });

  afterEach(async () => {
    await a.close();
    await b.close();
  });

  test('tokens: found by digest only while live, listed without secrets, revoked once', async () => {
    const { token, record } = mintToken('acme', 'member', 'ci');
    const added = await a.addToken(record);
    expect(added).toMatchObject({ id: record.id, tenant: 'acme', role: 'member', name: 'ci' });
    expect(await b.tokenByDigest(digestToken(token))).toMatchObject({ id: record.id, tenant: 'acme', role: 'member' });
    expect(await b.tokenByDigest(digestToken(`${token}x`))).toBeUndefined();
    await expect(a.addToken(record)).rejects.toMatchObject({ code: 'CONFLICT' });
    expect(JSON.stringify(await b.listTokens())).not.toContain(token);
    expect(await b.revokeToken(record.id)).toBe(true);
    expect(await a.revokeToken(record.id)).toBe(false);
    expect(await a.tokenByDigest(digestToken(token))).toBeUndefined();
    expect((await a.listTokens()).find((t) => t.id === record.id)?.revokedAt).toEqual(expect.any(String));
  });

  test('owners: the first record of an operation wins; no tenant means the operators\'', async () => {
    await a.recordOwner('synthesizeVm/host-a/i-1', 'acme');
    await b.recordOwner('synthesizeVm/host-a/i-1', 'globex');
    await a.recordOwner('importBaseVm/host-a/base-1', undefined);
    const owners = await b.ownersOf(['synthesizeVm/host-a/i-1', 'importBaseVm/host-a/base-1', 'never', 'synthesizeVm/host-a/i-1']);
    expect(owners.get('synthesizeVm/host-a/i-1')?.tenant).toBe('acme');
    expect(owners.has('importBaseVm/host-a/base-1')).toBe(true);
    expect(owners.get('importBaseVm/host-a/base-1')?.tenant).toBeUndefined();
    expect(owners.has('never')).toBe(false);
    expect((await a.ownersOf([])).size).toBe(0);
  });

  test('quotas: set, replaced as a whole, listed; an absent field is unlimited', async () => {
    expect(await a.quotaOf('acme')).toBeUndefined();
    await a.setQuota('acme', { instances: 3, memoryMiB: 4096 });
    expect(await b.quotaOf('acme')).toEqual({ instances: 3, memoryMiB: 4096 });
    await b.setQuota('acme', { instances: 5 });
    expect(await a.quotaOf('acme')).toEqual({ instances: 5 });
    await a.setQuota('globex', { memoryMiB: 2 ** 31 });
    expect(await b.listQuotas()).toEqual([{ tenant: 'acme', instances: 5 }, { tenant: 'globex', memoryMiB: 2 ** 31 }]);
  });

  test('ended operations: recorded with results, queried by kind, host and status, replaced only by a later close', async () => {
    const op = (id: string, kind: string, host: string, status: 'succeeded' | 'failed', startedAt: string, closedAt: string, extra: object = {}) => ({ id, kind, type: kind, hostId: host, status, startedAt, closedAt, ...extra });
    expect(await a.syncMark()).toBeUndefined();
    await a.recordClosed([
      op('synthesizeVm/h1/i-1', 'synthesizeVm', 'h1', 'succeeded', '2026-12-01T10:00:00.000Z', '2026-12-01T10:00:02.000Z', { result: { instanceId: 'i-1', timings: { firstResponseMs: 1500 } }, parentId: 'deployOverlay/d-1' }),
      op('synthesizeVm/h2/i-2', 'synthesizeVm', 'h2', 'failed', '2026-12-01T10:01:00.000Z', '2026-12-01T10:01:05.000Z', { error: { type: 'CORRUPT', message: 'bad overlay' } }),
      op('importBaseVm/h1/base', 'importBaseVm', 'h1', 'succeeded', '2026-12-01T09:00:00.000Z', '2026-12-01T09:01:00.000Z', { result: { baseId: 'b'.repeat(64) } }),
    ]);
    expect(await b.closedOperation('synthesizeVm/h1/i-1')).toEqual(op('synthesizeVm/h1/i-1', 'synthesizeVm', 'h1', 'succeeded', '2026-12-01T10:00:00.000Z', '2026-12-01T10:00:02.000Z', { result: { instanceId: 'i-1', timings: { firstResponseMs: 1500 } }, parentId: 'deployOverlay/d-1' }));
    expect((await b.closedOperations({ kinds: ['synthesizeVm'], hosts: ['h1', 'h2'] })).map((o) => o.id)).toEqual(['synthesizeVm/h2/i-2', 'synthesizeVm/h1/i-1']);
    expect((await b.closedOperations({ kinds: ['synthesizeVm', 'importBaseVm'], hosts: ['h1'], status: 'succeeded' })).map((o) => o.id)).toEqual(['synthesizeVm/h1/i-1', 'importBaseVm/h1/base']);
    expect((await b.closedOperation('synthesizeVm/h2/i-2'))?.error).toEqual({ type: 'CORRUPT', message: 'bad overlay' });
    expect(await b.closedOperations({ kinds: [], hosts: ['h1'] })).toEqual([]);
    expect([...(await b.knownClosed(['synthesizeVm/h1/i-1', 'nope']))]).toEqual(['synthesizeVm/h1/i-1']);
    // Records do not move the sync's mark; the sync does, forward only.
    expect(await b.syncMark()).toBeUndefined();
    await a.advanceSyncMark('2026-12-01T10:01:05.000Z');
    await b.advanceSyncMark('2026-12-01T09:00:00.000Z');
    expect(await b.syncMark()).toBe('2026-12-01T10:01:05.000Z');
    // An older record of the same id does not replace a newer one; a newer one does.
    await b.recordClosed([op('synthesizeVm/h1/i-1', 'synthesizeVm', 'h1', 'failed', '2026-12-01T08:00:00.000Z', '2026-12-01T08:00:01.000Z')]);
    expect((await a.closedOperation('synthesizeVm/h1/i-1'))?.status).toBe('succeeded');
    await b.recordClosed([op('synthesizeVm/h1/i-1', 'synthesizeVm', 'h1', 'failed', '2026-12-01T11:00:00.000Z', '2026-12-01T11:00:01.000Z')]);
    expect((await a.closedOperation('synthesizeVm/h1/i-1'))?.status).toBe('failed');
    await a.recordClosed([]);
  });

  test('reservations: the first of an operation wins, listed per tenant, dropped by operation', async () => {
    await a.reserve({ operationId: 'deployOverlay/d-1', tenant: 'acme', instances: 6, memoryMiB: 1536 });
    await b.reserve({ operationId: 'deployOverlay/d-1', tenant: 'acme', instances: 1, memoryMiB: 1 }); // a retried request
    await b.reserve({ operationId: 'synthesizeVm/h/i-9', tenant: 'acme', instances: 1, memoryMiB: 256 });
    await a.reserve({ operationId: 'deployOverlay/d-2', tenant: 'globex', instances: 2, memoryMiB: 2 ** 31 });
    expect((await b.reservationsOf('acme')).map((r) => [r.operationId, r.instances, r.memoryMiB])).toEqual([['deployOverlay/d-1', 6, 1536], ['synthesizeVm/h/i-9', 1, 256]]);
    expect((await a.reservationsOf('globex'))[0]?.memoryMiB).toBe(2 ** 31);
    await a.dropReservations(['deployOverlay/d-1', 'nope']);
    await a.dropReservations([]);
    expect((await b.reservationsOf('acme')).map((r) => r.operationId)).toEqual(['synthesizeVm/h/i-9']);
  });

  test('handoff tickets: kept by digest with their tenant, listed newest first, ended once (used, aborted or revoked)', async () => {
    const t1 = { handoffId: 'ho-1', digest: '1'.repeat(64), hostId: 'h1', instanceId: 'vm-1', tenant: 'acme', expiresAt: '2026-12-01T10:30:00.000Z' };
    const t2 = { handoffId: 'ho-2', digest: '2'.repeat(64), hostId: 'h2', instanceId: 'vm-2', expiresAt: '2026-12-01T10:31:00.000Z' };
    await a.addTicket(t1);
    await b.addTicket(t2);
    // One ticket per handoff, one handoff per digest.
    await expect(a.addTicket({ ...t1, digest: '3'.repeat(64) })).rejects.toHaveProperty('message', expect.stringMatching(/UNIQUE|duplicate key/));
    expect(await b.ticketByDigest('1'.repeat(64))).toMatchObject({ handoffId: 'ho-1', hostId: 'h1', instanceId: 'vm-1', tenant: 'acme', expiresAt: t1.expiresAt });
    expect(await b.ticketByDigest('2'.repeat(64))).not.toHaveProperty('tenant');
    expect(await a.ticketByDigest('9'.repeat(64))).toBeUndefined();
    expect(await a.ticketOfHandoff('ho-2')).toMatchObject({ handoffId: 'ho-2', hostId: 'h2', instanceId: 'vm-2' });
    expect(await a.ticketOfHandoff('ho-9')).toBeUndefined();
    expect((await a.listTickets()).map((t) => t.handoffId).sort()).toEqual(['ho-1', 'ho-2']);
    expect(await a.listTickets(1)).toHaveLength(1);
    expect(await a.endTicket('ho-1', 'revoked')).toBe(true);
    expect(await b.endTicket('ho-1', 'used')).toBe(false); // ended already: the first end stays
    expect(await b.endTicket('ho-nope', 'aborted')).toBe(false);
    expect(await b.ticketByDigest('1'.repeat(64))).toMatchObject({ ended: 'revoked', endedAt: expect.any(String) });
    expect((await a.ticketByDigest('2'.repeat(64)))?.ended).toBeUndefined();
  });

  test('tenant locks: one holder at a time across connections; given back, or taken over once expired', async () => {
    expect(await a.tryLockTenant('acme', 'p1', 30_000)).toBe(true);
    expect(await b.tryLockTenant('acme', 'p2', 30_000)).toBe(false);
    expect(await a.tryLockTenant('acme', 'p1', 30_000)).toBe(true); // its own again (renewed)
    expect(await b.tryLockTenant('globex', 'p2', 30_000)).toBe(true); // another tenant's is free
    await b.unlockTenant('acme', 'p2'); // not its: no effect
    expect(await b.tryLockTenant('acme', 'p2', 30_000)).toBe(false);
    await a.unlockTenant('acme', 'p1');
    expect(await b.tryLockTenant('acme', 'p2', -1)).toBe(true); // taken, and already expired
    expect(await a.tryLockTenant('acme', 'p3', 30_000)).toBe(true); // so p3 takes it over
    expect(await b.tryLockTenant('acme', 'p2', 30_000)).toBe(false);
  });

  test('a catalog of a newer schema is refused, naming it', async () => {
    await a.close();
    await b.close();
    if (_name === 'sqlite') {
      const file = path.join(dir, `catalog-newer-${(seq += 1)}.sqlite`);
      const db = new (await import('better-sqlite3')).default(file);
      db.pragma('user_version = 99');
      db.close();
      expect(() => new SqliteClusterCatalog(file)).toThrow(/schema is version 99/);
    } else {
      const url = await pg.newDatabase(`newer_${(seq += 1)}`);
      const c = new Client({ connectionString: url });
      await c.connect();
      await c.query('CREATE TABLE catalog_schema (version INTEGER NOT NULL); INSERT INTO catalog_schema VALUES (99)');
      await c.end();
      await expect(PostgresClusterCatalog.open(url)).rejects.toThrow(/schema is version 99/);
    }
    a = await where.open();
    b = await where.open();
  });
});

test('a version-1 catalog (tokens, owners, quotas) is upgraded in place on both engines: its tokens stay, ended operations can be recorded', async () => {
  const v1 = `
    CREATE TABLE tokens (id TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL, role TEXT NOT NULL, name TEXT NOT NULL, created_at TEXT NOT NULL, revoked_at TEXT);
    CREATE TABLE owners (operation_id TEXT PRIMARY KEY, tenant TEXT, created_at TEXT NOT NULL);
    CREATE TABLE quotas (tenant TEXT PRIMARY KEY, instances INTEGER, memory_mib INTEGER);
    INSERT INTO tokens VALUES ('0123abcd', '${'d'.repeat(64)}', 'acme', 'member', 'old', '2026-11-01T00:00:00.000Z', NULL);`;
  const op = { id: 'synthesizeVm/h/i', kind: 'synthesizeVm', type: 'synthesizeVm', hostId: 'h', status: 'succeeded' as const, startedAt: '2026-12-01T00:00:00.000Z', closedAt: '2026-12-01T00:00:01.000Z', result: { ok: 1 } };
  const file = path.join(dir, `catalog-v1-${(seq += 1)}.sqlite`);
  const db = new (await import('better-sqlite3')).default(file);
  db.exec(v1);
  db.pragma('user_version = 1');
  db.close();
  const url = await pg.newDatabase(`v1_${(seq += 1)}`);
  const c = new Client({ connectionString: url });
  await c.connect();
  await c.query(`CREATE TABLE catalog_schema (version INTEGER NOT NULL); INSERT INTO catalog_schema VALUES (1); ${v1}`);
  await c.end();
  for (const open of [async () => new SqliteClusterCatalog(file), () => PostgresClusterCatalog.open(url)]) {
    const cat = await open();
    try {
      expect(await cat.tokenByDigest('d'.repeat(64))).toMatchObject({ id: '0123abcd', tenant: 'acme' });
      await cat.recordClosed([op]);
      expect(await cat.closedOperation(op.id)).toEqual(op);
      await cat.advanceSyncMark(op.closedAt);
      expect(await cat.syncMark()).toBe(op.closedAt);
    } finally {
      await cat.close();
    }
  }
  const check = new (await import('better-sqlite3')).default(file);
  expect(check.pragma('user_version', { simple: true })).toBe(4);
  check.close();
  const c2 = new Client({ connectionString: url });
  await c2.connect();
  expect((await c2.query('SELECT version FROM catalog_schema')).rows).toEqual([{ version: 4 }]);
  await c2.end();
});

test('a version-3 catalog is upgraded with the sync\'s mark at the latest close it holds, so its first sync does not scan all of visibility', async () => {
  const op = { id: 'synthesizeVm/h/i', kind: 'synthesizeVm', type: 'synthesizeVm', hostId: 'h', status: 'succeeded' as const, startedAt: '2026-12-01T00:00:00.000Z', closedAt: '2026-12-01T00:00:07.000Z' };
  const file = path.join(dir, `catalog-v3-${(seq += 1)}.sqlite`);
  const url = await pg.newDatabase(`v3_${(seq += 1)}`);
  // Made as a version-4 catalog, then taken back to what version 3 had.
  for (const open of [async () => new SqliteClusterCatalog(file), () => PostgresClusterCatalog.open(url)]) {
    const cat = await open();
    await cat.recordClosed([op]);
    await cat.close();
  }
  const db = new (await import('better-sqlite3')).default(file);
  db.exec('DROP TABLE sync_marks');
  db.pragma('user_version = 3');
  db.close();
  const c = new Client({ connectionString: url });
  await c.connect();
  await c.query('DROP TABLE sync_marks; UPDATE catalog_schema SET version = 3');
  await c.end();
  for (const open of [async () => new SqliteClusterCatalog(file), () => PostgresClusterCatalog.open(url)]) {
    const cat = await open();
    try {
      expect(await cat.syncMark()).toBe(op.closedAt);
    } finally {
      await cat.close();
    }
  }
});

test('an unreachable PostgreSQL catalog is CATALOG_UNAVAILABLE, naming the server without its password and the fix', async () => {
  const err = await PostgresClusterCatalog.open('postgres://cloudlet:s3cret@127.0.0.1:1/nowhere').catch((e: unknown) => e);
  expect(err).toBeInstanceOf(CloudletError);
  expect(err).toMatchObject({ code: 'CATALOG_UNAVAILABLE' });
  expect((err as Error).message).toContain('127.0.0.1:1/nowhere');
  expect((err as Error).message).not.toContain('s3cret');
  expect((err as CloudletError).fix).toMatch(/CLOUDLET_CATALOG_URL/);
});

test('two API servers on one PostgreSQL catalog: a token minted on one works on the other at once; a revocation on one is honoured by the other', async () => {
  const url = await pg.newDatabase('two_apis');
  const ADMIN = 'operator-token-0123456789abcdef';
  const fake = new FakeCloudletService();
  const c1 = await PostgresClusterCatalog.open(url);
  const c2 = await PostgresClusterCatalog.open(url);
  const api1 = await buildServer({ service: fake, catalog: c1, tokens: [ADMIN] });
  const api2 = await buildServer({ service: fake, catalog: c2, tokens: [ADMIN] });
  try {
    const minted = (await api1.inject({ method: 'POST', url: '/v1/tokens', headers: { authorization: `Bearer ${ADMIN}` }, payload: { tenant: 'acme', role: 'member' } })).json() as { id: string; token: string };
    const whoami = await api2.inject({ url: '/v1/whoami', headers: { authorization: `Bearer ${minted.token}` } });
    expect(whoami.json()).toEqual({ role: 'member', tenant: 'acme', tokenId: minted.id });
    const base = fake.addBase(['host-a']);
    const overlay = fake.addOverlay(base.id, Buffer.from('o'));
    await c1.recordOwner(overlay.operationId, undefined); // the operators', shared
    const made = await api1.inject({ method: 'POST', url: '/v1/instances', headers: { authorization: `Bearer ${minted.token}` }, payload: { hostId: 'host-a', overlayUrl: overlay.url } });
    expect(made.statusCode).toBe(202);
    // The owner recorded through one node decides what the other shows.
    const other = (await api1.inject({ method: 'POST', url: '/v1/tokens', headers: { authorization: `Bearer ${ADMIN}` }, payload: { tenant: 'globex' } })).json() as { token: string };
    expect(((await api2.inject({ url: '/v1/instances', headers: { authorization: `Bearer ${minted.token}` } })).json() as { instances: unknown[] }).instances).toHaveLength(1);
    expect(((await api2.inject({ url: '/v1/instances', headers: { authorization: `Bearer ${other.token}` } })).json() as { instances: unknown[] }).instances).toHaveLength(0);
    expect((await api2.inject({ method: 'DELETE', url: `/v1/tokens/${minted.id}`, headers: { authorization: `Bearer ${ADMIN}` } })).statusCode).toBe(200);
    expect((await api1.inject({ url: '/v1/whoami', headers: { authorization: `Bearer ${minted.token}` } })).statusCode).toBe(401);
  } finally {
    await api1.close();
    await api2.close();
    await c1.close();
    await c2.close();
    fake.cleanup();
  }
});
