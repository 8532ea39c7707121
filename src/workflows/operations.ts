/**
 * The cloudlet operations as workflows: orchestration only (order, retries, timeouts,
 * compensation). Every activity runs on the task queue of the host that holds the data. The
 * service starts an operation's workflow on that queue too; a run started on the shared queue
 * works the same, with regular activities only.
 */
import {
  ActivityCancellationType,
  ApplicationFailure,
  CancellationScope,
  defineQuery,
  proxyActivities,
  proxyLocalActivities,
  setCurrentDetails,
  patched,
  setHandler,
  sleep,
  upsertSearchAttributes,
} from '@temporalio/workflow';
import type { ActivityOptions, RetryPolicy } from '@temporalio/workflow';
import type { InstanceActivities } from '../activities/instances';
import type { RecipeActivities } from '../activities/recipes';
import type { AdmissionActivities } from '../activities/admission';
import { hostTaskQueue, SearchAttributes } from '../common/names';
import { recordOperationEnd, type OperationEnd } from './operation-record';

export interface OperationProgress {
  stage: string;
  done: string[];
}
export const operationProgressQuery = defineQuery<OperationProgress>('progress');

/** Non-retryable failure types: a retry cannot fix them. */
const NON_RETRYABLE = ['BAD_INPUT', 'NOT_FOUND', 'CORRUPT', 'DIGEST_MISMATCH', 'WRONG_BASE', 'UNSUPPORTED_VERSION', 'CPU_MODEL_UNUSABLE', 'CONFLICT', 'NO_MEMORY'];

/** What every host operation's input has. */
export interface HostOperationInput {
  hostId: string;
  /**
   * The run was started on the host's own task queue (hostTaskQueue(hostId)), whose only worker is
   * the host's: its short checks run there as local activities. Part of the input, so a replay
   * takes the same path; a check that finds itself on another host fails with BAD_INPUT.
   */
  onHostQueue?: boolean;
}

function hostActivities(hostId: string, onHostQueue?: boolean) {
  const retry: RetryPolicy = { maximumAttempts: 5, initialInterval: '1 second', nonRetryableErrorTypes: NON_RETRYABLE };
  const common: ActivityOptions = { taskQueue: hostTaskQueue(hostId), retry };
  const quick = proxyActivities<InstanceActivities & RecipeActivities & AdmissionActivities>({ ...common, startToCloseTimeout: '2 minutes' });
  const local = onHostQueue === true;
  return {
    quick,
    /** Whether `check` runs local activities. */
    local,
    /**
     * Short checks of the host: as local activities when the run is on the host's own queue (so
     * this worker is the host's; pass `hostId` so a check verifies it), which saves a workflow task
     * and a dispatch each; otherwise as regular activities on the host's queue.
     */
    check: local
      // Every retry backoff (1 s or more) waits on a workflow timer, not inside a workflow task.
      ? proxyLocalActivities<InstanceActivities & AdmissionActivities>({ startToCloseTimeout: '2 minutes', retry, localRetryThreshold: '500 ms' })
      : quick,
    // A cancelled run waits for its long step to stop (it notices at its next heartbeat and removes
    // its temporary files) before compensating.
    long: proxyActivities<InstanceActivities>({ ...common, startToCloseTimeout: '30 minutes', heartbeatTimeout: '20 seconds', cancellationType: ActivityCancellationType.WAIT_CANCELLATION_COMPLETED }),
  };
}

/** Tracks an operation: its progress (a query), its search attributes, and its end in the catalog. */
export function tracker(operation: string, input: HostOperationInput, extra: Array<{ key: typeof SearchAttributes.baseId | typeof SearchAttributes.overlayId; value: string }> = []) {
  const hostId = input.hostId;
  const progress: OperationProgress = { stage: 'starting', done: [] };
  setHandler(operationProgressQuery, () => progress);
  upsertSearchAttributes([
    { key: SearchAttributes.host, value: hostId },
    { key: SearchAttributes.operation, value: operation },
    { key: SearchAttributes.status, value: 'running' },
    ...extra,
  ]);
  return {
    stage(name: string): void {
      if (progress.stage !== 'starting') progress.done.push(progress.stage);
      progress.stage = name;
      setCurrentDetails(`**${operation}** on host \`${hostId}\`: ${name}${progress.done.length ? ` (done: ${progress.done.join(', ')})` : ''}`);
    },
    tag(key: typeof SearchAttributes.baseId | typeof SearchAttributes.overlayId, value: string): void {
      upsertSearchAttributes([{ key, value }]);
    },
    async finish(end: OperationEnd): Promise<void> {
      this.stage(end.status === 'succeeded' ? 'done' : 'failed');
      upsertSearchAttributes([{ key: SearchAttributes.status, value: end.status }]);
      await recordOperationEnd({ kind: operation, hostId, ...(input.onHostQueue !== undefined ? { onHostQueue: input.onHostQueue } : {}) }, end);
    },
  };
}

