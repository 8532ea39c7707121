/**
 * Entry point of a host's worker process:
 *   npx tsx src/workers/main.ts --host <id>       (or CLOUDLET_HOST_ID=<id>)
 */
import { freePort } from '../common/ports';
import { Command } from 'commander';
import { loadConfig } from '../config';
import { createLogger } from '../common/logger';
import { HOST_ID_PATTERN } from '../common/names';
import { serveMetrics } from '../common/metrics';
import { initTracing, tracingFromEnv } from '../common/tracing';
import { createHostWorker } from './host-worker';
import { installRuntimeLogging } from './runtime-logging';

async function main(): Promise<void> {
  const program = new Command('cloudlet-worker')
    .description("Run the worker of one cloudlet host: its own queue (the host's activities and operations) and the shared workflow queue")
    .option('--host <id>', 'host id (default: $CLOUDLET_HOST_ID or "local")')
    .parse();
  const config = loadConfig();
  const hostId: string = program.opts<{ host?: string }>().host ?? config.hostId;
  if (!HOST_ID_PATTERN.test(hostId)) {
    throw new Error(`invalid host id "${hostId}": use lower-case letters, digits and dashes (e.g. host-a)`);
  }
  const log = createLogger(`worker:${hostId}`, config.logLevel);
  const traceOptions = tracingFromEnv();
  const tracing = traceOptions ? initTracing(`cloudlet-worker-${hostId}`, traceOptions) : undefined;
  if (traceOptions) log.info(traceOptions, 'tracing');
  let sdkMetricsUrl: string | undefined;
  if (config.metrics) {
    const sdkPort = await freePort();
    installRuntimeLogging(log, { prometheusBindAddress: `127.0.0.1:${sdkPort}` });
    sdkMetricsUrl = `http://127.0.0.1:${sdkPort}/metrics`;
  }
  const worker = await createHostWorker(config, hostId, log);
  const served = config.metrics ? await serveMetrics({ ...config.metrics, ...(sdkMetricsUrl ? { sdkMetricsUrl } : {}) }) : undefined;
  if (served) log.info({ metrics: served.url }, 'serving Prometheus metrics');
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      log.info({ signal: sig }, 'shutting down');
      worker.shutdown();
    });
  }
  await worker.run();
  await served?.close();
  await tracing?.shutdown();
}

main().catch((err: unknown) => {
  console.error(err instanceof Error ? err.message : err);
  process.exit(1);
});
