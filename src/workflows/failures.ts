/** What a failure in a workflow says, under the wrappers Temporal puts around it. */
import { ApplicationFailure } from '@temporalio/workflow';

/** The innermost failure: child workflow and activity failures wrap the one that says what happened. */
export function rootCause(e: unknown): { message: string; type?: string } {
  let message = e instanceof Error ? e.message : String(e);
  let type: string | undefined;
  for (let c: unknown = e; c instanceof Error; c = c.cause) {
    if (c.message) message = c.message;
    if (c instanceof ApplicationFailure && c.type) type = c.type;
  }
  return type ? { message, type } : { message };
}
