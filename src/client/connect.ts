/**
 * The Temporal client side: connect, check that a host's worker is serving before starting
 * work for it, and start the cloudlet workflows with ids and search attributes that say what
 * they are.
 */
import { Client, Connection } from '@temporalio/client';
import { OpenTelemetryWorkflowClientInterceptor } from '@temporalio/interceptors-opentelemetry/lib/client';
import { activeTracing } from '../common/tracing';
import { temporal } from '@temporalio/proto';
import type { Config } from '../config';
import { CloudletError } from '../core/errors';
import { HOST_ID_PATTERN, hostTaskQueue } from '../common/names';

export async function connectClient(config: Config): Promise<Client> {
  try {
    const connection = await Connection.connect({ address: config.temporalAddress, connectTimeout: '5s' });
    // With tracing, a workflow started here continues the caller's trace (docs/observability.md).
    const interceptors = activeTracing() ? { workflow: [new OpenTelemetryWorkflowClientInterceptor()] } : undefined;
    return new Client({ connection, namespace: config.namespace, ...(interceptors ? { interceptors } : {}) });
  } catch (cause) {
    throw new CloudletError('TEMPORAL_UNAVAILABLE', `the Temporal server at ${config.temporalAddress} is not reachable`, {
      fix: 'start it with `bash infra/temporal.sh start` (or `npm run setup`), or set CLOUDLET_TEMPORAL_ADDRESS',
      cause,
    });
  }
}

/**
 * Throw UNKNOWN_HOST unless a worker polls the host's activity queue: a workflow started for a
 * host nobody serves would wait forever.
 */
export async function assertHostServing(client: Client, hostId: string): Promise<void> {
  if (!HOST_ID_PATTERN.test(hostId)) {
    throw new CloudletError('BAD_INPUT', `"${hostId}" is not a valid host id`, {
      fix: 'use lower-case letters, digits and dashes, e.g. "local" or "host-a"',
    });
  }
  const res = await client.workflowService.describeTaskQueue({
    namespace: client.options.namespace,
    taskQueue: { name: hostTaskQueue(hostId), kind: temporal.api.enums.v1.TaskQueueKind.TASK_QUEUE_KIND_NORMAL },
    taskQueueType: temporal.api.enums.v1.TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
  });
  if ((res.pollers ?? []).length === 0) {
    throw new CloudletError('UNKNOWN_HOST', `unknown host "${hostId}": no worker polls its task queue ${hostTaskQueue(hostId)}`, {
      fix: `start the host's worker (npx tsx src/workers/main.ts --host ${hostId}) or use a host id that has one`,
      details: { hostId },
    });
  }
}
