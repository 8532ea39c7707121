/**
 * refreshNeighbours: measure every neighbour in the registry and record it (docs/mobility.md). A
 * Temporal Schedule per cluster runs it (every minute by default); unreachable neighbours are
 * marked, never fatal.
 */
import { proxyActivities } from '@temporalio/workflow';
import type { MobilityActivities } from '../activities/mobility';

const { refreshNeighbours: refresh } = proxyActivities<MobilityActivities>({ startToCloseTimeout: '2 minutes', retry: { maximumAttempts: 2 } });

export async function refreshNeighbours() {
  const views = await refresh();
  return views.map((v) => ({ name: v.name, status: v.status, ...(v.rtt ? { rttMs: v.rtt.ms } : {}) }));
}
