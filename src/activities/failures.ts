/**
 * The activity boundary: a CloudletError that a retry cannot fix becomes a non-retryable
 * Temporal ApplicationFailure carrying its code, message and details.
 */
import { ApplicationFailure } from '@temporalio/common';
import { statfsSync } from 'node:fs';
import { CloudletError, findCause, isCloudletError } from '../core/errors';

/** Which host the activities run for, so a full disk names its directory and what is free there. */
export interface FailureContext {
  hostId: string;
  dataDir: string;
}

function freeMiB(dir: string): string {
  try {
    const s = statfsSync(dir);
    return `${Math.floor((s.bavail * s.bsize) / 1048576)} MiB free`;
  } catch {
    return 'free space unknown';
  }
}

/** The file system error "no space left on device" anywhere in `e`'s cause chain. */
function noSpace(e: unknown): (Error & { path?: string }) | undefined {
  // The errno only: a message that merely mentions it (a guest's own full disk in a recipe's
  // output, a peer's error) is not this host's disk.
  return findCause(e, (c) => (c as { code?: unknown }).code === 'ENOSPC' || (c as { errno?: unknown }).errno === -28) as (Error & { path?: string }) | undefined;
}

export function toActivityFailure(e: unknown, ctx?: FailureContext): unknown {
  const full = !(e instanceof ApplicationFailure) && !(isCloudletError(e) && e.code === 'NO_SPACE') ? noSpace(e) : undefined;
  if (full) {
    const where = ctx ? `host ${ctx.hostId}'s disk is full (${ctx.dataDir}: ${freeMiB(ctx.dataDir)} after the step gave back what it wrote)` : "the host's disk is full";
    e = new CloudletError('NO_SPACE', `${where}${full.path ? `, writing ${full.path}` : ''}: ${full.message}`, {
      fix: `free space on the file system of ${ctx?.dataDir ?? "the host's CLOUDLET_VAR"} (remove instances, old bases or overlays), then retry the operation`,
      details: { ...(full.path ? { path: full.path } : {}), ...(ctx ? { hostId: ctx.hostId, dataDir: ctx.dataDir } : {}) },
      cause: e,
    });
  }
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
export function withFailureMapping<T extends object>(activities: T, ctx?: FailureContext): T {
  const wrapped: Record<string, unknown> = {};
  for (const [name, fn] of Object.entries(activities)) {
    if (typeof fn !== 'function') continue;
    wrapped[name] = async (...args: unknown[]) => {
      try {
        return await (fn as (...a: unknown[]) => Promise<unknown>).apply(activities, args);
      } catch (e) {
        throw toActivityFailure(e, ctx);
      }
    };
  }
  return wrapped as T;
}
