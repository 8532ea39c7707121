import type { FastifyInstance, LightMyRequestResponse } from 'fastify';
import { buildServer } from '../../src/api/server';
import { ErrorBodySchema } from '../../src/api/schemas';
import { CloudletError } from '../../src/core/errors';
import { neighbourView, parseNeighbourUrl, type NeighbourView } from '../../src/core/mobility/registry';
import { FakeCloudletService } from '../../src/service/fake';
import type { ClusterInfo, DeviceRttAnswer, Discovery, MobilityDecision, MobilityService, MobilityState, WatchRequest } from '../../src/service/mobility-types';
import { DEFAULT_MOBILITY_POLICY, mergePolicy, type MobilityPolicy } from '../../src/workflows/mobility-policy';

// fastify's inject (light-my-request) requires `cookie` 2, an ES module jest cannot load under
// Node 20; only its stringifySetCookie is used, and only for request cookies, which we never send.
jest.mock('cookie', () => ({
  stringifySetCookie: (name: string, value: string) => `${name}=${encodeURIComponent(value)}`,
}));

const TOKEN = 'test-token-0123456789abcdef';
const AUTH = { authorization: `Bearer ${TOKEN}` };
const KNOWN = 'i-known';
const APP = 'a'.repeat(64);
const NEIGHBOUR_TOKEN = 'neighbour-token-0123456789';

/** In-memory mobility: one instance (i-known), neighbours in a map, the policy merged like the workflow does. */
class FakeMobility implements MobilityService {
  readonly calls: Array<{ method: keyof MobilityService; args: unknown[] }> = [];
  private readonly neighbours = new Map<string, NeighbourView>();
  private policy: MobilityPolicy = { ...DEFAULT_MOBILITY_POLICY };
  private samples: number[] = [];

  constructor(private readonly allowedHosts: readonly string[]) {}

  private record(method: keyof MobilityService, ...args: unknown[]): void {
    this.calls.push({ method, args });
  }

  private requireKnown(instanceId: string): void {
    if (instanceId !== KNOWN) throw new CloudletError('NOT_FOUND', `instance ${instanceId} has no mobility controller`, { fix: 'list the instances with GET /v1/instances' });
  }

  private stateOf(): MobilityState {
    const t = Date.now();
    return {
      instanceId: KNOWN,
      hostId: 'host-a',
      baseId: 'b'.repeat(64),
      policy: this.policy,
      phase: 'watching',
      paused: false,
      cooldownUntil: 0,
      samples: this.samples.map((rttMs) => ({ rttMs, at: t, source: 'device' as const })),
      decisions: [],
      decisionCount: 0,
    };
  }

  async clusterInfo(): Promise<ClusterInfo> {
    this.record('clusterInfo');
    return { cluster: 'east', hosts: 2, servingHosts: 2 };
  }

  async addNeighbour(n: { name: string; apiUrl: string; token: string }): Promise<NeighbourView> {
    this.record('addNeighbour', n);
    const apiUrl = parseNeighbourUrl(n.apiUrl, this.allowedHosts);
    if (this.neighbours.has(n.name)) throw new CloudletError('CONFLICT', `a neighbour named ${n.name} exists`);
    const view = neighbourView({ name: n.name, apiUrl, addedAt: new Date().toISOString() }, Date.now(), 120_000);
    this.neighbours.set(n.name, view);
    return view;
  }

  async listNeighbours(): Promise<NeighbourView[]> {
    this.record('listNeighbours');
    return [...this.neighbours.values()];
  }

  async removeNeighbour(name: string): Promise<void> {
    this.record('removeNeighbour', name);
    if (!this.neighbours.delete(name)) throw new CloudletError('NOT_FOUND', `no neighbour named ${name}`);
  }

  async refreshNeighbours(): Promise<NeighbourView[]> {
    this.record('refreshNeighbours');
    return [...this.neighbours.values()];
  }

