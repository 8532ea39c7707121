/**
 * Tenants and scoped tokens through the API (fake service, real SQLite catalog): who sees what,
 * which role may do what, revocation without a restart, quotas, tokens hashed at rest, and
 * request logs that name the tenant but never the token.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import pino from 'pino';
import type { FastifyInstance } from 'fastify';
import { buildServer } from '../../src/api/server';
import { FakeCloudletService, FakeRecipeSchedules } from '../../src/service/fake';
import { digestToken, SqliteClusterCatalog } from '../../src/core/cluster-catalog';
import { receiveOperationId, type BeginReceiveRequest, type HandoffInstanceRequest, type HandoffService } from '../../src/service/handoff-types';
import type { OperationRef } from '../../src/service/types';

// fastify's inject needs `cookie` 2, an ES module jest cannot load under Node 20 (as in api-server.test.ts).
jest.mock('cookie', () => ({
  stringifySetCookie: (name: string, value: string) => `${name}=${encodeURIComponent(value)}`,
}));

const ADMIN = 'operator-token-0123456789abcdef';
let dir: string;
let fake: FakeCloudletService;
let catalog: SqliteClusterCatalog;
let app: FastifyInstance;
let logLines: string[];

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cloudlet-tenancy-'));
  // Operations move only when a test advances them (a deployment stays in flight until it does).
  fake = new FakeCloudletService({ dir, autoAdvance: false });
  catalog = new SqliteClusterCatalog(path.join(dir, 'catalog.sqlite'));
  logLines = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      logLines.push(chunk.toString());
      cb();
    },
  });
  app = await buildServer({ service: fake, schedules: new FakeRecipeSchedules(fake), catalog, tokens: [ADMIN], logger: pino({ level: 'info' }, sink) });
});

afterEach(async () => {
  await app.close();
  await catalog.close();
  fake.cleanup();
  fs.rmSync(dir, { recursive: true, force: true });
});

const auth = (token: string) => ({ authorization: `Bearer ${token}` });

async function call(token: string, method: 'GET' | 'POST' | 'DELETE', url: string, payload?: object) {
  return app.inject({ method, url, headers: auth(token), ...(payload !== undefined ? { payload } : {}) });
}

async function mint(tenant: string, role: 'admin' | 'member' | 'reader' = 'member'): Promise<{ id: string; token: string }> {
  const res = await call(ADMIN, 'POST', '/v1/tokens', { tenant, role, name: `${tenant} ${role}` });
  expect(res.statusCode).toBe(201);
  return res.json() as { id: string; token: string };
}

/** Provision with `token`; the instance id. */
async function provision(token: string, overlayUrl: string): Promise<string> {
  const res = await call(token, 'POST', '/v1/instances', { hostId: 'host-a', overlayUrl });
  expect(res.statusCode).toBe(202);
  return String((res.json() as { operation: { id: string } }).operation.id.split('/')[2]);
}

/** A base and an overlay the operators made through the API (recorded for no tenant: shared). */
async function shared(): Promise<{ baseId: string; overlayUrl: string }> {
  const base = fake.addBase(['host-a']);
  const overlay = fake.addOverlay(base.id, Buffer.from('shared overlay'));
  for (const id of [...base.operationIds, overlay.operationId]) await catalog.recordOwner(id, undefined);
  return { baseId: base.id, overlayUrl: overlay.url };
}

/** Tenants acme and globex; acme's instance synthesized from the shared overlay, and an overlay made of it (acme's). */
async function overlayOfAcme() {
  const { overlayUrl } = await shared();
  const a = await mint('acme');
  const b = await mint('globex');
  const inst = await provision(a.token, overlayUrl);
  fake.advance(`synthesizeVm/host-a/${inst}`, true);
  const made = await call(a.token, 'POST', '/v1/overlays', { instanceId: inst, keepInstance: true });
  expect(made.statusCode).toBe(202);
  const overlayId = String((fake.advance((made.json() as { operation: { id: string } }).operation.id, true).result as { overlayId: string }).overlayId);
  return { a, b, overlayUrl, overlayId };
}

