import pino, { type Logger } from 'pino';

/** Default logger of the snapshot codec; callers may pass their own (opts.logger). */
export const snapshotLog: Logger = pino({ name: 'cloudlet', level: process.env['LOG_LEVEL'] ?? 'info' }).child({ module: 'snapshot' });
export type { Logger };
