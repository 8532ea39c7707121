/**
 * guestSelfTest: the seed of the cloudlet operations. On one host it boots the test guest,
 * customizes its application, saves the VM's memory, restores it, replugs its NIC with a new
 * MAC, and checks over the network that the application answers with the state it had before
 * the save. The VM is destroyed at the end, also when the run fails or is cancelled.
 */
import {
  CancellationScope,
  proxyActivities,
  setCurrentDetails,
  upsertSearchAttributes,
  workflowInfo,
  defineQuery,
  setHandler,
} from '@temporalio/workflow';
import type { GuestActivities, GuestHandle } from '../activities/guest';
import { hostTaskQueue, SearchAttributes } from '../common/names';

export interface GuestSelfTestInput {
  hostId: string;
  /** Guest RAM in MiB (default 256). */
  memoryMiB?: number;
}

export interface GuestSelfTestResult {
  hostId: string;
  domain: string;
  bootId: string;
  token: string;
  /** Milliseconds per stage, as measured by the activities. */
  timings: Record<string, number>;
  answer: { token: string; disk: string; counter: number; bootId: string };
}

export interface SelfTestProgress {
  stage: string;
  done: string[];
}

export const progressQuery = defineQuery<SelfTestProgress>('progress');

export async function guestSelfTest(input: GuestSelfTestInput): Promise<GuestSelfTestResult> {
  const host = proxyActivities<GuestActivities>({
    taskQueue: hostTaskQueue(input.hostId),
    startToCloseTimeout: '5 minutes',
    heartbeatTimeout: '1 minute',
    retry: { maximumAttempts: 3, initialInterval: '1 second' },
  });
  const cleanup = proxyActivities<GuestActivities>({
    taskQueue: hostTaskQueue(input.hostId),
    startToCloseTimeout: '2 minutes',
    retry: { maximumAttempts: 5 },
  });

  const progress: SelfTestProgress = { stage: 'starting', done: [] };
  setHandler(progressQuery, () => progress);
  const stage = (name: string): void => {
    if (progress.stage !== 'starting') progress.done.push(progress.stage);
    progress.stage = name;
    setCurrentDetails(`stage: ${name}; done: ${progress.done.join(', ') || 'nothing yet'}`);
  };
  upsertSearchAttributes([
    { key: SearchAttributes.host, value: input.hostId },
    { key: SearchAttributes.operation, value: 'guestSelfTest' },
    { key: SearchAttributes.status, value: 'running' },
  ]);

  const instanceId = `selftest-${workflowInfo().runId.slice(-8)}`;
  const token = `tok-${workflowInfo().runId.slice(-12)}`;
  const message = `customized by ${workflowInfo().workflowId}`;
  const timings: Record<string, number> = {};
  let guest: GuestHandle | undefined;
  try {
    stage('boot');
    guest = await host.bootGuest({ instanceId, memoryMiB: input.memoryMiB ?? 256 });
    timings.bootToReadyMs = guest.bootToReadyMs;

    stage('customize');
    await host.customizeGuest({ guest, token, message });

    stage('save');
    const saved = await host.saveGuest({ guest });
    timings.saveMs = saved.saveMs;

    stage('restore');
    const restored = await host.restoreGuest({ guest, savePath: saved.savePath });
    timings.restoreMs = restored.restoreMs;

    stage('replug-nic');
    const replugged = await host.replugGuestNic({ guest });
    timings.unplugMs = replugged.unplugMs;
    timings.plugMs = replugged.plugMs;

    stage('check-app');
    const answer = await host.probeGuestApp({
      hostPort: replugged.hostPort,
      expect: { bootId: guest.bootId, token, message },
    });
    timings.firstAnswerAfterReplugMs = answer.waitedMs;

    stage('done');
    upsertSearchAttributes([{ key: SearchAttributes.status, value: 'succeeded' }]);
    return { hostId: input.hostId, domain: guest.domain, bootId: guest.bootId, token, timings, answer: answer.state };
  } catch (err) {
    upsertSearchAttributes([{ key: SearchAttributes.status, value: 'failed' }]);
    throw err;
  } finally {
    // Compensation: never leave a VM or its files behind, even when the run is cancelled.
    await CancellationScope.nonCancellable(() => cleanup.destroyGuest({ instanceId }));
  }
}