  async probeDevice(device: string, baseId?: string): Promise<DeviceRttAnswer> {
    this.record('probeDevice', device, baseId);
    return { cluster: 'east', device, rttMs: 3, minMs: 2, samples: [2, 3, 4], servingHosts: 2, ...(baseId ? { holdsBase: false } : {}) };
  }

  async reportRtt(instanceId: string, samples: number[], device?: string): Promise<MobilityState> {
    this.record('reportRtt', instanceId, samples, device);
    this.requireKnown(instanceId);
    this.samples.push(...samples);
    return this.stateOf();
  }

  async watch(instanceId: string, req: WatchRequest): Promise<MobilityState> {
    this.record('watch', instanceId, req);
    this.requireKnown(instanceId);
    return this.stateOf();
  }

  async state(instanceId: string): Promise<MobilityState> {
    this.record('state', instanceId);
    this.requireKnown(instanceId);
    return this.stateOf();
  }

  async setPolicy(instanceId: string, patch: Partial<MobilityPolicy>): Promise<MobilityPolicy> {
    this.record('setPolicy', instanceId, patch);
    this.requireKnown(instanceId);
    const r = mergePolicy(this.policy, patch);
    if ('error' in r) throw new CloudletError('BAD_INPUT', r.error);
    this.policy = r.policy;
    return r.policy;
  }

  async pause(instanceId: string, paused: boolean): Promise<MobilityState> {
    this.record('pause', instanceId, paused);
    this.requireKnown(instanceId);
    return { ...this.stateOf(), paused };
  }

  async moveNow(instanceId: string, neighbour?: string): Promise<MobilityDecision> {
    this.record('moveNow', instanceId, neighbour);
    this.requireKnown(instanceId);
    return { seq: 1, at: Date.now(), trigger: 'forced', thresholdMs: this.policy.thresholdMs, candidates: [], outcome: 'stay', why: 'no neighbour can take it' };
  }

  async stop(instanceId: string): Promise<void> {
    this.record('stop', instanceId);
    this.requireKnown(instanceId);
  }

  async discover(app: string, device: string, selfUrl: string): Promise<Discovery> {
    this.record('discover', app, device, selfUrl);
    return { app, baseId: 'b'.repeat(64), device, clusters: [], skipped: [] };
  }

  callsOf(method: keyof MobilityService): unknown[][] {
    return this.calls.filter((c) => c.method === method).map((c) => c.args);
  }
}

let service: FakeCloudletService;
let mobility: FakeMobility;
let app: FastifyInstance;

beforeEach(async () => {
  service = new FakeCloudletService();
  mobility = new FakeMobility(['*.example.org', '10.0.0.2']);
  app = await buildServer({ service, mobility, tokens: [TOKEN] });
});

afterEach(async () => {
  await app.close();
  service.cleanup();
});

const errorOf = (res: LightMyRequestResponse) => ErrorBodySchema.parse(res.json()).error;
const post = (url: string, payload?: unknown, on: FastifyInstance = app) =>
  on.inject({ method: 'POST', url, headers: AUTH, ...(payload !== undefined ? { payload: payload as object } : {}) });
const get = (url: string, on: FastifyInstance = app) => on.inject({ method: 'GET', url, headers: AUTH });

