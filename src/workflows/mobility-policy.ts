/**
 * When to move a VM closer to its user, and where (docs/mobility.md). Pure functions over plain
 * data, so the mobility controller workflow can run them deterministically and tests can drive
 * them with any RTT trace:
 *
 * - `smoothedRtt`: the median of the last `window` samples no older than `sampleMaxAgeMs`. A
 *   median ignores the single spikes a Wi-Fi link is full of; an EWMA would be dragged by them.
 * - `shouldCheck`: fire when the smoothed RTT has crossed `thresholdMs` (and has not fallen back
 *   below `thresholdMs - hysteresisMs`: noise at the threshold neither starts nor ends a crossing)
 *   and no cooldown runs. Every decision, move or stay, starts a cooldown, so a user sitting at
 *   the threshold does not make the controller ask its neighbours every few seconds.
 * - `chooseNeighbour`: among the neighbours that answered, serve and have room, the lowest RTT
 *   of those that beat the current RTT by `minGainMs` (and `minGainRatio`) wins; within `tieMs`
 *   of it, one that already holds the base is preferred (no base to send). A neighbour whose hosts
 *   have less memory available than the VM needs is skipped.
 */

export interface MobilityPolicy {
  /** Move when the smoothed RTT to the device is above this (ms). */
  thresholdMs: number;
  /** A crossing ends only once the smoothed RTT is below thresholdMs − hysteresisMs. */
  hysteresisMs: number;
  /** Samples in the median. */
  window: number;
  /** Fewer fresh samples than this: no decision. */
  minSamples: number;
  /** Samples older than this are not used (ms). */
  sampleMaxAgeMs: number;
  /** A neighbour must beat the current smoothed RTT by at least this (ms)... */
  minGainMs: number;
  /** ...and by at least this fraction of it. */
  minGainRatio: number;
  /** Neighbours within this of the best RTT count as equally near; the one holding the base wins. */
  tieMs: number;
  /** After a decision (move or stay), no new check for this long (ms). */
  cooldownMs: number;
  /** How often the controller evaluates the policy (ms). */
  checkIntervalMs: number;
  /** Without a device sample for this long, the cloudlet measures the RTT itself (ms; 0: never). */
  selfProbeAfterMs: number;
}

export const DEFAULT_MOBILITY_POLICY: MobilityPolicy = {
  thresholdMs: 40,
  hysteresisMs: 10,
  window: 5,
  minSamples: 3,
  sampleMaxAgeMs: 60_000,
  minGainMs: 10,
  minGainRatio: 0.25,
  tieMs: 5,
  cooldownMs: 60_000,
  checkIntervalMs: 5_000,
  selfProbeAfterMs: 30_000,
};

/** Limits a policy must respect (checked at the API's edge and again here). */
export const POLICY_LIMITS = {
  thresholdMs: [1, 10_000],
  hysteresisMs: [0, 10_000],
  window: [1, 100],
  minSamples: [1, 100],
  sampleMaxAgeMs: [1_000, 3_600_000],
  minGainMs: [0, 10_000],
  minGainRatio: [0, 0.95],
  tieMs: [0, 1_000],
  cooldownMs: [0, 86_400_000],
  checkIntervalMs: [200, 3_600_000],
  selfProbeAfterMs: [0, 3_600_000],
} as const satisfies Record<keyof MobilityPolicy, readonly [number, number]>;

/** Fields that count samples: whole numbers. */
export const INTEGER_FIELDS: readonly (keyof MobilityPolicy)[] = ['window', 'minSamples'];

export interface RttSample {
  rttMs: number;
  /** Epoch ms the sample was taken (or received). */
  at: number;
  /** Who measured it. */
  source: 'device' | 'cloudlet';
}

/** The median of the fresh samples, or undefined when there are fewer than minSamples. */
export function smoothedRtt(samples: readonly RttSample[], policy: MobilityPolicy, now: number): number | undefined {
  const fresh = samples.filter((s) => now - s.at <= policy.sampleMaxAgeMs).slice(-policy.window);
  if (fresh.length < policy.minSamples || fresh.length === 0) return undefined;
  const sorted = fresh.map((s) => s.rttMs).sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[mid] ?? 0) : ((sorted[mid - 1] ?? 0) + (sorted[mid] ?? 0)) / 2;
}

export interface TriggerState {
  /** Since when the smoothed RTT has been above the threshold (hysteresis included); undefined: it is not. */
  crossedAt?: number | undefined;
  /** Epoch ms before which no check fires (after a decision). */
  cooldownUntil: number;
}

export interface CheckVerdict {
  fire: boolean;
  smoothedMs: number | undefined;
  /** The new crossedAt. */
  crossedAt: number | undefined;
  why: string;
}

const fmtMs = (x: number): string => `${Math.round(x * 10) / 10} ms`;

/**
 * Whether to ask the neighbours now. The RTT counts as above the threshold once the median passes
 * thresholdMs, and until it falls below thresholdMs − hysteresisMs: noise around the threshold
 * neither starts nor ends a crossing. A crossing fires when no cooldown runs.
 */
