import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { createHash } from 'node:crypto';
import pino from 'pino';
import { Writable } from 'node:stream';
import { buildServer } from '../../src/api/server';
import { AcceptedSchema, ErrorBodySchema, InstanceInfoSchema, OperationStatusSchema, OverlayListSchema } from '../../src/api/schemas';
import { CloudletError } from '../../src/core/errors';
import { FakeCloudletService } from '../../src/service/fake';

// fastify's inject (light-my-request) requires `cookie` 2, an ES module jest cannot load under
// Node 20; only its stringifySetCookie is used, and only for request cookies, which we never send.
jest.mock('cookie', () => ({
  stringifySetCookie: (name: string, value: string) => `${name}=${encodeURIComponent(value)}`,
}));

const TOKEN = 'test-token-0123456789abcdef';
const AUTH = { authorization: `Bearer ${TOKEN}` };

let fake: FakeCloudletService;
let app: FastifyInstance;
let logLines: string[];

beforeEach(async () => {
  fake = new FakeCloudletService();
  logLines = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      logLines.push(chunk.toString());
      cb();
    },
  });
  app = await buildServer({ service: fake, tokens: [TOKEN, 'second-token-abcdefghijkl'], logger: pino({ level: 'info' }, sink) });
});

afterEach(async () => {
  await app.close();
  fake.cleanup();
});

function errorOf(res: LightMyRequestResponse) {
  return ErrorBodySchema.parse(res.json()).error;
}

async function post(url: string, body: unknown, headers: Record<string, string> = {}) {
  return app.inject({ method: 'POST', url, headers: { ...AUTH, ...headers }, payload: body as object });
}

describe('authentication', () => {
  test('healthz and the OpenAPI document need no token', async () => {
    expect((await app.inject({ url: '/healthz' })).json()).toEqual({ ok: true });
    expect((await app.inject({ url: '/openapi.json' })).statusCode).toBe(200);
  });

  test('/metrics needs the token and counts requests by route pattern and status, never by raw URL', async () => {
    expect((await app.inject({ url: '/metrics' })).statusCode).toBe(401);
    await app.inject({ url: '/v1/instances/i-metrics-probe', headers: AUTH });
    const res = await app.inject({ url: '/metrics', headers: AUTH });
    expect(res.statusCode).toBe(200);
    expect(res.headers['content-type']).toMatch(/^text\/plain/);
    expect(res.body).toMatch(/cloudlet_api_requests_total\{method="GET",route="\/v1\/instances\/:id",status="404"\} [1-9]/);
    expect(res.body).toMatch(/cloudlet_api_requests_total\{method="GET",route="\/metrics",status="401"\} [1-9]/);
    expect(res.body).toMatch(/cloudlet_api_request_duration_seconds_count\{method="GET",route="\/v1\/instances\/:id"\} [1-9]/);
    expect(res.body).not.toContain('i-metrics-probe');
  });

  test('a missing header is 401 with a Bearer challenge', async () => {
    const res = await app.inject({ url: '/v1/hosts' });
    expect(res.statusCode).toBe(401);
    expect(res.headers['www-authenticate']).toBe('Bearer realm="cloudlet"');
    expect(errorOf(res).code).toBe('UNAUTHORIZED');
    expect(fake.calls).toHaveLength(0);
  });

  test('a wrong token, a prefix of a right one, or another scheme is refused', async () => {
    for (const [header, error] of [
      [`Bearer ${TOKEN}x`, 'invalid_token'],
      [`Bearer ${TOKEN.slice(0, -1)}`, 'invalid_token'],
      [`Basic ${Buffer.from('a:b').toString('base64')}`, 'invalid_request'],
      ['Bearer', 'invalid_request'],
    ] as const) {
      const res = await app.inject({ url: '/v1/hosts', headers: { authorization: header } });
      expect(res.statusCode).toBe(401);
      expect(res.headers['www-authenticate']).toContain(`error="${error}"`);
    }
    expect(fake.calls).toHaveLength(0);
  });

  test('the token is checked before the body is read', async () => {
    const res = await app.inject({ method: 'POST', url: '/v1/bases', headers: { 'content-type': 'application/json' }, payload: '{not json' });
    expect(res.statusCode).toBe(401);
  });

  test('every configured token is accepted', async () => {
    for (const t of [TOKEN, 'second-token-abcdefghijkl']) {
      const res = await app.inject({ url: '/v1/hosts', headers: { authorization: `bearer ${t}` } });
      expect(res.statusCode).toBe(200);
      expect(res.json()).toEqual({ hosts: [{ id: 'host-a', serving: true }, { id: 'host-b', serving: true }] });
    }
  });

  test('the server refuses to start without tokens unless insecure is asked for', async () => {
    await expect(buildServer({ service: fake, tokens: [] })).rejects.toThrow(/CLOUDLET_API_TOKENS/);
    const open = await buildServer({ service: fake, tokens: [], insecure: true });
    expect((await open.inject({ url: '/v1/hosts' })).statusCode).toBe(200);
    await open.close();
  });
});