describe('tokens', () => {
  test('a minted token acts for its tenant and role; whoami says so', async () => {
    const a = await mint('acme');
    expect(a.token).toMatch(/^clt_[0-9a-f]{8}_[0-9a-f]{48}$/);
    expect((await call(a.token, 'GET', '/v1/whoami')).json()).toEqual({ role: 'member', tenant: 'acme', tokenId: a.id });
    expect((await call(ADMIN, 'GET', '/v1/whoami')).json()).toEqual({ role: 'admin', tokenId: 'config-1' });
  });

  test('tokens are stored as their sha256 only, and listings never show them', async () => {
    const a = await mint('acme');
    await catalog.close();
    const bytes = fs.readFileSync(path.join(dir, 'catalog.sqlite')).toString('latin1') + (fs.existsSync(path.join(dir, 'catalog.sqlite-wal')) ? fs.readFileSync(path.join(dir, 'catalog.sqlite-wal')).toString('latin1') : '');
    expect(bytes).not.toContain(a.token);
    expect(bytes).not.toContain(a.token.split('_')[2]);
    expect(bytes).toContain(digestToken(a.token));
    expect(fs.statSync(path.join(dir, 'catalog.sqlite')).mode & 0o077).toBe(0);
    catalog = new SqliteClusterCatalog(path.join(dir, 'catalog.sqlite'));
  });

  test('a revoked token is refused on its next request, without a restart; the listing keeps it as revoked', async () => {
    const a = await mint('acme');
    expect((await call(a.token, 'GET', '/v1/instances')).statusCode).toBe(200);
    expect((await call(ADMIN, 'DELETE', `/v1/tokens/${a.id}`)).statusCode).toBe(200);
    const refused = await call(a.token, 'GET', '/v1/instances');
    expect(refused.statusCode).toBe(401);
    expect(refused.json()).toMatchObject({ error: { code: 'UNAUTHORIZED' } });
    expect((await call(ADMIN, 'DELETE', `/v1/tokens/${a.id}`)).statusCode).toBe(404);
    const listed = (await call(ADMIN, 'GET', '/v1/tokens')).json() as { tokens: Array<{ id: string; revokedAt?: string; token?: string }> };
    expect(listed.tokens.find((t) => t.id === a.id)?.revokedAt).toEqual(expect.any(String));
    expect(JSON.stringify(listed)).not.toContain(a.token);
  });

  test('a token of the right shape that was never minted is 401, as is a forged one', async () => {
    const a = await mint('acme');
    const forged = `${a.token.slice(0, -1)}${a.token.endsWith('0') ? '1' : '0'}`;
    expect((await call(forged, 'GET', '/v1/instances')).statusCode).toBe(401);
    expect((await call(`clt_0123abcd_${'0'.repeat(48)}`, 'GET', '/v1/instances')).statusCode).toBe(401);
  });
});

describe('roles', () => {
  test('members are refused the admin routes with 403: hosts, base import, schedules, tokens, tenants, neighbours, metrics', async () => {
    const m = await mint('acme');
    const refused = [
      await call(m.token, 'GET', '/v1/hosts'),
      await call(m.token, 'POST', '/v1/bases', { hostId: 'host-a', source: '/srv/base.pkg' }),
      await call(m.token, 'GET', '/v1/schedules'),
      await call(m.token, 'POST', '/v1/tokens', { tenant: 'acme', role: 'admin' }),
      await call(m.token, 'GET', '/v1/tokens'),
      await call(m.token, 'GET', '/v1/tenants'),
      await call(m.token, 'POST', '/v1/tenants/acme/quota', { instances: 100 }),
      await call(m.token, 'GET', '/metrics'),
      // Cross-cluster routes: handoffs (which may import bases), discovery and probes (which
      // reveal what the cluster holds and reach out to devices and neighbours).
      await call(m.token, 'POST', '/v1/handoffs', { instanceId: 'i-x', baseId: 'a'.repeat(64) }),
      await call(m.token, 'POST', '/v1/instances/i-x/handoff', { destination: { apiUrl: 'http://127.0.0.1:1', credentials: { token: 'x'.repeat(16) } } }),
      await call(m.token, 'GET', `/v1/discover?app=${'a'.repeat(64)}&device=10.0.0.9:7777`),
      await call(m.token, 'POST', '/v1/rtt-probes', { device: '10.0.0.9:7777' }),
      await call(m.token, 'GET', '/v1/cluster'),
    ];
    for (const r of refused) {
      expect(r.statusCode).toBe(403);
      expect(r.json()).toMatchObject({ error: { code: 'FORBIDDEN', message: expect.stringContaining('needs the admin role') } });
    }
    expect(fake.calls.filter((c) => c.method === 'importBase')).toHaveLength(0);
  });

  test('readers read their tenant\'s objects and may change nothing', async () => {
    const { overlayUrl } = await shared();
    const m = await mint('acme');
    const r = await mint('acme', 'reader');
    const id = await provision(m.token, overlayUrl);
    expect((await call(r.token, 'GET', `/v1/instances/${id}`)).statusCode).toBe(200);
    for (const res of [await call(r.token, 'DELETE', `/v1/instances/${id}`), await call(r.token, 'POST', '/v1/instances', { hostId: 'host-a', overlayUrl })]) {
      expect(res.statusCode).toBe(403);
      expect(res.json()).toMatchObject({ error: { code: 'FORBIDDEN', message: expect.stringContaining('needs the member role') } });
    }
  });
});

