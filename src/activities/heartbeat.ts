import { Context } from '@temporalio/activity';

function current(): Context | undefined {
  try {
    return Context.current();
  } catch {
    return undefined; // not inside an activity (a unit test, the standalone CLI)
  }
}

/** Heartbeat (with optional progress details) when running inside an activity; a no-op elsewhere. */
export function heartbeat(details?: unknown): void {
  current()?.heartbeat(details);
}

/** The running activity's cancellation signal; undefined outside an activity. */
export function cancellationSignal(): AbortSignal | undefined {
  return current()?.cancellationSignal;
}

/**
 * For the progress callbacks of long core operations: heartbeat, and if the activity has been
 * cancelled, throw — the core then aborts and removes its temporary files like on any error.
 */
export function heartbeatOrCancel(details?: unknown): void {
  const ctx = current();
  if (!ctx) return;
  ctx.heartbeat(details);
  if (ctx.cancellationSignal.aborted) throw ctx.cancellationSignal.reason ?? new Error('activity cancelled');
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