describe('validation (400 with the zod issues)', () => {
  test('bad fields, an unknown key and a missing field are each listed with their path', async () => {
    const res = await post('/v1/instances', { hostId: 'Host B', overlayUrl: 'ftp://x/y', waitForAppPort: 70000, color: 'red' });
    expect(res.statusCode).toBe(400);
    const err = errorOf(res);
    expect(err.code).toBe('BAD_INPUT');
    const paths = (err.issues ?? []).map((i) => i.path.join('.'));
    expect(paths).toEqual(expect.arrayContaining(['body.hostId', 'body.overlayUrl', 'body.waitForAppPort', 'body']));
    expect(err.message).toContain('body.hostId');
    const missing = errorOf(await post('/v1/bases', { hostId: 'host-a' }));
    expect(missing.issues?.map((i) => i.path.join('.'))).toEqual(['body.source']);
    expect(fake.calls.filter((c) => c.method === 'provisionInstance' || c.method === 'importBase')).toHaveLength(0);
  });

  test('a body that is not JSON, no body, or another media type', async () => {
    const bad = await app.inject({ method: 'POST', url: '/v1/bases', headers: { ...AUTH, 'content-type': 'application/json' }, payload: '{"hostId":' });
    expect(bad.statusCode).toBe(400);
    expect(errorOf(bad).code).toBe('BAD_INPUT');
    const none = await app.inject({ method: 'POST', url: '/v1/bases', headers: AUTH });
    expect(none.statusCode).toBe(400);
    expect(errorOf(none).issues?.[0]?.path).toEqual(['body']);
    const text = await app.inject({ method: 'POST', url: '/v1/bases', headers: { ...AUTH, 'content-type': 'text/plain' }, payload: 'host-a' });
    expect(text.statusCode).toBe(415);
  });

  test('malformed ids in the path are 400, not 404', async () => {
    const res = await app.inject({ url: '/v1/bases/not-a-digest', headers: AUTH });
    expect(res.statusCode).toBe(400);
    expect(errorOf(res).issues?.[0]?.path).toEqual(['params', 'id']);
  });

  test('an Idempotency-Key of the wrong shape is refused before the service is called', async () => {
    for (const key of ['has space', 'x'.repeat(65), 'semi;colon']) {
      const res = await post('/v1/bases', { hostId: 'host-a', source: '/srv/base.pkg' }, { 'idempotency-key': key });
      expect(res.statusCode).toBe(400);
      expect(errorOf(res).issues?.[0]?.path).toEqual(['header', 'Idempotency-Key']);
    }
    expect(fake.calls.filter((c) => c.method === 'importBase')).toHaveLength(0);
  });
});

