/**
 * What failed, under the wrappers Temporal puts around a failure: the type, message and
 * retryability of the innermost ApplicationFailure. Shared by the workflows (which record their
 * own end) and the service (which reads a run's end from its result); imports only
 * @temporalio/common, so both may use it.
 */
import { ActivityFailure, ApplicationFailure, ChildWorkflowFailure } from '@temporalio/common';

export interface FailureSummary {
  type: string;
  message: string;
  nonRetryable: boolean;
}

/** `fallbackType` names a failure that is not an ApplicationFailure (e.g. the run's status). */
export function failureSummary(e: unknown, fallbackType: string): FailureSummary {
  // An activity's failure comes wrapped in an ActivityFailure, a child's in a ChildWorkflowFailure,
  // a local activity's and the workflow's own come bare. Only those wrappers are looked through (a
  // timeout's cause is an earlier attempt's failure, not why the run failed).
  let cause: unknown = e;
  while ((cause instanceof ActivityFailure || cause instanceof ChildWorkflowFailure) && cause.cause) cause = cause.cause;
  return cause instanceof ApplicationFailure
    ? { type: cause.type ?? 'FAILED', message: cause.message, nonRetryable: cause.nonRetryable === true }
    : { type: fallbackType, message: (cause as Error)?.message ?? String(cause), nonRetryable: true };
}

/** How a cancelled operation's end is recorded. */
export const CANCELLED: FailureSummary = { type: 'CANCELLED', message: 'the operation was cancelled', nonRetryable: true };
