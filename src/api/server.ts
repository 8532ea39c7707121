/**
 * The cloudlet HTTP API: a thin face over a CloudletService. `buildServer` makes the fastify app
 * (tests drive it with `app.inject`, no port); `startApi` also listens.
 */
import fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import type pino from 'pino';
import type { z } from 'zod';
import type { CloudletService } from '../service/types';
import { Authenticator, authorize, type Principal } from './auth';
import type { ClusterCatalog } from '../core/cluster-catalog';
import { TenantLocks, TenantScope } from './tenancy';
import { tenantRoutes } from './routes/tenants';
import { metrics, registry } from '../common/metrics';
import { step } from '../common/tracing';
import fastifyStatic from '@fastify/static';
import { REPO_ROOT } from '../config';

const DASHBOARD_DIR = path.join(REPO_ROOT, 'src', 'api', 'dashboard');
import { ApiError, sendError, validationError } from './errors';
import { buildOpenApi } from './openapi';
import { accessOf, defineRoute, R, type Route } from './route';
import { baseRoutes } from './routes/bases';
import { hostRoutes } from './routes/hosts';
import { instanceRoutes } from './routes/instances';
import { operationRoutes } from './routes/operations';
import { overlayRoutes } from './routes/overlays';
import { scheduleRoutes } from './routes/schedules';
import type { RecipeScheduleApi } from '../service/schedule-types';
import { handoffRoutes } from './routes/handoffs';
import type { HandoffService } from '../service/handoff-types';
import type { MobilityService } from '../service/mobility-types';
import { mobilityRoutes } from './routes/mobility';
import { HealthSchema, IdempotencyKeySchema } from './schemas';

export interface ApiOptions {
  service: CloudletService;
  /** Recipe schedules (the service's RecipeSchedules); without them /v1/schedules answers 501. */
  schedules?: RecipeScheduleApi;
  /** Handoff between clusters; without it the /v1/handoffs routes answer 501. */
  handoffs?: HandoffService;
  /** Neighbours, RTT, mobility controllers, discovery; without it those routes answer 501. */
  mobility?: MobilityService;
  /** The operators' bearer tokens (admin, of no tenant). Empty is refused unless `insecure` is set or a catalog is given. */
  tokens: readonly string[];
  /** The cluster catalog: tenants' tokens, owners, quotas (docs/security.md). Without it only `tokens` are accepted and nothing is filtered by tenant. */
  catalog?: ClusterCatalog;
  /** Serve without authentication (local development only; logged loudly). */
  insecure?: boolean;
  logger?: pino.Logger;
  /** Largest JSON body accepted, in bytes (default 64 KiB: bodies are small). */
  bodyLimit?: number;
  /** Where the dashboard links runs to: the Temporal Web UI and the namespace (docs/dashboard.md). */
  temporalUi?: { url: string; namespace: string };
}

const serviceRoutes: readonly Route[] = [...hostRoutes, ...baseRoutes, ...instanceRoutes, ...overlayRoutes, ...operationRoutes];

/** Every route of the API, in documentation order (without the two meta routes). */
export const apiRoutes: readonly Route[] = [...serviceRoutes, ...scheduleRoutes(undefined), ...handoffRoutes(undefined), ...mobilityRoutes(undefined), ...tenantRoutes(undefined)];

declare module 'fastify' {
  interface FastifyRequest {
    /** Set by authentication (routes that need a token). */
    principal?: Principal;
  }
}

const ANONYMOUS: Principal = { role: 'reader', tokenId: 'anonymous' };
const INSECURE: Principal = { role: 'admin', tokenId: 'insecure' };

