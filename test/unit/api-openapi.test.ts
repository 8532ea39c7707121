// ajv comes with fastify (its schema compiler): used here only to check the document.
import Ajv2020 from 'ajv/dist/2020';
import { buildOpenApi } from '../../src/api/openapi';
import { decideRange, etagMatches } from '../../src/api/range';
import { apiRoutes, buildServer } from '../../src/api/server';
import { FakeCloudletService } from '../../src/service/fake';

// See api-server.test.ts: light-my-request's `cookie` is an ES module jest cannot load on Node 20.
jest.mock('cookie', () => ({ stringifySetCookie: (n: string, v: string) => `${n}=${v}` }));

type Doc = {
  openapi: string;
  paths: Record<string, Record<string, { operationId: string; security: unknown[]; parameters: Array<{ name: string; in: string }>; requestBody?: unknown; responses: Record<string, unknown> }>>;
  components: { schemas: Record<string, unknown> };
};

describe('the OpenAPI document', () => {
  let doc: Doc;
  beforeAll(async () => {
    const fake = new FakeCloudletService();
    const app = await buildServer({ service: fake, tokens: ['openapi-test-token-123456'] });
    const res = await app.inject({ url: '/openapi.json' });
    expect(res.statusCode).toBe(200);
    expect(res.headers['content-type']).toContain('application/json');
    doc = JSON.parse(res.payload) as Doc;
    await app.close();
    fake.cleanup();
  });

  test('is OpenAPI 3.1 and lists every route with its method, once', () => {
    expect(doc.openapi).toBe('3.1.0');
    const listed = Object.entries(doc.paths).flatMap(([p, ops]) => Object.keys(ops).map((m) => `${m.toUpperCase()} ${p}`));
    const expected = [...apiRoutes.map((r) => `${r.method} ${r.path}`), 'GET /healthz', 'GET /metrics', 'GET /openapi.json'];
    expect(listed.sort()).toEqual(expected.sort());
    expect(listed).toEqual(
      expect.arrayContaining([
        'GET /v1/hosts',
        'POST /v1/bases',
        'GET /v1/bases',
        'GET /v1/bases/{id}',
        'GET /v1/bases/{id}/package',
        'POST /v1/bases/{id}/instances',
        'POST /v1/instances',
        'GET /v1/instances',
        'GET /v1/instances/{id}',
        'DELETE /v1/instances/{id}',
        'POST /v1/overlays',
        'GET /v1/overlays',
        'GET /v1/overlays/{id}',
        'GET /v1/overlays/{id}/content',
        'GET /v1/operations/{id}',
      ]),
    );
    const ids = Object.values(doc.paths).flatMap((ops) => Object.values(ops).map((o) => o.operationId));
    expect(new Set(ids).size).toBe(ids.length);
  });

  test('every $ref resolves to a component, and bodies come from the zod schemas', () => {
    const refs = [...JSON.stringify(doc).matchAll(/"\$ref":"([^"]+)"/g)].map((m) => m[1] ?? '');
    expect(refs.length).toBeGreaterThan(10);
    for (const ref of refs) {
      expect(ref).toMatch(/^#\/components\/schemas\//);
      expect(doc.components.schemas).toHaveProperty([ref.replace('#/components/schemas/', '')]);
    }
    const provision = doc.components.schemas.ProvisionRequest as { required: string[]; properties: Record<string, { type?: string; maximum?: number }>; additionalProperties: boolean };
    expect(provision.required.sort()).toEqual(['hostId', 'overlayUrl']);
    expect(provision.properties.waitForAppPort).toMatchObject({ type: 'integer', maximum: 65535 });
    expect(provision.additionalProperties).toBe(false);
    expect(doc.paths['/v1/instances']?.post?.requestBody).toEqual({ required: true, content: { 'application/json': { schema: { $ref: '#/components/schemas/ProvisionRequest' } } } });
  });

  test('security, path parameters and Idempotency-Key are declared', () => {
    expect(doc.paths['/healthz']?.get?.security).toEqual([]);
    expect(doc.paths['/v1/hosts']?.get?.security).toEqual([{ bearer: [] }]);
    expect(doc.paths['/v1/operations/{id}']?.get?.parameters).toEqual([expect.objectContaining({ name: 'id', in: 'path' })]);
    for (const [p, m] of [['/v1/bases', 'post'], ['/v1/instances', 'post'], ['/v1/instances/{id}', 'delete'], ['/v1/overlays', 'post'], ['/v1/bases/{id}/instances', 'post']] as const) {
      expect(doc.paths[p]?.[m]?.parameters.map((x) => `${x.in}:${x.name}`)).toContain('header:Idempotency-Key');
      expect(Object.keys(doc.paths[p]?.[m]?.responses ?? {})).toContain('202');
    }
    expect(Object.keys(doc.paths['/v1/overlays/{id}/content']?.get?.responses ?? {})).toEqual(expect.arrayContaining(['200', '206', '416']));
  });

  test('is the same document when built directly', () => {
    const again = buildOpenApi([...apiRoutes]) as Doc;
    expect(again.paths['/v1/overlays/{id}']).toEqual(doc.paths['/v1/overlays/{id}']);
  });
});

describe('what the API answers matches what the document says', () => {
  test('every JSON answer validates against its documented schema (JSON Schema 2020-12)', async () => {
    const fake = new FakeCloudletService();
    const token = 'openapi-test-token-123456';
    const app = await buildServer({ service: fake, tokens: [token] });
    const doc = JSON.parse((await app.inject({ url: '/openapi.json' })).payload) as Doc;
    const ajv = new Ajv2020({ strict: false, allErrors: true });
    ajv.addSchema({ $id: 'api', components: doc.components });
    for (const id of Object.keys(doc.components.schemas)) expect(ajv.getSchema(`api#/components/schemas/${id}`)).toBeDefined();

    const base = fake.addBase(['host-a']);
    const inst = fake.addInstance('host-a', base.id);
    const overlay = fake.addOverlay(base.id, Buffer.from('overlay bytes'), inst.id);
    const calls: Array<[method: 'GET' | 'POST' | 'DELETE', url: string, docPath: string, body?: object]> = [
      ['GET', '/v1/hosts', '/v1/hosts'],
      ['GET', '/v1/bases', '/v1/bases'],
      ['GET', `/v1/bases/${base.id}`, '/v1/bases/{id}'],
      ['GET', '/v1/bases/nope', '/v1/bases/{id}'],
      ['POST', '/v1/bases', '/v1/bases', { hostId: 'host-b', source: '/srv/b.pkg' }],
      ['POST', '/v1/bases', '/v1/bases', { hostId: 7 }],
      ['POST', `/v1/bases/${base.id}/instances`, '/v1/bases/{id}/instances', { hostId: 'host-a' }],
      ['POST', '/v1/instances', '/v1/instances', { hostId: 'host-b', overlayUrl: overlay.url }],
      ['POST', '/v1/instances', '/v1/instances', { hostId: 'host-x', overlayUrl: overlay.url }],
      ['GET', '/v1/instances', '/v1/instances'],
      ['GET', `/v1/instances/${inst.id}`, '/v1/instances/{id}'],
      ['POST', '/v1/overlays', '/v1/overlays', { instanceId: inst.id, keepInstance: true }],
      ['GET', '/v1/overlays', '/v1/overlays'],
      ['GET', `/v1/overlays/${overlay.id}`, '/v1/overlays/{id}'],
      ['DELETE', `/v1/instances/${inst.id}`, '/v1/instances/{id}'],
      ['DELETE', `/v1/instances/${inst.id}`, '/v1/instances/{id}'],
      ['GET', `/v1/operations/${encodeURIComponent(`terminateVm/host-a/${inst.id}`)}`, '/v1/operations/{id}'],
      ['GET', '/v1/hosts', '/v1/hosts'], // without a token: below
    ];
    let checked = 0;
    for (const [i, [method, url, docPath, body]] of calls.entries()) {
      const withToken = i < calls.length - 1;
      const res = await app.inject({ method, url, headers: withToken ? { authorization: `Bearer ${token}` } : {}, ...(body ? { payload: body } : {}) });
      const responses = doc.paths[docPath]?.[method.toLowerCase()]?.responses ?? {};
      expect([method, url, Object.keys(responses)]).toEqual([method, url, expect.arrayContaining([String(res.statusCode)])]);
      const content = (responses[String(res.statusCode)] as { content?: Record<string, { schema: object }> }).content;
      const schema = content?.['application/json']?.schema;
      expect(schema).toBeDefined();
      const validate = ajv.compile({ $id: `check-${i}`, ...(JSON.parse(JSON.stringify(schema).replace(/"#\/components/g, '"api#/components')) as object) });
      const ok = validate(res.json());
      expect([method, url, res.statusCode, ok ? 'valid' : ajv.errorsText(validate.errors)]).toEqual([method, url, res.statusCode, 'valid']);
      checked += 1;
    }
    expect(checked).toBe(calls.length);
    await app.close();
    fake.cleanup();
  });
});

describe('Range decisions', () => {
  test.each([
    [undefined, 100, { kind: 'full' }],
    ['bytes=0-0', 100, { kind: 'partial', start: 0, end: 0 }],
    ['bytes=10-19', 100, { kind: 'partial', start: 10, end: 19 }],
    ['bytes=90-200', 100, { kind: 'partial', start: 90, end: 99 }],
    ['bytes=95-', 100, { kind: 'partial', start: 95, end: 99 }],
    ['bytes=-10', 100, { kind: 'partial', start: 90, end: 99 }],
    ['bytes=-1000', 100, { kind: 'partial', start: 0, end: 99 }],
    ['BYTES = 1 - 2', 100, { kind: 'partial', start: 1, end: 2 }],
    ['bytes=100-', 100, { kind: 'unsatisfiable' }],
    ['bytes=100-150', 100, { kind: 'unsatisfiable' }],
    ['bytes=-0', 100, { kind: 'unsatisfiable' }],
    ['bytes=0-', 0, { kind: 'unsatisfiable' }],
    ['bytes=-5', 0, { kind: 'unsatisfiable' }],
    ['bytes=20-10', 100, { kind: 'full' }],
    ['bytes=0-1,3-4', 100, { kind: 'full' }],
    ['bytes=-', 100, { kind: 'full' }],
    ['pages=0-1', 100, { kind: 'full' }],
    ['bytes=abc', 100, { kind: 'full' }],
  ] as const)('%s of %i bytes', (header, size, expected) => {
    expect(decideRange(header, size)).toEqual(expected);
  });

  test('If-None-Match matches weakly, lists and *', () => {
    expect(etagMatches('"abc"', '"abc"')).toBe(true);
    expect(etagMatches('W/"abc"', '"abc"')).toBe(true);
    expect(etagMatches('"x", "abc"', '"abc"')).toBe(true);
    expect(etagMatches('*', '"abc"')).toBe(true);
    expect(etagMatches('"abd"', '"abc"')).toBe(false);
    expect(etagMatches(undefined, '"abc"')).toBe(false);
  });
});
