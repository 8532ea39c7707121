/**
 * The mobility controller: one long-running run per served instance (workflow id
 * `mobility/<instanceId>`, on the cluster's shared workflow queue) that follows its user
 * (docs/mobility.md). Signals carry RTT samples from the device; a timer drives the checks; when
 * the policy (src/workflows/mobility-policy.ts) fires, it asks the neighbours for their RTT to the
 * device, chooses, and starts the handoff as a child run (handoffVm, on the instance's host, the
 * same run the API would start). Every decision is kept with its inputs (query
 * `mobilityState`, and the run's current details in the Temporal UI). Operators pause, resume,
 * change the policy or force a move by signal and update; continue-as-new bounds the history.
 */
import {
  allHandlersFinished,
  condition,
  continueAsNew,
  defineQuery,
  defineSignal,
  defineUpdate,
  executeChild,
  ParentClosePolicy,
  proxyActivities,
  setCurrentDetails,
  setHandler,
  workflowInfo,
} from '@temporalio/workflow';
import type { MobilityActivities } from '../activities/mobility';
import { chooseNeighbour, DEFAULT_MOBILITY_POLICY, mergePolicy, shouldCheck, type CandidateReport, type Choice, type MobilityPolicy, type RttSample } from './mobility-policy';
import { hostTaskQueue, SearchAttributes } from '../common/names';
import { handoffVm } from './handoff';
import { rootCause } from './failures';

export interface MobilityDecision {
  /** 1, 2, ... over the controller's life (across continue-as-new). */
  seq: number;
  at: number;
  trigger: 'threshold' | 'forced';
  /** The smoothed RTT that fired it (ms), and the threshold then. */
  smoothedMs?: number;
  thresholdMs: number;
  /** When the smoothed RTT went above the threshold (epoch ms). */
  crossedAt?: number;
  candidates: CandidateReport[];
  outcome: 'move' | 'stay';
  to?: string;
  why: string;
  handoff?: { workflowId: string; state: 'running' | 'succeeded' | 'failed'; pausedMs?: number; totalMs?: number; appEndpoint?: string; answeredAt?: number; error?: string };
}

export interface MobilityState {
  instanceId: string;
  hostId: string;
  baseId: string;
  memoryBytes?: number;
  device?: string;
  policy: MobilityPolicy;
  phase: 'watching' | 'asking neighbours' | 'moving' | 'moved' | 'stopped';
  paused: boolean;
  cooldownUntil: number;
  samples: RttSample[];
  smoothedMs?: number;
  crossedAt?: number;
  lastCheck?: { at: number; why: string };
  lastSelfProbe?: { at: number; error?: string };
  /** The last 20 decisions, oldest first. */
  decisions: MobilityDecision[];
  decisionCount: number;
  movedTo?: { neighbour: string; apiUrl: string; hostId: string; appEndpoint?: string };
}

export interface MobilityInput {
  instanceId: string;
  hostId: string;
  baseId: string;
  /** The VM's memory: a neighbour whose hosts have less available cannot take it. */
  memoryBytes?: number;
  device?: string;
  policy?: Partial<MobilityPolicy>;
  /** The tenant the instance belongs to: it stays that tenant's at the neighbour it moves to. */
  tenant?: string;
  /** Start cooling down (e.g. just after the instance arrived by a move). */
  cooldownMs?: number;
  /** Continue as new past this many history events (default 4000, or when Temporal suggests it). */
  historyLimit?: number;
  /** The state a continued run carries on with. */
  carried?: MobilityState;
}

export const rttSamplesSignal = defineSignal<[{ samples: Array<{ rttMs: number; at: number }>; device?: string }]>('rttSamples');
export const pauseSignal = defineSignal<[{ paused: boolean }]>('pause');
export const stopSignal = defineSignal<[]>('stop');
export const setPolicyUpdate = defineUpdate<MobilityPolicy, [Partial<MobilityPolicy>]>('setPolicy');
export const moveNowUpdate = defineUpdate<MobilityDecision, [{ neighbour?: string }]>('moveNow');
export const mobilityStateQuery = defineQuery<MobilityState>('mobilityState');

