/**
 * VM handoff between clusters, as two workflows that never share a Temporal server:
 *
 * - handoffVm runs in the source cluster on the instance's host: live rounds while the VM runs
 *   (each ships what differs from what the destination holds), then the cut-over (pause, last
 *   round, the destination resumes), then the source VM goes. A failure or a cancellation before
 *   the destination confirmed resumes the source VM and aborts the destination.
 * - receiveHandoff runs in the destination cluster on the receiving host: its API's updates say a
 *   round has arrived (it applies it and answers) or that the last one is in (it rebuilds,
 *   verifies and resumes the VM, and answers with it). An abort, a failure or silence longer than
 *   the idle timeout removes whatever it made.
 *
 * Protocol and policy: docs/handoff.md.
 */
import {
  ActivityCancellationType,
  ApplicationFailure,
  CancellationScope,
  condition,
  defineQuery,
  defineSignal,
  defineUpdate,
  executeChild,
  isCancellation,
  patched,
  proxyActivities,
  setHandler,
  allHandlersFinished,
} from '@temporalio/workflow';
import type { RetryPolicy } from '@temporalio/workflow';
import type { BaseSent, HandoffSourceActivities, RoundReport } from '../activities/handoff-source';
import type { HandoffDestinationActivities } from '../activities/handoff-destination';
import type { InstanceActivities } from '../activities/instances';
import type { AdmissionActivities } from '../activities/admission';
import type { BaseImported, Fingerprint, HandoffTicket, ReceivedVm } from '../client/handoff-peer';
import { decideNext, measuredLinkRate, DEFAULT_STOP_POLICY, type StopPolicy, type RoundRecord } from './handoff-policy';
import type { Compression } from '../core/handoff/round';
import { hostTaskQueue, SearchAttributes } from '../common/names';
import { importBaseVm, tracker, tracked, type HostOperationInput } from './operations';
import { rootCause } from './failures';

const NON_RETRYABLE = ['BAD_INPUT', 'NOT_FOUND', 'CORRUPT', 'DIGEST_MISMATCH', 'WRONG_BASE', 'UNSUPPORTED_VERSION', 'CPU_MODEL_UNUSABLE', 'CONFLICT', 'UNAUTHORIZED', 'FORBIDDEN'];

function activitiesOf(hostId: string) {
  const retry: RetryPolicy = { maximumAttempts: 4, initialInterval: '1 second', nonRetryableErrorTypes: NON_RETRYABLE };
  const common = { taskQueue: hostTaskQueue(hostId), retry };
  return {
    quick: proxyActivities<HandoffSourceActivities & HandoffDestinationActivities & InstanceActivities & AdmissionActivities>({ ...common, startToCloseTimeout: '2 minutes' }),
    long: proxyActivities<HandoffSourceActivities & HandoffDestinationActivities & InstanceActivities>({
      ...common,
      startToCloseTimeout: '60 minutes',
      heartbeatTimeout: '60 seconds',
      cancellationType: ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
    }),
    /** The cut-over runs once: a second attempt could not know what the first did to the VM. */
    once: proxyActivities<HandoffSourceActivities>({ ...common, retry: { maximumAttempts: 1 }, startToCloseTimeout: '60 minutes', heartbeatTimeout: '60 seconds' }),
  };
}

// ---- source -----------------------------------------------------------------------------------

export interface HandoffVmInput extends HostOperationInput {
  instanceId: string;
  /** The destination's API and the ticket it issued (the source never sees its credentials). */
  destination: { apiUrl: string; ticket: HandoffTicket };
  policy?: Partial<StopPolicy>;
  /** The link rate to plan the first round with (bytes/s; default 25 Mbit/s). */
  linkBytesPerSec?: number;
  /** The first round's compression (default: chosen from a sample of its records and the link rate). */
  compression?: Compression;
  /** 'full': compare guest memory and disk hashes of the paused source and the destination before it resumes. */
  verify?: 'digests' | 'full';
}

export interface HandoffProgress {
  phase: 'live rounds' | 'cut-over' | 'removing source' | 'done' | 'resuming source' | 'failed';
  rounds: RoundReport[];
  stopReason?: string;
  /** When the destination lacked the base: its package's size and times. */
  base?: BaseSent;
}
export const handoffProgressQuery = defineQuery<HandoffProgress>('handoffProgress');

const mb = (b: number): string => `${(b / 1e6).toFixed(2)} MB`;
const roundLine = (r: RoundReport): string =>
  `${r.final ? 'last round' : `round ${r.round}`}: ${mb(r.bytes)} sent (${r.memRawPages} pages, ${r.diskRawChunks} disk chunks new; ${r.compression.codec === 'none' ? 'stored' : `${r.compression.codec} ${r.compression.level}`}) in ${(r.ms.total / 1000).toFixed(1)} s, link ${(r.sendBytesPerSec * 8 / 1e6).toFixed(1)} Mbit/s`;

