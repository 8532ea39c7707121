/**
 * deployOverlay: one request, the same application on many hosts at once (docs/deployments.md).
 * Per host, in parallel: the host fetches the overlay once (cacheOverlay), then synthesizes its
 * share of the VMs from that copy, each a child synthesizeVm run (the same run POST /v1/instances
 * starts, so every VM is an instance and an operation of its own). A host that fails is reported
 * with its reason and the others go on; the deployment succeeds when at least one VM answers.
 * Cancelling it cancels its synthesis runs, which remove what they made; the hosts' copies of the
 * overlay go in every case.
 */
import {
  ApplicationFailure,
  CancellationScope,
  CancelledFailure,
  executeChild,
  proxyActivities,
  setCurrentDetails,
  setHandler,
  upsertSearchAttributes,
  workflowInfo,
} from '@temporalio/workflow';
import type { OverlayCacheActivities } from '../activities/overlay-cache';
import { hostTaskQueue, SearchAttributes } from '../common/names';
import { operationProgressQuery, synthesizeVm, terminateVm, type OperationProgress } from './operations';
import { rootCause } from './failures';
import { recordedOperation } from './operation-record';

export interface DeployOverlayInput {
  deploymentId: string;
  overlayUrl: string;
  /** How many VMs on each host. */
  hosts: Array<{ hostId: string; count: number }>;
  /** The application's guest port (default the test guest's). */
  appPort?: number;
}

export interface DeployedVm {
  instanceId: string;
  hostId: string;
  hostPort?: number;
  firstResponseMs?: number;
  /** When its application first answered (epoch ms). */
  answeredAt?: number;
  error?: string;
}

export interface HostDeployment {
  hostId: string;
  fetchedBytes?: number;
  fetchMs?: number;
  vms: DeployedVm[];
  /** The host's failure before any VM (fetching the overlay). */
  error?: string;
}

const mb = (b: number): string => `${(b / 1e6).toFixed(2)} MB`;

export async function deployOverlay(input: DeployOverlayInput) {
  return recordedOperation({ kind: 'deployOverlay', hostId: input.hosts[0]?.hostId ?? '' }, () => deploy(input));
}

