/**
 * rebuildOverlay: rebuild a recipe's overlay, as a Temporal Schedule does on its own (see
 * src/service/schedules.ts). On the recipe's host: resume the base, run the recipe inside the
 * guest, create and publish the overlay, then VERIFY it by synthesizing it once from its URL
 * (waiting for the application) and running the recipe's check. Only a verified overlay becomes
 * the recipe's current one; until then, and on any failure, the previous one stays current, and
 * the run's instances (and its unverified overlay) are removed.
 */
import {
  ApplicationFailure,
  CancellationScope,
  isCancellation,
  patched,
  proxyActivities,
  setCurrentDetails,
  setHandler,
  upsertSearchAttributes,
  workflowInfo,
} from '@temporalio/workflow';
import type { ActivityOptions, RetryPolicy } from '@temporalio/workflow';
import type { InstanceActivities } from '../activities/instances';
import type { RecipeActivities, RecipeInput } from '../activities/recipes';
import { HOST_ID_PATTERN, hostTaskQueue, SearchAttributes } from '../common/names';
import { admit, operationProgressQuery, type OperationProgress } from './operations';
import type { AdmissionActivities } from '../activities/admission';
import { rootCause } from './failures';
import { recordedOperation } from './operation-record';

/** The test guest's port of `POST /cgi-bin/exec` (docs/test-guest.md); see GUEST_EXEC_PORT. */
const GUEST_EXEC_PORT = 8080;

export interface RebuildOverlayResult {
  recipeId: string;
  hostId: string;
  baseId: string;
  /** The new overlay, now the recipe's current one. */
  overlayId: string;
  url: string;
  bytes: number;
  /** The overlay that was current before (kept), if any. */
  previousOverlayId?: string;
  /** Milliseconds per stage. */
  timings: Record<string, number>;
  /** The end of what the recipe printed in the guest (at most 2,000 characters). */
  recipeOutput?: string;
}

const NON_RETRYABLE = ['BAD_INPUT', 'NOT_FOUND', 'CORRUPT', 'DIGEST_MISMATCH', 'WRONG_BASE', 'UNSUPPORTED_VERSION', 'CPU_MODEL_UNUSABLE', 'CONFLICT', 'RECIPE_FAILED', 'RECIPE_CHECK_FAILED'];

/** "verify: synthesize" -> "verifySynthesize" (timing keys). */
const camel = (s: string): string => s.replace(/[^a-zA-Z0-9]+([a-zA-Z0-9])/g, (_m, c: string) => c.toUpperCase());

export async function rebuildOverlay(input: RecipeInput): Promise<RebuildOverlayResult> {
  const hostId = typeof input === 'object' && input !== null && typeof input.hostId === 'string' ? input.hostId : '';
  if (!HOST_ID_PATTERN.test(hostId)) {
    // Checked here: without a valid host there is no queue to validate the rest on.
    throw ApplicationFailure.nonRetryable(`the recipe has no valid hostId (${JSON.stringify(hostId)}). Fix: give the host that holds the base, e.g. "local"`, 'BAD_INPUT');
  }
  return recordedOperation({ kind: 'rebuildOverlay', hostId }, () => rebuild(input, hostId));
}