describe('status codes of service errors', () => {
  test('unknown ids are 404 with the service untouched beyond the lookup', async () => {
    const digest = 'a'.repeat(64);
    for (const url of [`/v1/bases/${digest}`, `/v1/overlays/${digest}`, `/v1/overlays/${digest}/content`, `/v1/bases/${digest}/package`, '/v1/instances/inst-9999', '/v1/operations/synthesizeVm%2Fhost-b%2Finst-9']) {
      const res = await app.inject({ url, headers: AUTH });
      expect([url, res.statusCode]).toEqual([url, 404]);
      expect(errorOf(res).code).toBe('NOT_FOUND');
    }
    const del = await app.inject({ method: 'DELETE', url: '/v1/instances/inst-9999', headers: AUTH });
    expect(del.statusCode).toBe(404);
    expect(fake.calls.some((c) => c.method === 'terminateInstance')).toBe(false);
    const route = await app.inject({ url: '/v2/nothing', headers: AUTH });
    expect(route.statusCode).toBe(404);
  });

  test('conflicts are 409, unknown hosts 422, the service message kept', async () => {
    const base = fake.addBase(['host-a']);
    const notHere = await post(`/v1/bases/${base.id}/instances`, { hostId: 'host-b' });
    expect(notHere.statusCode).toBe(409);
    expect(errorOf(notHere).message).toContain('not imported on host host-b');

    const started = AcceptedSchema.parse((await post(`/v1/bases/${base.id}/instances`, { hostId: 'host-a' })).json());
    const instanceId = started.operation.id.split('/')[2] ?? '';
    const stillProvisioning = await post('/v1/overlays', { instanceId });
    expect(stillProvisioning.statusCode).toBe(409);
    expect(errorOf(stillProvisioning).code).toBe('CONFLICT');

    const unknownHost = await post('/v1/instances', { hostId: 'host-z', overlayUrl: 'http://127.0.0.1:9/o.overlay' });
    expect(unknownHost.statusCode).toBe(422);
    expect(errorOf(unknownHost)).toMatchObject({ code: 'UNKNOWN_HOST', fix: 'use one of host-a, host-b' });
  });

  test('an unexpected failure is a 500 that names the request id, which is logged', async () => {
    jest.spyOn(fake, 'listBases').mockRejectedValueOnce(new Error('database is locked'));
    const res = await app.inject({ url: '/v1/bases', headers: AUTH });
    expect(res.statusCode).toBe(500);
    const err = errorOf(res);
    expect(err.code).toBe('INTERNAL');
    expect(err.requestId).toBe(res.headers['x-request-id']);
    expect(err.message).not.toContain('database is locked');
    const logged = logLines.map((l) => JSON.parse(l) as { reqId?: string; requestId?: string; err?: { message?: string } }).find((l) => l.requestId === err.requestId);
    expect(logged?.err?.message).toBe('database is locked');
  });

  test('a well-formed X-Request-Id from the caller is kept, another is replaced', async () => {
    const kept = await app.inject({ url: '/v1/instances/inst-none', headers: { ...AUTH, 'x-request-id': 'trace-1234abcd' } });
    expect(kept.headers['x-request-id']).toBe('trace-1234abcd');
    expect(errorOf(kept).requestId).toBe('trace-1234abcd');
    const replaced = await app.inject({ url: '/healthz', headers: { 'x-request-id': 'bad id\u0007' } });
    expect(replaced.headers['x-request-id']).toMatch(/^req-[0-9a-f-]{36}$/);
  });

  test('a CloudletError thrown synchronously by the service keeps its code and fix', async () => {
    jest.spyOn(fake, 'provisionInstance').mockRejectedValueOnce(new CloudletError('CPU_MODEL_UNUSABLE', 'CPU model Haswell is not usable on host-b', { fix: 'use a base made with qemu64' }));
    const res = await post('/v1/instances', { hostId: 'host-b', overlayUrl: 'http://127.0.0.1:9/o.overlay' });
    expect(res.statusCode).toBe(422);
    expect(errorOf(res)).toMatchObject({ code: 'CPU_MODEL_UNUSABLE', fix: 'use a base made with qemu64' });
  });
});

