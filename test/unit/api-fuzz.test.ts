/**
 * Issue #15, "Bad input at every edge": a schema-driven fuzz of the HTTP API.
 *
 * The routes come from the server's own OpenAPI document (GET /openapi.json). For every route and
 * method a seeded PRNG makes RANDOM_CASES requests: valid ones, and bad or boundary ones (wrong
 * JSON types, missing required fields, unknown fields, huge strings, out-of-range and non-finite
 * numbers, empty and non-JSON bodies, other media types, odd path parameters, garbage query
 * strings, wrong methods, missing or garbage credentials, odd headers). Beside them, up to
 * SYSTEMATIC_CASES that no random draw should miss: every edge value of every patterned field and
 * parameter, a wrong type in every field, and a deeply nested unknown field in every object.
 * Every answer must hold:
 *
 *  - no 5xx (501 only on a route whose backend the server runs without);
 *  - a status the route documents, or a generic one (400, 401, 404, 405, 413, 415);
 *  - a 4xx body that is the API's Error schema (error.code, error.message, error.requestId);
 *  - a refused request (4xx) changed nothing: when the API itself refused it (validation, auth,
 *    media type, size, no route) no mutating backend call was made at all; when a backend refused
 *    it, the backend's mutating call is the one that threw (reads: methods starting with get/list,
 *    plus the few read-only ones in READ_METHODS);
 *  - a wrong or missing bearer token is 401 before any backend call.
 *
 * Two servers: "bare", over the fake backends only (FakeCloudletService and FakeRecipeSchedules;
 * without handoff and mobility backends, so those routes answer 501), and "stubbed", which adds
 * recording stand-ins for the handoff and mobility backends so those routes are exercised past
 * the 501.
 * Each route gets a fresh world (server, fake, a base, an overlay, an instance, a running
 * operation, a recipe schedule) and its own seed, derived from SEED and the route, so a finding
 * replays on its own. Set CLOUDLET_FUZZ_SEED to explore other seeds.
 *
 * A bug the fuzz finds is listed in KNOWN_BUGS until it is fixed (the sweep sets its findings
 * aside) and gets a replay at the end of this file (`test.failing` until fixed, then a plain test).
 */
import type { FastifyInstance, InjectOptions, LightMyRequestResponse } from 'fastify';
import { buildServer } from '../../src/api/server';
import { ErrorBodySchema } from '../../src/api/schemas';
import { CloudletError } from '../../src/core/errors';
import { FakeCloudletService, FakeRecipeSchedules } from '../../src/service/fake';
import type { HandoffService } from '../../src/service/handoff-types';
import type { MobilityService } from '../../src/service/mobility-types';
import type { RecipeScheduleApi } from '../../src/service/schedule-types';
import { prng } from './overlay-fixture';
import { mintToken, SqliteClusterCatalog } from '../../src/core/cluster-catalog';

// fastify's inject (light-my-request) requires `cookie` 2, an ES module jest cannot load under
// Node 20; only its stringifySetCookie is used, and only for request cookies, which we never send.
jest.mock('cookie', () => ({
  stringifySetCookie: (name: string, value: string) => `${name}=${encodeURIComponent(value)}`,
}));

const TOKEN = 'test-token-0123456789abcdef';
const AUTH = { authorization: `Bearer ${TOKEN}` };
/** The handoff ticket the stand-in handoff backend accepts. */
const TICKET = 'ticket-fuzz-0123456789abcdef';
const SEED = Number(process.env.CLOUDLET_FUZZ_SEED ?? 0x15);
if (!Number.isSafeInteger(SEED)) throw new Error(`CLOUDLET_FUZZ_SEED must be an integer, not ${process.env.CLOUDLET_FUZZ_SEED}`);
const RANDOM_CASES = 56;
const SYSTEMATIC_CASES = 40;
/** Statuses any route may answer: malformed, unauthenticated, no such route/method, too large, media type. */
const GENERIC = [400, 401, 404, 405, 413, 415];
const HUGE = 'x'.repeat(100 * 1024);
/** Nesting deep enough to overflow a recursive walk (structuredClone, JSON.stringify) but under the 64 KiB body limit. */
const DEEP_DEPTH = 10_000;
/** Backend methods that only read, beside those whose name starts with get or list. */
const READ_METHODS = new Set(['basePackageFile', 'overlayFile', 'clusterInfo', 'state', 'status', 'probeDevice', 'discover']);
/** Tags whose backend the bare server runs without (their routes answer 501 there). */
const OPTIONAL_BACKENDS = new Set(['handoff', 'mobility', 'tenants']);
const FAMILIES = ['meta', 'hosts', 'bases', 'instances', 'overlays', 'operations', 'schedules', 'handoff', 'mobility', 'tenants'] as const;

// ---- JSON values, with raw tokens JSON.stringify cannot make (1e400, -0, a lone surrogate...) --------

class Raw {
  constructor(readonly text: string) {}
}
type Json = null | boolean | number | string | Raw | Json[] | { [k: string]: Json };
type Path = Array<string | number>;

function serialize(v: Json): string {
  const raws: Raw[] = [];
  const s = JSON.stringify(v, (_k, x: unknown) => (x instanceof Raw ? `@@raw${raws.push(x) - 1}@@` : x));
  return s.replace(/"@@raw(\d+)@@"/g, (_m, i: string) => raws[Number(i)]?.text ?? 'null');
}

function isObj(v: Json | undefined): v is { [k: string]: Json } {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Raw);
}

/** Own property, even for "__proto__" (plain assignment would set the prototype). */
function define(o: Record<string, Json>, k: string, v: Json): void {
  Object.defineProperty(o, k, { value: v, enumerable: true, writable: true, configurable: true });
}

function clone(v: Json): Json {
  if (Array.isArray(v)) return v.map(clone);
  if (isObj(v)) {
    const o: Record<string, Json> = {};
    for (const [k, x] of Object.entries(v)) define(o, k, clone(x));
    return o;
  }
  return v;
}

function setAt(root: Json, path: Path, value: Json): Json {
  if (path.length === 0) return value;
  const out = clone(root);
  let cur: Json = out;
  for (const p of path.slice(0, -1)) cur = (Array.isArray(cur) ? cur[Number(p)] : isObj(cur) ? cur[String(p)] : null) ?? null;
  const last = path[path.length - 1] ?? '';
  if (Array.isArray(cur)) cur[Number(last)] = value;
  else if (isObj(cur)) define(cur, String(last), value);
  return out;
}

function deleteAt(root: Json, path: Path): Json {
  const out = clone(root);
  let cur: Json = out;
  for (const p of path.slice(0, -1)) cur = (Array.isArray(cur) ? cur[Number(p)] : isObj(cur) ? cur[String(p)] : null) ?? null;
  const last = path[path.length - 1];
  if (isObj(cur) && last !== undefined) delete cur[String(last)];
  return out;
}

const deep = (depth: number) => new Raw('['.repeat(depth) + ']'.repeat(depth));
const deepObject = (depth: number) => new Raw('{"a":'.repeat(depth) + '1' + '}'.repeat(depth));

// ---- the PRNG ----------------------------------------------------------------------------------

