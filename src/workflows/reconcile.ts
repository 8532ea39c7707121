/**
 * reconcileHost: compare a host's instance records with its hypervisor and remove what a crash or
 * a reboot left behind (activities/reconcile.ts). The host's worker starts one run when it starts
 * (`reconcileHost/<host>/<start time>`); the API lists the instances it found lost as `lost`.
 */
import { proxyActivities } from '@temporalio/workflow';
import type { ReconcileActivities, LostInstance } from '../activities/reconcile';
import { hostTaskQueue } from '../common/names';
import { tracked, tracker, type HostOperationInput } from './operations';

export type ReconcileHostInput = HostOperationInput;

export async function reconcileHost(input: ReconcileHostInput): Promise<{ hostId: string; checked: number; lost: LostInstance[] }> {
  const t = tracker('reconcileHost', input);
  const { reconcileInstances } = proxyActivities<ReconcileActivities>({ taskQueue: hostTaskQueue(input.hostId), startToCloseTimeout: '5 minutes', retry: { maximumAttempts: 3 } });
  return tracked(t, async () => {
    t.stage('compare instance records with the hypervisor');
    const r = await reconcileInstances();
    return { hostId: input.hostId, ...r };
  });
}
