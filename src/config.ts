/**
 * Process configuration, parsed from the environment once, at the edge. Every setting has an
 * embedded default (Temporal dev server, local libvirt, SQLite under var/).
 */
import path from 'node:path';
import { z } from 'zod';
import { CloudletError } from './core/errors';
import { HOST_ID_PATTERN, WORKFLOW_TASK_QUEUE } from './common/names';
import { AllowList, DEFAULT_LIMITS, type FetchPolicy } from './core/fetch/policy';

export const REPO_ROOT = path.resolve(__dirname, '..');

const EnvSchema = z.object({
  CLOUDLET_TEMPORAL_ADDRESS: z.string().regex(/^[^:\s]+:\d+$/, 'host:port').default('127.0.0.1:7233'),
  CLOUDLET_NAMESPACE: z.string().min(1).default('default'),
  CLOUDLET_TEMPORAL_UI_PORT: z.coerce.number().int().min(1).max(65535).default(8233),
  CLOUDLET_VAR: z.string().min(1).default(path.join(REPO_ROOT, 'var')),
  CLOUDLET_HOST_ID: z.string().regex(HOST_ID_PATTERN, 'a DNS label such as "local" or "host-a"').default('local'),
  CLOUDLET_WORKFLOW_QUEUE: z.string().min(1).default(WORKFLOW_TASK_QUEUE),
  CLOUDLET_LOG_LEVEL: z.enum(['trace', 'debug', 'info', 'warn', 'error', 'silent']).default('info'),
  /** A worker process serves Prometheus metrics on this port (0: any free one; unset: none). */
  CLOUDLET_METRICS_PORT: z.coerce.number().int().min(0).max(65535).optional(),
  CLOUDLET_METRICS_HOST: z.string().min(1).default('127.0.0.1'),
  /** The cluster's neighbour registry (SQLite; default <var>/clusters/<namespace>/neighbours.sqlite). */
  CLOUDLET_NEIGHBOURS_DB: z.string().min(1).optional(),
  /** The cluster catalog (tokens of tenants, owners, quotas) as SQLite (default <var>/clusters/<namespace>/catalog.sqlite). */
  CLOUDLET_CATALOG_DB: z.string().min(1).optional(),
  /** The cluster catalog in PostgreSQL (postgres://user@host:port/db), for an API on several machines; overrides CLOUDLET_CATALOG_DB. */
  CLOUDLET_CATALOG_URL: z.string().regex(/^postgres(ql)?:\/\//, 'a postgres:// URL').optional(),
  /** The local address RTT probes to devices leave from (a multihomed host picks its path). */
  CLOUDLET_PROBE_FROM: z.ipv4().or(z.ipv6()).optional(),
  /** Hosts a neighbour's API URL may name (comma-separated; "*.example.org" for a domain); empty: any. */
  CLOUDLET_NEIGHBOUR_HOSTS: z.string().default(''),
  /**
   * Where overlays and base packages may be fetched from (docs/security.md): "public", IP
   * addresses, CIDR ranges, host names, *.domain; comma-separated. Default: this machine's
   * loopback, where the embedded cluster's hosts publish. Neighbour hosts are added to it.
   */
  CLOUDLET_FETCH_ALLOW: z.string().default('127.0.0.1'),
  /** Directories local overlay and package paths must be under (comma-separated; default <var>/imports and <var>/cache). */
  CLOUDLET_IMPORT_DIRS: z.string().optional(),
  CLOUDLET_MAX_OVERLAY_BYTES: z.coerce.number().int().positive().default(DEFAULT_LIMITS.maxOverlayBytes),
  CLOUDLET_MAX_PACKAGE_BYTES: z.coerce.number().int().positive().default(DEFAULT_LIMITS.maxPackageBytes),
  /** Connecting to an overlay or package server and receiving its answer's headers, each (seconds). */
  CLOUDLET_FETCH_TIMEOUT_S: z.coerce.number().positive().default(DEFAULT_LIMITS.headersTimeoutMs / 1000),
  /** The longest a download may receive nothing (seconds). */
  CLOUDLET_FETCH_IDLE_TIMEOUT_S: z.coerce.number().positive().default(DEFAULT_LIMITS.bodyIdleTimeoutMs / 1000),
  CLOUDLET_FETCH_MAX_REDIRECTS: z.coerce.number().int().min(0).max(20).default(DEFAULT_LIMITS.maxRedirects),
  /** Guest memory a host gives its synthesized VMs in all (MiB); default: its total memory less the reserve. */
  CLOUDLET_VM_MEMORY_MIB: z.coerce.number().int().positive().optional(),
  /** Memory a host keeps for itself when CLOUDLET_VM_MEMORY_MIB is unset (MiB). */
  CLOUDLET_MEMORY_RESERVE_MIB: z.coerce.number().int().min(0).default(1024),
  /** How often a host's monitor reads its stats (ms); every 60 readings it also reconciles the host (docs/reliability.md). */
  CLOUDLET_HOST_STATS_EVERY_MS: z.coerce.number().int().min(100).default(5000),
  /** How often a host's warm pool checks its VMs and replaces used ones (ms; docs/warm-pool.md). */
  CLOUDLET_WARM_POOL_EVERY_MS: z.coerce.number().int().min(500).default(10_000),
});

export interface Config {
  temporalAddress: string;
  namespace: string;
  webUiUrl: string;
  varDir: string;
  hostId: string;
  /** The shared queue for workflow tasks (tests use their own to stay isolated). */
  workflowTaskQueue: string;
  logLevel: z.infer<typeof EnvSchema>['CLOUDLET_LOG_LEVEL'];
  /** Where a worker process serves its metrics (docs/observability.md); absent: it serves none. */
  metrics?: { host: string; port: number };
  /** Mobility (docs/mobility.md): the neighbour registry, where probes leave from, allowed neighbour hosts. */
  mobility: { registryFile: string; probeFrom?: string; neighbourHosts: string[] };
  /** Where the cluster catalog is (docs/security.md). */
  catalog: { file: string; url?: string };
  /** What a host's workers may fetch overlays and packages from, and the limits (docs/security.md). */
  fetch: FetchPolicy;
  /** Admission by memory (docs/operations.md). */
  admission: { vmMemoryBytes?: number; reserveBytes: number };
  /** How often a host's warm pool steps when at its targets (docs/warm-pool.md). */
  warmPoolEveryMs: number;
  /** How often a host's monitor reads its stats; it reconciles the host every 60 readings. */
  hostStatsEveryMs: number;
}

export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const parsed = EnvSchema.safeParse(env);
  if (!parsed.success) {
    const problems = parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ');
    throw new CloudletError('BAD_INPUT', `invalid environment configuration (${problems})`, {
      fix: 'correct or unset the named CLOUDLET_* variables',
    });
  }
  const e = parsed.data;
  const uiHost = e.CLOUDLET_TEMPORAL_ADDRESS.split(':')[0] ?? '127.0.0.1';
  const list = (s: string): string[] => s.split(',').map((h) => h.trim()).filter(Boolean);
  const neighbourHosts = list(e.CLOUDLET_NEIGHBOUR_HOSTS);
  const varDir = path.resolve(e.CLOUDLET_VAR);
  return {
    temporalAddress: e.CLOUDLET_TEMPORAL_ADDRESS,
    namespace: e.CLOUDLET_NAMESPACE,
    webUiUrl: `http://${uiHost}:${e.CLOUDLET_TEMPORAL_UI_PORT}`,
    varDir,
    hostId: e.CLOUDLET_HOST_ID,
    workflowTaskQueue: e.CLOUDLET_WORKFLOW_QUEUE,
    logLevel: e.CLOUDLET_LOG_LEVEL,
    mobility: {
      registryFile: path.resolve(e.CLOUDLET_NEIGHBOURS_DB ?? path.join(e.CLOUDLET_VAR, 'clusters', e.CLOUDLET_NAMESPACE, 'neighbours.sqlite')),
      ...(e.CLOUDLET_PROBE_FROM ? { probeFrom: e.CLOUDLET_PROBE_FROM } : {}),
      neighbourHosts,
    },
    catalog: {
      file: path.resolve(e.CLOUDLET_CATALOG_DB ?? path.join(varDir, 'clusters', e.CLOUDLET_NAMESPACE, 'catalog.sqlite')),
      ...(e.CLOUDLET_CATALOG_URL ? { url: e.CLOUDLET_CATALOG_URL } : {}),
    },
    admission: { ...(e.CLOUDLET_VM_MEMORY_MIB !== undefined ? { vmMemoryBytes: e.CLOUDLET_VM_MEMORY_MIB * 1024 * 1024 } : {}), reserveBytes: e.CLOUDLET_MEMORY_RESERVE_MIB * 1024 * 1024 },
    warmPoolEveryMs: e.CLOUDLET_WARM_POOL_EVERY_MS,
    hostStatsEveryMs: e.CLOUDLET_HOST_STATS_EVERY_MS,
    fetch: {
      allow: new AllowList([...list(e.CLOUDLET_FETCH_ALLOW), ...neighbourHosts]),
      importDirs: (e.CLOUDLET_IMPORT_DIRS !== undefined ? list(e.CLOUDLET_IMPORT_DIRS) : [path.join(varDir, 'imports'), path.join(varDir, 'cache')]).map((d) => path.resolve(d)),
      limits: {
        maxOverlayBytes: e.CLOUDLET_MAX_OVERLAY_BYTES,
        maxPackageBytes: e.CLOUDLET_MAX_PACKAGE_BYTES,
        headersTimeoutMs: Math.round(e.CLOUDLET_FETCH_TIMEOUT_S * 1000),
        bodyIdleTimeoutMs: Math.round(e.CLOUDLET_FETCH_IDLE_TIMEOUT_S * 1000),
        maxRedirects: e.CLOUDLET_FETCH_MAX_REDIRECTS,
      },
    },
    ...(e.CLOUDLET_METRICS_PORT !== undefined ? { metrics: { host: e.CLOUDLET_METRICS_HOST, port: e.CLOUDLET_METRICS_PORT } } : {}),
  };
}

/** Where a host keeps its instances, stores and logs. */
export function hostDir(config: Config, hostId: string): string {
  return path.join(config.varDir, 'hosts', hostId);
}
