/** What failed in a workflow run, from the error its result threw. */
import { WorkflowFailedError } from '@temporalio/client';
import { ActivityFailure, ApplicationFailure, ChildWorkflowFailure } from '@temporalio/common';

export function failureOf(e: unknown, statusName: string): { type: string; message: string; nonRetryable: boolean } {
  // An activity's failure comes wrapped in an ActivityFailure, a local activity's and the
  // workflow's own come bare. Only those wrappers are looked through (a timeout's cause is an
  // earlier attempt's failure, not why the run failed).
  let cause: unknown = e instanceof WorkflowFailedError ? e.cause : e;
  while ((cause instanceof ActivityFailure || cause instanceof ChildWorkflowFailure) && cause.cause) cause = cause.cause;
  return cause instanceof ApplicationFailure
    ? { type: cause.type ?? 'FAILED', message: cause.message, nonRetryable: cause.nonRetryable === true }
    : { type: statusName, message: (cause as Error)?.message ?? String(cause), nonRetryable: true };
}