describe('isolation', () => {
  test('a tenant sees and acts on its own instances and operations only; another tenant\'s are 404, as if absent', async () => {
    const { overlayUrl } = await shared();
    const a = await mint('acme');
    const b = await mint('globex');
    const mine = await provision(a.token, overlayUrl);
    const theirs = await provision(b.token, overlayUrl);
    const ids = async (token: string) => ((await call(token, 'GET', '/v1/instances')).json() as { instances: Array<{ id: string }> }).instances.map((i) => i.id).sort();
    expect(await ids(a.token)).toEqual([mine]);
    expect(await ids(b.token)).toEqual([theirs]);
    expect(await ids(ADMIN)).toEqual([mine, theirs].sort());

    const opOf = (id: string) => encodeURIComponent(`synthesizeVm/host-a/${id}`);
    const refused = [
      await call(b.token, 'GET', `/v1/instances/${mine}`),
      await call(b.token, 'DELETE', `/v1/instances/${mine}`),
      await call(b.token, 'GET', `/v1/operations/${opOf(mine)}`),
      await call(b.token, 'DELETE', `/v1/operations/${opOf(mine)}`),
      await call(b.token, 'POST', '/v1/overlays', { instanceId: mine }),
    ];
    for (const r of refused) {
      expect(r.statusCode).toBe(404);
      expect(r.json()).toMatchObject({ error: { code: 'NOT_FOUND' } });
    }
    // The same 404 as an id that never existed: nothing tells the two apart.
    const never = await call(b.token, 'GET', '/v1/instances/i-never');
    expect((refused[0]?.json() as { error: { message: string } }).error.message.replace(mine, 'X')).toBe((never.json() as { error: { message: string } }).error.message.replace('i-never', 'X'));
    expect(fake.calls.filter((c) => c.method === 'terminateInstance' || c.method === 'createOverlay' || c.method === 'cancelOperation')).toHaveLength(0);

    expect((await call(a.token, 'GET', `/v1/operations/${opOf(mine)}`)).statusCode).toBe(200);
    expect((await call(a.token, 'DELETE', `/v1/instances/${mine}`)).statusCode).toBe(202);
  });

  test('overlays are their maker\'s tenant\'s; the operators\' overlays and bases are shared; a base imported for a tenant is that tenant\'s', async () => {
    const { a, b, overlayUrl, overlayId } = await overlayOfAcme();
    const overlays = async (token: string) => ((await call(token, 'GET', '/v1/overlays')).json() as { overlays: Array<{ id: string; url: string }> }).overlays;
    expect((await overlays(a.token)).map((o) => o.id)).toContain(overlayId);
    expect((await overlays(b.token)).map((o) => o.id)).not.toContain(overlayId);
    expect((await overlays(b.token)).map((o) => o.url)).toContain(overlayUrl);
    expect((await call(b.token, 'GET', `/v1/overlays/${overlayId}`)).statusCode).toBe(404);
    expect((await call(b.token, 'GET', `/v1/overlays/${overlayId}/content`)).statusCode).toBe(404);
    expect((await call(a.token, 'GET', `/v1/overlays/${overlayId}/content`)).statusCode).toBe(200);

    const imported = await call(ADMIN, 'POST', '/v1/bases', { hostId: 'host-b', source: '/srv/acme-only.pkg', tenant: 'acme' });
    expect(imported.statusCode).toBe(202);
    const baseId = String((fake.advance((imported.json() as { operation: { id: string } }).operation.id, true).result as { baseId: string }).baseId);
    const bases = async (token: string) => ((await call(token, 'GET', '/v1/bases')).json() as { bases: Array<{ id: string }> }).bases.map((x) => x.id);
    expect(await bases(a.token)).toContain(baseId);
    expect(await bases(b.token)).not.toContain(baseId);
    expect((await call(b.token, 'POST', `/v1/bases/${baseId}/instances`, { hostId: 'host-b' })).statusCode).toBe(404);
    expect((await call(b.token, 'GET', `/v1/bases/${baseId}/package`)).statusCode).toBe(404);
    expect((await call(a.token, 'POST', `/v1/bases/${baseId}/instances`, { hostId: 'host-b' })).statusCode).toBe(202);
  });
});