export async function handoffVm(input: HandoffVmInput) {
  const t = tracker('handoffVm', input);
  const { quick, long, once } = activitiesOf(input.hostId);
  const policy: StopPolicy = { ...DEFAULT_STOP_POLICY, ...(input.policy ?? {}) };
  const progress: HandoffProgress = { phase: 'live rounds', rounds: [] };
  setHandler(handoffProgressQuery, () => progress);
  const ticket = input.destination.ticket;
  const dest = { ticket, destinationApiUrl: input.destination.apiUrl };
  const started = Date.now();
  return tracked(t, async () => {
    t.stage('inspect instance');
    const inst = await quick.handoffInspectSource({ instanceId: input.instanceId });
    t.tag(SearchAttributes.baseId, inst.baseId);
    // The first round's compression is chosen from a sample of its records (unless given).
    let compression: Compression | undefined = input.compression;
    const history: RoundRecord[] = [];
    const link = (): number => measuredLinkRate(history, input.linkBytesPerSec ?? 25e6 / 8);
    let cut: { report: RoundReport; received: ReceivedVm; pausedMs: number; verified?: Fingerprint } | undefined;
    try {
      if (ticket.needsBase) {
        // The destination host lacks the base: its package goes first (resumable, like a round).
        t.stage('send the base package (the destination host lacks it)');
        const b = await long.handoffSendBase({ instanceId: input.instanceId, ...dest });
        progress.base = b;
        t.stage(`base sent: ${mb(b.bytes)} in ${(b.uploadMs / 1000).toFixed(1)} s, imported at the destination in ${(b.importMs / 1000).toFixed(1)} s`);
      }
      // Live rounds: cancellable (the source VM keeps running; compensation below).
      for (let round = 1; ; round++) {
        t.stage(`round ${round}`);
        const r = await long.handoffLiveRound({ instanceId: input.instanceId, ...dest, round, ...(compression ? { compression } : {}), linkBytesPerSec: link() });
        progress.rounds.push(r);
        history.push({ round, bytes: r.bytes, rawBytes: r.rawBytes, ms: r.ms.total, sendMs: r.ms.send });
        t.stage(roundLine(r));
        compression = r.nextCompression;
        const d = decideNext(history, link(), policy);
        if (d.stop) {
          progress.stopReason = d.reason;
          break;
        }
      }
      // The cut-over: not cancellable once begun.
      progress.phase = 'cut-over';
      t.stage(`cut-over (${progress.stopReason ?? ''}): pause, last round, destination resumes`);
      cut = await CancellationScope.nonCancellable(() => once.handoffCutOver({ instanceId: input.instanceId, ...dest, round: history.length + 1, ...(compression ? { compression } : {}), linkBytesPerSec: link(), ...(input.verify ? { verify: input.verify } : {}) }));
      progress.rounds.push(cut.report);
      t.stage(roundLine(cut.report));
    } catch (e) {
      progress.phase = 'resuming source';
      t.stage('resume the source VM, abort the destination');
      const reason = isCancellation(e) ? 'cancelled' : e instanceof Error ? e.message : String(e);
      await CancellationScope.nonCancellable(() => quick.handoffResumeSource({ instanceId: input.instanceId, ...dest, reason: reason.slice(0, 500) }));
      progress.phase = 'failed';
      throw e;
    }
    progress.phase = 'removing source';
    t.stage('remove the source VM');
    await CancellationScope.nonCancellable(() => quick.handoffRemoveSource({ instanceId: input.instanceId, handoffId: ticket.handoffId }));
    progress.phase = 'done';
    const bytes = progress.rounds.reduce((s, r) => s + r.bytes, 0);
    return {
      hostId: input.hostId,
      instanceId: input.instanceId,
      baseId: inst.baseId,
      handoffId: ticket.handoffId,
      destination: cut.received,
      rounds: progress.rounds.length,
      bytes,
      stopReason: progress.stopReason,
      pausedMs: cut.pausedMs,
      totalMs: Date.now() - started,
      ...(progress.base ? { base: progress.base } : {}),
      ...(cut.verified ? { verified: cut.verified } : {}),
    };
  });
}

// ---- destination ---------------------------------------------------------------------------------

export interface ReceiveHandoffInput extends HostOperationInput {
  handoffId: string;
  instanceId: string;
  baseId: string;
  /** Silence longer than this (no round, no completion) aborts the handoff (default 5 min). */
  idleTimeoutMs?: number;
}