describe('RTT reports', () => {
  test('samples for a known instance reach the service', async () => {
    const res = await post(`/v1/instances/${KNOWN}/rtt`, { samples: [12.5, 0.01, 60_000], device: '10.0.0.7:7070' });
    expect(res.statusCode).toBe(200);
    expect(res.json()).toMatchObject({ instanceId: KNOWN, samples: [{ rttMs: 12.5 }, { rttMs: 0.01 }, { rttMs: 60_000 }] });
    expect(mobility.callsOf('reportRtt')).toEqual([[KNOWN, [12.5, 0.01, 60_000], '10.0.0.7:7070']]);
  });

  test('an unknown instance is 404', async () => {
    const res = await post('/v1/instances/i-unknown/rtt', { samples: [20] });
    expect(res.statusCode).toBe(404);
    expect(errorOf(res).code).toBe('NOT_FOUND');
    expect(mobility.callsOf('reportRtt')).toEqual([['i-unknown', [20], undefined]]);
  });

  test.each<[string, unknown]>([
    ['a negative sample', [-1]],
    ['a zero sample', [10, 0]],
    ['a sample above 60 s', [60_001]],
    ['a sample given as a string', ['NaN']],
    ['a numeric string', ['12']],
    ['null', [null]],
    ['no samples', []],
    ['101 samples', Array.from({ length: 101 }, () => 10)],
    ['not an array', 12],
  ])('%s is 400 and the service is not called', async (_what, samples) => {
    const res = await post(`/v1/instances/${KNOWN}/rtt`, { samples });
    expect(res.statusCode).toBe(400);
    const err = errorOf(res);
    expect(err.code).toBe('BAD_INPUT');
    expect(err.issues?.[0]?.path.slice(0, 2)).toEqual(['body', 'samples']);
    expect(mobility.calls).toHaveLength(0);
  });

  test('100 samples are accepted', async () => {
    const res = await post(`/v1/instances/${KNOWN}/rtt`, { samples: Array.from({ length: 100 }, (_, i) => i + 1) });
    expect(res.statusCode).toBe(200);
    expect(mobility.callsOf('reportRtt')[0]?.[1]).toHaveLength(100);
  });

  test('a bad device address, an unknown field or a bad instance id is 400 and the service is not called', async () => {
    for (const [url, body] of [
      [`/v1/instances/${KNOWN}/rtt`, { samples: [10], device: 'nohost' }],
      [`/v1/instances/${KNOWN}/rtt`, { samples: [10], device: 'h:123456' }],
      [`/v1/instances/${KNOWN}/rtt`, { samples: [10], extra: true }],
      ['/v1/instances/-bad/rtt', { samples: [10] }],
    ] as const) {
      const res = await post(url, body);
      expect([url, JSON.stringify(body), res.statusCode]).toEqual([url, JSON.stringify(body), 400]);
    }
    expect(mobility.calls).toHaveLength(0);
  });
});

describe('neighbours', () => {
  test('add, list and remove', async () => {
    const added = await post('/v1/neighbours', { name: 'west', apiUrl: 'https://west.example.org:8080/', token: NEIGHBOUR_TOKEN });
    expect(added.statusCode).toBe(201);
    expect(added.json()).toMatchObject({ name: 'west', apiUrl: 'https://west.example.org:8080', status: 'unmeasured' });
    expect(added.body).not.toContain(NEIGHBOUR_TOKEN);
    const listed = await get('/v1/neighbours');
    expect(listed.statusCode).toBe(200);
    expect((listed.json() as Array<{ name: string }>).map((n) => n.name)).toEqual(['west']);
    expect((await post('/v1/neighbours', { name: 'west', apiUrl: 'https://w2.example.org', token: NEIGHBOUR_TOKEN })).statusCode).toBe(409);
    expect((await app.inject({ method: 'DELETE', url: '/v1/neighbours/west', headers: AUTH })).statusCode).toBe(204);
    expect((await app.inject({ method: 'DELETE', url: '/v1/neighbours/west', headers: AUTH })).statusCode).toBe(404);
    expect((await app.inject({ method: 'DELETE', url: '/v1/neighbours/Not_A_Label', headers: AUTH })).statusCode).toBe(400);
  });

  test('a URL that is not http(s), has credentials or a query is 400 (from the service)', async () => {
    for (const apiUrl of ['ftp://west.example.org', 'west.example.org', 'https://u:p@west.example.org', 'https://west.example.org/?a=1']) {
      const res = await post('/v1/neighbours', { name: 'west', apiUrl, token: NEIGHBOUR_TOKEN });
      expect([apiUrl, res.statusCode, errorOf(res).code]).toEqual([apiUrl, 400, 'BAD_INPUT']);
    }
    expect(mobility.callsOf('addNeighbour')).toHaveLength(4);
    expect((await get('/v1/neighbours')).json()).toEqual([]);
  });

  test('a host outside the allow-list is 403', async () => {
    const res = await post('/v1/neighbours', { name: 'west', apiUrl: 'https://west.evil.net', token: NEIGHBOUR_TOKEN });
    expect(res.statusCode).toBe(403);
    expect(errorOf(res).code).toBe('FORBIDDEN');
    expect(errorOf(res).message).toContain('west.evil.net');
    expect((await post('/v1/neighbours', { name: 'ip', apiUrl: 'http://10.0.0.2:8080', token: NEIGHBOUR_TOKEN })).statusCode).toBe(201);
  });

  test('a short token, a bad name, an unknown field or a missing field is 400 before the service', async () => {
    for (const body of [
      { name: 'west', apiUrl: 'https://west.example.org', token: 'short' },
      { name: 'West', apiUrl: 'https://west.example.org', token: NEIGHBOUR_TOKEN },
      { name: 'west', apiUrl: 'https://west.example.org', token: NEIGHBOUR_TOKEN, extra: 1 },
      { name: 'west', apiUrl: '', token: NEIGHBOUR_TOKEN },
      { name: 'west', token: NEIGHBOUR_TOKEN },
    ]) {
      const res = await post('/v1/neighbours', body);
      expect([JSON.stringify(body), res.statusCode]).toEqual([JSON.stringify(body), 400]);
    }
    expect(mobility.calls).toHaveLength(0);
    const short = errorOf(await post('/v1/neighbours', { name: 'west', apiUrl: 'https://west.example.org', token: 'x'.repeat(15) }));
    expect(short.issues?.map((i) => i.path.join('.'))).toEqual(['body.token']);
  });
});