export async function buildServer(options: ApiOptions): Promise<FastifyInstance> {
  const insecure = options.insecure === true;
  if (options.tokens.length === 0 && !insecure && !options.catalog) {
    throw new Error(
      'the cloudlet API needs at least one bearer token. Fix: set CLOUDLET_API_TOKENS (comma-separated, e.g. `openssl rand -hex 32`), ' +
        'or CLOUDLET_API_INSECURE=1 to serve without authentication on a development machine',
    );
  }
  const auth = new Authenticator(options.tokens, options.catalog);
  const locks = new TenantLocks();

  const loggerInstance: FastifyBaseLogger | undefined = options.logger;
  const app: FastifyInstance = fastify({
    ...(loggerInstance ? { loggerInstance } : { logger: false }),
    bodyLimit: options.bodyLimit ?? 64 * 1024,
    // Ids may be 128 characters (and operation ids longer); fastify's default cuts params at 100.
    routerOptions: { maxParamLength: 2048 },
    // The router's own refusals (a malformed %-escape, an over-long param) answer like every error.
    frameworkErrors: (err, req, reply) => {
      const e = err.code === 'FST_ERR_MAX_PARAM_LENGTH' || err.code === 'FST_ERR_BAD_URL' ? new ApiError(400, 'BAD_INPUT', `the request path is malformed: ${err.message}`, { fix: 'URL-encode the path\'s ids (e.g. encodeURIComponent)' }) : err;
      void sendError(e, req, reply);
    },
    // A caller's X-Request-Id (when it looks like one) is kept, so a request can be traced end to end.
    requestIdHeader: false,
    genReqId: (req) => {
      const given = req.headers['x-request-id'];
      return typeof given === 'string' && /^[A-Za-z0-9._:-]{8,128}$/.test(given) ? given : `req-${randomUUID()}`;
    },
  });
  if (insecure) app.log.warn('the cloudlet API serves WITHOUT authentication (CLOUDLET_API_INSECURE=1): use this on a development machine only');

  // Bodies are JSON; anything else is 415 rather than a string zod would reject confusingly.
  app.removeContentTypeParser('text/plain');
  app.setErrorHandler((err, req, reply) => sendError(err, req, reply));
  app.setNotFoundHandler((req, reply) =>
    sendError(new ApiError(404, 'NOT_FOUND', `no route ${req.method} ${req.url.split('?')[0] ?? ''}`, { fix: 'see GET /openapi.json for the routes' }), req, reply),
  );
  app.addHook('onSend', async (req, reply) => {
    void reply.header('x-request-id', String(req.id));
  });
  // Requests by route pattern (never the raw URL: ids would make a series each) and status.
  app.addHook('onResponse', async (req, reply) => {
    const route = req.routeOptions.url ?? 'unmatched';
    metrics.apiRequests.inc({ method: req.method, route, status: String(reply.statusCode) });
    metrics.apiSeconds.observe({ method: req.method, route }, reply.elapsedTime / 1000);
  });

  // The dashboard: static files that read the API with the user's token (docs/dashboard.md).
  await app.register(fastifyStatic, { root: DASHBOARD_DIR, prefix: '/dashboard/', index: 'index.html', list: false, dotfiles: 'deny' });
  app.get('/dashboard', async (_req, reply) => reply.redirect('/dashboard/'));
  app.get('/dashboard/config.json', async () => ({
    temporalUiUrl: options.temporalUi?.url ?? '',
    namespace: options.temporalUi?.namespace ?? '',
    schedules: options.schedules !== undefined,
  }));

  let openapi: Record<string, unknown> | undefined;
  const metaRoutes: Route[] = [
    defineRoute({
      method: 'GET',
      path: '/healthz',
      operationId: 'health',
      summary: 'Liveness of the API process (no authentication)',
      tag: 'meta',
      auth: false,
      responses: { 200: { description: 'The API answers.', schema: HealthSchema } },
      handler: async () => ({ ok: true }),
    }),
    defineRoute({
      method: 'GET',
      path: '/openapi.json',
      operationId: 'openapi',
      summary: 'This OpenAPI 3.1 document (no authentication)',
      tag: 'meta',
      auth: false,
      responses: { 200: { description: 'The OpenAPI document.' } },
      handler: async () => (openapi ??= buildOpenApi(allRoutes)),
    }),
    defineRoute({
      method: 'GET',
      path: '/metrics',
      operationId: 'metrics',
      access: 'admin',
      summary: "The API process's Prometheus metrics (requests by route and status, process figures); bearer token as for every route",
      tag: 'meta',
      responses: { 200: { description: 'Prometheus text exposition format.' }, 401: R.unauthorized },
      handler: async ({ reply }) => {
        void reply.type(registry.contentType);
        return registry.metrics();
      },
    }),
  ];
  const allRoutes = [...metaRoutes, ...serviceRoutes, ...scheduleRoutes(options.schedules), ...handoffRoutes(options.handoffs), ...mobilityRoutes(options.mobility), ...tenantRoutes(options.catalog)];

  for (const route of allRoutes) {
    const needsToken = route.auth !== false && !insecure;
    const access = accessOf(route);
    app.route({
      method: route.method,
      url: route.fastifyPath ?? route.path.replace(/\{(\w+)\}/g, ':$1'),
      // Before the body is read: a client without a token (or the role) learns nothing from a 400.
      ...(needsToken
        ? {
            onRequest: async (req: FastifyRequest, reply: FastifyReply) => {
              const principal = await auth.authenticate(req.headers.authorization);
              req.principal = principal;
              // Every line this request logs names who asked (never the token itself).
              req.log = reply.log = req.log.child({ tenant: principal.tenant ?? '(operators)', role: principal.role, tokenId: principal.tokenId });
              authorize(principal, access, `${route.operationId} (${route.method} ${route.path})`);
            },
          }
        : {}),
      handler: (req, reply) => handle(route, req, reply),
    });
  }

  async function handle(route: Route, req: FastifyRequest, reply: FastifyReply): Promise<unknown> {
    const params = route.params ? parse(route.params, 'params', rawParams(route, req.params)) : undefined;
    let idempotencyKey: string | undefined;
    if (route.idempotent) {
      const raw = req.headers['idempotency-key'];
      if (raw !== undefined) {
        const r = IdempotencyKeySchema.safeParse(raw);
        if (!r.success) throw validationError('header', prefixIssues(r.error, 'Idempotency-Key'));
        idempotencyKey = r.data;
      }
    }
    const body = route.body ? parse(route.body, 'body', req.body === undefined && route.bodyOptional ? {} : req.body) : undefined;
    const query = route.query ? parse(route.query, 'query', req.query ?? {}) : undefined;
    // A span per request (a no-op without tracing): workflows it starts continue its trace.
    return step(`${route.method} ${route.path}`, async (span) => {
      const scope = new TenantScope(req.principal ?? (insecure ? INSECURE : ANONYMOUS), options.catalog, locks);
      const r = await route.handler({ params, body, query, idempotencyKey: scope.keyFor(idempotencyKey), service: options.service, scope, req, reply });
      span.setAttributes({ 'http.request.method': route.method, 'http.route': route.path, 'cloudlet.request_id': String(req.id) });
      return r;
    });
  }

  return app;
}

