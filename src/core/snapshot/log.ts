import type { Logger } from 'pino';
import { createLogger } from '../../common/logger';

/** Default logger of the snapshot codec (stderr, like every cloudlet log); callers may pass their own (opts.logger). */
export const snapshotLog: Logger = createLogger('cloudlet').child({ module: 'snapshot' });
export type { Logger };