describe('handoffs keep the VM its tenant\'s', () => {
  /** A handoff service that records what it was asked (the rest is handoff.test.ts). */
  function recordingHandoffs() {
    const asked: { handoff: Array<{ id: string; req: HandoffInstanceRequest }>; receive: BeginReceiveRequest[] } = { handoff: [], receive: [] };
    const unused = async (): Promise<never> => {
      throw new Error('not used here');
    };
    const handoffs: HandoffService = {
      async handoffInstance(id, req) {
        asked.handoff.push({ id, req });
        return { id: `handoffVm/host-a/${id}/ho-${asked.handoff.length}`, kind: 'handoffVm', statusUrl: '' } as unknown as OperationRef;
      },
      async beginReceive(req) {
        asked.receive.push(req);
        const handoffId = `ho-${asked.receive.length}`;
        return { handoffId, ticket: 't', hostId: 'host-b', instanceId: req.instanceId, receiverUrl: 'http://127.0.0.1:1/handoffs/x', expiresAt: new Date().toISOString() };
      },
      baseArrived: unused,
      roundArrived: unused,
      complete: unused,
      status: unused,
      abort: unused,
      listTickets: unused,
      revokeTicket: unused,
    };
    return { asked, handoffs };
  }

  test('the source names the instance\'s tenant to the destination, which records the VM it receives as that tenant\'s', async () => {
    const { asked, handoffs } = recordingHandoffs();
    const server = await buildServer({ service: fake, schedules: new FakeRecipeSchedules(fake), catalog, tokens: [ADMIN], handoffs, logger: pino({ level: 'silent' }) });
    try {
      const { overlayUrl, baseId } = await shared();
      const a = await mint('acme');
      const mine = await provision(a.token, overlayUrl);
      const admins = await provision(ADMIN, overlayUrl);
      const destination = { apiUrl: 'http://127.0.0.1:1', credentials: { token: 'x'.repeat(16) } };
      for (const id of [mine, admins]) {
        const res = await server.inject({ method: 'POST', url: `/v1/instances/${id}/handoff`, headers: auth(ADMIN), payload: { destination } });
        expect(res.statusCode).toBe(202);
      }
      expect(asked.handoff.map((h) => [h.id, h.req.tenant])).toEqual([[mine, 'acme'], [admins, undefined]]);

      // At the destination: the tenant the source named owns the receiving operation (so the VM
      // that arrives), else the tenant of the token the source used (an operator's: none).
      const westAdmin = await mint('west-ops', 'admin');
      const begin = async (token: string, body: object) => server.inject({ method: 'POST', url: '/v1/handoffs', headers: auth(token), payload: { instanceId: 'moved-1', baseId, ...body } });
      expect((await begin(ADMIN, { tenant: 'acme' })).statusCode).toBe(201);
      expect((await begin(westAdmin.token, {})).statusCode).toBe(201);
      expect((await begin(ADMIN, {})).statusCode).toBe(201);
      const ids = [1, 2, 3].map((n) => receiveOperationId('host-b', 'moved-1', `ho-${n}`));
      const owners = await catalog.ownersOf(ids);
      expect(ids.map((id) => [owners.has(id), owners.get(id)?.tenant])).toEqual([[true, 'acme'], [true, 'west-ops'], [true, undefined]]);
      // A tenant that is not a tenant name is refused, and nothing starts.
      const bad = await begin(ADMIN, { tenant: 'Not A Tenant' });
      expect(bad.statusCode).toBe(400);
      expect(asked.receive).toHaveLength(3);
    } finally {
      await server.close();
    }
  });
});

