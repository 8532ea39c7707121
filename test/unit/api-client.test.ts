import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CloudletApiClient, CloudletApiError } from '../../src/api/client';
import { startApi, type RunningApi } from '../../src/api/server';
import { CloudletError } from '../../src/core/errors';
import { FakeCloudletService } from '../../src/service/fake';
import type { OperationStatus } from '../../src/service/types';

const TOKEN = 'client-test-token-0123456789';

let fake: FakeCloudletService;
let api: RunningApi;
let client: CloudletApiClient;
let downloads: string;

beforeEach(async () => {
  fake = new FakeCloudletService();
  api = await startApi(fake, { tokens: [TOKEN], host: '127.0.0.1', port: 0 });
  downloads = fs.mkdtempSync(path.join(os.tmpdir(), 'cloudlet-client-'));
  client = new CloudletApiClient({ baseUrl: api.url, token: TOKEN, downloadDir: downloads });
});

afterEach(async () => {
  await api.close();
  fake.cleanup();
  fs.rmSync(downloads, { recursive: true, force: true });
});

test('the whole story through the client: import, resume, overlay, provision, terminate', async () => {
  expect(api.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
  expect(await client.health()).toBe(true);
  expect((await client.listHosts()).map((h) => h.id)).toEqual(['host-a', 'host-b']);

  const imported: OperationStatus[] = [];
  const importA = await client.importBase({ hostId: 'host-a', source: 'http://127.0.0.1:9/base.pkg' });
  expect(importA.kind).toBe('importBaseVm');
  const doneA = await client.waitForOperation(importA.id, { intervalMs: 5, onProgress: (s) => imported.push(s) });
  expect(doneA.state).toBe('succeeded');
  // Every stage was seen, in order, and the last report is the final state.
  expect(imported.at(-1)?.state).toBe('succeeded');
  expect(imported.at(-1)?.progress?.done).toEqual(['fetch', 'verify', 'unpack', 'register']);
  const baseId = (doneA.result as { baseId: string }).baseId;
  await client.waitForOperation((await client.importBase({ hostId: 'host-b', source: 'http://127.0.0.1:9/base.pkg' })).id, { intervalMs: 5 });
  const base = await client.getBase(baseId);
  expect(base?.hostIds.sort()).toEqual(['host-a', 'host-b']);
  expect((await client.listBases()).map((b) => b.id)).toEqual([baseId]);

  const resumed = await client.waitForOperation((await client.resumeBase({ hostId: 'host-a', baseId, appPort: 8080 })).id, { intervalMs: 5 });
  const instanceId = (resumed.result as { instanceId: string }).instanceId;
  expect((await client.getInstance(instanceId))?.state).toBe('running');

  const made = await client.waitForOperation((await client.createOverlay({ instanceId })).id, { intervalMs: 5 });
  const overlayId = (made.result as { overlayId: string }).overlayId;
  const overlay = await client.getOverlay(overlayId);
  expect(overlay).toMatchObject({ id: overlayId, baseId, fromInstanceId: instanceId });
  expect((await client.getInstance(instanceId))?.state).toBe('terminated');

  // Download it whole (its sha256 is its id) and by range.
  const file = await client.overlayFile(overlayId);
  expect(file).toBe(path.join(downloads, `${overlayId}.overlay`));
  const bytes = fs.readFileSync(file ?? '');
  expect(createHash('sha256').update(bytes).digest('hex')).toBe(overlayId);
  expect((await client.readOverlayRange(overlayId, 3, 9)).equals(bytes.subarray(3, 10))).toBe(true);
  expect((await client.readOverlayRange(overlayId, 5)).equals(bytes.subarray(5))).toBe(true);
  expect(fs.readdirSync(downloads)).toEqual([`${overlayId}.overlay`]);

  // Provisioning with an idempotency key twice is one operation.
  const p1 = await client.provisionInstance({ hostId: 'host-b', overlayUrl: overlay?.url ?? '', waitForAppPort: 8080 }, 'provision-1');
  const p2 = await client.provisionInstance({ hostId: 'host-b', overlayUrl: overlay?.url ?? '', waitForAppPort: 8080 }, 'provision-1');
  expect(p2.id).toBe(p1.id);
  expect(fake.calls.filter((c) => c.method === 'provisionInstance').map((c) => c.idempotencyKey)).toEqual(['provision-1', 'provision-1']);
  const synthesized = await client.waitForOperation(p1.id, { intervalMs: 5 });
  const newId = (synthesized.result as { instanceId: string }).instanceId;
  const inst = await client.getInstance(newId);
  expect(inst).toMatchObject({ hostId: 'host-b', state: 'running', overlayId, baseId });
  expect(Object.keys(inst?.timings ?? {})).toContain('first response');

  const term = await client.terminateInstance(newId, 'term-1');
  expect(term.kind).toBe('terminateVm');
  await client.waitForOperation(term.id, { intervalMs: 5 });
  expect((await client.listInstances()).find((i) => i.id === newId)?.state).toBe('terminated');
});

test('unknown ids are undefined, as from the service', async () => {
  const digest = 'c'.repeat(64);
  expect(await client.getBase(digest)).toBeUndefined();
  expect(await client.getOverlay(digest)).toBeUndefined();
  expect(await client.getInstance('inst-none')).toBeUndefined();
  expect(await client.getOperation('synthesizeVm/host-a/inst-none')).toBeUndefined();
  expect(await client.overlayFile(digest)).toBeUndefined();
  expect(await client.basePackageFile(digest)).toBeUndefined();
  expect(fs.readdirSync(downloads)).toEqual([]);
});

test('refusals become CloudletErrors with the server code, message and issues', async () => {
  const wrong = new CloudletApiClient({ baseUrl: api.url, token: 'not-the-token-at-all' });
  const unauthorized = await wrong.listHosts().catch((e: unknown) => e);
  expect(unauthorized).toBeInstanceOf(CloudletApiError);
  expect(unauthorized).toMatchObject({ status: 401, apiCode: 'UNAUTHORIZED', code: 'UNAUTHORIZED' });

  const bad = (await client.importBase({ hostId: 'HOST', source: 'relative/path' }).catch((e: unknown) => e)) as CloudletApiError;
  expect(bad).toBeInstanceOf(CloudletError);
  expect(bad.code).toBe('BAD_INPUT');
  expect(bad.issues.map((i) => i.path.join('.'))).toEqual(['body.hostId', 'body.source']);
  expect(bad.requestId).toMatch(/^req-/);
  expect(bad.message).toMatch(/^invalid request body \(body\.hostId: .*\. Fix: correct the listed fields/);

  const unknownHost = (await client.provisionInstance({ hostId: 'host-q', overlayUrl: 'http://127.0.0.1:9/x' }).catch((e: unknown) => e)) as CloudletApiError;
  expect(unknownHost).toMatchObject({ code: 'UNKNOWN_HOST', status: 422 });
  expect(unknownHost.message).toBe('host host-q is not part of this cloudlet. Fix: use one of host-a, host-b');

  const base = fake.addBase(['host-a']);
  const instance = fake.addInstance('host-a', base.id);
  await client.terminateInstance(instance.id);
  const conflict = (await client.terminateInstance(instance.id).catch((e: unknown) => e)) as CloudletApiError;
  expect(conflict).toMatchObject({ code: 'CONFLICT', status: 409 });

  const badKey = (await client.terminateInstance(instance.id, 'no spaces allowed').catch((e: unknown) => e)) as CloudletApiError;
  expect(badKey).toMatchObject({ code: 'BAD_INPUT', status: 400 });
});

test('waitForOperation reports a workflow failure with its type and message', async () => {
  const op = await client.provisionInstance({ hostId: 'host-b', overlayUrl: 'http://127.0.0.1:9/bad.overlay' });
  fake.fail(op.id, 'CORRUPT', 'segment 3 of overlay http://127.0.0.1:9/bad.overlay does not decompress');
  const err = (await client.waitForOperation(op.id, { intervalMs: 5 }).catch((e: unknown) => e)) as CloudletError;
  expect(err).toBeInstanceOf(CloudletError);
  expect(err.code).toBe('CORRUPT');
  expect(err.message).toContain('segment 3');
  expect(err.retryable).toBe(false);
  expect((await client.getOperation(op.id))?.error).toEqual({ type: 'CORRUPT', message: expect.stringContaining('segment 3'), nonRetryable: true });
});

test('waitForOperation gives up with TIMEOUT when the operation does not close', async () => {
  const slow = new FakeCloudletService({ autoAdvance: false });
  const slowApi = await startApi(slow, { tokens: [TOKEN], port: 0 });
  try {
    const c = new CloudletApiClient({ baseUrl: `${slowApi.url}/`, token: TOKEN });
    const op = await c.importBase({ hostId: 'host-a', source: '/srv/base.pkg' });
    const started = Date.now();
    const err = (await c.waitForOperation(op.id, { intervalMs: 10, timeoutMs: 150 }).catch((e: unknown) => e)) as CloudletError;
    expect(err.code).toBe('TIMEOUT');
    expect(Date.now() - started).toBeGreaterThanOrEqual(150);
    expect(err.message).toContain('still running');
  } finally {
    await slowApi.close();
    slow.cleanup();
  }
});

test('an unreachable API is a CloudletApiError with status 0 naming the URL', async () => {
  const port = (await startApi(fake, { tokens: [TOKEN], port: 0 }).then(async (a) => {
    const p = new URL(a.url).port;
    await a.close();
    return p;
  }));
  const gone = new CloudletApiClient({ baseUrl: `http://127.0.0.1:${port}`, token: TOKEN });
  const err = (await gone.listHosts().catch((e: unknown) => e)) as CloudletApiError;
  expect(err).toBeInstanceOf(CloudletApiError);
  expect(err.status).toBe(0);
  expect(err.message).toContain(`http://127.0.0.1:${port}/v1/hosts`);
  expect(() => new CloudletApiClient({ baseUrl: 'not a url' })).toThrow(CloudletError);
});

test('recipe schedules through the client', async () => {
  const { FakeRecipeSchedules } = await import('../../src/service/fake');
  const withSchedules = await startApi(fake, { schedules: new FakeRecipeSchedules(fake), tokens: [TOKEN], port: 0 });
  try {
    const c = new CloudletApiClient({ baseUrl: withSchedules.url, token: TOKEN });
    const recipe = { recipeId: 'shop', hostId: 'host-b', baseId: 'e'.repeat(64), command: 'start-shop' };
    const created = await c.createSchedule(recipe, { every: '1h', triggerImmediately: true });
    expect(created).toMatchObject({ recipeId: 'shop', every: '1h', recentRuns: [expect.objectContaining({ workflowId: expect.stringMatching(/^rebuildOverlay\/host-b\/shop-/) })] });
    const triggered = await c.triggerSchedule('shop');
    expect(triggered.operation).toMatchObject({ id: expect.stringMatching(/^rebuildOverlay\/host-b\/shop-/), kind: 'rebuildOverlay' });
    expect((await c.getOperation(triggered.operation?.id ?? ''))?.kind).toBe('rebuildOverlay');
    await c.pauseSchedule('shop', 'maintenance');
    expect(await c.getSchedule('shop')).toMatchObject({ paused: true, note: 'maintenance', actionsTaken: 2 });
    await c.unpauseSchedule('shop');
    expect((await c.listSchedules()).map((s) => [s.recipeId, s.paused])).toEqual([['shop', false]]);
    const dup = (await c.createSchedule(recipe, { every: '1h' }).catch((e: unknown) => e)) as CloudletApiError;
    expect(dup).toMatchObject({ code: 'CONFLICT', status: 409 });
    await c.deleteSchedule('shop');
    expect(await c.getSchedule('shop')).toBeUndefined();
    await expect(c.deleteSchedule('shop')).rejects.toMatchObject({ code: 'NOT_FOUND' });
  } finally {
    await withSchedules.close();
  }
});

test('waitForOperation rides out a transient failure of the status endpoint', async () => {
  const op = await client.importBase({ hostId: 'host-a', source: '/srv/base.pkg' });
  const spy = jest
    .spyOn(fake, 'getOperation')
    .mockRejectedValueOnce(new CloudletError('TEMPORAL_UNAVAILABLE', 'Temporal is restarting'))
    .mockRejectedValueOnce(new Error('socket hang up'));
  const done = await client.waitForOperation(op.id, { intervalMs: 5 });
  expect(done.state).toBe('succeeded');
  expect(spy.mock.calls.length).toBeGreaterThan(2);
  // A refusal that is not transient still ends the wait at once.
  spy.mockRejectedValueOnce(new CloudletError('BAD_INPUT', 'no'));
  await expect(client.waitForOperation(op.id, { intervalMs: 5 })).rejects.toMatchObject({ status: 400 });
});
