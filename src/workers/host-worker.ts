/**
 * One worker process per cloudlet host. It polls the host's own task queue for activities
 * (they touch this host's files and hypervisor) and the shared queue for workflow tasks.
 */
import { NativeConnection, Worker } from '@temporalio/worker';
import type { Logger } from 'pino';
import { hostTaskQueue } from '../common/names';
import type { Config } from '../config';
import { hostDir } from '../config';
import { createHostActivities } from '../activities';
import { installRuntimeLogging } from './runtime-logging';

export interface HostWorker {
  /** Resolves when both workers have stopped. */
  run(): Promise<void>;
  shutdown(): void;
  connection: NativeConnection;
}

export async function createHostWorker(config: Config, hostId: string, log: Logger): Promise<HostWorker> {
  installRuntimeLogging(log);
  const connection = await NativeConnection.connect({ address: config.temporalAddress });
  const activities = createHostActivities({ hostId, dataDir: hostDir(config, hostId), config, log });
  const activityWorker = await Worker.create({
    connection,
    namespace: config.namespace,
    taskQueue: hostTaskQueue(hostId),
    activities,
    maxConcurrentActivityTaskExecutions: 4,
  });
  const workflowWorker = await Worker.create({
    connection,
    namespace: config.namespace,
    taskQueue: config.workflowTaskQueue,
    workflowsPath: require.resolve('../workflows'),
  });
  log.info({ hostId, queues: [hostTaskQueue(hostId), config.workflowTaskQueue] }, 'host worker ready');
  return {
    connection,
    async run() {
      try {
        await Promise.all([activityWorker.run(), workflowWorker.run()]);
      } finally {
        await connection.close();
      }
    },
    shutdown() {
      activityWorker.shutdown();
      workflowWorker.shutdown();
    },
  };
}
