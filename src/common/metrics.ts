/**
 * The cloudlet's Prometheus metrics (prom-client), one registry per process. Worker processes
 * record activities, their stage timings and bytes; the API records requests. Each process serves
 * them on its own port (serveMetrics), beside the Temporal SDK's own worker metrics when given.
 * Every metric is listed in docs/observability.md.
 */
import http from 'node:http';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export const registry = new Registry();
collectDefaultMetrics({ register: registry, prefix: 'cloudlet_process_' });

/** Seconds, from 10 ms to 10 min: a stage, an activity, a whole synthesis or handoff. */
const SECONDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600];
/** Bytes, from 64 KiB to 4 GiB. */
const BYTES = [65_536, 262_144, 1_048_576, 4_194_304, 16_777_216, 67_108_864, 268_435_456, 1_073_741_824, 4_294_967_296];

export const metrics = {
  activitySeconds: new Histogram({
    name: 'cloudlet_activity_duration_seconds',
    help: 'Host activities (import, synthesis steps, overlay creation, handoff rounds...) by name and outcome',
    labelNames: ['host', 'activity', 'outcome'] as const,
    buckets: SECONDS,
    registers: [registry],
  }),
  stageSeconds: new Histogram({
    name: 'cloudlet_stage_duration_seconds',
    help: 'Stages inside an activity, from its timings (fetch, apply, restore, replug, app wait, handoff capture/build/send/apply...)',
    labelNames: ['host', 'activity', 'stage'] as const,
    buckets: SECONDS,
    registers: [registry],
  }),
  bytes: new Counter({
    name: 'cloudlet_transfer_bytes_total',
    help: 'Bytes moved between hosts: overlays fetched, handoff rounds and base packages shipped',
    labelNames: ['host', 'direction', 'what'] as const,
    registers: [registry],
  }),
  overlayBytes: new Histogram({
    name: 'cloudlet_overlay_size_bytes',
    help: 'Size of the overlays this host created',
    labelNames: ['host'] as const,
    buckets: BYTES,
    registers: [registry],
  }),
  handoffDowntimeSeconds: new Histogram({
    name: 'cloudlet_handoff_pause_seconds',
    help: 'How long a handoff kept the VM paused (cut-over until the destination answered)',
    labelNames: ['host'] as const,
    buckets: SECONDS,
    registers: [registry],
  }),
  apiRequests: new Counter({
    name: 'cloudlet_api_requests_total',
    help: 'API requests by method, route and status code',
    labelNames: ['method', 'route', 'status'] as const,
    registers: [registry],
  }),
  apiSeconds: new Histogram({
    name: 'cloudlet_api_request_duration_seconds',
    help: 'API request durations by method and route',
    labelNames: ['method', 'route'] as const,
    buckets: SECONDS,
    registers: [registry],
  }),
};

/** A gauge whose values are read when Prometheus scrapes (host memory, store space, instances). */
export function scrapedGauge<L extends string>(name: string, help: string, labelNames: readonly L[], read: () => Promise<Array<{ labels: Record<L, string>; value: number }>>): Gauge<L> {
  return new Gauge<L>({
    name,
    help,
    labelNames,
    registers: [registry],
    async collect() {
      this.reset();
      for (const v of await read()) this.set(v.labels, v.value);
    },
  });
}

/** What an activity's result says about its stages and bytes (results are plain JSON objects). */
export function recordActivityResult(host: string, activity: string, result: unknown): void {
  if (!result || typeof result !== 'object') return;
  const r = result as Record<string, unknown>;
  const timings = r.timings;
  if (timings && typeof timings === 'object') {
    for (const [k, v] of Object.entries(timings as Record<string, unknown>)) {
      // Every timings map here is in milliseconds (some keys say so with an "Ms" suffix).
      if (typeof v === 'number' && Number.isFinite(v) && v >= 0) metrics.stageSeconds.observe({ host, activity, stage: k.replace(/\s*Ms$/, '') }, v / 1000);
    }
  }
  // A handoff round's report: its phases, and the bytes that crossed the link.
  const ms = r.ms;
  if (ms && typeof ms === 'object' && typeof r.bytes === 'number' && typeof r.round === 'number') {
    for (const [k, v] of Object.entries(ms as Record<string, unknown>)) {
      if (typeof v === 'number' && k !== 'total') metrics.stageSeconds.observe({ host, activity, stage: k }, v / 1000);
    }
    metrics.bytes.inc({ host, direction: 'sent', what: 'handoff round' }, r.bytes);
  }
  if (activity === 'handoffSendBase' && typeof r.sent === 'number') metrics.bytes.inc({ host, direction: 'sent', what: 'base package' }, r.sent);
  if (activity === 'handoffCutOver' && typeof r.pausedMs === 'number') metrics.handoffDowntimeSeconds.observe({ host }, r.pausedMs / 1000);
  if (activity === 'createInstanceOverlay' && typeof r.bytes === 'number') metrics.overlayBytes.observe({ host }, r.bytes);
  if (typeof r.fetchedBytes === 'number') metrics.bytes.inc({ host, direction: 'received', what: 'overlay' }, r.fetchedBytes);
}

export interface MetricsServer {
  url: string;
  close(): Promise<void>;
}

/**
 * Serves GET /metrics: this process's registry, then (if given) the Temporal SDK's own metrics,
 * read from its exporter, so one scrape target has both.
 */
export async function serveMetrics(opts: { host?: string; port: number; sdkMetricsUrl?: string }): Promise<MetricsServer> {
  const server = http.createServer((req, res) => {
    if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('only GET /metrics here\n');
      return;
    }
    void (async () => {
      let text = await registry.metrics();
      if (opts.sdkMetricsUrl) {
        const sdk = await fetch(opts.sdkMetricsUrl, { signal: AbortSignal.timeout(5000) }).then((r) => r.text()).catch((e: unknown) => `# the Temporal SDK's metrics could not be read: ${(e as Error).message}\n`);
        text += `\n${sdk}`;
      }
      res.writeHead(200, { 'content-type': registry.contentType }).end(text);
    })().catch((e: unknown) => {
      res.writeHead(500, { 'content-type': 'text/plain' }).end(`metrics failed: ${(e as Error).message}\n`);
    });
  });
  const host = opts.host ?? '127.0.0.1';
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, host, resolve);
  });
  const addr = server.address();
  const port = typeof addr === 'object' && addr ? addr.port : opts.port;
  return { url: `http://${host}:${port}/metrics`, close: () => new Promise((r) => server.close(() => r())) };
}
