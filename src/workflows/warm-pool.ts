/**
 * warmPool: one long-running run per host (workflow id `warmPool/<hostId>`, on the host's own
 * queue) that keeps the host's warm pool at its targets (docs/warm-pool.md). Each step is a local
 * activity (activities/warm-pool.ts) that discards what cannot serve, gives memory back when the
 * host needs it, and starts at most one VM; the run steps again at once while VMs are missing,
 * else every `everyMs` (a used VM is replaced within that) or when signalled. The signal
 * `setPoolTarget` sets a base's size; the query `poolState` answers the latest report. The host's
 * worker starts it; it continues as new every 200 steps.
 */
import { condition, continueAsNew, defineQuery, defineSignal, proxyLocalActivities, setHandler } from '@temporalio/workflow';
import type { PoolReport, WarmPoolActivities } from '../activities/warm-pool';

export const poolStateQuery = defineQuery<PoolReport | undefined>('poolState');
export const setPoolTargetSignal = defineSignal<[{ baseId: string; size: number }]>('setPoolTarget');
/** Step now (e.g. a VM of the pool was used or its memory is wanted). */
export const poolChangedSignal = defineSignal<[]>('poolChanged');
export const stopPoolSignal = defineSignal<[]>('stopPool');

const { maintainPool, setPoolTarget } = proxyLocalActivities<WarmPoolActivities>({ startToCloseTimeout: '3 minutes', retry: { maximumAttempts: 3 } });

export interface WarmPoolInput {
  hostId: string;
  /** Between steps when the pool is at its targets (default 10 s). */
  everyMs?: number;
  last?: PoolReport;
  /** Targets signalled to an earlier run that it had no time to set. */
  pending?: Array<{ baseId: string; size: number }>;
}

const STEPS_PER_RUN = 200;

export async function warmPool(input: WarmPoolInput): Promise<void> {
  let latest = input.last;
  let stop = false;
  let poked = false;
  const pending: Array<{ baseId: string; size: number }> = [...(input.pending ?? [])];
  setHandler(poolStateQuery, () => latest);
  setHandler(setPoolTargetSignal, (t) => {
    pending.push(t);
  });
  setHandler(poolChangedSignal, () => {
    poked = true;
  });
  setHandler(stopPoolSignal, () => {
    stop = true;
  });
  for (let i = 0; i < STEPS_PER_RUN && !stop; i++) {
    while (pending.length > 0) {
      const t = pending.shift() as { baseId: string; size: number };
      try {
        await setPoolTarget({ ...t, hostId: input.hostId });
      } catch {
        // A bad target (the API validates it first) is dropped; the report shows the targets.
      }
    }
    // A poke that arrives during the step asks for another one.
    poked = false;
    try {
      latest = await maintainPool();
    } catch {
      // Keep the last report, but wait before the next step: it may work then.
      if (latest) latest = { ...latest, more: false };
    }
    if (stop) return;
    if (latest?.more || pending.length > 0 || poked) continue;
    await condition(() => stop || poked || pending.length > 0, input.everyMs ?? 10_000);
  }
  if (stop) return;
  // Signals that arrived during the last step go on with the next run.
  await continueAsNew<typeof warmPool>({ hostId: input.hostId, ...(input.everyMs !== undefined ? { everyMs: input.everyMs } : {}), ...(latest ? { last: latest } : {}), ...(pending.length > 0 ? { pending: [...pending] } : {}) });
}
