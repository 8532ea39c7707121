/**
 * An operation's workflow records its own end in the cluster catalog (docs/security.md, "The
 * cluster catalog"): what it was, on which host, when, and its result or failure. The API's sync
 * from visibility (src/service/catalog-sync.ts) then only has to catch the runs that could not
 * record themselves (terminated, timed out, or the record failed). A failed record never fails
 * the operation: it is logged and left to that sync.
 */
import { CancellationScope, isCancellation, log, patched, proxyActivities, proxyLocalActivities, TemporalFailure, workflowInfo } from '@temporalio/workflow';
import type { RetryPolicy } from '@temporalio/workflow';
import type { OperationRecordActivities } from '../activities/operation-records';
import type { ClosedOperation } from '../core/cluster-catalog/types';
import { CANCELLED, failureSummary } from '../common/failure-summary';
import { hostTaskQueue } from '../common/names';

export type OperationEnd = { status: 'succeeded'; result: unknown } | { status: 'failed'; error: unknown };

/** Where an operation runs: its kind, its host, and whether its run is on the host's own queue. */
export interface RecordedOperation {
  kind: string;
  hostId: string;
  onHostQueue?: boolean;
}

/** Runs an operation's body and records how it ended (for workflows without a tracker). */
export async function recordedOperation<T>(op: RecordedOperation, body: () => Promise<T>): Promise<T> {
  let r: T;
  try {
    r = await body();
  } catch (e) {
    await recordOperationEnd(op, { status: 'failed', error: e });
    throw e;
  }
  await recordOperationEnd(op, { status: 'succeeded', result: r });
  return r;
}

export async function recordOperationEnd(op: RecordedOperation, end: OperationEnd): Promise<void> {
  // An error that is not a Temporal failure fails the workflow task, which is retried: the run
  // has not ended.
  if (end.status === 'failed' && !(end.error instanceof TemporalFailure) && !isCancellation(end.error)) return;
  // Runs of an older version replay without this step; an operation of no host has no worker to ask.
  if (!patched('record-operation-end') || op.hostId === '') return;
  const info = workflowInfo();
  const record: ClosedOperation = {
    id: info.workflowId,
    kind: op.kind,
    type: info.workflowType,
    hostId: op.hostId,
    status: end.status,
    startedAt: info.startTime.toISOString(),
    closedAt: new Date().toISOString(),
    ...(info.parent ? { parentId: info.parent.workflowId } : {}),
    ...(end.status === 'succeeded' ? { result: end.result } : { error: isCancellation(end.error) ? CANCELLED : failureSummary(end.error, 'FAILED') }),
  };
  const retry: RetryPolicy = { maximumAttempts: 3, initialInterval: '1 second' };
  // On the host's own queue its worker runs the record as a local activity (no extra dispatch).
  const records = op.onHostQueue === true
    ? proxyLocalActivities<OperationRecordActivities>({ startToCloseTimeout: '30 seconds', retry, localRetryThreshold: '500 ms' })
    // A host whose worker is down delays the run's end by a minute at most, then the sync records it.
    : proxyActivities<OperationRecordActivities>({ taskQueue: hostTaskQueue(op.hostId), startToCloseTimeout: '30 seconds', scheduleToCloseTimeout: '1 minute', retry });
  try {
    // A cancelled run records that it was cancelled.
    await CancellationScope.nonCancellable(() => records.recordOperationEnd(record));
  } catch (e) {
    log.warn('the operation end was not recorded in the cluster catalog; the API sync from visibility will record it', { operation: record.id, error: (e as Error).message });
  }
}
