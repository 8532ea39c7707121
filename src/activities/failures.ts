/**
 * The activity boundary: a CloudletError that a retry cannot fix becomes a non-retryable
 * Temporal ApplicationFailure carrying its code, message and details.
 */
import { ApplicationFailure } from '@temporalio/common';
import { isCloudletError } from '../core/errors';

export function toActivityFailure(e: unknown): unknown {
  if (isCloudletError(e)) {
    return ApplicationFailure.create({
      type: e.code,
      message: e.message,
      nonRetryable: !e.retryable,
      details: [e.details],
      cause: e,
    });
  }
  return e;
}

/** Wrap every function of an activity object so failures cross the boundary typed. */
export function withFailureMapping<T extends object>(activities: T): T {
  const wrapped: Record<string, unknown> = {};
  for (const [name, fn] of Object.entries(activities)) {
    if (typeof fn !== 'function') continue;
    wrapped[name] = async (...args: unknown[]) => {
      try {
        return await (fn as (...a: unknown[]) => Promise<unknown>).apply(activities, args);
      } catch (e) {
        throw toActivityFailure(e);
      }
    };
  }
  return wrapped as T;
}