describe('operations: 202, Location, status, idempotency', () => {
  test('POST answers 202 with the operation, statusUrl and Location, and the status reports progress', async () => {
    const res = await post('/v1/instances', { hostId: 'host-b', overlayUrl: 'http://127.0.0.1:9/o.overlay', waitForAppPort: 8080 });
    expect(res.statusCode).toBe(202);
    const body = AcceptedSchema.parse(res.json());
    expect(body.operation.kind).toBe('synthesizeVm');
    expect(body.operation.id).toMatch(/^synthesizeVm\/host-b\/inst-/);
    expect(res.headers.location).toBe(body.statusUrl);
    expect(body.statusUrl).toBe(`/v1/operations/${encodeURIComponent(body.operation.id)}`);
    expect(fake.calls.find((c) => c.method === 'provisionInstance')?.args[0]).toEqual({ hostId: 'host-b', overlayUrl: 'http://127.0.0.1:9/o.overlay', waitForAppPort: 8080 });

    const first = OperationStatusSchema.parse((await app.inject({ url: body.statusUrl, headers: AUTH })).json());
    expect(first).toMatchObject({ id: body.operation.id, state: 'running', hostId: 'host-b' });
    expect(first.progress?.done.length).toBeGreaterThan(0);
    // The id also works with its slashes unencoded.
    const raw = await app.inject({ url: `/v1/operations/${body.operation.id}`, headers: AUTH });
    expect(OperationStatusSchema.parse(raw.json()).id).toBe(body.operation.id);

    const instanceView = InstanceInfoSchema.parse((await app.inject({ url: `/v1/instances/${body.operation.id.split('/')[2] ?? ''}`, headers: AUTH })).json());
    expect(instanceView.state).toBe('provisioning');
    expect(instanceView.progress?.done).toEqual(expect.arrayContaining(['verify CPU model']));

    fake.advance(body.operation.id, true);
    const done = OperationStatusSchema.parse((await app.inject({ url: body.statusUrl, headers: AUTH })).json());
    expect(done.state).toBe('succeeded');
    const instanceId = body.operation.id.split('/')[2] ?? '';
    const inst = InstanceInfoSchema.parse((await app.inject({ url: `/v1/instances/${instanceId}`, headers: AUTH })).json());
    expect(inst.state).toBe('running');
    expect(inst.progress).toBeUndefined();
    expect(inst.timings?.['first response']).toBeGreaterThan(0);
  });

  test('the Idempotency-Key reaches the service and a retried POST gets the same operation', async () => {
    const body = { hostId: 'host-a', source: 'http://127.0.0.1:9/base.pkg' };
    const a = await post('/v1/bases', body, { 'idempotency-key': 'import-base_1' });
    const b = await post('/v1/bases', body, { 'idempotency-key': 'import-base_1' });
    expect([a.statusCode, b.statusCode]).toEqual([202, 202]);
    expect(AcceptedSchema.parse(b.json()).operation.id).toBe(AcceptedSchema.parse(a.json()).operation.id);
    const imports = fake.calls.filter((c) => c.method === 'importBase');
    expect(imports.map((c) => c.idempotencyKey)).toEqual(['import-base_1', 'import-base_1']);
    // The same key for another request is a conflict.
    const other = await post('/v1/bases', { ...body, hostId: 'host-b' }, { 'idempotency-key': 'import-base_1' });
    expect(other.statusCode).toBe(409);
  });

  test('DELETE answers 202 and passes its key; resume takes the base id from the path', async () => {
    const base = fake.addBase(['host-a', 'host-b']);
    const resumed = await post(`/v1/bases/${base.id}/instances`, { hostId: 'host-b', appPort: 8080 }, { 'idempotency-key': 'r1' });
    expect(resumed.statusCode).toBe(202);
    expect(fake.calls.find((c) => c.method === 'resumeBase')).toEqual({ method: 'resumeBase', args: [{ hostId: 'host-b', baseId: base.id, appPort: 8080 }], idempotencyKey: 'r1' });

    const inst = fake.addInstance('host-a', base.id);
    const del = await app.inject({ method: 'DELETE', url: `/v1/instances/${inst.id}`, headers: { ...AUTH, 'idempotency-key': 'del-1' } });
    expect(del.statusCode).toBe(202);
    const op = AcceptedSchema.parse(del.json()).operation;
    expect(op).toMatchObject({ kind: 'terminateVm', id: `terminateVm/host-a/${inst.id}` });
    expect(del.headers.location).toBe(`/v1/operations/${encodeURIComponent(op.id)}`);
    expect(fake.calls.find((c) => c.method === 'terminateInstance')?.idempotencyKey).toBe('del-1');
  });

  test('an overlay made from an instance is listed', async () => {
    const base = fake.addBase(['host-a']);
    const inst = fake.addInstance('host-a', base.id);
    const res = await post('/v1/overlays', { instanceId: inst.id, keepInstance: true });
    expect(res.statusCode).toBe(202);
    fake.advance(AcceptedSchema.parse(res.json()).operation.id, true);
    const list = OverlayListSchema.parse((await app.inject({ url: '/v1/overlays', headers: AUTH })).json());
    expect(list.overlays).toHaveLength(1);
    expect(list.overlays[0]).toMatchObject({ baseId: base.id, fromInstanceId: inst.id });
  });
});

