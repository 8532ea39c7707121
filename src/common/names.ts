/**
 * Names shared by workflows, workers and clients: task queues, workflow ids and search attributes.
 * Deterministic and dependency-light, so workflow code may import it.
 */
import { defineSearchAttributeKey, SearchAttributeType } from '@temporalio/common';

/**
 * The shared workflow queue: runs that are not one host's operation (recipe rebuilds, self-tests)
 * and runs started by older clients. A host's own operations run their workflow tasks on the
 * host's queue (hostTaskQueue), beside its activities.
 */
export const WORKFLOW_TASK_QUEUE = 'cloudlet-workflows';

/** A host id: lower-case letters, digits and dashes, as in a DNS label. */
export const HOST_ID_PATTERN = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

/** The worker-specific task queue of a host (the "worker-specific task queues" pattern). */
export function hostTaskQueue(hostId: string): string {
  return `cloudlet-host-${hostId}`;
}

/** Search attributes registered by infra/temporal.sh; operators filter runs in the Web UI with them. */
export const SearchAttributes = {
  host: defineSearchAttributeKey('CloudletHost', SearchAttributeType.KEYWORD),
  baseId: defineSearchAttributeKey('CloudletBaseId', SearchAttributeType.KEYWORD),
  overlayId: defineSearchAttributeKey('CloudletOverlayId', SearchAttributeType.KEYWORD),
  operation: defineSearchAttributeKey('CloudletOperation', SearchAttributeType.KEYWORD),
  status: defineSearchAttributeKey('CloudletStatus', SearchAttributeType.KEYWORD),
} as const;
