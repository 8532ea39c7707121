/**
 * Route the Temporal SDK's own logs (worker state changes, workflow and activity logs) into the
 * process's structured pino logger, once per process; optionally export its metrics.
 */
import { Runtime } from '@temporalio/worker';
import type { Logger as TemporalLogger, LogLevel, LogMetadata } from '@temporalio/common';
import type { Logger } from 'pino';

let installed = false;

/**
 * Each host runs a second Worker, workflows only, for the shared workflow queue, so the SDK's
 * "No activities registered, not polling for activity tasks" (and its workflows twin) is
 * expected: debug, not a warning in every worker's log.
 */
const EXPECTED = /^No (workflows|activities) registered, not polling for (workflow|activity) tasks/;

/** The level a message of the SDK is logged at. */
export function levelFor(level: LogLevel, message: string): 'trace' | 'debug' | 'info' | 'warn' | 'error' {
  if (level === 'WARN' && EXPECTED.test(message)) return 'debug';
  return level.toLowerCase() as 'trace' | 'debug' | 'info' | 'warn' | 'error';
}

/**
 * `prometheusBindAddress`: the SDK's own worker metrics are served there (host:port), for the
 * worker's metrics server to include (docs/observability.md).
 */
export function installRuntimeLogging(log: Logger, options: { prometheusBindAddress?: string } = {}): void {
  if (installed) return;
  installed = true;
  const at = (level: LogLevel, message: string, meta?: LogMetadata): void => {
    log[levelFor(level, message)](meta ?? {}, message);
  };
  const logger: TemporalLogger = {
    log: at,
    trace: (m, meta) => at('TRACE', m, meta),
    debug: (m, meta) => at('DEBUG', m, meta),
    info: (m, meta) => at('INFO', m, meta),
    warn: (m, meta) => at('WARN', m, meta),
    error: (m, meta) => at('ERROR', m, meta),
  };
  try {
    Runtime.install({
      logger,
      ...(options.prometheusBindAddress ? { telemetryOptions: { metrics: { prometheus: { bindAddress: options.prometheusBindAddress } } } } : {}),
    });
  } catch {
    // A Runtime already exists in this process (e.g. installed by the embedding program); keep it.
  }
}