describe('downloads with Range', () => {
  const content = Buffer.from(Array.from({ length: 10_000 }, (_, i) => (i * 7 + 3) % 256));
  let id: string;
  let url: string;
  beforeEach(() => {
    id = fake.addOverlay('b'.repeat(64), content).id;
    url = `/v1/overlays/${id}/content`;
  });
  const get = (headers: Record<string, string> = {}, method: 'GET' | 'HEAD' = 'GET') => app.inject({ method, url, headers: { ...AUTH, ...headers } });

  test('the whole file, with Accept-Ranges and the sha256 as ETag', async () => {
    const res = await get();
    expect(res.statusCode).toBe(200);
    expect(res.rawPayload.equals(content)).toBe(true);
    expect(createHash('sha256').update(res.rawPayload).digest('hex')).toBe(id);
    expect(res.headers).toMatchObject({ 'accept-ranges': 'bytes', etag: `"${id}"`, 'content-length': String(content.length), 'content-type': 'application/octet-stream' });
  });

  test('first bytes, a suffix and an open range are 206 with Content-Range', async () => {
    const cases: Array<[string, number, number]> = [
      ['bytes=0-99', 0, 99],
      ['bytes=-100', content.length - 100, content.length - 1],
      ['bytes=9000-', 9000, content.length - 1],
      ['bytes=9990-20000', 9990, content.length - 1],
    ];
    for (const [range, start, end] of cases) {
      const res = await get({ range });
      expect([range, res.statusCode]).toEqual([range, 206]);
      expect(res.headers['content-range']).toBe(`bytes ${start}-${end}/${content.length}`);
      expect(res.headers['content-length']).toBe(String(end - start + 1));
      expect(res.rawPayload.equals(content.subarray(start, end + 1))).toBe(true);
    }
  });

  test('an unsatisfiable range is 416 with the size', async () => {
    for (const range of [`bytes=${content.length}-`, 'bytes=20000-20010', 'bytes=-0']) {
      const res = await get({ range });
      expect([range, res.statusCode]).toEqual([range, 416]);
      expect(res.headers['content-range']).toBe(`bytes */${content.length}`);
    }
  });

  test('several ranges or a malformed header get the whole file', async () => {
    for (const range of ['bytes=0-1,5-6', 'items=0-5', 'bytes=5-1']) {
      const res = await get({ range });
      expect([range, res.statusCode, res.rawPayload.length]).toEqual([range, 200, content.length]);
    }
  });

  test('If-None-Match gives 304; If-Range serves the range only for the same ETag', async () => {
    expect((await get({ 'if-none-match': `"${id}"` })).statusCode).toBe(304);
    expect((await get({ 'if-none-match': '"other"' })).statusCode).toBe(200);
    const same = await get({ range: 'bytes=0-9', 'if-range': `"${id}"` });
    expect(same.statusCode).toBe(206);
    const changed = await get({ range: 'bytes=0-9', 'if-range': '"0000"' });
    expect(changed.statusCode).toBe(200);
    expect(changed.rawPayload.length).toBe(content.length);
  });

  test('HEAD answers the headers without the bytes', async () => {
    const res = await get({ range: 'bytes=0-9' }, 'HEAD');
    expect(res.statusCode).toBe(206);
    expect(res.headers['content-range']).toBe(`bytes 0-9/${content.length}`);
    expect(res.headers['content-length']).toBe('10');
    expect(res.rawPayload.length).toBe(0);
    const whole = await get({}, 'HEAD');
    expect(whole.statusCode).toBe(200);
    expect(whole.headers).toMatchObject({ 'content-length': String(content.length), etag: `"${id}"`, 'accept-ranges': 'bytes' });
    expect(whole.rawPayload.length).toBe(0);
  });

  test('a base package downloads the same way', async () => {
    const pkg = Buffer.from('a base package, not really');
    const base = fake.addBase(['host-a'], pkg);
    const res = await app.inject({ url: `/v1/bases/${base.id}/package`, headers: AUTH });
    expect(res.statusCode).toBe(200);
    expect(res.rawPayload.equals(pkg)).toBe(true);
    const part = await app.inject({ url: `/v1/bases/${base.id}/package`, headers: { ...AUTH, range: 'bytes=2-5' } });
    expect(part.statusCode).toBe(206);
    expect(part.payload).toBe('base');
  });
});