/** Runs an operation's body, then records how it ended (search attribute, catalog). */
export async function tracked<T>(t: ReturnType<typeof tracker>, body: () => Promise<T>): Promise<T> {
  let r: T;
  try {
    r = await body();
  } catch (e) {
    await t.finish({ status: 'failed', error: e });
    throw e;
  }
  await t.finish({ status: 'succeeded', result: r });
  return r;
}

export interface ImportBaseVmInput extends HostOperationInput { source: string }
export async function importBaseVm(input: ImportBaseVmInput) {
  const t = tracker('importBaseVm', input);
  const { quick, long } = hostActivities(input.hostId);
  return tracked(t, async () => {
    t.stage('import');
    const r = await long.importBasePackage({ source: input.source });
    t.tag(SearchAttributes.baseId, r.baseId);
    // A (re-)imported base rebuilds the overlays of the recipes that use it; a failure to
    // trigger them is reported, not a failure of the import.
    t.stage('trigger recipe rebuilds');
    let rebuilds: { triggered: string[]; skippedPaused: string[] } | { error: string };
    try {
      rebuilds = await quick.rebuildRecipesOfBase({ baseId: r.baseId });
    } catch (e) {
      rebuilds = { error: (e as Error).message };
    }
    return { hostId: input.hostId, ...r, rebuilds };
  });
}

export interface ResumeBaseVmInput extends HostOperationInput {
  baseId: string;
  instanceId: string;
  appPort?: number;
  /** How long to wait for the host to have memory for the VM (admission) before failing NO_MEMORY; default 10 minutes. */
  admissionWaitMs?: number;
}
export async function resumeBaseVm(input: ResumeBaseVmInput) {
  const t = tracker('resumeBaseVm', input, [{ key: SearchAttributes.baseId, value: input.baseId }]);
  const { quick, check, long } = hostActivities(input.hostId, input.onHostQueue);
  return tracked(t, async () => {
    t.stage('check base');
    const base = await check.checkBasePresent({ baseId: input.baseId, hostId: input.hostId });
    t.stage('verify CPU model');
    await check.checkCpuModel({ ...(base.cpuModel ? { cpuModel: base.cpuModel } : {}), hostId: input.hostId });
    try {
      // A VM resumed from a base takes its memory like a synthesized one: it waits for room.
      // patched: a run started before resumed bases were admitted replays without it.
      // (A run whose base check ran before the change has no size in its history: not admitted.)
      if (patched('admission-resume-base') && typeof base.memoryBytes === 'number') await admit(check, t, input, base.memoryBytes);
      t.stage('resume');
      return await long.resumeBaseInstance({ instanceId: input.instanceId, baseId: input.baseId, ...(input.appPort ? { appPort: input.appPort } : {}) });
    } catch (e) {
      await CancellationScope.nonCancellable(() => quick.terminateInstance({ instanceId: input.instanceId }));
      throw e;
    }
  });
}

export interface CreateOverlayVmInput extends HostOperationInput { instanceId: string; keepInstance?: boolean; lzmaLevel?: number; delta?: boolean }
export async function createOverlayVm(input: CreateOverlayVmInput) {
  const t = tracker('createOverlay', input);
  const { quick, long } = hostActivities(input.hostId);
  return tracked(t, async () => {
    t.stage('snapshot and build overlay');
    const r = await long.createInstanceOverlay({
      instanceId: input.instanceId,
      keepInstance: input.keepInstance ?? false,
      ...(input.lzmaLevel !== undefined ? { lzmaLevel: input.lzmaLevel } : {}),
      ...(input.delta !== undefined ? { delta: input.delta } : {}),
    });
    t.tag(SearchAttributes.overlayId, r.overlayId);
    t.tag(SearchAttributes.baseId, r.baseId);
    if (!input.keepInstance) {
      t.stage('destroy instance');
      await quick.terminateInstance({ instanceId: input.instanceId });
    }
    return { hostId: input.hostId, instanceId: input.instanceId, kept: input.keepInstance ?? false, ...r };
  });
}

export interface SynthesizeVmInput extends HostOperationInput {
  instanceId: string;
  overlayUrl: string;
  waitForApp?: boolean;
  appPort?: number;
  /** How long to wait for the host to have memory for the VM (admission) before failing NO_MEMORY; default 10 minutes. */
  admissionWaitMs?: number;
  /** false: restore as usual even when the host's warm pool has a VM ready (docs/warm-pool.md); default true. */
  warmPool?: boolean;
}