function parse(schema: z.ZodType, where: string, value: unknown): unknown {
  const r = schema.safeParse(value);
  if (!r.success) throw validationError(where, r.error);
  return r.data;
}

function prefixIssues(error: z.ZodError, name: string): z.ZodError {
  for (const i of error.issues) i.path.unshift(name);
  return error;
}

/** A wildcard route's `*` param under the name the OpenAPI path gives it. */
function rawParams(route: Route, params: unknown): unknown {
  if (!route.fastifyPath?.includes('*')) return params;
  const name = /\{(\w+)\}/.exec(route.path)?.[1] ?? 'id';
  return { [name]: (params as Record<string, unknown>)['*'] };
}

export interface RunningApi {
  app: FastifyInstance;
  /** http://host:port of the listening server. */
  url: string;
  close(): Promise<void>;
}

/** Build the server and listen (default 127.0.0.1, port 8080; port 0 picks a free one). */
export async function startApi(
  service: CloudletService,
  options: Omit<ApiOptions, 'service'> & { host?: string; port?: number },
): Promise<RunningApi> {
  const app = await buildServer({ ...options, service });
  const host = options.host ?? '127.0.0.1';
  await app.listen({ host, port: options.port ?? 8080 });
  const addr = app.server.address();
  const port = typeof addr === 'object' && addr ? addr.port : (options.port ?? 8080);
  const shownHost = host.includes(':') ? `[${host}]` : host;
  return { app, url: `http://${shownHost}:${port}`, close: () => app.close() };
}
