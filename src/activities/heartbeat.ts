import { Context } from '@temporalio/activity';

/** Heartbeat (with optional progress details) when running inside an activity; a no-op elsewhere. */
export function heartbeat(details?: unknown): void {
  try {
    Context.current().heartbeat(details);
  } catch {
    // Not inside an activity (e.g. called from a unit test or the standalone CLI).
  }
}

/** Run `work` while heartbeating every `everyMs`, so a long wait is not mistaken for a dead worker. */
export async function withHeartbeats<T>(work: Promise<T>, details?: () => unknown, everyMs = 2000): Promise<T> {
  const timer = setInterval(() => heartbeat(details?.()), everyMs);
  try {
    return await work;
  } finally {
    clearInterval(timer);
  }
}