describe('ids that do not cross tenants', () => {
  test('one Idempotency-Key from two tenants makes two operations; a key spelling another tenant\'s instance id does not reach it', async () => {
    const { overlayUrl } = await shared();
    const a = await mint('acme');
    const b = await mint('globex');
    const post = (token: string, key: string) => app.inject({ method: 'POST', url: '/v1/instances', headers: { ...auth(token), 'idempotency-key': key }, payload: { hostId: 'host-a', overlayUrl } });
    const fromA = (await post(a.token, 'same-key')).json() as { operation: { id: string } };
    const fromB = (await post(b.token, 'same-key')).json() as { operation: { id: string } };
    expect(fromB.operation.id).not.toBe(fromA.operation.id);
    // The same key again from A is A's first operation (idempotent within the tenant).
    expect(((await post(a.token, 'same-key')).json() as { operation: { id: string } }).operation.id).toBe(fromA.operation.id);
    const aInstance = String(fromA.operation.id.split('/')[2]);
    const spelled = (await post(b.token, aInstance.replace(/^i-/, ''))).json() as { operation: { id: string } };
    expect(spelled.operation.id.split('/')[2]).not.toBe(aInstance);
    expect(((await call(b.token, 'GET', '/v1/instances')).json() as { instances: Array<{ id: string }> }).instances.map((i) => i.id)).not.toContain(aInstance);
  });

  test('another tenant\'s overlay cannot be provisioned by its URL; an overlay made outside the API is the admins\'', async () => {
    const { a, b, overlayId } = await overlayOfAcme();
    const url = String(((await call(a.token, 'GET', `/v1/overlays/${overlayId}`)).json() as { url: string }).url);
    const refused = await call(b.token, 'POST', '/v1/instances', { hostId: 'host-a', overlayUrl: url });
    expect(refused.statusCode).toBe(404);
    expect(refused.json()).toMatchObject({ error: { code: 'NOT_FOUND' } });
    expect((await call(a.token, 'POST', '/v1/instances', { hostId: 'host-a', overlayUrl: url })).statusCode).toBe(202);

    const outside = fake.addOverlay(fake.addBase(['host-b'], Buffer.from('outside')).id, Buffer.from('made by a Temporal client of its own'));
    const ids = async (token: string) => ((await call(token, 'GET', '/v1/overlays')).json() as { overlays: Array<{ id: string }> }).overlays.map((o) => o.id);
    expect(await ids(b.token)).not.toContain(outside.id);
    expect(await ids(ADMIN)).toContain(outside.id);
  });
});