describe('policy', () => {
  test('a valid patch is merged and returned', async () => {
    const res = await post(`/v1/instances/${KNOWN}/mobility/policy`, { thresholdMs: 60, cooldownMs: 0 });
    expect(res.statusCode).toBe(200);
    expect(res.json()).toEqual({ ...DEFAULT_MOBILITY_POLICY, thresholdMs: 60, cooldownMs: 0 });
  });

  test('an unknown field or a value out of range is 400 before the service', async () => {
    for (const body of [{ threshold: 60 }, { thresholdMs: 0 }, { thresholdMs: 10_001 }, { window: 101 }, { minGainRatio: 0.96 }, { checkIntervalMs: 199 }, { thresholdMs: '60' }, { cooldownMs: -1 }]) {
      const res = await post(`/v1/instances/${KNOWN}/mobility/policy`, body);
      expect([JSON.stringify(body), res.statusCode]).toEqual([JSON.stringify(body), 400]);
    }
    expect(mobility.calls).toHaveLength(0);
  });

  test('a cross-field error found by the service is 400 too; an unknown instance 404', async () => {
    const res = await post(`/v1/instances/${KNOWN}/mobility/policy`, { hysteresisMs: 50 });
    expect(res.statusCode).toBe(400);
    expect(errorOf(res).message).toContain('policy.hysteresisMs (50) must be below policy.thresholdMs (40)');
    expect((await post('/v1/instances/i-unknown/mobility/policy', { thresholdMs: 60 })).statusCode).toBe(404);
  });

  test('the watch body checks its embedded policy the same way', async () => {
    expect((await post(`/v1/instances/${KNOWN}/mobility`, { policy: { window: 0 } })).statusCode).toBe(400);
    expect((await post(`/v1/instances/${KNOWN}/mobility`, { cooldownMs: 1.5 })).statusCode).toBe(400);
    expect(mobility.calls).toHaveLength(0);
    expect((await post(`/v1/instances/${KNOWN}/mobility`)).statusCode).toBe(200);
    expect(mobility.callsOf('watch')).toEqual([[KNOWN, {}]]);
  });
});

