/**
 * The API server's entry: parse the environment (zod), get a CloudletService, listen.
 *
 *   CLOUDLET_API_TOKENS    comma-separated bearer tokens (required unless CLOUDLET_API_INSECURE=1)
 *   CLOUDLET_API_INSECURE  1: serve without authentication (development only)
 *   CLOUDLET_API_HOST      listen address (default 127.0.0.1)
 *   CLOUDLET_API_PORT      listen port (default 8080)
 *   CLOUDLET_TRACE_FILE, OTEL_EXPORTER_OTLP_ENDPOINT   tracing (docs/observability.md)
 *
 * `runApi(createBackend)` is what a wiring module calls with the Temporal-backed service; run
 * directly with `--fake`, it serves the in-memory fake (for trying the API and its docs).
 */
import { initTracing, tracingFromEnv } from '../common/tracing';
import { z } from 'zod';
import { createLogger } from '../common/logger';
import type { CloudletService } from '../service/types';
import { parseTokens } from './auth';
import type { ClusterCatalog } from '../core/cluster-catalog';
import type { RecipeScheduleApi } from '../service/schedule-types';
import type { HandoffService } from '../service/handoff-types';
import type { MobilityService } from '../service/mobility-types';
import { startApi, type RunningApi } from './server';

const ApiEnvSchema = z.object({
  CLOUDLET_API_TOKENS: z.string().optional(),
  CLOUDLET_API_INSECURE: z.enum(['0', '1', 'true', 'false', '']).optional(),
  CLOUDLET_API_HOST: z.string().min(1).default('127.0.0.1'),
  CLOUDLET_API_PORT: z.coerce.number().int().min(0).max(65535).default(8080),
});

export interface ApiConfig {
  tokens: string[];
  insecure: boolean;
  host: string;
  port: number;
}

export function loadApiConfig(env: NodeJS.ProcessEnv = process.env): ApiConfig {
  const r = ApiEnvSchema.safeParse(env);
  if (!r.success) {
    const problems = r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ');
    throw new Error(`invalid API configuration (${problems}). Fix: correct or unset the named CLOUDLET_API_* variables`);
  }
  const e = r.data;
  const insecure = e.CLOUDLET_API_INSECURE === '1' || e.CLOUDLET_API_INSECURE === 'true';
  const tokens = parseTokens(e.CLOUDLET_API_TOKENS);
  if (tokens.length === 0 && !insecure) {
    throw new Error(
      'CLOUDLET_API_TOKENS is empty: the API refuses to start without a bearer token. ' +
        'Fix: export CLOUDLET_API_TOKENS=$(openssl rand -hex 32), or CLOUDLET_API_INSECURE=1 on a development machine',
    );
  }
  return { tokens, insecure, host: e.CLOUDLET_API_HOST, port: e.CLOUDLET_API_PORT };
}

/** What the API serves: the service, and (optionally) recipe schedules; closed on shutdown. */
export interface ApiBackend {
  service: CloudletService;
  schedules?: RecipeScheduleApi;
  handoffs?: HandoffService;
  mobility?: MobilityService;
  /** Where the dashboard links runs to. */
  temporalUi?: { url: string; namespace: string };
  /** Tenants' tokens, owners and quotas (docs/security.md). */
  catalog?: ClusterCatalog;
  close?: () => Promise<void>;
}

/** Start the API over the backend `createBackend` makes; closes both on SIGINT/SIGTERM. */
export async function runApi(createBackend: () => Promise<ApiBackend>, env: NodeJS.ProcessEnv = process.env): Promise<RunningApi> {
  const config = loadApiConfig(env);
  const logger = createLogger('cloudlet-api');
  // Before the backend connects to Temporal: its client then carries traces into the workflows.
  const traceOptions = tracingFromEnv(env);
  const tracing = traceOptions ? initTracing('cloudlet-api', traceOptions) : undefined;
  const backend = await createBackend();
  const api = await startApi(backend.service, {
    ...(backend.schedules ? { schedules: backend.schedules } : {}),
    ...(backend.handoffs ? { handoffs: backend.handoffs } : {}),
    ...(backend.mobility ? { mobility: backend.mobility } : {}),
    ...(backend.temporalUi ? { temporalUi: backend.temporalUi } : {}),
    ...(backend.catalog ? { catalog: backend.catalog } : {}),
    tokens: config.tokens,
    insecure: config.insecure,
    host: config.host,
    port: config.port,
    logger,
  });
  logger.info({ url: api.url, openapi: `${api.url}/openapi.json`, dashboard: `${api.url}/dashboard/`, tokens: config.tokens.length, insecure: config.insecure }, 'cloudlet API listening');
  const stop = async (signal: string) => {
    logger.info({ signal }, 'cloudlet API stopping');
    await api.close();
    await backend.close?.();
    await tracing?.shutdown();
    process.exit(0);
  };
  process.once('SIGINT', (s) => void stop(s));
  process.once('SIGTERM', (s) => void stop(s));
  return api;
}

if (require.main === module) {
  const args = process.argv.slice(2);
  if (args.includes('--fake')) {
    runApi(async () => {
      const { FakeCloudletService, FakeRecipeSchedules } = await import('../service/fake');
      const service = new FakeCloudletService();
      return { service, schedules: new FakeRecipeSchedules(service), close: async () => service.cleanup() };
    }).catch((e: unknown) => {
      process.stderr.write(`cloudlet-api: ${(e as Error).message}\n`);
      process.exit(1);
    });
  } else {
    runApi(async () => {
      const { createTemporalBackend } = await import('../service');
      return createTemporalBackend();
    }).catch((e: unknown) => {
      process.stderr.write(`cloudlet-api: ${(e as Error).message}\n`);
      process.exit(1);
    });
  }
}