async function deploy(input: DeployOverlayInput) {
  const started = Date.now();
  const progress: OperationProgress = { stage: 'starting', done: [] };
  const total = input.hosts.reduce((n, h) => n + h.count, 0);
  setHandler(operationProgressQuery, () => progress);
  const firstHost = input.hosts[0]?.hostId ?? '';
  upsertSearchAttributes([
    { key: SearchAttributes.host, value: firstHost },
    { key: SearchAttributes.operation, value: 'deployOverlay' },
    { key: SearchAttributes.status, value: 'running' },
  ]);
  const note = (line: string): void => {
    progress.done.push(line);
    setCurrentDetails(`**deployOverlay** ${input.deploymentId}: ${total} VMs on ${input.hosts.length} hosts\n\n${progress.done.map((d) => `- ${d}`).join('\n')}`);
  };
  const finish = (status: 'succeeded' | 'failed' | 'cancelled'): void => {
    progress.stage = status === 'succeeded' ? 'done' : status;
    upsertSearchAttributes([{ key: SearchAttributes.status, value: status }]);
  };
  progress.stage = `fetch the overlay once per host, then ${total} syntheses`;
  let seq = 0;
  const plan = input.hosts.map((h) => ({ ...h, ids: Array.from({ length: h.count }, () => `i-${input.deploymentId.slice(2)}-${++seq}`) }));

  const deployOn = async (h: (typeof plan)[number]): Promise<HostDeployment> => {
    const acts = proxyActivities<OverlayCacheActivities>({
      taskQueue: hostTaskQueue(h.hostId),
      startToCloseTimeout: '30 minutes',
      heartbeatTimeout: '30 seconds',
      retry: { maximumAttempts: 3, nonRetryableErrorTypes: ['BAD_INPUT', 'NOT_FOUND', 'DIGEST_MISMATCH'] },
    });
    const out: HostDeployment = { hostId: h.hostId, vms: [] };
    try {
      const cached = await acts.cacheOverlay({ deploymentId: input.deploymentId, overlayUrl: input.overlayUrl });
      out.fetchedBytes = cached.bytes;
      out.fetchMs = cached.fetchMs;
      note(`${h.hostId}: overlay fetched once, ${mb(cached.bytes)} in ${(cached.fetchMs / 1000).toFixed(1)} s`);
      out.vms = await Promise.all(
        h.ids.map(async (instanceId): Promise<DeployedVm> => {
          try {
            const r = await executeChild(synthesizeVm, {
              workflowId: `synthesizeVm/${h.hostId}/${instanceId}`,
              taskQueue: hostTaskQueue(h.hostId),
              args: [{ hostId: h.hostId, instanceId, overlayUrl: cached.path, waitForApp: true, onHostQueue: true, ...(input.appPort ? { appPort: input.appPort } : {}) }],
              typedSearchAttributes: [
                { key: SearchAttributes.host, value: h.hostId },
                { key: SearchAttributes.operation, value: 'synthesizeVm' },
                { key: SearchAttributes.status, value: 'running' },
              ],
              staticSummary: `Synthesize instance ${instanceId} on host ${h.hostId} for deployment ${input.deploymentId}`,
            });
            note(`${h.hostId}: ${instanceId} answers (first response ${((r.timings.firstResponseMs ?? 0) / 1000).toFixed(1)} s)`);
            return { instanceId, hostId: h.hostId, hostPort: r.hostPort, ...(r.timings.firstResponseMs !== undefined ? { firstResponseMs: r.timings.firstResponseMs } : {}), ...(r.answeredAt !== undefined ? { answeredAt: r.answeredAt } : {}) };
          } catch (e) {
            const error = rootCause(e).message.slice(0, 500);
            note(`${h.hostId}: ${instanceId} failed: ${error}`);
            return { instanceId, hostId: h.hostId, error };
          }
        }),
      );
    } catch (e) {
      out.error = rootCause(e).message.slice(0, 500);
      note(`${h.hostId}: failed: ${out.error}`);
    } finally {
      await CancellationScope.nonCancellable(() => acts.dropCachedOverlay({ deploymentId: input.deploymentId })).catch(() => undefined);
    }
    return out;
  };

  const hosts = await Promise.all(plan.map(deployOn));
  const vms = hosts.flatMap((h) => h.vms);
  const answering = vms.filter((v) => v.hostPort !== undefined);
  const result = {
    deploymentId: input.deploymentId,
    overlayUrl: input.overlayUrl,
    requested: total,
    answering: answering.length,
    failed: total - answering.length,
    /** From the start of the deployment until its last VM answered. */
    allAnsweringMs: answering.length ? Math.max(...answering.map((v) => v.answeredAt ?? started)) - started : undefined,
    totalMs: Date.now() - started,
    hosts,
  };
  if (CancellationScope.current().consideredCancelled) {
    // Cancelled as a whole: the cancelled syntheses have removed their VMs, the hosts their
    // copies; the VMs that had answered go too.
    await CancellationScope.nonCancellable(() =>
      Promise.all(
        answering.map((v) =>
          executeChild(terminateVm, {
            workflowId: `terminateVm/${v.hostId}/${v.instanceId}/deployment-cancelled`,
            taskQueue: hostTaskQueue(v.hostId),
            args: [{ hostId: v.hostId, instanceId: v.instanceId, onHostQueue: true }],
            typedSearchAttributes: [
              { key: SearchAttributes.host, value: v.hostId },
              { key: SearchAttributes.operation, value: 'terminateVm' },
              { key: SearchAttributes.status, value: 'running' },
            ],
          }).catch(() => undefined),
        ),
      ),
    );
    finish('cancelled');
    throw new CancelledFailure(`deployment ${input.deploymentId} was cancelled (${answering.length} of ${total} VMs had answered; they were removed)`);
  }
  if (answering.length === 0) {
    finish('failed');
    const why = hosts.map((h) => `${h.hostId}: ${h.error ?? h.vms.find((v) => v.error)?.error ?? 'no VM'}`).join('; ');
    throw ApplicationFailure.nonRetryable(`deployment ${input.deploymentId}: no VM answers (${why})`, 'DEPLOYMENT_FAILED', result);
  }
  note(`${answering.length} of ${total} VMs answer${result.failed ? `, ${result.failed} failed` : ''} (${workflowInfo().workflowId})`);
  finish('succeeded');
  return result;
}
