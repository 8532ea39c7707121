/**
 * hostMonitor: one long-running run per host (workflow id `hostMonitor/<hostId>`, on the host's
 * own queue) that reads the host's stats (free memory, store space, running instances) every few
 * seconds with a local activity and answers the query `hostStats` with the latest. The host's
 * worker starts it; the API reads it for GET /v1/hosts and neighbours' capacity (docs/mobility.md).
 * It continues as new every 60 readings, and a run times out (10 min) once no worker serves
 * its host, so a host that is gone leaves no run behind for long. Before it continues, it starts
 * the host's reconciliation (reconcileHost, abandoned: it outlives this run), so instances lost
 * and domains without a record are found every ~5 minutes, not only when the worker starts.
 */
import { condition, continueAsNew, defineQuery, defineSignal, ParentClosePolicy, proxyLocalActivities, setHandler, startChild, workflowInfo } from '@temporalio/workflow';
import type { HostStats, HostStatsActivities } from '../activities/host-stats';
import { SearchAttributes } from '../common/names';
import { reconcileHost } from './reconcile';

export const hostStatsQuery = defineQuery<HostStats | undefined>('hostStats');
export const stopMonitorSignal = defineSignal<[]>('stopMonitor');

const { hostStats } = proxyLocalActivities<HostStatsActivities>({ startToCloseTimeout: '10 seconds', retry: { maximumAttempts: 2 } });

export interface HostMonitorInput {
  hostId: string;
  /** Between readings (default 5 s). */
  everyMs?: number;
  last?: HostStats;
  /** false: no periodic reconciliation (default: one per run, i.e. every 60 readings). */
  reconcile?: boolean;
}

const READINGS_PER_RUN = 60;

export async function hostMonitor(input: HostMonitorInput): Promise<void> {
  let latest = input.last;
  let stop = false;
  setHandler(hostStatsQuery, () => latest);
  setHandler(stopMonitorSignal, () => {
    stop = true;
  });
  for (let i = 0; i < READINGS_PER_RUN; i++) {
    try {
      latest = await hostStats();
    } catch {
      // Keep the last reading; the next one may work.
    }
    if (await condition(() => stop, input.everyMs ?? 5000)) return;
  }
  if (input.reconcile !== false) {
    await startChild(reconcileHost, {
      workflowId: `reconcileHost/${input.hostId}/${new Date().toISOString()}`,
      taskQueue: workflowInfo().taskQueue,
      args: [{ hostId: input.hostId }],
      parentClosePolicy: ParentClosePolicy.ABANDON,
      workflowRunTimeout: '10 minutes',
      typedSearchAttributes: [
        { key: SearchAttributes.host, value: input.hostId },
        { key: SearchAttributes.operation, value: 'reconcileHost' },
        { key: SearchAttributes.status, value: 'running' },
      ],
      staticSummary: `Reconcile host ${input.hostId}'s instances and domains with its hypervisor (every ~5 min)`,
    }).catch(() => undefined);
  }
  await continueAsNew<typeof hostMonitor>({ ...input, ...(latest ? { last: latest } : {}) });
}