describe('quotas', () => {
  test('past its instance quota a tenant gets 429 QUOTA_EXCEEDED, and room again after a terminate', async () => {
    const { overlayUrl } = await shared();
    const a = await mint('acme');
    expect((await call(ADMIN, 'POST', '/v1/tenants/acme/quota', { instances: 1 })).json()).toMatchObject({ tenant: 'acme', quota: { instances: 1 }, usage: { instances: 0 } });
    const first = await provision(a.token, overlayUrl);
    const second = await call(a.token, 'POST', '/v1/instances', { hostId: 'host-a', overlayUrl });
    expect(second.statusCode).toBe(429);
    expect(second.json()).toMatchObject({ error: { code: 'QUOTA_EXCEEDED', message: expect.stringContaining('tenant acme has 1 instance(s) of the 1') } });
    // Another tenant is not limited by acme's quota.
    await provision((await mint('globex')).token, overlayUrl);
    expect((await call(a.token, 'GET', '/v1/tenants/acme')).json()).toMatchObject({ usage: { instances: 1, memoryMiB: 256 } });
    expect((await call(a.token, 'GET', '/v1/tenants/globex')).statusCode).toBe(404);

    fake.advance(`synthesizeVm/host-a/${first}`, true);
    const term = await call(a.token, 'DELETE', `/v1/instances/${first}`);
    fake.advance((term.json() as { operation: { id: string } }).operation.id, true);
    await provision(a.token, overlayUrl);
  });

  test('memory quota: counted from the bases\' memory; a deployment counts each of its VMs', async () => {
    const { overlayUrl } = await shared(); // 256 MiB base
    const a = await mint('acme');
    await call(ADMIN, 'POST', '/v1/tenants/acme/quota', { memoryMiB: 600 });
    const deploy = await call(a.token, 'POST', '/v1/deployments', { overlayUrl, hosts: ['host-a'], count: 3 });
    expect(deploy.statusCode).toBe(429);
    expect(deploy.json()).toMatchObject({ error: { code: 'QUOTA_EXCEEDED', message: expect.stringContaining('needs 768 MiB more') } });
    await provision(a.token, overlayUrl);
    await provision(a.token, overlayUrl);
    expect((await call(a.token, 'POST', '/v1/instances', { hostId: 'host-a', overlayUrl })).statusCode).toBe(429);
  });

  test('a deployment in flight counts the VMs it has not made yet, until it ends', async () => {
    const { overlayUrl } = await shared();
    const a = await mint('acme');
    await call(ADMIN, 'POST', '/v1/tenants/acme/quota', { instances: 3 });
    // Accepted and running, none of its VMs listed yet (the fake makes them only when it ends).
    const deploy = await call(a.token, 'POST', '/v1/deployments', { overlayUrl, hosts: ['host-a'], count: 2 });
    expect(deploy.statusCode).toBe(202);
    const deployId = (deploy.json() as { operation: { id: string } }).operation.id;
    expect((await call(a.token, 'GET', '/v1/tenants/acme')).json()).toMatchObject({ usage: { instances: 2, memoryMiB: 512 } });
    const again = await call(a.token, 'POST', '/v1/deployments', { overlayUrl, hosts: ['host-a'], count: 2 });
    expect(again.statusCode).toBe(429);
    expect(again.json()).toMatchObject({ error: { code: 'QUOTA_EXCEEDED', message: expect.stringContaining('tenant acme has 2 instance(s) of the 3') } });
    await provision(a.token, overlayUrl);
    expect((await call(a.token, 'POST', '/v1/instances', { hostId: 'host-a', overlayUrl })).statusCode).toBe(429);
    // The deployment ended: what it reserved is free again (its record goes too).
    fake.advance(deployId, true);
    expect((await call(a.token, 'GET', '/v1/tenants/acme')).json()).toMatchObject({ usage: { instances: 1 } });
    expect(await catalog.reservationsOf('acme')).toEqual([expect.objectContaining({ instances: 1 })]);
    expect((await call(a.token, 'POST', '/v1/instances', { hostId: 'host-a', overlayUrl })).statusCode).toBe(202);
  });

  test('the quota lock is the catalog\'s: a request waits while another process holds it', async () => {
    const { overlayUrl } = await shared();
    const a = await mint('acme');
    await call(ADMIN, 'POST', '/v1/tenants/acme/quota', { instances: 5 });
    // Another API process holds acme's lock.
    expect(await catalog.tryLockTenant('acme', 'other-process', 30_000)).toBe(true);
    const attempts = jest.spyOn(catalog, 'tryLockTenant');
    let answered = false;
    const pending = call(a.token, 'POST', '/v1/instances', { hostId: 'host-a', overlayUrl }).then((r) => {
      answered = true;
      return r;
    });
    // It tries, and tries again, and does not go ahead while the other holds the lock...
    await new Promise<void>((resolve) => {
      const check = (): void => {
        if (attempts.mock.calls.length >= 3) resolve();
        else setTimeout(check, 5);
      };
      check();
    });
    expect(await attempts.mock.results[0]?.value).toBe(false);
    expect(answered).toBe(false);
    expect(fake.calls.filter((c) => c.method === 'provisionInstance')).toHaveLength(0);
    attempts.mockRestore();
    // ...and goes ahead once it is given back.
    await catalog.unlockTenant('acme', 'other-process');
    expect((await pending).statusCode).toBe(202);
    // An expired lock (its holder died) is taken over.
    expect(await catalog.tryLockTenant('acme', 'dead-process', -1)).toBe(true);
    expect((await call(a.token, 'POST', '/v1/instances', { hostId: 'host-a', overlayUrl })).statusCode).toBe(202);
  });

  test('concurrent requests cannot both take the last place', async () => {
    const { overlayUrl } = await shared();
    const a = await mint('acme');
    await call(ADMIN, 'POST', '/v1/tenants/acme/quota', { instances: 2 });
    const answers = await Promise.all(Array.from({ length: 6 }, () => call(a.token, 'POST', '/v1/instances', { hostId: 'host-a', overlayUrl })));
    expect(answers.map((r) => r.statusCode).sort()).toEqual([202, 202, 429, 429, 429, 429]);
    expect(fake.calls.filter((c) => c.method === 'provisionInstance')).toHaveLength(2);
  });
});

test('every request is logged with its tenant, role and token id, never the token', async () => {
  const a = await mint('acme');
  await call(a.token, 'GET', '/v1/instances');
  await call(a.token, 'GET', '/v1/hosts');
  const lines = logLines.map((l) => JSON.parse(l) as Record<string, unknown>);
  const completed = lines.filter((l) => l.msg === 'request completed' && l.tenant === 'acme');
  expect(completed.length).toBeGreaterThanOrEqual(2);
  expect(completed.every((l) => l.role === 'member' && l.tokenId === a.id)).toBe(true);
  expect(logLines.join('\n')).not.toContain(a.token);
  expect(lines.some((l) => l.msg === 'token minted' && l.forTenant === 'acme' && l.tenant === '(operators)')).toBe(true);
});