describe('discover', () => {
  const device = '10.0.0.7:7070';

  test('a valid query reaches the service with this API\'s own URL', async () => {
    const res = await get(`/v1/discover?app=${APP}&device=${encodeURIComponent(device)}`);
    expect(res.statusCode).toBe(200);
    expect(res.json()).toMatchObject({ app: APP, device });
    const [args] = mobility.callsOf('discover');
    expect(args?.slice(0, 2)).toEqual([APP, device]);
    expect(args?.[2]).toMatch(/^http:\/\/[^/]+$/);
  });

  test('without app, with a bad app or a bad device it is 400 naming the parameter', async () => {
    const cases: Array<[string, string]> = [
      [`/v1/discover?device=${device}`, 'query.app'],
      [`/v1/discover?app=${APP}`, 'query.device'],
      [`/v1/discover?app=${APP}&device=nohost`, 'query.device'],
      [`/v1/discover?app=${APP}&device=h:1234567`, 'query.device'],
      [`/v1/discover?app=${'A'.repeat(64)}&device=${device}`, 'query.app'],
      [`/v1/discover?app=${APP}&device=${device}&extra=1`, 'query'],
    ];
    for (const [url, where] of cases) {
      const res = await get(url);
      expect([url, res.statusCode]).toEqual([url, 400]);
      expect([url, errorOf(res).issues?.map((i) => i.path.join('.'))]).toEqual([url, [where]]);
    }
    expect(mobility.calls).toHaveLength(0);
  });

  test('the OpenAPI document lists /v1/discover with its query parameters', async () => {
    const doc = (await app.inject({ url: '/openapi.json' })).json() as { paths: Record<string, Record<string, { parameters?: Array<{ name: string; in: string; required: boolean; schema: { pattern?: string } }> }>> };
    const params = doc.paths['/v1/discover']?.get?.parameters ?? [];
    expect(params.map((p) => [p.name, p.in, p.required])).toEqual([
      ['app', 'query', true],
      ['device', 'query', true],
    ]);
    // app: an overlay or base id (sha256) or a recipe id.
    expect(JSON.stringify(params[0]?.schema)).toContain('^[0-9a-f]{64}$');
    // The other mobility routes are there too.
    for (const p of ['/v1/neighbours', '/v1/neighbours/{name}', '/v1/instances/{id}/rtt', '/v1/instances/{id}/mobility/policy', '/v1/rtt-probes', '/v1/cluster']) {
      expect([p, p in doc.paths]).toEqual([p, true]);
    }
  });
});

describe('without a mobility service', () => {
  test('the routes answer 501 (after validation and authentication)', async () => {
    const bare = await buildServer({ service, tokens: [TOKEN] });
    try {
      const answers = [
        await get('/v1/cluster', bare),
        await get('/v1/neighbours', bare),
        await post('/v1/neighbours', { name: 'west', apiUrl: 'https://west.example.org', token: NEIGHBOUR_TOKEN }, bare),
        await post(`/v1/instances/${KNOWN}/rtt`, { samples: [10] }, bare),
        await get(`/v1/instances/${KNOWN}/mobility`, bare),
        await post(`/v1/instances/${KNOWN}/mobility/policy`, { thresholdMs: 60 }, bare),
        await post('/v1/rtt-probes', { device: '10.0.0.7:7070' }, bare),
        await get(`/v1/discover?app=${APP}&device=10.0.0.7:7070`, bare),
      ];
      expect(answers.map((r) => r.statusCode)).toEqual(answers.map(() => 501));
      expect(answers.map((r) => errorOf(r).code)).toEqual(answers.map(() => 'NOT_IMPLEMENTED'));
      expect((await bare.inject({ url: '/v1/neighbours' })).statusCode).toBe(401);
    } finally {
      await bare.close();
    }
  });

  test('mobility routes need the bearer token', async () => {
    expect((await app.inject({ url: '/v1/neighbours' })).statusCode).toBe(401);
    expect((await app.inject({ method: 'POST', url: `/v1/instances/${KNOWN}/rtt`, payload: { samples: [1] } })).statusCode).toBe(401);
    expect(mobility.calls).toHaveLength(0);
  });
});