/**
 * Waits until the host admits the VM's memory (docs/operations.md, "Admission"): each refusal is
 * followed by a workflow timer (1 s, doubling to 10 s), so waiting holds no worker slot; NO_MEMORY
 * after `admissionWaitMs`. How long it waited. (Synthesis, resumed bases, recipe rebuilds.)
 */
export async function admit(check: Pick<AdmissionActivities, 'admitInstance'>, t: { stage(name: string): void }, input: { instanceId: string; hostId: string; admissionWaitMs?: number }, memoryBytes: number): Promise<number> {
  const limit = input.admissionWaitMs ?? 10 * 60_000;
  let waited = 0;
  for (let delay = 1000; ; delay = Math.min(delay * 2, 10_000)) {
    const a = await check.admitInstance({ instanceId: input.instanceId, memoryBytes, hostId: input.hostId });
    if (a.admitted) return waited;
    if (waited === 0) t.stage('wait for memory');
    if (waited >= limit) {
      throw ApplicationFailure.nonRetryable(
        `host ${input.hostId} had no room for instance ${input.instanceId}'s ${Math.round(memoryBytes / 1048576)} MiB within ${Math.round(limit / 1000)} s (its VMs hold ${Math.round(a.committedBytes / 1048576)} of ${Math.round(a.capacityBytes / 1048576)} MiB). Fix: retry later, terminate instances there, or choose another host`,
        'NO_MEMORY',
      );
    }
    await sleep(delay);
    waited += delay;
  }
}
export async function synthesizeVm(input: SynthesizeVmInput) {
  const t = tracker('synthesizeVm', input);
  const { quick, check, local, long } = hostActivities(input.hostId, input.onHostQueue);
  const started = Date.now();
  const timings: Record<string, number> = {};
  const timed = async <T>(name: string, f: () => Promise<T>): Promise<T> => {
    t.stage(name);
    const t0 = Date.now();
    try {
      return await f();
    } finally {
      timings[`${name}Ms`] = Date.now() - t0;
    }
  };
  return tracked(t, async () => {
    // Early checks, before any transfer: what the overlay needs, and whether this host has it.
    // (inspect the overlay, verify its CPU model is usable here, check its base is on this host)
    const overlay = await timed('preflight', () => check.preflightSynthesis({ overlayUrl: input.overlayUrl, hostId: input.hostId }));
    Object.assign(timings, overlay.timings);
    t.tag(SearchAttributes.baseId, overlay.baseId);
    try {
      // Before any transfer: a request the host has no memory for waits here, holding nothing.
      // patched: a run started before admission existed replays without it.
      const waitedMs = patched('admission-before-apply') ? await admit(check, t, input, overlay.memoryBytes) : 0;
      if (waitedMs > 0) timings['wait for memoryMs'] = waitedMs;
      const applied = await timed('fetch and apply overlay', () =>
        long.synthesizeInstanceFiles({ instanceId: input.instanceId, overlayUrl: input.overlayUrl, baseId: overlay.baseId, ...(input.appPort ? { appPort: input.appPort } : {}), ...(input.warmPool === false ? { warmPool: false } : {}) }));
      // Restore, replug the NIC, forward the app port and (by default) wait until the app answers.
      const resumed = await timed('resume', () => long.resumeInstance({ instanceId: input.instanceId, waitForApp: input.waitForApp ?? true }));
      Object.assign(timings, resumed.timings);
      timings.firstResponseMs = Date.now() - started;
      // localActivitiesMs: what the local activities' own code took (they have no activity events).
      return { hostId: input.hostId, instanceId: input.instanceId, baseId: overlay.baseId, hostPort: resumed.hostPort, timings, applyTimings: applied.timings, localActivitiesMs: local ? overlay.ranMs : 0, ...(resumed.answeredAt ? { answeredAt: resumed.answeredAt } : {}), ...(applied.poolEntry ? { poolEntry: applied.poolEntry } : {}), ...(applied.earlyStart ? { earlyStart: applied.earlyStart } : {}) };
    } catch (e) {
      // Compensation: no half-made VM or file stays behind.
      await CancellationScope.nonCancellable(() => quick.terminateInstance({ instanceId: input.instanceId }));
      throw e;
    }
  });
}

export interface TerminateVmInput extends HostOperationInput { instanceId: string }
export async function terminateVm(input: TerminateVmInput) {
  const t = tracker('terminateVm', input);
  const { quick } = hostActivities(input.hostId);
  return tracked(t, async () => {
    t.stage('terminate');
    const r = await quick.terminateInstance({ instanceId: input.instanceId });
    if (!r.existed) throw ApplicationFailure.nonRetryable(`instance ${input.instanceId} does not exist on host ${input.hostId}`, 'NOT_FOUND');
    return { hostId: input.hostId, instanceId: input.instanceId };
  });
}