const MAX_SAMPLES = 200;
const KEPT_DECISIONS = 20;

const acts = proxyActivities<MobilityActivities>({
  startToCloseTimeout: '1 minute',
  retry: { maximumAttempts: 3, initialInterval: '1 second', nonRetryableErrorTypes: ['BAD_INPUT', 'NOT_FOUND', 'UNAUTHORIZED', 'FORBIDDEN', 'CONFLICT', 'WRONG_BASE'] },
});
/** Asking the neighbours reports each one's failure itself; a probe of the device is tried once per check. */
const once = proxyActivities<MobilityActivities>({ startToCloseTimeout: '1 minute', retry: { maximumAttempts: 1 } });

const ms = (x: number | undefined): string => (x === undefined ? '–' : `${Math.round(x * 10) / 10} ms`);

export async function mobilityController(input: MobilityInput) {
  const st: MobilityState = input.carried ?? {
    instanceId: input.instanceId,
    hostId: input.hostId,
    baseId: input.baseId,
    ...(input.memoryBytes !== undefined ? { memoryBytes: input.memoryBytes } : {}),
    ...(input.device ? { device: input.device } : {}),
    policy: { ...DEFAULT_MOBILITY_POLICY, ...(input.policy ?? {}) },
    phase: 'watching',
    paused: false,
    cooldownUntil: Date.now() + (input.cooldownMs ?? 0),
    samples: [],
    decisions: [],
    decisionCount: 0,
  };
  let stop = false;
  let wake = false;
  let forced: { neighbour?: string } | undefined;

  setHandler(mobilityStateQuery, () => st);
  setHandler(rttSamplesSignal, ({ samples, device }) => {
    for (const s of samples) st.samples.push({ rttMs: s.rttMs, at: s.at, source: 'device' });
    if (st.samples.length > MAX_SAMPLES) st.samples.splice(0, st.samples.length - MAX_SAMPLES);
    if (device) st.device = device;
    wake = true;
  });
  setHandler(pauseSignal, ({ paused }) => {
    st.paused = paused;
    wake = true;
  });
  setHandler(stopSignal, () => {
    stop = true;
  });
  setHandler(
    setPolicyUpdate,
    (patch) => {
      const r = mergePolicy(st.policy, patch);
      if ('policy' in r) st.policy = r.policy;
      wake = true;
      return st.policy;
    },
    {
      validator: (patch) => {
        const r = mergePolicy(st.policy, patch);
        if ('error' in r) throw new Error(r.error);
      },
    },
  );
  setHandler(
    moveNowUpdate,
    async (req) => {
      const before = st.decisionCount;
      forced = req;
      wake = true;
      await condition(() => st.decisionCount > before);
      const d = st.decisions[st.decisions.length - 1];
      if (!d) throw new Error('no decision was recorded');
      return d;
    },
    {
      validator: (_req) => {
        if (st.phase === 'moving' || st.phase === 'asking neighbours') throw new Error(`the controller is ${st.phase} already`);
        if (st.phase === 'moved' || st.phase === 'stopped') throw new Error(`the controller has ${st.phase === 'moved' ? 'moved the instance away' : 'stopped'}`);
      },
    },
  );

  const show = (): void => {
    const last = st.decisions[st.decisions.length - 1];
    setCurrentDetails(
      [
        `**mobility** of instance \`${st.instanceId}\` on host \`${st.hostId}\`: ${st.phase}${st.paused ? ' (paused)' : ''}`,
        `RTT ${ms(st.smoothedMs)} (median of ${Math.min(st.samples.length, st.policy.window)}), threshold ${ms(st.policy.thresholdMs)}${Date.now() < st.cooldownUntil ? `, cooling down until ${new Date(st.cooldownUntil).toISOString()}` : ''}`,
        st.lastCheck ? `last check: ${st.lastCheck.why}` : '',
        last ? `last decision #${last.seq} (${last.trigger}): **${last.outcome}${last.to ? ` to ${last.to}` : ''}**: ${last.why}` : 'no decision yet',
      ].filter(Boolean).join('\n\n'),
    );
  };

  const record = (d: Omit<MobilityDecision, 'seq'>): MobilityDecision => {
    const full = { seq: st.decisionCount + 1, ...d };
    st.decisions.push(full);
    if (st.decisions.length > KEPT_DECISIONS) st.decisions.shift();
    st.decisionCount++;
    st.cooldownUntil = Date.now() + st.policy.cooldownMs;
    show();
    return full;
  };

  /** Ask the neighbours, choose, and (when moving) run the handoff. True when the instance has moved. */
  async function decide(trigger: MobilityDecision['trigger'], want?: string): Promise<boolean> {
    const base = { at: Date.now(), trigger, thresholdMs: st.policy.thresholdMs, ...(st.smoothedMs !== undefined ? { smoothedMs: st.smoothedMs } : {}), ...(st.crossedAt !== undefined ? { crossedAt: st.crossedAt } : {}) };
    if (!st.device) {
      record({ ...base, candidates: [], outcome: 'stay', why: 'no device address: the neighbours cannot measure their RTT to the device (report samples with "device")' });
      return false;
    }
    st.phase = 'asking neighbours';
    show();
    let candidates: CandidateReport[];
    try {
      candidates = await acts.mobilityAskNeighbours({ device: st.device, baseId: st.baseId });
    } catch (e) {
      // The registry itself failed (each neighbour's own failure is a candidate's error): stay, and
      // try again after the cooldown.
      st.phase = 'watching';
      record({ ...base, candidates: [], outcome: 'stay', why: `could not ask the neighbours: ${rootCause(e).message.slice(0, 300)}` });
      return false;
    }
    st.phase = 'watching';
    let choice: Choice;
    if (want !== undefined) {
      const c = candidates.find((x) => x.neighbour === want);
      choice = !c
        ? { move: false, why: `neighbour ${want} is not in the registry` }
        : c.reachable && (c.servingHosts ?? 1) > 0 && !(st.memoryBytes !== undefined && c.memAvailableBytes !== undefined && c.memAvailableBytes < st.memoryBytes)
          ? { move: true, to: c, gainMs: (st.smoothedMs ?? NaN) - (c.rttMs ?? NaN), why: `forced to ${want} by an operator` }
          : { move: false, why: `neighbour ${want} cannot take it (${c.error ?? ((c.servingHosts ?? 1) > 0 ? 'too little memory available' : 'no serving host')})` };
    } else if (trigger === 'forced') {
      // Forced without a name: the nearest neighbour that can take it, whatever the gain.
      choice = chooseNeighbour(Number.MAX_SAFE_INTEGER, candidates, { ...st.policy, minGainMs: 0, minGainRatio: 0 }, st.memoryBytes);
      if (choice.move) choice = { ...choice, why: `forced by an operator: ${choice.why.replace(/ beats .*? by [^;(]*/, ' is the nearest')}` };
    } else {
      choice = chooseNeighbour(st.smoothedMs ?? 0, candidates, st.policy, st.memoryBytes);
    }
    if (!choice.move) {
      record({ ...base, candidates, outcome: 'stay', why: choice.why });
      return false;
    }
    const decision = record({ ...base, candidates, outcome: 'move', to: choice.to.neighbour, why: choice.why });
    st.phase = 'moving';
    show();
    let workflowId = '';
    try {
      const { apiUrl, ticket } = await acts.mobilityBeginHandoff({ neighbour: choice.to.neighbour, instanceId: st.instanceId, baseId: st.baseId, ...(input.tenant ? { tenant: input.tenant } : {}) });
      workflowId = `handoffVm/${st.hostId}/${st.instanceId}/${ticket.handoffId}`;
      decision.handoff = { workflowId, state: 'running' };
      const r = await executeChild(handoffVm, {
        workflowId,
        taskQueue: hostTaskQueue(st.hostId),
        args: [{ hostId: st.hostId, instanceId: st.instanceId, destination: { apiUrl, ticket }, onHostQueue: true }],
        typedSearchAttributes: [
          { key: SearchAttributes.host, value: st.hostId },
          { key: SearchAttributes.operation, value: 'handoffVm' },
          { key: SearchAttributes.status, value: 'running' },
        ],
        // The handoff finishes (or compensates) on its own even if this run is stopped.
        parentClosePolicy: ParentClosePolicy.ABANDON,
        staticSummary: `Hand off instance ${st.instanceId} to ${choice.to.neighbour} (mobility decision #${decision.seq})`,
      });
      decision.handoff = {
        workflowId,
        state: 'succeeded',
        pausedMs: r.pausedMs,
        totalMs: r.totalMs,
        ...(r.destination.appEndpoint ? { appEndpoint: r.destination.appEndpoint } : {}),
        ...(r.destination.answeredAt !== undefined ? { answeredAt: r.destination.answeredAt } : {}),
      };
      st.movedTo = { neighbour: choice.to.neighbour, apiUrl, hostId: r.destination.hostId, ...(r.destination.appEndpoint ? { appEndpoint: r.destination.appEndpoint } : {}) };
      st.phase = 'moved';
      show();
      // The neighbour's cluster watches the instance from now on; it starts cooling down, so the
      // instance does not bounce straight back. Not fatal: the instance has moved either way.
      try {
        await acts.mobilityWatchAtNeighbour({ neighbour: choice.to.neighbour, instanceId: st.instanceId, ...(st.device ? { device: st.device } : {}), policy: st.policy, cooldownMs: st.policy.cooldownMs });
      } catch (e) {
        decision.why += `; the neighbour did not take over watching: ${rootCause(e).message}`;
      }
      show();
      return true;
    } catch (e) {
      decision.handoff = { workflowId, state: 'failed', error: rootCause(e).message.slice(0, 500) };
      st.phase = 'watching';
      show();
      return false;
    }
  }

  show();
  for (;;) {
    await condition(() => stop || wake || forced !== undefined, st.policy.checkIntervalMs);
    wake = false;
    if (stop) break;
    const now = Date.now();
    const fresh = st.samples.filter((s) => now - s.at <= st.policy.sampleMaxAgeMs);
    if (fresh.length < st.samples.length) st.samples = fresh;

    if (forced !== undefined) {
      const want = forced.neighbour;
      forced = undefined;
      if (await decide('forced', want)) break;
      continue;
    }
    if (st.paused) {
      st.lastCheck = { at: now, why: 'paused' };
      continue;
    }
    // No word from the device for a while: measure from here.
    const lastDevice = [...st.samples].reverse().find((s) => s.source === 'device')?.at ?? 0;
    if (st.device && st.policy.selfProbeAfterMs > 0 && now - lastDevice > st.policy.selfProbeAfterMs && now - (st.lastSelfProbe?.at ?? 0) >= st.policy.checkIntervalMs) {
      try {
        const m = await once.mobilityProbeDevice({ device: st.device });
        st.samples.push({ rttMs: m.medianMs, at: Date.now(), source: 'cloudlet' });
        st.lastSelfProbe = { at: Date.now() };
      } catch (e) {
        st.lastSelfProbe = { at: Date.now(), error: rootCause(e).message.slice(0, 300) };
      }
    }
    const v = shouldCheck(st.samples, st, st.policy, Date.now());
    st.smoothedMs = v.smoothedMs;
    if (v.crossedAt === undefined) delete st.crossedAt;
    else st.crossedAt = v.crossedAt;
    st.lastCheck = { at: now, why: v.fire ? `${v.why}: asking the neighbours` : v.why };
    if (v.fire && (await decide('threshold'))) break;
    show();
    if (workflowInfo().continueAsNewSuggested || workflowInfo().historyLength > (input.historyLimit ?? 4000)) {
      await condition(allHandlersFinished);
      await continueAsNew<typeof mobilityController>({ ...input, carried: st });
    }
  }
  if (st.phase !== 'moved') st.phase = 'stopped';
  show();
  await condition(allHandlersFinished);
  return { instanceId: st.instanceId, phase: st.phase, decisions: st.decisionCount, ...(st.movedTo ? { movedTo: st.movedTo } : {}), lastDecision: st.decisions[st.decisions.length - 1] };
}
