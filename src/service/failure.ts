/** What failed in a workflow run, from the error its result threw. */
import { WorkflowFailedError } from '@temporalio/client';
import { failureSummary, type FailureSummary } from '../common/failure-summary';

export function failureOf(e: unknown, statusName: string): FailureSummary {
  return failureSummary(e instanceof WorkflowFailedError ? e.cause : e, statusName);
}
