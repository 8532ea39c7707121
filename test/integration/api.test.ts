/**
 * The acceptance story through the HTTP API only (typed client), on real Temporal, real libvirt
 * and two host workers: import the base on host A and host B, resume on A, customize the guest,
 * create an overlay on A, provision on B from the overlay's URL, and the application on B
 * answers with the state set on A. The runs carry their search attributes. Then tenants: a
 * member's synthesis on the real cluster is its own, invisible to another tenant, within its quota.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { SqliteClusterCatalog } from '../../src/core/cluster-catalog';
import type { Client } from '@temporalio/client';
import { pollUntil } from '../helpers/poll';
import { createLogger } from '../../src/common/logger';
import { startApi, type RunningApi } from '../../src/api/server';
import { CloudletApiClient } from '../../src/api/client';
import { TemporalCloudletService } from '../../src/service';
import { GuestAppClient } from '../../src/guest/app-client';
import { isCloudletError } from '../../src/core/errors';
import { startTestCluster, type TestCluster } from '../helpers/cluster';
import { testBasePackage } from '../helpers/test-base';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { synthesizeVm } from '../../src/workflows';
import { hostTaskQueue } from '../../src/common/names';

jest.setTimeout(20 * 60_000);

describe('the cloudlet story through the HTTP API', () => {
  let cluster: TestCluster;
  let hostA: string;
  let hostB: string;
  let suffix: string;
  let temporal: Client;
  let token: string;
  let api: RunningApi;
  let cloud: CloudletApiClient;
  let pkg: { packageFile: string; baseId: string };
  let catalogDir: string;
  let catalog: SqliteClusterCatalog;
  /** The overlay the story made (used again by the tenants' test). */
  let overlayUrl = '';
  let launchToken = '';

  beforeAll(async () => {
    pkg = await testBasePackage(256);
    // The API and the workers share one catalog, as in a deployment: the workflows record their
    // ends in it, the API's sync records what they could not.
    catalogDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cloudlet-api-catalog-'));
    const catalogFile = path.join(catalogDir, 'catalog.sqlite');
    cluster = await startTestCluster('api', ['pa', 'pb'], { env: { CLOUDLET_CATALOG_DB: catalogFile } });
    [hostA = '', hostB = ''] = cluster.hosts;
    ({ suffix, client: temporal } = cluster);
    token = `test-token-${suffix}-0123456789`;
    catalog = new SqliteClusterCatalog(catalogFile);
    api = await startApi(new TemporalCloudletService(temporal, cluster.config, { hosts: cluster.hosts, catalog }), { tokens: [token], catalog, port: 0, logger: createLogger('api', 'warn') });
    cloud = new CloudletApiClient({ baseUrl: api.url, token });
  });

  afterAll(async () => {
    await api?.close();
    await catalog?.close();
    await cluster?.stop();
    if (catalogDir) fs.rmSync(catalogDir, { recursive: true, force: true });
  });

  const done = async (id: string) => {
    const s = await cloud.waitForOperation(id, { timeoutMs: 10 * 60_000 });
    expect(s.state).toBe('succeeded');
    return s.result as Record<string, unknown>;
  };

  it('provisions on B from an overlay made on A, and B answers with A\'s state', async () => {
    expect((await cloud.listHosts()).map((h) => [h.id, h.serving])).toEqual([[hostA, true], [hostB, true]]);
    // Each serving host's stats, from its hostMonitor run.
    const withStats = await pollUntil('both hosts to have stats', 30_000, async () => {
      const hosts = await cloud.listHosts();
      return hosts.every((h) => h.stats) ? hosts : undefined;
    });
    for (const h of withStats) {
      expect(h.stats?.memAvailableBytes).toBeGreaterThan(0);
      expect(h.stats?.memAvailableBytes).toBeLessThanOrEqual(h.stats?.memTotalBytes ?? 0);
      expect(h.stats?.storeFreeBytes).toBeGreaterThan(0);
    }

    for (const hostId of [hostA, hostB]) {
      const op = await cloud.importBase({ hostId, source: pkg.packageFile }, `import-${hostId}`);
      expect(op.id).toBe(`importBaseVm/${hostId}/base/import-${hostId}`);
      // A retried POST with the same idempotency key returns the same operation.
      expect((await cloud.importBase({ hostId, source: pkg.packageFile }, `import-${hostId}`)).id).toBe(op.id);
      await done(op.id);
    }
    const base = await cloud.getBase(pkg.baseId);
    expect(base?.hostIds.sort()).toEqual([hostA, hostB].sort());

    const resumeOp = await cloud.resumeBase({ hostId: hostA, baseId: pkg.baseId }, `dev-${suffix}`);
    await done(resumeOp.id);
    const dev = (await cloud.listInstances()).find((i) => i.operationId === resumeOp.id);
    expect(dev?.state).toBe('running');
    const [, devPort] = (dev?.appEndpoint ?? '').split(':');
    const appA = new GuestAppClient(Number(devPort));
    const before = (await appA.waitForState(60_000)).state;
    await appA.set(`tok-${suffix}`, 'customized through the API');

    const overlayOp = await cloud.createOverlay({ instanceId: dev?.id ?? '' });
    const made = await done(overlayOp.id);
    const overlay = await cloud.getOverlay(String(made.overlayId));
    expect(overlay?.url).toMatch(/\/overlays\/[0-9a-f]{64}\.overlay$/);
    // The overlay downloads through the API with Range.
    const head = await cloud.readOverlayRange(overlay?.id ?? '', 0, 7);
    expect(head.toString('latin1')).toBe('CLDOVRLY');

    const provision = await cloud.provisionInstance({ hostId: hostB, overlayUrl: overlay?.url ?? '' });
    const status = await cloud.getOperation(provision.id);
    expect(status?.hostId).toBe(hostB);
    const result = await done(provision.id);
    expect((result.timings as Record<string, number>).firstResponseMs).toBeGreaterThan(0);
    const inst = await cloud.getInstance(String(result.instanceId));
    expect(inst?.hostId).toBe(hostB);
    const [, port] = (inst?.appEndpoint ?? '').split(':');
    const state = await new GuestAppClient(Number(port)).state();
    expect(state.token).toBe(`tok-${suffix}`);
    expect(state.disk).toBe('customized through the API');
    expect(state.bootId).toBe(before.bootId);
    overlayUrl = overlay?.url ?? '';
    launchToken = `tok-${suffix}`;

    // The runs are in visibility with their search attributes.
    const query = `CloudletHost = '${hostB}' AND CloudletOperation = 'synthesizeVm' AND CloudletBaseId = '${pkg.baseId}' AND CloudletStatus = 'succeeded'`;
    let n = 0;
    for await (const _ of temporal.workflow.list({ query })) n++;
    expect(n).toBe(1);

    const term = await cloud.terminateInstance(inst?.id ?? '');
    await done(term.id);
    expect((await cloud.getInstance(inst?.id ?? ''))?.state).toBe('terminated');
  });

  it('tenants: a member\'s VM is its own, another tenant sees nothing of it, and the quota holds', async () => {
    expect(overlayUrl).not.toBe('');
    const admin = async (method: string, url: string, body: object) => {
      const res = await fetch(`${api.url}${url}`, { method, headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, body: JSON.stringify(body) });
      expect(res.ok).toBe(true);
      return (await res.json()) as Record<string, unknown>;
    };
    const acme = new CloudletApiClient({ baseUrl: api.url, token: String((await admin('POST', '/v1/tokens', { tenant: 'acme', role: 'member', name: 'api test' })).token) });
    const globex = new CloudletApiClient({ baseUrl: api.url, token: String((await admin('POST', '/v1/tokens', { tenant: 'globex' })).token) });
    await admin('POST', '/v1/tenants/acme/quota', { instances: 1 });

    // The shared overlay (made by the operators' token) is visible to both tenants.
    expect((await globex.listOverlays()).map((o) => o.url)).toContain(overlayUrl);
    const op = await acme.provisionInstance({ hostId: hostB, overlayUrl });
    const s = await acme.waitForOperation(op.id, { timeoutMs: 10 * 60_000 });
    expect(s.state).toBe('succeeded');
    const id = String((s.result as Record<string, unknown>).instanceId);
    const inst = await acme.getInstance(id);
    expect(inst?.state).toBe('running');
    expect((await new GuestAppClient(Number((inst?.appEndpoint ?? '').split(':')[1])).state()).token).toBe(launchToken);

    // globex: not listed, and every id of it is 404, as if it did not exist.
    expect((await globex.listInstances()).map((i) => i.id)).not.toContain(id);
    expect(await globex.getInstance(id)).toBeUndefined();
    expect(await globex.getOperation(op.id)).toBeUndefined();
    const refused = await globex.terminateInstance(id).catch((e: unknown) => e);
    expect(isCloudletError(refused) && refused.code).toBe('NOT_FOUND');
    // Members may not list hosts or import bases.
    const forbidden = await globex.listHosts().catch((e: unknown) => e);
    expect(isCloudletError(forbidden) && forbidden.code).toBe('FORBIDDEN');

    // acme is at its quota of one instance: a second request is refused before any workflow starts.
    const before = new Date();
    const over = await acme.provisionInstance({ hostId: hostB, overlayUrl }).catch((e: unknown) => e);
    expect(isCloudletError(over) && over.code).toBe('QUOTA_EXCEEDED');
    let started = 0;
    for await (const _ of temporal.workflow.list({ query: `CloudletHost = '${hostB}' AND CloudletOperation = 'synthesizeVm' AND StartTime >= '${before.toISOString()}'` })) started++;
    expect(started).toBe(0);

    const term = await acme.terminateInstance(id);
    expect((await acme.waitForOperation(term.id, { timeoutMs: 5 * 60_000 })).state).toBe('succeeded');
    expect((await acme.getInstance(id))?.state).toBe('terminated');
    // The operators see every tenant's instances.
    expect((await cloud.listInstances()).map((i) => i.id)).toContain(id);
  });

  it('what the API lists outlives the runs: with every run deleted from the Temporal server, bases, overlays, instances and operations read the same from the catalog', async () => {
    const before = { bases: await cloud.listBases(), overlays: await cloud.listOverlays(), instances: await cloud.listInstances() };
    expect(before.instances.length).toBeGreaterThanOrEqual(3);
    const ops = await catalog.closedOperations({ kinds: ['importBaseVm', 'resumeBaseVm', 'createOverlay', 'synthesizeVm', 'terminateVm'], hosts: cluster.hosts });
    expect(ops.length).toBeGreaterThanOrEqual(6);
    const someOp = before.instances[0]?.operationId ?? '';
    const opBefore = await cloud.getOperation(someOp);
    // As the server's retention would: the runs are gone from the server.
    for (const o of ops) await temporal.workflowService.deleteWorkflowExecution({ namespace: cluster.config.namespace, workflowExecution: { workflowId: o.id } });
    await pollUntil('the runs to be deleted from the server', 60_000, async () => {
      let n = 0;
      for await (const _ of temporal.workflow.list({ query: `(${cluster.hosts.map((h) => `CloudletHost = '${h}'`).join(' OR ')}) AND CloudletOperation = 'synthesizeVm'` })) n++;
      return n === 0 ? true : undefined;
    });
    await expect(temporal.workflow.getHandle(someOp).describe()).rejects.toThrow();
    expect(await cloud.listBases()).toEqual(before.bases);
    expect(await cloud.listOverlays()).toEqual(before.overlays);
    expect(await cloud.listInstances()).toEqual(before.instances);
    const opAfter = await cloud.getOperation(someOp);
    expect(opAfter).toMatchObject({ id: someOp, state: opBefore?.state, hostId: opBefore?.hostId, result: opBefore?.result });
  });

  it('answers unknown ids with 404 and bad bodies with 400, behind a bearer token', async () => {
    expect(await cloud.getInstance('i-nope')).toBeUndefined();
    const bad = await cloud.provisionInstance({ hostId: 'NOT A HOST', overlayUrl: 'x' }).catch((e: unknown) => e);
    expect(isCloudletError(bad)).toBe(true);
    const anon = await fetch(`${api.url}/v1/hosts`);
    expect(anon.status).toBe(401);
    const unknownHost = await cloud.provisionInstance({ hostId: 'no-such-host', overlayUrl: 'http://127.0.0.1:1/x.overlay' }).catch((e: unknown) => e);
    expect(isCloudletError(unknownHost) && unknownHost.code).toBe('UNKNOWN_HOST');
  });

  it('refuses sources the fetch policy does not permit: on their face at the API, and on the host where it connects', async () => {
    // On their face (a link-local address, a path outside the import directories): 403, no operation.
    for (const attempt of [
      () => cloud.provisionInstance({ hostId: hostB, overlayUrl: 'http://169.254.169.254/latest/meta-data/x.overlay' }),
      () => cloud.provisionInstance({ hostId: hostB, overlayUrl: '/etc/passwd' }),
      () => cloud.importBase({ hostId: hostA, source: '/etc/hostname' }),
    ]) {
      const err = await attempt().catch((e: unknown) => e);
      expect(isCloudletError(err) && err.code).toBe('SOURCE_REFUSED');
    }
    // Behind a redirect from an allowed server (loopback 127.0.0.1 is this cluster's) to 127.0.0.2,
    // which is not allowed: the API cannot know, the host refuses before connecting to it.
    let secretHits = 0;
    const secret = http.createServer((_req, res) => {
      secretHits += 1;
      res.end('internal');
    });
    await new Promise<void>((r) => secret.listen(0, '127.0.0.2', r));
    const redirector = http.createServer((_req, res) => res.writeHead(302, { location: `http://127.0.0.2:${(secret.address() as AddressInfo).port}/x.overlay` }).end());
    await new Promise<void>((r) => redirector.listen(0, '127.0.0.1', r));
    try {
      const op = await cloud.provisionInstance({ hostId: hostB, overlayUrl: `http://127.0.0.1:${(redirector.address() as AddressInfo).port}/x.overlay` });
      const failed = await cloud.waitForOperation(op.id, { timeoutMs: 60_000 }).catch((e: unknown) => e);
      expect(isCloudletError(failed) && failed.code).toBe('SOURCE_REFUSED');
      expect(String(failed)).toMatch(/127\.0\.0\.2 is a loopback address and not on the allow-list/);
      expect((await cloud.getOperation(op.id))?.state).toBe('failed');
      expect(secretHits).toBe(0);
      // A Temporal client that starts the workflow itself gets the same refusal from the host.
      const direct = await temporal.workflow
        .execute(synthesizeVm, { taskQueue: hostTaskQueue(hostB), workflowId: `synthesizeVm/${hostB}/refused-${suffix}`, args: [{ hostId: hostB, instanceId: `refused-${suffix}`, overlayUrl: '/etc/passwd', onHostQueue: true }] })
        .catch((e: unknown) => e);
      expect(String((direct as { cause?: { cause?: unknown } }).cause?.cause ?? direct)).toMatch(/overlay \/etc\/passwd is refused: it is not under an import directory/);
    } finally {
      secret.close();
      redirector.close();
    }
  });
});