describe('recipe schedules', () => {
  const recipe = { recipeId: 'web-app', hostId: 'host-a', baseId: 'd'.repeat(64), command: 'echo hi > /data/state', files: [{ path: '/data/x', content: 'y' }] };

  test('without a schedules backend the routes answer 501', async () => {
    const res = await app.inject({ url: '/v1/schedules', headers: AUTH });
    expect(res.statusCode).toBe(501);
    expect(errorOf(res).code).toBe('NOT_IMPLEMENTED');
  });

  test('create, list, trigger, pause, unpause and delete', async () => {
    const { FakeRecipeSchedules } = await import('../../src/service/fake');
    const withSchedules = await buildServer({ service: fake, schedules: new FakeRecipeSchedules(fake), tokens: [TOKEN] });
    const inject = (method: 'GET' | 'POST' | 'DELETE', url: string, payload?: object) =>
      withSchedules.inject({ method, url, headers: AUTH, ...(payload ? { payload } : {}) });
    try {
      const created = await inject('POST', '/v1/schedules', { recipe, every: '6h', note: 'nightly' });
      expect(created.statusCode).toBe(201);
      expect(created.headers.location).toBe('/v1/schedules/web-app');
      expect(created.json()).toMatchObject({ recipeId: 'web-app', scheduleId: 'recipe-web-app', every: '6h', paused: false, note: 'nightly', recipe });

      expect((await inject('POST', '/v1/schedules', { recipe, every: '6h' })).statusCode).toBe(409);
      const bad = await inject('POST', '/v1/schedules', { recipe: { ...recipe, recipeId: 'Web App' }, every: 'often' });
      expect(bad.statusCode).toBe(400);
      expect(errorOf(bad).issues?.map((i) => i.path.join('.')).sort()).toEqual(['body.every', 'body.recipe.recipeId']);
      // A rule only the service knows (at least 10 s) is still a 400.
      const tooOften = await inject('POST', '/v1/schedules', { recipe: { ...recipe, recipeId: 'other' }, every: '5s' });
      expect(tooOften.statusCode).toBe(400);
      expect(errorOf(tooOften).message).toContain('at least 10 s');

      const list = await inject('GET', '/v1/schedules');
      expect((list.json() as { schedules: Array<{ recipeId: string }> }).schedules.map((s) => s.recipeId)).toEqual(['web-app']);

      const trig = await inject('POST', '/v1/schedules/web-app/trigger');
      expect(trig.statusCode).toBe(202);
      const shown = (await inject('GET', '/v1/schedules/web-app')).json() as { recentRuns: Array<{ workflowId: string }> };
      expect(shown.recentRuns).toHaveLength(1);
      // The trigger names the rebuild it started, and points at its status.
      const started = shown.recentRuns[0]?.workflowId ?? '';
      expect(trig.json()).toEqual({ recipeId: 'web-app', scheduleUrl: '/v1/schedules/web-app', operation: { id: started, kind: 'rebuildOverlay' }, statusUrl: `/v1/operations/${encodeURIComponent(started)}` });
      expect(trig.headers.location).toBe(`/v1/operations/${encodeURIComponent(started)}`);
      const run = await inject('GET', `/v1/operations/${encodeURIComponent(shown.recentRuns[0]?.workflowId ?? '')}`);
      expect(OperationStatusSchema.parse(run.json())).toMatchObject({ kind: 'rebuildOverlay', hostId: 'host-a' });

      expect((await inject('POST', '/v1/schedules/web-app/pause')).statusCode).toBe(204);
      expect((await inject('GET', '/v1/schedules/web-app')).json()).toMatchObject({ paused: true });
      expect((await inject('POST', '/v1/schedules/web-app/unpause', { note: 'back on' })).statusCode).toBe(204);
      expect((await inject('GET', '/v1/schedules/web-app')).json()).toMatchObject({ paused: false, note: 'back on' });

      expect((await inject('DELETE', '/v1/schedules/web-app')).statusCode).toBe(204);
      expect((await inject('GET', '/v1/schedules/web-app')).statusCode).toBe(404);
      expect((await inject('POST', '/v1/schedules/web-app/trigger')).statusCode).toBe(404);
    } finally {
      await withSchedules.close();
    }
  });
});

describe('errors a Temporal-backed service may let through', () => {
  test('are mapped by name, and a service BAD_INPUT keeps its issues', async () => {
    const started = Object.assign(new Error('Workflow execution already started'), { name: 'WorkflowExecutionAlreadyStartedError' });
    jest.spyOn(fake, 'importBase').mockRejectedValueOnce(started);
    const res = await post('/v1/bases', { hostId: 'host-a', source: '/srv/base.pkg' });
    expect(res.statusCode).toBe(409);
    expect(errorOf(res).code).toBe('CONFLICT');

    const issues = [{ path: ['command'], message: 'Required', code: 'invalid_type' }];
    jest.spyOn(fake, 'importBase').mockRejectedValueOnce(new CloudletError('BAD_INPUT', 'invalid package', { details: { issues } }));
    const bad = await post('/v1/bases', { hostId: 'host-a', source: '/srv/base.pkg' });
    expect(bad.statusCode).toBe(400);
    expect(errorOf(bad).issues).toEqual(issues);
  });
});
