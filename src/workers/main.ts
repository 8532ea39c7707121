/**
 * Entry point of a host's worker process:
 *   npx tsx src/workers/main.ts --host <id>       (or CLOUDLET_HOST_ID=<id>)
 */
import { Command } from 'commander';
import { loadConfig } from '../config';
import { createLogger } from '../common/logger';
import { HOST_ID_PATTERN } from '../common/names';
import { createHostWorker } from './host-worker';

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
  const worker = await createHostWorker(config, hostId, log);
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      log.info({ signal: sig }, 'shutting down');
      worker.shutdown();
    });
  }
  await worker.run();
}

main().catch((err: unknown) => {
  console.error(err instanceof Error ? err.message : err);
  process.exit(1);
});