class Rng {
  private readonly next: () => number;
  constructor(seed: number) {
    this.next = prng(seed);
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  pick<T>(xs: readonly T[]): T {
    if (xs.length === 0) throw new Error('pick from an empty list');
    return xs[this.int(xs.length)] as T;
  }
}

function hash(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

// ---- the OpenAPI document as routes ---------------------------------------------------------------

interface JsonSchema {
  $ref?: string;
  type?: string;
  enum?: Json[];
  const?: Json;
  anyOf?: JsonSchema[];
  properties?: Record<string, JsonSchema>;
  required?: string[];
  additionalProperties?: boolean | JsonSchema;
  items?: JsonSchema;
  minItems?: number;
  maxItems?: number;
  minLength?: number;
  maxLength?: number;
  minimum?: number;
  maximum?: number;
  exclusiveMinimum?: number;
  exclusiveMaximum?: number;
  pattern?: string;
  format?: string;
}

interface Param {
  name: string;
  in: 'path' | 'query' | 'header';
  required: boolean;
  schema: JsonSchema;
}

interface ApiRoute {
  method: 'GET' | 'POST' | 'DELETE';
  path: string;
  key: string;
  tag: string;
  codes: number[];
  /** Needs the API's bearer token. */
  bearer: boolean;
  /** Takes a handoff ticket as its bearer token instead (no API security, but a documented 401). */
  ticket: boolean;
  pathParams: Param[];
  queryParams: Param[];
  idempotent: boolean;
  body?: { schema: JsonSchema; required: boolean };
  regex: RegExp;
}

interface OpenApiDoc {
  paths: Record<string, Record<string, { tags: string[]; parameters: Param[]; responses: Record<string, unknown>; security: unknown[]; requestBody?: { required: boolean; content: Record<string, { schema: JsonSchema }> } }>>;
  components: { schemas: Record<string, JsonSchema> };
}

let doc: OpenApiDoc;
let routes: ApiRoute[];

function resolve(s: JsonSchema): JsonSchema {
  let cur = s;
  for (let i = 0; cur.$ref !== undefined && i < 10; i++) {
    const id = cur.$ref.replace('#/components/schemas/', '');
    const next = doc.components.schemas[id];
    if (!next) throw new Error(`unresolved $ref ${cur.$ref}`);
    cur = next;
  }
  return cur;
}

function routesOf(d: OpenApiDoc): ApiRoute[] {
  const out: ApiRoute[] = [];
  for (const [path, ops] of Object.entries(d.paths)) {
    for (const [m, op] of Object.entries(ops)) {
      const params = op.parameters ?? [];
      const pathParams = params.filter((p) => p.in === 'path');
      const codes = Object.keys(op.responses).filter((c) => c !== 'default').map(Number);
      // A path parameter without a pattern at the end is a wildcard (as /v1/operations/{id} is: ids hold slashes).
      const regex = new RegExp(
        '^' +
          path.replace(/\{(\w+)\}/g, (_x, name: string) => {
            const p = pathParams.find((q) => q.name === name);
            const last = path.endsWith(`{${name}}`);
            return last && p?.schema.pattern === undefined ? '.+' : '[^/]+';
          }) +
          '$',
      );
      const body = op.requestBody?.content['application/json']?.schema;
      out.push({
        method: m.toUpperCase() as ApiRoute['method'],
        path,
        key: `${m.toUpperCase()} ${path}`,
        tag: op.tags[0] ?? '',
        codes,
        bearer: op.security.length > 0,
        ticket: op.security.length === 0 && codes.includes(401),
        pathParams,
        queryParams: params.filter((p) => p.in === 'query'),
        idempotent: params.some((p) => p.in === 'header' && p.name === 'Idempotency-Key'),
        ...(body ? { body: { schema: body, required: op.requestBody?.required ?? false } } : {}),
        regex,
      });
    }
  }
  return out;
}

/** The routes a request reaches (HEAD is GET's), matched on its raw (still percent-encoded) path. */
function routesMatching(method: string, pathname: string): ApiRoute[] {
  const m = method === 'HEAD' ? 'GET' : method;
  return routes.filter((r) => r.method === m && r.regex.test(pathname));
}

// ---- the world a route is fuzzed in ------------------------------------------------------------

interface BackendCall {
  backend: string;
  method: string;
  /** The error code (or name) it threw; undefined when it returned. */
  error?: string;
}

type Variant = 'bare' | 'stubbed';

interface World {
  variant: Variant;
  app: FastifyInstance;
  fake: FakeCloudletService;
  /** Every call the server made to a backend, with how it ended. */
  log: BackendCall[];
  ids: { base: string; overlay: string; overlayUrl: string; instance: string; operation: string; recipe: string; token: string };
  /** For fresh names (a recipe id no schedule has yet). */
  seq: number;
}

function isRead(method: string): boolean {
  return /^(get|list)/.test(method) || READ_METHODS.has(method);
}

function codeOf(e: unknown): string {
  if (e instanceof CloudletError) return e.code;
  return e instanceof Error ? e.name : String(e);
}

/** `target` with every method call logged (with its outcome); methods run on the target itself. */
function recording<T extends object>(backend: string, target: T, log: BackendCall[]): T {
  return new Proxy(target, {
    get(t, prop, receiver) {
      const v: unknown = Reflect.get(t, prop, receiver);
      if (typeof v !== 'function' || typeof prop !== 'string') return v;
      return (...args: unknown[]) => {
        const entry: BackendCall = { backend, method: prop };
        log.push(entry);
        try {
          const r: unknown = (v as (...a: unknown[]) => unknown).apply(t, args);
          if (r instanceof Promise) {
            return r.catch((e: unknown) => {
              entry.error = codeOf(e);
              throw e;
            });
          }
          return r;
        } catch (e) {
          entry.error = codeOf(e);
          throw e;
        }
      };
    },
  });
}

const MOBILITY_METHODS: Record<keyof MobilityService, true> = {
  clusterInfo: true, addNeighbour: true, listNeighbours: true, removeNeighbour: true, refreshNeighbours: true, probeDevice: true, reportRtt: true,
  watch: true, state: true, setPolicy: true, pause: true, moveNow: true, stop: true, discover: true,
};
const HANDOFF_METHODS: Record<keyof HandoffService, true> = {
  beginReceive: true, baseArrived: true, roundArrived: true, complete: true, status: true, abort: true, handoffInstance: true, listTickets: true, revokeTicket: true,
};

/** A stand-in backend: every method answers at once; the ticket methods of a handoff want TICKET. */
function standIn<T>(methods: Record<string, true>, answer: (method: string, args: unknown[]) => unknown): T {
  const o: Record<string, (...args: unknown[]) => Promise<unknown>> = {};
  for (const m of Object.keys(methods)) o[m] = async (...args: unknown[]) => answer(m, args);
  return o as unknown as T;
}

function standInHandoffs(): HandoffService {
  return standIn<HandoffService>(HANDOFF_METHODS, (m, args) => {
    if (m === 'handoffInstance') return { id: `handoffVm/host-a/${String(args[0])}`, kind: 'handoffVm' };
    if (m === 'listTickets') return [];
    // The stand-in issued one ticket, for handoff ho-fuzz-1.
    if (m === 'revokeTicket') {
      if (args[0] !== 'ho-fuzz-1') throw new CloudletError('NOT_FOUND', `no ticket for handoff ${String(args[0])}`);
      return { handoffId: 'ho-fuzz-1', hostId: 'host-a', instanceId: 'i-1', createdAt: '2026-12-04T00:00:00.000Z', expiresAt: '2026-12-04T00:30:00.000Z', endedAt: '2026-12-04T00:01:00.000Z', ended: 'revoked', state: 'revoked' };
    }
    if (m !== 'beginReceive' && args[0] !== TICKET) throw new CloudletError('UNAUTHORIZED', 'not a ticket this cluster issued');
    return { standIn: m };
  });
}

function standInMobility(): MobilityService {
  return standIn<MobilityService>(MOBILITY_METHODS, (m) => (m === 'stop' || m === 'removeNeighbour' ? undefined : { standIn: m }));
}

const worlds: World[] = [];

async function makeWorld(variant: Variant): Promise<World> {
  const fake = new FakeCloudletService();
  const base = fake.addBase(['host-a'], Buffer.from('fuzz base package'));
  const overlay = fake.addOverlay(base.id, Buffer.from('fuzz overlay content '.repeat(64)));
  const instance = fake.addInstance('host-a', base.id);
  const operation = await fake.importBase({ hostId: 'host-b', source: '/srv/fuzz-running.pkg' });
  const schedules = new FakeRecipeSchedules(fake);
  await schedules.create({ recipeId: 'fuzz-recipe', hostId: 'host-a', baseId: base.id, command: 'true' }, { every: '6h' });
  fake.calls.length = 0; // the setup's calls are not the fuzz's
  const log: BackendCall[] = [];
  // The stubbed server has a cluster catalog with one minted token (for the token routes).
  const catalog = new SqliteClusterCatalog(':memory:');
  const token = (await catalog.addToken(mintToken('fuzz-tenant', 'member', 'fuzz').record)).id;
  const app = await buildServer({
    service: recording('service', fake, log),
    schedules: recording<RecipeScheduleApi>('schedules', schedules, log),
    ...(variant === 'stubbed' ? { handoffs: recording('handoffs', standInHandoffs(), log), mobility: recording('mobility', standInMobility(), log), catalog } : {}),
    tokens: [TOKEN],
  });
  const w: World = {
    variant,
    app,
    fake,
    log,
    ids: { base: base.id, overlay: overlay.id, overlayUrl: overlay.url, instance: instance.id, operation: operation.id, recipe: 'fuzz-recipe', token },
    seq: 0,
  };
  worlds.push(w);
  return w;
}

async function closeWorld(w: World): Promise<void> {
  await w.app.close();
  w.fake.cleanup();
  worlds.splice(worlds.indexOf(w), 1);
}

function backendAbsent(w: World, r: ApiRoute): boolean {
  return w.variant === 'bare' && OPTIONAL_BACKENDS.has(r.tag);
}

// ---- examples: what the JSON Schema cannot say (patterns, refinements, known ids) ---------------------

interface Examples {
  valid: (w: World) => string[];
  /** Values at or past the pattern's edges. */
  edge: string[];
}

/** By pattern, exactly as the document spells it. A new pattern without an entry fails the first test. */
const PATTERNS: Record<string, Examples> = {
  // host ids, neighbour names (DNS labels)
  '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$': {
    valid: () => ['host-a', 'host-b', 'host-zz', 'west'],
    edge: ['-a', 'a-', 'Host-A', 'a'.repeat(63), 'a'.repeat(64), 'a_b', 'a.b', '0', 'host-a\n', 'hóst'],
  },
  // sha256 ids (bases, overlays, fingerprints)
  '^[0-9a-f]{64}$': {
    valid: (w) => [w.ids.base, w.ids.overlay, '0'.repeat(64)],
    edge: ['a'.repeat(63), 'a'.repeat(65), 'A'.repeat(64), 'g'.repeat(64), ` ${'a'.repeat(64)}`, `${'a'.repeat(64)}\n`],
  },
  // instance ids
  '^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$': {
    valid: (w) => [w.ids.instance, 'inst-ffff', 'I.known_1'],
    edge: ['.', '-x', '_x', 'a'.repeat(128), 'a'.repeat(129), 'a/b', 'a b', 'a\u0000'],
  },
  // Idempotency-Key
  '^[A-Za-z0-9_-]{1,64}$': {
    valid: () => ['fuzz-key-1', 'fuzz-key-2', 'K_'.repeat(32)],
    edge: ['', 'a'.repeat(65), 'has space', 'semi;colon', 'é', '%00', 'a.b'],
  },
  // recipe ids
  '^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$': {
    // The first is fresh each time: a recipe no schedule has yet.
    valid: (w) => [`r-${(w.seq += 1)}`, w.ids.recipe, 'other-recipe'],
    edge: ['-r', 'r-', 'R', 'a'.repeat(40), 'a'.repeat(41), 'r_1'],
  },
  // recipe schedule intervals
  '^\\d{1,7}\\s*(s|m|h|d)$': {
    valid: () => ['6h', '10s', '30m', '1d', '10 s'],
    edge: ['0s', '9s', '-1h', '6', 'h', '6w', '6hh', ' 6h', '6h ', '6.5h', '１h', `${'9'.repeat(20)}d`, `${'9'.repeat(400)}s`],
  },
  // tenant names
  '^[a-z0-9][a-z0-9-]{0,62}$': {
    valid: () => ['acme', 'tenant-2', '0'],
    edge: ['-a', 'Acme', 'a'.repeat(63), 'a'.repeat(64), 'a_b', 'a.b', '', 'acme\n', 'ácme'],
  },
  // token ids
  '^[0-9a-f]{8}$': {
    valid: (w) => [w.ids.token, '0123abcd', 'ffffffff'],
    edge: ['0123abc', '0123abcde', '0123ABCD', 'g1234567', ''],
  },
  // handoff ids
  '^ho-[a-z0-9-]{1,78}$': {
    valid: () => ['ho-fuzz-1', 'ho-x'],
    edge: ['ho-', 'HO-x', `ho-${'a'.repeat(78)}`, `ho-${'a'.repeat(79)}`, 'ho-a_b', 'x-ho-1'],
  },
  // device addresses (host:port of an RTT responder)
  '^(\\[[0-9A-Fa-f:.]+\\]|[A-Za-z0-9.-]+):\\d{1,5}$': {
    valid: () => ['10.0.0.9:7777', '[::1]:7', 'phone.local:65535'],
    edge: ['10.0.0.9:99999', '10.0.0.9:0', ':80', 'host:', '[::1]', 'a:1', '[zz]:1', 'h:123456', '10.0.0.9:7777\n', `${'a'.repeat(300)}:1`],
  },
};

/** Strings without a pattern whose schema cannot say what a valid one is (refinements, or ids we know). */
const NAMED: Record<string, (w: World) => string[]> = {
  source: () => ['/srv/fuzz.pkg', 'https://example.invalid/base.pkg'],
  overlayUrl: (w) => [w.ids.overlayUrl, 'http://127.0.0.1:1/overlays/none.overlay'],
  apiUrl: () => ['https://west.example.invalid:8080'],
  token: () => ['neighbour-token-0123456789'],
};

/** Path parameters without a pattern: the operation id (given encoded in one segment, as statusUrl does). */
const NAMED_PATH: Record<string, (w: World) => string[]> = {
  id: (w) => [encodeURIComponent(w.ids.operation), encodeURIComponent('synthesizeVm/host-b/none')],
};

function fitLength(s: string, schema: JsonSchema): string {
  let out = s;
  while (out.length < (schema.minLength ?? 0)) out += 'x';
  return schema.maxLength !== undefined ? out.slice(0, schema.maxLength) : out;
}

function validStrings(s: JsonSchema, name: string, w: World): string[] {
  if (s.pattern !== undefined) {
    const ex = PATTERNS[s.pattern];
    if (!ex) throw new Error(`no examples for the pattern ${s.pattern} (field ${name}): add them to PATTERNS`);
    return ex.valid(w);
  }
  const named = NAMED[name];
  if (named) return named(w);
  if (s.format === 'uri') return ['http://127.0.0.1:1/fuzz'];
  return [fitLength('fuzz-text', s)];
}

function typical(s: JsonSchema): number {
  const lo = s.minimum ?? (s.exclusiveMinimum !== undefined ? s.exclusiveMinimum + 1 : undefined);
  const hi = s.maximum ?? (s.exclusiveMaximum !== undefined ? s.exclusiveMaximum - 1 : undefined);
  return Math.min(hi ?? 1, Math.max(lo ?? 1, 1));
}

/**
 * A value of `schema` that passes the API's validation. `first`: the first examples and every
 * optional field (deterministic); otherwise random choices, optional fields half the time.
 */
function valid(schema: JsonSchema, name: string, w: World, rng: Rng | 'first'): Json {
  const s = resolve(schema);
  const pick = <T>(xs: readonly T[]): T => (rng === 'first' ? (xs[0] as T) : rng.pick(xs));
  if (s.const !== undefined) return s.const;
  if (s.enum) return pick(s.enum);
  if (s.anyOf) return valid(pick(s.anyOf), name, w, rng);
  switch (s.type) {
    case 'string':
      return pick(validStrings(s, name, w));
    case 'integer':
    case 'number': {
      const t = typical(s);
      if (rng === 'first') return t;
      const lo = s.minimum ?? (s.exclusiveMinimum !== undefined ? s.exclusiveMinimum + (s.type === 'integer' ? 1 : 0.001) : -1000);
      const hi = s.maximum ?? (s.exclusiveMaximum !== undefined ? s.exclusiveMaximum - 1 : 1000);
      const between = lo + (Math.min(hi, lo + 1_000_000) - lo) * rng.int(1000) / 1000;
      return rng.pick([t, lo, hi, s.type === 'integer' ? Math.floor(between) : between]);
    }
    case 'boolean':
      return rng === 'first' ? true : rng.chance(0.5);
    case 'array': {
      const n = rng === 'first' ? Math.max(1, s.minItems ?? 0) : (s.minItems ?? 0) + rng.int(Math.min(3, (s.maxItems ?? 3) - (s.minItems ?? 0)) + 1);
      return Array.from({ length: n }, () => valid(s.items ?? {}, name, w, rng));
    }
    case 'object': {
      const o: Record<string, Json> = {};
      for (const [k, ps] of Object.entries(s.properties ?? {})) {
        if (s.required?.includes(k) || rng === 'first' || rng.chance(0.5)) define(o, k, valid(ps, k, w, rng));
      }
      return o;
    }
    default:
      return 'fuzz';
  }
}

// ---- bad and boundary values -------------------------------------------------------------------

const BY_TYPE: Record<string, Json[]> = {
  string: ['', 'x', '0', 'true', 'null', '[]', '{}'],
  number: [0, -1, 1, 1.5, -0.5, 1e308, -1e308],
  boolean: [true, false],
  null: [null],
  array: [[], [null], ['x', 1], [[[]]]],
  object: [{}, { a: 1 }, { '': null }],
};

function typesOf(s: JsonSchema): string[] {
  const r = resolve(s);
  if (r.anyOf) return r.anyOf.flatMap(typesOf);
  if (r.enum) return [...new Set(r.enum.map((e) => (e === null ? 'null' : typeof e)))];
  if (r.type === 'integer') return ['number'];
  return r.type !== undefined ? [r.type] : [];
}

function wrongTypes(s: JsonSchema): Json[] {
  const own = new Set(typesOf(s));
  return Object.entries(BY_TYPE).flatMap(([t, vs]) => (own.has(t) ? [] : vs));
}

const NASTY_STRINGS: Json[] = [
  '', ' ', '\t', 'é中😀', '\u0000', 'a\u0000b', new Raw('"\\ud800"'), new Raw('"\\u0000"'), '\u202eevil', '../../etc/passwd', '%00', '%zz',
  'file:///etc/passwd', 'javascript:alert(1)', 'http://', '//evil.example/x', 'http://[::1', 'http://127.0.0.1:99999/x', '${jndi:ldap://x/a}',
  "'; DROP TABLE x; --", '<script>alert(1)</script>', 'a'.repeat(10_000), HUGE,
];

/** Boundary values of a schema, in groups (a group is picked first, so a short one, such as a pattern's edges, is not drowned). */
function boundaryGroups(schema: JsonSchema, name: string, w: World): Json[][] {
  const s = resolve(schema);
  const groups: Json[][] = [];
  const types = typesOf(s);
  if (types.includes('number')) {
    const lo = s.minimum ?? s.exclusiveMinimum;
    const hi = s.maximum ?? s.exclusiveMaximum;
    groups.push([lo, hi].flatMap((b) => (b === undefined ? [] : [b, b - 1, b + 1, b - 0.5, b + 0.5])));
    groups.push([0, -1, 2 ** 53, -(2 ** 53), 2 ** 53 + 2, Number.MAX_VALUE, -Number.MAX_VALUE, Number.MIN_VALUE, 0.1 + 0.2]);
    groups.push([new Raw('-0'), new Raw('1e400'), new Raw('-1e400'), new Raw('1E2'), new Raw('1.0'), new Raw('1e-400'), new Raw('123456789012345678901234567890')]);
    groups.push(['1', 'NaN', 'Infinity', '-Infinity', '1e400']);
  }
  if (types.includes('string')) {
    const lengths: Json[] = [];
    if (s.minLength !== undefined && s.minLength > 0) lengths.push('a'.repeat(s.minLength - 1));
    if (s.maxLength !== undefined) lengths.push('a'.repeat(s.maxLength), 'a'.repeat(s.maxLength + 1));
    groups.push(lengths, NASTY_STRINGS);
    if (s.pattern !== undefined) groups.push(PATTERNS[s.pattern]?.edge ?? [], PATTERNS[s.pattern]?.edge ?? []);
    if (s.type === 'string') groups.push(validStrings(s, name, w).flatMap((v) => [v.toUpperCase(), ` ${v}`, `${v}\n`, `${v}\u0000`, v + v]));
  }
  if (s.enum) groups.push([...s.enum.map((e) => String(e).toUpperCase()), 'other', `${String(s.enum[0])} `]);
  if (types.includes('boolean')) groups.push(['true', 'false', 1, 0, null]);
  if (types.includes('array')) {
    const item = valid(s.items ?? {}, name, w, 'first');
    groups.push([[], [null], [item, 'x'], Array.from({ length: (s.maxItems ?? 100) + 1 }, () => item), Array.from({ length: 2000 }, () => 1)]);
  }
  if (types.includes('object')) groups.push([{}, [], null, deepObject(DEEP_DEPTH)]);
  const nonEmpty = groups.filter((g) => g.length > 0);
  return nonEmpty.length > 0 ? nonEmpty : [[null]];
}

function boundary(schema: JsonSchema, name: string, w: World, rng: Rng): Json {
  return rng.pick(rng.pick(boundaryGroups(schema, name, w)));
}

const EXTRA_KEYS = ['extra', '__proto__', 'constructor', 'prototype', 'toString', 'hasOwnProperty', '', ' ', 'é', 'a'.repeat(1000), 'hostId ', 'HOSTID'];
const EXTRA_VALUES: Json[] = [1, 'x', null, true, {}, [], { a: { b: { c: 1 } } }, deep(DEEP_DEPTH), deepObject(DEEP_DEPTH), 'y'.repeat(20_000)];

interface Slot {
  path: Path;
  schema: JsonSchema;
  value: Json;
}

/** Every position in `value` (a valid body) with its schema: the root, each field, the first items. */
function slotsOf(value: Json, schema: JsonSchema, path: Path = []): Slot[] {
  const s = resolve(schema);
  const out: Slot[] = [{ path, schema: s, value }];
  if (isObj(value)) {
    for (const [k, v] of Object.entries(value)) {
      const ps = s.properties?.[k];
      if (ps) out.push(...slotsOf(v, ps, [...path, k]));
    }
  }
  if (Array.isArray(value) && s.items) value.slice(0, 2).forEach((v, i) => out.push(...slotsOf(v, s.items ?? {}, [...path, i])));
  return out;
}

const lastName = (p: Path): string => String(p[p.length - 1] ?? 'body');

// ---- cases ---------------------------------------------------------------------------------------

interface Case {
  category: string;
  label: string;
  req: InjectOptions & { method: string; url: string; headers: Record<string, string | string[]> };
  /** The credentials are wrong: the answer must be this status, before any backend call when `noBackend`. */
  badAuth?: { statuses: number[]; noBackend: boolean };
}

const JSON_CT = { 'content-type': 'application/json' };

const PATH_ODDITIES = [
  '', '%00', '..', '.', '%2e%2e', '%2E%2E%2F%2E%2E', '%2F', 'a%2Fb', '%zz', '%', '%E0%A4%A', '%C0%AE', '%FF',
  encodeURIComponent('é中😀'), 'é', '%20', '+', '-x', '_', 'A'.repeat(129), 'a'.repeat(5000), 'a'.repeat(100 * 1024),
  '%27%3B%20DROP%20TABLE%20x', '%3Cscript%3E', 'null', 'undefined', '0', '-1', 'ho-', `ho-${'a'.repeat(79)}`, '%0A', ';', '*', '~', '%7B%7D',
];
const QUERY_GARBAGE = [
  '?', '?a', '?a=1&a=2', '?%zz', '?__proto__[x]=1', '?constructor=1&prototype=2', '?a[b]=c', `?${'a=1&'.repeat(3000)}`, `?x=${'y'.repeat(100 * 1024)}`,
  '?%00=%00', '?=&=&', '?a=%E0%A4%A', '?app=&device=', '?device[]=x',
];
const NOT_JSON = ['{', '{"a":', '}', 'NaN', 'undefined', "{'a':1}", '{"a":1}garbage', '{"a":1,}', '\u0000', '[1,2', '{"a":"\\x"}', '1e', '{"__proto__":{"x":1}}', '{"constructor":{"prototype":{"x":1}}}', '\ufeff{}', '{"a":1}{"a":2}'];
const EMPTY_BODIES: Array<{ payload?: string; headers: Record<string, string> }> = [
  { headers: JSON_CT },
  { payload: '', headers: JSON_CT },
  { headers: {} },
  { payload: 'null', headers: JSON_CT },
  { payload: '[]', headers: JSON_CT },
  { payload: '""', headers: JSON_CT },
  { payload: '0', headers: JSON_CT },
  { payload: 'true', headers: JSON_CT },
  { payload: '{}', headers: JSON_CT },
  { payload: '   ', headers: JSON_CT },
];
const CONTENT_TYPES = [
  'text/plain', 'application/xml', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', 'application/octet-stream',
  'application/jsonx', 'application/json-seq', 'json', '', 'application/json; charset=utf-16', 'application/json; charset=latin1', 'application/json;;;',
  'APPLICATION/JSON', 'text/json', 'application/problem+json', 'application/vnd.api+json', 'application/json, text/plain', '*/*',
];
const BAD_BEARER = [
  '', 'Bearer', 'Bearer ', `Bearer ${TOKEN}x`, `Bearer ${TOKEN.slice(0, -1)}`, `Basic ${Buffer.from('a:b').toString('base64')}`, `Bearer ${TOKEN} extra`,
  `Bearer\t${TOKEN}`, `Token ${TOKEN}`, `Bearer ${'a'.repeat(10_000)}`, 'Bearer é', `Bearer ${TOKEN.toUpperCase()}`, TOKEN, `Bearer ${TOKEN},Bearer ${TOKEN}`,
  'Bearer %00', `Bearer ${TOKEN}\u0000`, `Bearer ${HUGE}`, `Bearer ${TICKET}`,
];
const OK_BEARER = [`bearer ${TOKEN}`, `BEARER   ${TOKEN}  `];
const ODD_HEADERS: Array<Record<string, string | string[]>> = [
  { 'x-request-id': 'a'.repeat(10_000) },
  { 'x-request-id': '../../x\u0000' },
  { accept: 'text/html' },
  { accept: 'application/xml;q=abc, */*;q=-1' },
  { 'accept-encoding': 'gzip;q=abc, br, zstd, *' },
  { range: 'bytes=0-3' },
  { range: 'bytes=99999999999999999999-' },
  { range: 'bytes=-99999999999999999999' },
  { range: 'bytes=5-2' },
  { range: 'bytes=0-0,5-6' },
  { range: 'bytes=-0' },
  { range: 'items=0-1' },
  { range: 'bytes=1000000-' },
  { 'if-none-match': '*' },
  { 'if-none-match': 'W/"garbage", "x"' },
  { 'if-range': '"not-the-etag"', range: 'bytes=0-1' },
  { 'if-modified-since': 'not a date' },
  { 'content-length': '5' },
  { 'content-length': '999999' },
  { 'content-length': '-1' },
  { 'transfer-encoding': 'chunked' },
  { 'content-encoding': 'gzip' },
  { expect: '100-continue' },
  { 'x-forwarded-for': 'é, %00, ::1' },
  { origin: 'null' },
  { 'idempotency-key': ['a', 'b'] },
  { authorization: [`Bearer ${TOKEN}`, `Bearer ${TOKEN}`] },
];
const OTHER_METHODS = ['GET', 'POST', 'DELETE', 'PUT', 'PATCH', 'OPTIONS', 'HEAD'];

class CaseMaker {
  constructor(
    private readonly r: ApiRoute,
    private readonly w: World,
    private readonly rng: Rng,
  ) {}

  /** The route's path with valid (encoded) parameters, or `odd` for one of them; `first`: the first examples. */
  url(odd?: { name: string; value: string }, query?: string, mode: Rng | 'first' = this.rng): string {
    const p = this.r.path.replace(/\{(\w+)\}/g, (_x, name: string) => {
      if (odd?.name === name) return odd.value;
      const param = this.r.pathParams.find((q) => q.name === name);
      if (!param) return 'x';
      const named = NAMED_PATH[name];
      if (param.schema.pattern === undefined && named) return mode === 'first' ? (named(this.w)[0] ?? 'x') : mode.pick(named(this.w));
      return encodeURIComponent(String(valid(param.schema, name, this.w, mode)));
    });
    return p + (query ?? this.validQuery(mode));
  }

  validQuery(mode: Rng | 'first' = this.rng): string {
    if (this.r.queryParams.length === 0) return '';
    const q = this.r.queryParams.map((p) => `${encodeURIComponent(p.name)}=${encodeURIComponent(String(valid(p.schema, p.name, this.w, mode)))}`);
    return `?${q.join('&')}`;
  }

  /** The first valid request: the first example of everything, every optional field. */
  first(): Case {
    const body = this.r.body ? valid(this.r.body.schema, 'body', this.w, 'first') : undefined;
    const c = this.make('valid', 'valid (first examples)', body, { url: this.url(undefined, undefined, 'first') });
    delete c.req.headers['idempotency-key'];
    return c;
  }

  auth(): Record<string, string> {
    if (this.r.bearer) return { ...AUTH };
    if (this.r.ticket) return { authorization: `Bearer ${TICKET}` };
    return {};
  }

  idem(): Record<string, string> {
    if (!this.r.idempotent || !this.rng.chance(0.3)) return {};
    return { 'idempotency-key': this.rng.pick(PATTERNS['^[A-Za-z0-9_-]{1,64}$']?.valid(this.w) ?? ['k']) };
  }

  validBody(): Json | undefined {
    return this.r.body ? valid(this.r.body.schema, 'body', this.w, this.rng) : undefined;
  }

  /** A request of this route with `body` (serialized as JSON unless a string is given). */
  make(category: string, label: string, body: Json | undefined, extra: { url?: string; headers?: Record<string, string | string[]>; method?: string; raw?: string } = {}): Case {
    const method = extra.method ?? this.r.method;
    const payload = extra.raw ?? (body === undefined ? undefined : serialize(body));
    const headers: Record<string, string | string[]> = { ...this.auth(), ...this.idem(), ...(payload !== undefined ? JSON_CT : {}), ...(extra.headers ?? {}) };
    return { category, label, req: { method, url: extra.url ?? this.url(), headers, ...(payload !== undefined ? { payload } : {}) } };
  }

  categories(): string[] {
    const c = ['valid', 'valid', 'auth', 'query', 'huge', 'headers', 'method'];
    if (this.r.pathParams.length > 0) c.push('path-param', 'path-param');
    if (this.r.body) c.push('body-wrong-type', 'body-wrong-type', 'body-boundary', 'body-boundary', 'body-boundary', 'body-missing', 'body-extra');
    if (this.r.method !== 'GET') c.push('body-empty', 'body-not-json', 'content-type');
    else c.push('content-type');
    if (!this.r.body && this.r.method !== 'GET') c.push('body-extra');
    if (this.r.idempotent) c.push('idempotency');
    if (this.r.queryParams.length > 0) c.push('query-param', 'query-param');
    return c;
  }

  make1(category: string): Case {
    const rng = this.rng;
    const body = this.validBody();
    switch (category) {
      case 'valid':
        return rng.chance(0.4) ? this.first() : this.make(category, 'valid', body);
      case 'auth': {
        if (rng.chance(0.15)) return this.make(category, 'accepted bearer variant', body, { headers: this.r.bearer ? { authorization: rng.pick(OK_BEARER) } : {} });
        const drop = rng.chance(0.2);
        const value = rng.pick(BAD_BEARER);
        // Half the time with a body that is not JSON: the API token is checked before the body is
        // read (a ticket is checked by the handler, after the body).
        const garbled = this.r.bearer && this.r.method !== 'GET' && rng.chance(0.5);
        const label = `${drop ? 'no Authorization' : `Authorization ${JSON.stringify(value.slice(0, 40))}`}${garbled ? ' and a non-JSON body' : ''}`;
        const c = garbled ? this.make(category, label, undefined, { raw: rng.pick(NOT_JSON), headers: JSON_CT }) : this.make(category, label, body);
        if (drop) delete c.req.headers.authorization;
        else c.req.headers.authorization = value;
        // A ticket route of the bare server answers 501 before it looks at the ticket.
        if (this.r.bearer) c.badAuth = { statuses: [401], noBackend: true };
        else if (this.r.ticket && value !== `Bearer ${TICKET}`) c.badAuth = { statuses: backendAbsent(this.w, this.r) ? [501] : [401], noBackend: false };
        return c;
      }
      case 'path-param': {
        const p = rng.pick(this.r.pathParams);
        const edges = p.schema.pattern !== undefined ? (PATTERNS[p.schema.pattern]?.edge ?? []).map(encodeURIComponent) : [];
        const extra = p.schema.pattern === undefined ? [this.w.ids.operation, `${this.w.ids.operation}/..`, '%2F%2F', 'a/b/c/d'] : [];
        const value = rng.pick([...PATH_ODDITIES, ...edges, ...extra]);
        return this.make(category, `path ${p.name}=${JSON.stringify(value.slice(0, 40))}${value.length > 40 ? `…(${value.length})` : ''}`, body, { url: this.url({ name: p.name, value }) });
      }
      case 'query': {
        const q = rng.pick(QUERY_GARBAGE);
        const base = this.url(undefined, '');
        const good = this.validQuery();
        const url = good && rng.chance(0.5) ? `${base}${good}&${q.slice(1)}` : `${base}${q}`;
        return this.make(category, `query ${JSON.stringify(q.slice(0, 40))}`, body, { url });
      }
      case 'query-param': {
        const p = rng.pick(this.r.queryParams);
        const others = this.r.queryParams.filter((x) => x !== p).map((x) => `${x.name}=${encodeURIComponent(String(valid(x.schema, x.name, this.w, rng)))}`);
        const choice = rng.int(4);
        const bad = rng.pick(boundaryGroups(p.schema, p.name, this.w).flat().filter((v): v is string => typeof v === 'string'));
        const parts =
          choice === 0 ? others
          : choice === 1 ? [...others, `${p.name}=${encodeURIComponent(bad)}`]
          : choice === 2 ? [...others, `${p.name}=${encodeURIComponent(String(valid(p.schema, p.name, this.w, rng)))}`, `${p.name}=${encodeURIComponent(bad)}`]
          : [...others, `${p.name}[]=${encodeURIComponent(bad)}`];
        const label = ['missing', 'bad', 'repeated', 'as an array'][choice] ?? '';
        return this.make(category, `query ${p.name} ${label} ${JSON.stringify(bad.slice(0, 30))}`, body, { url: `${this.url(undefined, '')}?${parts.join('&')}` });
      }
      case 'huge': {
        const which = rng.int(4);
        if (which === 0 && this.r.method !== 'GET') return this.make(category, '100 KiB JSON string body', HUGE);
        if (which === 1 && this.r.method !== 'GET') return this.make(category, '100 KiB non-JSON body', undefined, { raw: HUGE, headers: JSON_CT });
        if (which === 2) return this.make(category, '100 KiB query', body, { url: `${this.url(undefined, '')}?q=${HUGE}` });
        return this.make(category, '100 KiB header', body, { headers: { 'x-fuzz': HUGE } });
      }
      case 'headers': {
        const h = rng.pick(ODD_HEADERS);
        return this.make(category, `headers ${JSON.stringify(h).slice(0, 60)}`, body, { headers: h });
      }
      case 'method': {
        const defined = new Set(routes.filter((x) => x.path === this.r.path).map((x) => x.method as string));
        if (defined.has('GET')) defined.add('HEAD');
        const others = OTHER_METHODS.filter((m) => !defined.has(m));
        const m = rng.pick(others);
        return this.make(category, `method ${m}`, m === 'GET' || m === 'HEAD' ? undefined : body, { method: m });
      }
      case 'body-wrong-type':
      case 'body-boundary': {
        if (body === undefined) return this.make1('valid');
        const slot = rng.pick(slotsOf(body, this.r.body?.schema ?? {}));
        const wrong = wrongTypes(slot.schema);
        const v = category === 'body-boundary' ? boundary(slot.schema, lastName(slot.path), this.w, rng) : rng.pick(wrong.length > 0 ? wrong : [null]);
        const shown = v instanceof Raw ? v.text : JSON.stringify(v);
        return this.make(category, `body.${slot.path.join('.') || '(root)'} = ${shown.slice(0, 40)}${shown.length > 40 ? `…(${shown.length})` : ''}`, setAt(body, slot.path, v));
      }
      case 'body-missing': {
        if (body === undefined) return this.make1('valid');
        const holes = slotsOf(body, this.r.body?.schema ?? {}).flatMap((s) => (isObj(s.value) ? Object.keys(s.value).filter((k) => s.schema.required?.includes(k)).map((k) => [...s.path, k]) : []));
        if (holes.length === 0) return this.make(category, 'all fields left out', {});
        const hole = rng.pick(holes);
        return this.make(category, `body.${hole.join('.')} left out`, deleteAt(body, hole));
      }
      case 'body-extra': {
        const key = rng.pick(EXTRA_KEYS);
        const value = rng.pick(EXTRA_VALUES);
        const shown = value instanceof Raw ? `${value.text.slice(0, 12)}…(${value.text.length})` : JSON.stringify(value).slice(0, 30);
        if (body === undefined) {
          const o: Record<string, Json> = {};
          define(o, key, value);
          return this.make(category, `unexpected body {${JSON.stringify(key.slice(0, 20))}: ${shown}}`, o);
        }
        const objects = slotsOf(body, this.r.body?.schema ?? {}).filter((s) => isObj(s.value));
        const at = rng.pick(objects);
        const target = clone(at.value) as Record<string, Json>;
        define(target, key, value);
        return this.make(category, `extra field body.${[...at.path, key.slice(0, 20)].join('.')} = ${shown}`, setAt(body, at.path, target));
      }
      case 'body-empty': {
        const e = rng.pick(EMPTY_BODIES);
        const c = this.make(category, `empty body ${JSON.stringify(e)}`, undefined, { headers: e.headers, ...(e.payload !== undefined ? { raw: e.payload } : {}) });
        if (e.payload === undefined) delete c.req.payload;
        return c;
      }
      case 'body-not-json': {
        const text = rng.pick(NOT_JSON);
        return this.make(category, `non-JSON body ${JSON.stringify(text)}`, undefined, { raw: text, headers: JSON_CT });
      }
      case 'content-type': {
        const ct = rng.pick(CONTENT_TYPES);
        const raw = body === undefined ? (rng.chance(0.5) ? '{}' : 'a=b') : serialize(body);
        return this.make(category, `content-type ${JSON.stringify(ct)}`, undefined, { raw, headers: { 'content-type': ct } });
      }
      case 'idempotency': {
        const edges = PATTERNS['^[A-Za-z0-9_-]{1,64}$']?.edge ?? [];
        const key = rng.pick([...edges, 'fuzz-key-1', 'fuzz-key-1']);
        return this.make(category, `Idempotency-Key ${JSON.stringify(key)}`, body, { headers: { 'idempotency-key': key } });
      }
      default:
        throw new Error(`unknown category ${category}`);
    }
  }

  /** The random cases: the categories in turn, each drawing its variant. */
  cases(n: number): Case[] {
    const cats = this.categories();
    const out: Case[] = [];
    for (let i = 0; i < n; i++) out.push(this.make1(cats[i % cats.length] ?? 'valid'));
    return out;
  }

  /**
   * The systematic cases, in a seeded order, at most `n`: each edge value of each patterned field
   * (body, path, query), a wrong type in each body field, a deeply nested unknown field in each
   * body object.
   */
  systematic(n: number): Case[] {
    const out: Array<() => Case> = [];
    const body = this.r.body ? valid(this.r.body.schema, 'body', this.w, 'first') : undefined;
    if (body !== undefined) {
      for (const slot of slotsOf(body, this.r.body?.schema ?? {})) {
        const where = `body.${slot.path.join('.') || '(root)'}`;
        const edges = slot.schema.pattern !== undefined ? (PATTERNS[slot.schema.pattern]?.edge ?? []) : [];
        for (const e of edges) out.push(() => this.make('edge', `${where} = ${JSON.stringify(e.slice(0, 40))}`, setAt(this.firstBody(), slot.path, e)));
        out.push(() => {
          const v = this.rng.pick(wrongTypes(slot.schema).concat([null]));
          return this.make('wrong-type', `${where} = ${JSON.stringify(v).slice(0, 40)}`, setAt(this.firstBody(), slot.path, v));
        });
        if (isObj(slot.value)) {
          for (const d of [deep(DEEP_DEPTH), deepObject(DEEP_DEPTH)]) {
            out.push(() => {
              const target = clone(slot.value) as Record<string, Json>;
              define(target, 'x-extra', d);
              return this.make('deep-extra', `${where}.x-extra = ${d.text.slice(0, 8)}…(${d.text.length})`, setAt(this.firstBody(), slot.path, target));
            });
          }
        }
      }
    }
    for (const p of this.r.pathParams) {
      for (const e of p.schema.pattern !== undefined ? (PATTERNS[p.schema.pattern]?.edge ?? []) : []) {
        out.push(() => this.make('edge', `path ${p.name}=${JSON.stringify(e.slice(0, 40))}`, this.validBody(), { url: this.url({ name: p.name, value: encodeURIComponent(e) }) }));
      }
    }
    for (const p of this.r.queryParams) {
      const branches = p.schema.anyOf ?? [p.schema];
      for (const e of branches.flatMap((b) => (b.pattern !== undefined ? (PATTERNS[b.pattern]?.edge ?? []) : []))) {
        const others = this.r.queryParams.filter((x) => x !== p).map((x) => `${x.name}=${encodeURIComponent(String(valid(x.schema, x.name, this.w, this.rng)))}`);
        out.push(() => this.make('edge', `query ${p.name}=${JSON.stringify(e.slice(0, 40))}`, this.validBody(), { url: `${this.url(undefined, '')}?${[...others, `${p.name}=${encodeURIComponent(e)}`].join('&')}` }));
      }
    }
    // A seeded shuffle, then the first n.
    for (let i = out.length - 1; i > 0; i--) {
      const j = this.rng.int(i + 1);
      [out[i], out[j]] = [out[j] as () => Case, out[i] as () => Case];
    }
    return out.slice(0, n).map((f) => f());
  }

  /** The first valid body again (fresh names: a recipe id no schedule has yet). */
  private firstBody(): Json {
    return this.r.body ? valid(this.r.body.schema, 'body', this.w, 'first') : null;
  }
}

// ---- checking an answer ------------------------------------------------------------------------------

interface Finding {
  kind: 'server-error' | 'status' | 'error-body' | 'mutation' | 'auth' | 'inject' | 'coverage';
  variant: Variant;
  route: string;
  category: string;
  label: string;
  method: string;
  url: string;
  payload: string;
  status: number;
  body: string;
  problem: string;
}

let requestCount = 0;
const knownHits = new Map<string, number>();

function pathnameOf(url: string): string {
  try {
    return new URL(url, 'http://localhost').pathname;
  } catch {
    return url.split('?')[0] ?? url;
  }
}

function errorOf(res: LightMyRequestResponse): { code?: unknown; message?: unknown; issues?: Array<{ path: unknown[] }>; details?: Record<string, unknown> } | undefined {
  try {
    const b = JSON.parse(res.body) as { error?: unknown };
    return typeof b.error === 'object' && b.error !== null ? (b.error as ReturnType<typeof errorOf>) : undefined;
  } catch {
    return undefined;
  }
}

/** The API itself refused the request (before or instead of any backend): validation, auth, media type, size, routing, 501. */
function refusedByApi(res: LightMyRequestResponse): boolean {
  const s = res.statusCode;
  const err = errorOf(res);
  if (s === 405 || s === 413 || s === 415 || s === 501) return true;
  if (s === 401) return res.headers['www-authenticate'] !== undefined;
  if (s === 404) return typeof err?.message === 'string' && err.message.startsWith('no route');
  if (s === 400) {
    if (err === undefined || err.details?.fastifyCode !== undefined) return true;
    return (err.issues ?? []).some((i) => ['params', 'body', 'query', 'header'].includes(String(i.path[0])));
  }
  return false;
}

async function send(w: World, c: Case, statuses?: number[]): Promise<Finding[]> {
  const fakeBefore = w.fake.calls.length;
  const logBefore = w.log.length;
  const method = c.req.method.toUpperCase();
  const pathname = pathnameOf(c.req.url);
  const matched = routesMatching(method, pathname);
  const routeName = matched.map((r) => r.key).join(' | ') || `${method} ${pathname.slice(0, 80)} (no route)`;
  const payload = typeof c.req.payload === 'string' ? c.req.payload : '';
  const finding = (kind: Finding['kind'], problem: string, res?: LightMyRequestResponse): Finding => ({
    kind, variant: w.variant, route: routeName, category: c.category, label: c.label, method, url: c.req.url, payload,
    status: res?.statusCode ?? 0, body: res?.body ?? '', problem,
  });
  let res: LightMyRequestResponse;
  try {
    requestCount += 1;
    res = await w.app.inject(c.req);
  } catch (e) {
    return [finding('inject', `the request did not complete: ${(e as Error).message}`)];
  }
  const out: Finding[] = [];
  const s = res.statusCode;
  statuses?.push(s);
  const absent = matched.some((r) => backendAbsent(w, r));
  const allowed = new Set([...GENERIC, ...matched.flatMap((r) => r.codes), ...(absent ? [501] : [])]);
  if (s >= 500 && !(s === 501 && absent)) out.push(finding('server-error', `answered ${s}`, res));
  else if (!allowed.has(s)) out.push(finding('status', `status ${s} is not documented (allowed: ${[...allowed].sort().join(', ')})`, res));

  if (s >= 400 && s < 500 && method !== 'HEAD') {
    let parsed: unknown;
    try {
      parsed = JSON.parse(res.body);
    } catch {
      parsed = undefined;
    }
    const r = ErrorBodySchema.safeParse(parsed);
    if (!r.success) out.push(finding('error-body', `a ${s} whose body is not the Error schema (${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')})`, res));
  }

  const newLog = w.log.slice(logBefore);
  if (s >= 400) {
    const mutatingFake = w.fake.calls.slice(fakeBefore).filter((x) => !isRead(x.method));
    const mutating = newLog.filter((x) => !isRead(x.method));
    if (refusedByApi(res)) {
      const calls = [...mutatingFake.map((x) => `service.${x.method}`), ...mutating.filter((x) => x.backend !== 'service').map((x) => `${x.backend}.${x.method}`)];
      if (calls.length > 0) out.push(finding('mutation', `refused by the API with ${s}, yet the backend was called: ${calls.join(', ')}`, res));
    } else {
      const done = mutating.filter((x) => x.error === undefined);
      if (done.length > 0) out.push(finding('mutation', `refused with ${s} after ${done.map((x) => `${x.backend}.${x.method}`).join(', ')} went through`, res));
    }
  }

  if (c.badAuth) {
    if (!c.badAuth.statuses.includes(s)) out.push(finding('auth', `wrong credentials answered ${s}, not ${c.badAuth.statuses.join(' or ')}`, res));
    if (c.badAuth.noBackend && newLog.length > 0) out.push(finding('auth', `wrong credentials reached the backend: ${newLog.map((x) => `${x.backend}.${x.method}`).join(', ')}`, res));
  }
  return out;
}

function show(f: Finding): string {
  const cut = (s: string, n: number) => (s.length > n ? `${s.slice(0, n)}…(${s.length} chars)` : s);
  return [
    `[${f.kind}] ${f.problem}`,
    `  server: ${f.variant}; route: ${f.route}; case: ${f.category}: ${cut(f.label, 120)}`,
    `  request: ${f.method} ${cut(f.url, 160)}${f.payload ? `\n  payload: ${cut(f.payload, 200)}` : ''}`,
    `  answer: ${f.status} ${cut(f.body, 300)}`,
  ].join('\n');
}

// ---- bugs the fuzz found (see the test.failing replays at the end) ------------------------------

interface KnownBug {
  id: string;
  matches(f: Finding): boolean;
}

/**
 * Findings of bugs not fixed yet, set aside by the sweep (each with a `test.failing` replay below).
 * Empty: the five the fuzz found (malformed path body, 128-character ids, unbounded "every",
 * undocumented 409 on deployments, deep unknown recipe fields) are fixed, and their replays below
 * are plain tests.
 */
const KNOWN_BUGS: KnownBug[] = [];

function triage(findings: Finding[]): Finding[] {
  const unknown: Finding[] = [];
  for (const f of findings) {
    const bug = KNOWN_BUGS.find((b) => b.matches(f));
    if (bug) knownHits.set(bug.id, (knownHits.get(bug.id) ?? 0) + 1);
    else unknown.push(f);
  }
  return unknown;
}

async function fuzzRoute(r: ApiRoute, variant: Variant): Promise<Finding[]> {
  const w = await makeWorld(variant);
  try {
    const maker = new CaseMaker(r, w, new Rng(SEED ^ hash(`${variant} ${r.key}`)));
    const findings: Finding[] = [];
    const statuses: number[] = [];
    for (const c of [...maker.systematic(SYSTEMATIC_CASES), ...maker.cases(RANDOM_CASES)]) findings.push(...(await send(w, c, statuses)));
    // The fuzz reached the route's backend (a success, or 501 where there is none) and was refused too.
    const through = backendAbsent(w, r) ? statuses.includes(501) : statuses.some((s) => (s >= 200 && s < 300) || s === 304);
    if (!through || !statuses.some((s) => s >= 400 && s < 500)) {
      const histogram = JSON.stringify(statuses.reduce<Record<number, number>>((h, s) => ({ ...h, [s]: (h[s] ?? 0) + 1 }), {}));
      findings.push({
        kind: 'coverage', variant, route: r.key, category: '-', label: '-', method: r.method, url: r.path, payload: '', status: 0, body: '',
        problem: `the cases never ${through ? 'were refused' : 'went through'} (statuses: ${histogram}): the generator or the world is wrong`,
      });
    }
    return findings;
  } finally {
    await closeWorld(w);
  }
}

// ---- the tests -----------------------------------------------------------------------------------

beforeAll(async () => {
  const w = await makeWorld('bare');
  const res = await w.app.inject({ url: '/openapi.json' });
  expect(res.statusCode).toBe(200);
  doc = res.json<OpenApiDoc>();
  routes = routesOf(doc);
  await closeWorld(w);
});

afterAll(async () => {
  for (const w of [...worlds]) await closeWorld(w);
  const known = [...knownHits].map(([id, n]) => `${id} ×${n}`).join(', ');
  console.log(`api-fuzz: ${requestCount} requests over ${routes.length} routes (seed ${SEED}; per route and server: ${RANDOM_CASES} random cases and up to ${SYSTEMATIC_CASES} systematic ones); known bugs hit: ${known || 'none'}`);
});

describe('the fuzz covers the document', () => {
  test('every route of the OpenAPI document is in a fuzzed family, and every pattern has examples that match it', () => {
    expect(routes.length).toBeGreaterThan(40);
    expect(routes.filter((r) => !(FAMILIES as readonly string[]).includes(r.tag)).map((r) => r.key)).toEqual([]);
    const patterns = new Set<string>();
    const walk = (s: unknown): void => {
      if (Array.isArray(s)) s.forEach(walk);
      else if (typeof s === 'object' && s !== null) {
        for (const [k, v] of Object.entries(s)) {
          if (k === 'pattern' && typeof v === 'string') patterns.add(v);
          else walk(v);
        }
      }
    };
    walk(doc.paths);
    walk(doc.components.schemas);
    const fakeWorld = { ids: { base: 'a'.repeat(64), overlay: 'b'.repeat(64), overlayUrl: 'http://x/o', instance: 'inst-0001', operation: 'x', recipe: 'fuzz-recipe', token: '0123abcd' }, seq: 0 } as World;
    for (const p of patterns) {
      const ex = PATTERNS[p];
      expect({ pattern: p, hasExamples: ex !== undefined }).toEqual({ pattern: p, hasExamples: true });
      for (const v of ex?.valid(fakeWorld) ?? []) expect({ pattern: p, value: v, matches: new RegExp(p).test(v) }).toEqual({ pattern: p, value: v, matches: true });
    }
  });
});

describe('the server otherwise works (valid requests)', () => {
  let bare: World;
  let stubbed: World;
  beforeAll(async () => {
    bare = await makeWorld('bare');
    stubbed = await makeWorld('stubbed');
  });
  afterAll(async () => {
    await closeWorld(bare);
    await closeWorld(stubbed);
  });

  const inject = (w: World, o: InjectOptions) => {
    requestCount += 1;
    return w.app.inject(o);
  };

  test('a valid request made from the document passes the API\'s validation on every route', async () => {
    const problems: string[] = [];
    const own = [await makeWorld('bare'), await makeWorld('stubbed')];
    for (const r of routes) {
      for (const w of own) {
        const res = await inject(w, new CaseMaker(r, w, new Rng(SEED)).first().req);
        const ok = res.statusCode < 400 ? res.statusCode < 300 || res.statusCode === 304 : res.statusCode === 501 ? backendAbsent(w, r) : !refusedByApi(res) && res.statusCode < 500;
        if (!ok) problems.push(`${w.variant} ${r.key}: ${res.statusCode} ${res.body.slice(0, 300)}`);
      }
    }
    for (const w of own) await closeWorld(w);
    expect(problems).toEqual([]);
  });

  test('meta and hosts: health, the document, metrics, the hosts', async () => {
    expect((await inject(bare, { url: '/healthz' })).json()).toEqual({ ok: true });
    expect((await inject(bare, { url: '/openapi.json' })).json<OpenApiDoc>().paths['/v1/hosts']).toBeDefined();
    expect((await inject(bare, { url: '/metrics', headers: AUTH })).statusCode).toBe(200);
    const hosts = await inject(bare, { url: '/v1/hosts', headers: AUTH });
    expect(hosts.statusCode).toBe(200);
    expect(hosts.json()).toEqual({ hosts: [{ id: 'host-a', serving: true }, { id: 'host-b', serving: true }] });
  });

  test('bases: import, list, show, download, resume', async () => {
    const imported = await inject(bare, { method: 'POST', url: '/v1/bases', headers: AUTH, payload: { hostId: 'host-a', source: '/srv/ok.pkg' } });
    expect(imported.statusCode).toBe(202);
    expect(bare.fake.calls.filter((c) => c.method === 'importBase')).toHaveLength(1);
    expect((await inject(bare, { url: '/v1/bases', headers: AUTH })).json<{ bases: Array<{ id: string }> }>().bases.map((b) => b.id)).toContain(bare.ids.base);
    expect((await inject(bare, { url: `/v1/bases/${bare.ids.base}`, headers: AUTH })).statusCode).toBe(200);
    const pkg = await inject(bare, { url: `/v1/bases/${bare.ids.base}/package`, headers: AUTH });
    expect(pkg.statusCode).toBe(200);
    expect(pkg.body).toBe('fuzz base package');
    expect((await inject(bare, { method: 'POST', url: `/v1/bases/${bare.ids.base}/instances`, headers: AUTH, payload: { hostId: 'host-a', appPort: 8080 } })).statusCode).toBe(202);
  });

  test('instances and deployments: provision, show, terminate, deploy', async () => {
    const made = await inject(bare, { method: 'POST', url: '/v1/instances', headers: AUTH, payload: { hostId: 'host-b', overlayUrl: bare.ids.overlayUrl } });
    expect(made.statusCode).toBe(202);
    expect((await inject(bare, { url: `/v1/instances/${bare.ids.instance}`, headers: AUTH })).json()).toMatchObject({ id: bare.ids.instance, state: 'running' });
    expect((await inject(bare, { url: '/v1/instances', headers: AUTH })).statusCode).toBe(200);
    expect((await inject(bare, { method: 'DELETE', url: `/v1/instances/${bare.ids.instance}`, headers: AUTH })).statusCode).toBe(202);
    expect((await inject(bare, { method: 'POST', url: '/v1/deployments', headers: AUTH, payload: { overlayUrl: bare.ids.overlayUrl, hosts: ['host-a', 'host-b'], count: 4 } })).statusCode).toBe(202);
  });

  test('overlays and operations: create, show, ranged download, status, cancel', async () => {
    const inst = bare.fake.addInstance('host-b', bare.ids.base);
    expect((await inject(bare, { method: 'POST', url: '/v1/overlays', headers: AUTH, payload: { instanceId: inst.id, keepInstance: true } })).statusCode).toBe(202);
    expect((await inject(bare, { url: `/v1/overlays/${bare.ids.overlay}`, headers: AUTH })).json()).toMatchObject({ id: bare.ids.overlay });
    const part = await inject(bare, { url: `/v1/overlays/${bare.ids.overlay}/content`, headers: { ...AUTH, range: 'bytes=0-3' } });
    expect(part.statusCode).toBe(206);
    expect(part.body).toBe('fuzz');
    const op = encodeURIComponent(bare.ids.operation);
    expect((await inject(bare, { url: `/v1/operations/${op}`, headers: AUTH })).json()).toMatchObject({ id: bare.ids.operation });
    expect((await inject(bare, { method: 'DELETE', url: `/v1/operations/${op}`, headers: AUTH })).statusCode).toBe(202);
  });

  test('schedules: create, list, show, trigger, pause, unpause, delete', async () => {
    const recipe = { recipeId: 'sane', hostId: 'host-a', baseId: bare.ids.base, command: 'true' };
    expect((await inject(bare, { method: 'POST', url: '/v1/schedules', headers: AUTH, payload: { recipe, every: '1h' } })).statusCode).toBe(201);
    expect((await inject(bare, { url: '/v1/schedules', headers: AUTH })).json<{ schedules: unknown[] }>().schedules).toHaveLength(2);
    expect((await inject(bare, { url: '/v1/schedules/sane', headers: AUTH })).json()).toMatchObject({ recipeId: 'sane', every: '1h' });
    expect((await inject(bare, { method: 'POST', url: '/v1/schedules/sane/trigger', headers: AUTH })).statusCode).toBe(202);
    expect((await inject(bare, { method: 'POST', url: '/v1/schedules/sane/pause', headers: AUTH, payload: { note: 'n' } })).statusCode).toBe(204);
    expect((await inject(bare, { method: 'POST', url: '/v1/schedules/sane/unpause', headers: AUTH })).statusCode).toBe(204);
    expect((await inject(bare, { method: 'DELETE', url: '/v1/schedules/sane', headers: AUTH })).statusCode).toBe(204);
  });

  test('handoff: 501 without the backend; with one, a ticket is issued and ticket routes answer', async () => {
    const begin = { instanceId: 'inst-x', baseId: bare.ids.base };
    expect((await inject(bare, { method: 'POST', url: '/v1/handoffs', headers: AUTH, payload: begin })).statusCode).toBe(501);
    expect((await inject(stubbed, { method: 'POST', url: '/v1/handoffs', headers: AUTH, payload: begin })).statusCode).toBe(201);
    const round = await inject(stubbed, { method: 'POST', url: '/v1/handoffs/ho-1/rounds', headers: { authorization: `Bearer ${TICKET}` }, payload: { round: 1, final: false } });
    expect(round.statusCode).toBe(200);
    expect(stubbed.log.filter((c) => c.method === 'roundArrived' && c.error === undefined)).toHaveLength(1);
  });

  test('mobility: 501 without the backend; with one, cluster, neighbours and discovery answer', async () => {
    expect((await inject(bare, { url: '/v1/cluster', headers: AUTH })).statusCode).toBe(501);
    expect((await inject(stubbed, { url: '/v1/cluster', headers: AUTH })).statusCode).toBe(200);
    expect((await inject(stubbed, { method: 'POST', url: '/v1/neighbours', headers: AUTH, payload: { name: 'west', apiUrl: 'https://w.example', token: 'x'.repeat(16) } })).statusCode).toBe(201);
    expect((await inject(stubbed, { url: `/v1/discover?app=${stubbed.ids.base}&device=10.0.0.9:7777`, headers: AUTH })).statusCode).toBe(200);
  });
});

describe('fuzz (seeded; findings print the request to replay)', () => {
  test.each(FAMILIES.map((f) => [f]))('%s routes', async (family) => {
    const mine = routes.filter((r) => r.tag === family);
    expect(mine.length).toBeGreaterThan(0);
    const findings: Finding[] = [];
    for (const r of mine) {
      findings.push(...(await fuzzRoute(r, 'bare')));
      if (OPTIONAL_BACKENDS.has(r.tag)) findings.push(...(await fuzzRoute(r, 'stubbed')));
    }
    const unknown = triage(findings);
    if (unknown.length > 0) throw new Error(`${unknown.length} finding(s) on the ${family} routes:\n\n${unknown.slice(0, 15).map(show).join('\n\n')}`);
  });

  test('paths outside the document: the dashboard, unknown and odd paths', async () => {
    const w = await makeWorld('bare');
    try {
      const paths = [
        '/', '/v1', '/v1/', '/v2/hosts', '/V1/HOSTS', '/v1/hosts/', '/v1/hosts/x', '/v1//hosts', '/v1/hosts%00', '/v1/hosts;x', '/v1/hosts%2F',
        '/dashboard', '/dashboard/', '/dashboard/config.json', '/dashboard/..%2f..%2fpackage.json', '/dashboard/.env', '/dashboard/%00', '/dashboard/%zz',
        '/dashboard/index.html%00.js', `/dashboard/${'a'.repeat(5000)}`, '/%zz', `/${'a'.repeat(100 * 1024)}`, '/openapi.json/..', '/metrics?x=%zz',
      ];
      const findings: Finding[] = [];
      for (const url of paths) {
        for (const method of ['GET', 'POST', 'DELETE', 'OPTIONS']) {
          for (const headers of [AUTH, {}]) {
            const c: Case = { category: 'outside', label: `${method} ${url.slice(0, 60)}`, req: { method, url, headers: { ...headers, ...(method === 'POST' ? JSON_CT : {}) }, ...(method === 'POST' ? { payload: '{"hostId":"host-a","source":"/x"}' } : {}) } };
            // Unknown to the document: the dashboard's statuses are not documented; everything else must hold.
            for (const f of await send(w, c)) if (!(f.kind === 'status' && routesMatching(method, pathnameOf(url)).length === 0 && f.status < 500)) findings.push(f);
          }
        }
      }
      const unknown = triage(findings);
      if (unknown.length > 0) throw new Error(`${unknown.length} finding(s):\n\n${unknown.slice(0, 15).map(show).join('\n\n')}`);
    } finally {
      await closeWorld(w);
    }
  });
});

describe('bugs the fuzz found, fixed: each replays the request that found it', () => {
  let w: World;
  beforeAll(async () => {
    w = await makeWorld('bare');
  });
  afterAll(async () => {
    await closeWorld(w);
  });

  test('bad-url-default-body: a malformed percent-encoding in the path is answered in the Error schema', async () => {
    for (const url of [`/v1/instances/%zz`, '/v1/operations/%E0%A4%A', '/dashboard/%zz']) {
      const res = await w.app.inject({ url, headers: AUTH });
      expect(res.statusCode).toBe(400);
      expect(ErrorBodySchema.safeParse(res.json()).success).toBe(true);
    }
  });

  test('max-param-length: a valid 128-character instance id reaches its route (404 here, in the Error schema)', async () => {
    const id = `i${'a'.repeat(127)}`;
    expect(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/.test(id)).toBe(true);
    const res = await w.app.inject({ url: `/v1/instances/${id}`, headers: AUTH });
    expect(res.statusCode).toBe(404);
    expect(ErrorBodySchema.safeParse(res.json()).success).toBe(true);
  });

  test('schedule-every-unbounded: an "every" too long for a duration is a 400, not a 500', async () => {
    const recipe = { recipeId: 'long-every', hostId: 'host-a', baseId: w.ids.base, command: 'true' };
    for (const every of [`${'9'.repeat(400)}s`, `${'9'.repeat(20)}d`]) {
      const res = await w.app.inject({ method: 'POST', url: '/v1/schedules', headers: AUTH, payload: { recipe, every } });
      expect(res.statusCode).toBe(400);
    }
  });

  test('deploy-409-undocumented: POST /v1/deployments answers only statuses it documents', async () => {
    const documented = routes.find((r) => r.key === 'POST /v1/deployments')?.codes ?? [];
    const body = { overlayUrl: w.ids.overlayUrl, hosts: ['host-a'], count: 1 };
    const statuses: number[] = [];
    // Two deployments at once (no key), then a key reused for another request.
    for (const [payload, headers] of [[body, AUTH], [body, AUTH], [body, { ...AUTH, 'idempotency-key': 'dk' }], [{ ...body, count: 2 }, { ...AUTH, 'idempotency-key': 'dk' }]] as const) {
      statuses.push((await w.app.inject({ method: 'POST', url: '/v1/deployments', headers, payload })).statusCode);
    }
    expect(statuses.filter((s) => !documented.includes(s) && !GENERIC.includes(s))).toEqual([]);
  });

  test('fake-schedules-deep-recipe: a deeply nested unknown recipe field is refused, not a 500', async () => {
    const payload = `{"recipe":{"recipeId":"deep","hostId":"host-a","baseId":"${w.ids.base}","command":"true","x":${deep(DEEP_DEPTH).text}},"every":"6h"}`;
    const res = await w.app.inject({ method: 'POST', url: '/v1/schedules', headers: { ...AUTH, ...JSON_CT }, payload });
    expect(res.statusCode).toBeLessThan(500);
  });
});