async function rebuild(input: RecipeInput, hostId: string): Promise<RebuildOverlayResult> {
  const info = workflowInfo();
  const common: ActivityOptions & { retry: RetryPolicy } = { taskQueue: hostTaskQueue(hostId), retry: { maximumAttempts: 5, initialInterval: '1 second', nonRetryableErrorTypes: NON_RETRYABLE } };
  const quick = proxyActivities<RecipeActivities & InstanceActivities & AdmissionActivities>({ ...common, startToCloseTimeout: '2 minutes' });

  const progress: OperationProgress = { stage: 'starting', done: [] };
  setHandler(operationProgressQuery, () => progress);
  const timings: Record<string, number> = {};
  let stageStarted = Date.now();
  const stage = (name: string): void => {
    const now = Date.now();
    if (progress.stage !== 'starting') {
      progress.done.push(progress.stage);
      timings[`${camel(progress.stage)}Ms`] = now - stageStarted;
    }
    stageStarted = now;
    progress.stage = name;
    setCurrentDetails(`**rebuildOverlay** of recipe \`${input.recipeId}\` on host \`${hostId}\`: ${name}${progress.done.length ? ` (done: ${progress.done.join(', ')})` : ''}`);
  };
  upsertSearchAttributes([
    { key: SearchAttributes.host, value: hostId },
    { key: SearchAttributes.operation, value: 'rebuildOverlay' },
    { key: SearchAttributes.status, value: 'running' },
  ]);
  const started = Date.now();

  stage('validate recipe');
  const recipe = await quick.parseRecipe(input).catch((e: unknown) => {
    upsertSearchAttributes([{ key: SearchAttributes.status, value: 'failed' }]);
    throw e;
  });
  upsertSearchAttributes([{ key: SearchAttributes.baseId, value: recipe.baseId }]);
  // The run id's random tail (a UUIDv7 starts with the time: two runs in the same minute share a prefix).
  const runTag = info.runId.replace(/-/g, '').slice(-8);
  const buildInstance = `rb-${recipe.recipeId}-${runTag}`;
  const verifyInstance = `rv-${recipe.recipeId}-${runTag}`;
  const recipeRun = proxyActivities<RecipeActivities>({
    ...common,
    // An activity retry runs the whole script again: recipes must be re-runnable (docs/recipes.md).
    retry: { ...common.retry, maximumAttempts: 2 },
    startToCloseTimeout: `${recipe.timeoutSeconds + 60} seconds`,
    heartbeatTimeout: '1 minute',
  });
  const long = proxyActivities<InstanceActivities>({ ...common, startToCloseTimeout: '30 minutes', heartbeatTimeout: '1 minute' });
  const checker = proxyActivities<RecipeActivities>({ ...common, startToCloseTimeout: `${(recipe.check?.timeoutSeconds ?? 30) + 60} seconds`, heartbeatTimeout: '1 minute' });

  let overlay: { overlayId: string; url: string; bytes: number } | undefined;
  try {
    // The host's activities are called directly (not through the resumeBaseVm, createOverlayVm
    // and synthesizeVm workflows): the run's instances and its unverified overlay are internal to
    // it, so they must not show up as operations of their own (the service lists instances and
    // overlays from those workflows).
    stage('resume base');
    const base = await quick.checkBasePresent({ baseId: recipe.baseId });
    await quick.checkCpuModel(base.cpuModel ? { cpuModel: base.cpuModel } : {});
    // Its VMs (the build VM, then the verify VM, one at a time) are admitted by memory like any
    // other (docs/operations.md). patched: a run started before they were replays without it.
    const admitting = patched('admission-rebuild') && typeof base.memoryBytes === 'number';
    if (admitting && (await admit(quick, { stage }, { instanceId: buildInstance, hostId }, base.memoryBytes)) > 0) stage('resume base');
    // The build instance forwards the guest's exec port (the recipe mechanism).
    await long.resumeBaseInstance({ instanceId: buildInstance, baseId: recipe.baseId, appPort: GUEST_EXEC_PORT });

    stage('run recipe in guest');
    const ran = await recipeRun.runRecipeInGuest({ instanceId: buildInstance, recipe });

    stage('create overlay');
    const made = await long.createInstanceOverlay({ instanceId: buildInstance, keepInstance: false });
    overlay = { overlayId: made.overlayId, url: made.url, bytes: made.bytes };
    upsertSearchAttributes([{ key: SearchAttributes.overlayId, value: made.overlayId }]);
    await quick.terminateInstance({ instanceId: buildInstance });

    stage('verify: synthesize');
    if (admitting && (await admit(quick, { stage }, { instanceId: verifyInstance, hostId }, base.memoryBytes)) > 0) stage('verify: synthesize');
    // Fetched by its URL, like any host would; the verify instance forwards the application's port.
    await long.synthesizeInstanceFiles({ instanceId: verifyInstance, overlayUrl: made.url, baseId: recipe.baseId, appPort: recipe.appPort });
    await long.resumeInstance({ instanceId: verifyInstance });
    // The readiness probe is the test guest's (port 8080); on another port the recipe's check verifies.
    if (recipe.appPort === GUEST_EXEC_PORT) await long.waitForApp({ instanceId: verifyInstance });
    if (recipe.check) {
      stage('verify: check application');
      await checker.checkRecipeApp({ instanceId: verifyInstance, recipeId: recipe.recipeId, check: recipe.check });
    }

    stage('make current');
    await quick.terminateInstance({ instanceId: verifyInstance });
    const recorded = await quick.recordRecipeOverlay({
      recipeId: recipe.recipeId,
      baseId: recipe.baseId,
      overlay: { ...overlay, workflowId: info.workflowId },
    });
    stage('done');
    timings.totalMs = Date.now() - started;
    upsertSearchAttributes([{ key: SearchAttributes.status, value: 'succeeded' }]);
    return {
      recipeId: recipe.recipeId,
      hostId,
      baseId: recipe.baseId,
      ...overlay,
      ...(recorded.previous ? { previousOverlayId: recorded.previous.overlayId } : {}),
      timings,
      recipeOutput: ran.output,
    };
  } catch (e) {
    // Compensation: the previous overlay stays current; no instance of this run stays behind.
    const failedStage = progress.stage;
    const root = rootCause(e);
    await CancellationScope.nonCancellable(async () => {
      stage('clean up after failure');
      await quick.terminateInstance({ instanceId: buildInstance });
      await quick.terminateInstance({ instanceId: verifyInstance });
      await quick.discardRecipeRun({
        recipeId: recipe.recipeId,
        baseId: recipe.baseId,
        workflowId: info.workflowId,
        message: `${failedStage}: ${root.message}`,
        ...(overlay ? { overlayId: overlay.overlayId } : {}),
      });
      stage('failed');
      upsertSearchAttributes([{ key: SearchAttributes.status, value: 'failed' }]);
    });
    if (isCancellation(e)) throw e;
    // One readable failure for operators: the recipe, the stage, and the root cause's type and message.
    throw ApplicationFailure.create({
      type: root.type ?? 'REBUILD_FAILED',
      nonRetryable: true,
      message: `rebuild of recipe ${recipe.recipeId} failed at "${failedStage}"; the previous overlay stays current: ${root.message}`,
      cause: e instanceof Error ? e : undefined,
    });
  }
}