export interface ReceiveState {
  handoffId: string;
  phase: 'preparing' | 'awaiting base' | 'importing base' | 'receiving' | 'finishing' | 'resumed' | 'failed' | 'aborted';
  receiverUrl?: string;
  /** Highest round the source said has arrived, and highest applied. */
  arrived: number;
  applied: number;
  finalRound?: number;
  rounds: Array<{ round: number; ms: number; stats: Record<string, number>; final: boolean }>;
  result?: ReceivedVm;
  /** The base package the source sent, once imported. */
  baseImport?: BaseImported;
  error?: string;
  /** The failure's type (e.g. WRONG_BASE), for the source's error. */
  errorType?: string;
}

export const receiveStateQuery = defineQuery<ReceiveState>('receiveState');
export const roundArrivedUpdate = defineUpdate<ReceiveState['rounds'][number], [{ round: number; final: boolean }]>('roundArrived');
export const completeUpdate = defineUpdate<ReceivedVm, [{ appPort: number; verify?: Fingerprint }]>('complete');
/** The source uploaded the base package: import it; answers when rounds can come. */
export const baseArrivedUpdate = defineUpdate<BaseImported, []>('baseArrived');
export const abortSignal = defineSignal<[{ reason: string }]>('abort');

export async function receiveHandoff(input: ReceiveHandoffInput) {
  const t = tracker('receiveHandoff', input, [{ key: SearchAttributes.baseId, value: input.baseId }]);
  const { quick, long } = activitiesOf(input.hostId);
  const state: ReceiveState = { handoffId: input.handoffId, phase: 'preparing', arrived: 0, applied: 0, rounds: [] };
  let completeAsked = false;
  let baseSent = false;
  let appPort = 8080;
  let verify: Fingerprint | undefined;
  let abortReason: string | undefined;
  const ended = (): boolean => state.phase === 'resumed' || state.phase === 'failed' || state.phase === 'aborted';
  setHandler(receiveStateQuery, () => state);
  setHandler(abortSignal, ({ reason }) => {
    abortReason ??= reason;
  });
  setHandler(
    baseArrivedUpdate,
    async () => {
      baseSent = true;
      await condition(() => state.phase === 'receiving' || ended());
      if (!state.baseImport) throw ApplicationFailure.nonRetryable(`the destination did not import the base: ${state.error ?? state.phase}`, state.errorType ?? 'CONFLICT');
      return state.baseImport;
    },
    {
      validator: () => {
        if (ended() || abortReason !== undefined) throw new Error(`handoff ${input.handoffId} has ended (${state.phase})`);
        if (state.phase !== 'awaiting base' && state.phase !== 'importing base' && !state.baseImport) throw new Error(`host ${input.hostId} did not ask for the base (${state.phase})`);
      },
    },
  );
  setHandler(
    roundArrivedUpdate,
    async ({ round, final }) => {
      state.arrived = Math.max(state.arrived, round);
      if (final) state.finalRound = round;
      await condition(() => state.applied >= round || ended());
      const r = state.rounds.find((x) => x.round === round);
      if (!r) throw ApplicationFailure.nonRetryable(`round ${round} was not applied: ${state.error ?? state.phase}`, state.errorType ?? 'CONFLICT');
      return r;
    },
    {
      validator: ({ round }) => {
        if (ended() || abortReason !== undefined) throw new Error(`handoff ${input.handoffId} has ended (${state.phase})`);
        if (!Number.isInteger(round) || round < 1 || round > state.applied + 1) throw new Error(`round ${round} cannot be applied after round ${state.applied}`);
      },
    },
  );
  setHandler(
    completeUpdate,
    async (asked) => {
      appPort = asked.appPort;
      verify = asked.verify;
      completeAsked = true;
      await condition(() => ended());
      if (state.phase !== 'resumed' || !state.result) throw ApplicationFailure.nonRetryable(`the destination did not resume the VM: ${state.error ?? state.phase}`, 'HANDOFF_FAILED');
      return state.result;
    },
    {
      validator: (asked) => {
        if (ended() || abortReason !== undefined) throw new Error(`handoff ${input.handoffId} has ended (${state.phase})`);
        if (!Number.isInteger(asked.appPort) || asked.appPort < 1 || asked.appPort > 65535) throw new Error(`appPort ${asked.appPort} is not a port`);
      },
    },
  );
  const ids = { handoffId: input.handoffId, instanceId: input.instanceId, baseId: input.baseId };
  const idle = input.idleTimeoutMs ?? 5 * 60_000;
  return tracked(t, async () => {
    try {
      t.stage('open the receiver');
      const opened = await quick.receiveOpen(ids);
      state.receiverUrl = opened.receiverUrl;
      if (!opened.hasBase) {
        // The source sends the base package to the receiver, then says so (baseArrived).
        state.phase = 'awaiting base';
        t.stage('wait for the base package from the source');
        const woke = await condition(() => abortReason !== undefined || baseSent, idle);
        if (!woke) throw ApplicationFailure.nonRetryable(`no base package from the source for ${Math.round(idle / 1000)} s`, 'TIMEOUT');
        if (abortReason !== undefined) throw ApplicationFailure.nonRetryable(`the source aborted the handoff: ${abortReason}`, 'ABORTED');
        state.phase = 'importing base';
        t.stage('import the base package');
        const t0 = Date.now();
        // A run of its own, so the base is listed like any imported base (GET /v1/bases).
        const imported = await executeChild(importBaseVm, {
          workflowId: `importBaseVm/${input.hostId}/${input.handoffId}`,
          args: [{ hostId: input.hostId, source: opened.basePackage, onHostQueue: true }],
        });
        if (imported.baseId !== input.baseId) {
          throw ApplicationFailure.nonRetryable(`the package the source sent is base ${imported.baseId.slice(0, 12)}…, not ${input.baseId.slice(0, 12)}…, which the VM runs on`, 'WRONG_BASE');
        }
        state.baseImport = { baseId: imported.baseId, alreadyPresent: imported.alreadyPresent, importMs: Date.now() - t0 };
      }
      // The VM's memory must fit on this host now: a handoff does not wait for room (the source
      // keeps running the VM meanwhile, and can hand it to another host). receiveAbort gives it back.
      // patched: a run started before destinations were admitted replays without it.
      if (patched('admission-handoff-destination')) {
        t.stage('admit the VM\'s memory');
        const base = await quick.checkBasePresent({ baseId: input.baseId, hostId: input.hostId });
        const a = await quick.admitInstance({ instanceId: input.instanceId, memoryBytes: base.memoryBytes, hostId: input.hostId });
        if (!a.admitted) {
          throw ApplicationFailure.nonRetryable(
            `host ${input.hostId} has no room for instance ${input.instanceId}'s ${Math.round(base.memoryBytes / 1048576)} MiB (its VMs hold ${Math.round(a.committedBytes / 1048576)} of ${Math.round(a.capacityBytes / 1048576)} MiB). Fix: hand it off to another host, or terminate instances there`,
            'NO_MEMORY',
          );
        }
      }
      t.stage('prepare working files from the base');
      await long.receivePrepare(ids);
      state.phase = 'receiving';
      for (;;) {
        t.stage(`receiving (round ${state.applied} applied)`);
        const woke = await condition(() => abortReason !== undefined || state.arrived > state.applied || (completeAsked && state.finalRound !== undefined && state.applied >= state.finalRound), idle);
        if (!woke) throw ApplicationFailure.nonRetryable(`no word from the source for ${Math.round(idle / 1000)} s`, 'TIMEOUT');
        if (abortReason !== undefined) throw ApplicationFailure.nonRetryable(`the source aborted the handoff: ${abortReason}`, 'ABORTED');
        if (state.arrived > state.applied) {
          const round = state.applied + 1;
          t.stage(`apply round ${round}`);
          const r = await long.receiveApplyRound({ ...ids, round });
          state.rounds.push(r);
          state.applied = round;
          continue;
        }
        break;
      }
      state.phase = 'finishing';
      t.stage('rebuild and verify the VM');
      const built = await long.receiveFinish({ ...ids, appPort });
      t.stage('resume, wait for the application');
      // The VM keeps its NIC, as a live migration does (docs/handoff.md).
      const resumed = await long.resumeInstance({ instanceId: input.instanceId, waitForApp: true, keepNic: true, ...(verify ? { verify } : {}) });
      state.result = {
        instanceId: input.instanceId,
        hostId: input.hostId,
        appEndpoint: `127.0.0.1:${resumed.hostPort}`,
        timings: { ...built.timings, ...resumed.timings },
        ...(resumed.verified ? { verified: resumed.verified } : {}),
        ...(resumed.answeredAt ? { answeredAt: resumed.answeredAt } : {}),
      };
      state.phase = 'resumed';
      await condition(allHandlersFinished);
      return { hostId: input.hostId, instanceId: input.instanceId, baseId: input.baseId, handoffId: input.handoffId, hostPort: resumed.hostPort, rounds: state.rounds, timings: state.result.timings };
    } catch (e) {
      const f = rootCause(e);
      state.error = f.message;
      if (f.type) state.errorType = f.type;
      await CancellationScope.nonCancellable(() => quick.receiveAbort(ids));
      state.phase = abortReason !== undefined ? 'aborted' : 'failed';
      await condition(allHandlersFinished);
      throw e;
    }
  });
}