export function shouldCheck(samples: readonly RttSample[], trigger: TriggerState, policy: MobilityPolicy, now: number): CheckVerdict {
  const smoothedMs = smoothedRtt(samples, policy, now);
  if (smoothedMs === undefined) return { fire: false, smoothedMs, crossedAt: trigger.crossedAt, why: `too few fresh samples (need ${policy.minSamples})` };
  const above = smoothedMs > policy.thresholdMs || (trigger.crossedAt !== undefined && smoothedMs >= policy.thresholdMs - policy.hysteresisMs);
  const crossedAt = above ? (trigger.crossedAt ?? now) : undefined;
  if (!above) return { fire: false, smoothedMs, crossedAt, why: `${fmtMs(smoothedMs)} is below the threshold ${fmtMs(policy.thresholdMs)}` };
  if (now < trigger.cooldownUntil) return { fire: false, smoothedMs, crossedAt, why: `${fmtMs(smoothedMs)} is above the threshold, cooling down for ${Math.ceil((trigger.cooldownUntil - now) / 1000)} s` };
  return { fire: true, smoothedMs, crossedAt, why: `${fmtMs(smoothedMs)} is above the threshold ${fmtMs(policy.thresholdMs)}` };
}

/** What a neighbour said when asked for its RTT to the device. */
export interface CandidateReport {
  neighbour: string;
  apiUrl: string;
  reachable: boolean;
  /** Its measured RTT to the device (ms). */
  rttMs?: number;
  /** Hosts of its cluster serving now. */
  servingHosts?: number;
  holdsBase?: boolean;
  /** The most memory one of its serving hosts has available (bytes), when it reports it. */
  memAvailableBytes?: number;
  /** Why it was not reachable, or could not measure. */
  error?: string;
}

export type Choice =
  | { move: true; to: CandidateReport; gainMs: number; why: string }
  | { move: false; why: string; best?: CandidateReport };

const fmt = (ms: number): string => `${Math.round(ms * 10) / 10} ms`;

/**
 * Pick the neighbour to move to, or say why none. Only neighbours that beat the current RTT by the
 * minimum gain compete; among those, the nearest wins, or within tieMs of it one holding the base.
 */
export function chooseNeighbour(currentMs: number, candidates: readonly CandidateReport[], policy: MobilityPolicy, needBytes?: number): Choice {
  const usable: Array<CandidateReport & { rttMs: number }> = [];
  const skipped: string[] = [];
  const gib = (b: number): string => `${(b / 2 ** 30).toFixed(2)} GiB`;
  for (const c of candidates) {
    if (needBytes !== undefined && c.memAvailableBytes !== undefined && c.memAvailableBytes < needBytes) skipped.push(`${c.neighbour} (${gib(c.memAvailableBytes)} available, the VM needs ${gib(needBytes)})`);
    else if (c.reachable && c.rttMs !== undefined && (c.servingHosts ?? 1) > 0) usable.push(c as CandidateReport & { rttMs: number });
    else skipped.push(`${c.neighbour} (${c.error ?? (!c.reachable ? 'unreachable' : c.rttMs === undefined ? 'no RTT measured' : 'no serving host')})`);
  }
  const skippedText = skipped.length ? `; skipped ${skipped.join(', ')}` : '';
  if (usable.length === 0) return { move: false, why: `no neighbour can take it${skippedText}` };
  const needed = Math.max(policy.minGainMs, policy.minGainRatio * currentMs);
  const byRtt = [...usable].sort((a, b) => a.rttMs - b.rttMs);
  const nearest = byRtt[0] as CandidateReport & { rttMs: number };
  const qualified = byRtt.filter((c) => currentMs - c.rttMs >= needed);
  const first = qualified[0];
  if (!first) {
    return { move: false, best: nearest, why: `best neighbour ${nearest.neighbour} at ${fmt(nearest.rttMs)} is not enough nearer than ${fmt(currentMs)} (gain ${fmt(currentMs - nearest.rttMs)} < ${fmt(needed)})${skippedText}` };
  }
  const near = qualified.filter((c) => c.rttMs <= first.rttMs + policy.tieMs);
  const best = near.find((c) => c.holdsBase === true) ?? first;
  const gainMs = currentMs - best.rttMs;
  const tie = near.length > 1 ? ` (within ${fmt(policy.tieMs)} of ${near.filter((c) => c !== best).map((c) => c.neighbour).join(', ')}; ${best.holdsBase ? 'it holds the base' : 'nearest'})` : '';
  return { move: true, to: best, gainMs, why: `${best.neighbour} at ${fmt(best.rttMs)} beats ${fmt(currentMs)} by ${fmt(gainMs)}${tie}${skippedText}` };
}

/** A policy with `patch` applied, every field inside its limits (BAD_INPUT-style message otherwise). */
export function mergePolicy(base: MobilityPolicy, patch: Partial<MobilityPolicy>): { policy: MobilityPolicy } | { error: string } {
  const policy = { ...base, ...patch };
  for (const [k, [lo, hi]] of Object.entries(POLICY_LIMITS) as [keyof MobilityPolicy, readonly [number, number]][]) {
    const v = policy[k];
    if (!Number.isFinite(v) || v < lo || v > hi) return { error: `policy.${k} must be between ${lo} and ${hi} (got ${v})` };
    if (INTEGER_FIELDS.includes(k) && !Number.isInteger(v)) return { error: `policy.${k} must be a whole number (got ${v})` };
  }
  if (policy.minSamples > policy.window) return { error: `policy.minSamples (${policy.minSamples}) cannot exceed policy.window (${policy.window})` };
  if (policy.hysteresisMs >= policy.thresholdMs) return { error: `policy.hysteresisMs (${policy.hysteresisMs}) must be below policy.thresholdMs (${policy.thresholdMs})` };
  return { policy };
}
