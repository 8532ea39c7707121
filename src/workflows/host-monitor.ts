/**
 * hostMonitor: one long-running run per host (workflow id `hostMonitor/<hostId>`, on the host's
 * own queue) that reads the host's stats (free memory, store space, running instances) every few
 * seconds with a local activity and answers the query `hostStats` with the latest. The host's
 * worker starts it; the API reads it for GET /v1/hosts and neighbours' capacity (docs/mobility.md).
 * It continues as new every 60 readings, and a run times out (10 min) once no worker serves
 * its host, so a host that is gone leaves no run behind for long.
 */
import { condition, continueAsNew, defineQuery, defineSignal, proxyLocalActivities, setHandler } from '@temporalio/workflow';
import type { HostStats, HostStatsActivities } from '../activities/host-stats';

export const hostStatsQuery = defineQuery<HostStats | undefined>('hostStats');
export const stopMonitorSignal = defineSignal<[]>('stopMonitor');

const { hostStats } = proxyLocalActivities<HostStatsActivities>({ startToCloseTimeout: '10 seconds', retry: { maximumAttempts: 2 } });

export interface HostMonitorInput {
  hostId: string;
  /** Between readings (default 5 s). */
  everyMs?: number;
  last?: HostStats;
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
  await continueAsNew<typeof hostMonitor>({ ...input, ...(latest ? { last: latest } : {}) });
}
