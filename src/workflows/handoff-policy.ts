/**
 * When a handoff stops its live rounds and pauses the VM: pure functions of the rounds so far,
 * run in the handoffVm workflow (deterministic, no I/O).
 */

export interface RoundRecord {
  round: number;
  /** Bytes of the round file (what crossed the link). */
  bytes: number;
  /** Bytes of payload before compression. */
  rawBytes: number;
  /** Wall time of the round (capture + build + send + apply). */
  ms: number;
  /** Seconds the upload took. */
  sendMs: number;
}

export interface StopPolicy {
  /** Stop when the next round is expected to cross the link within this long (default 1 s). */
  targetFinalMs: number;
  /** Stop after this many live rounds (default 6). */
  maxRounds: number;
  /** Stop when the live rounds have taken this long (default 10 min). */
  maxLiveMs: number;
  /** Not converging: a round shipping at least this fraction of the previous one's bytes (default 0.8). */
  notConvergingRatio: number;
}

export const DEFAULT_STOP_POLICY: StopPolicy = { targetFinalMs: 1000, maxRounds: 6, maxLiveMs: 10 * 60_000, notConvergingRatio: 0.8 };

export type StopDecision = { stop: false } | { stop: true; reason: 'converged' | 'not converging' | 'round limit' | 'time limit' };

/** After each live round: go on with another, or pause the VM and send the last one. */
export function decideNext(rounds: readonly RoundRecord[], linkBytesPerSec: number, policy: StopPolicy = DEFAULT_STOP_POLICY): StopDecision {
  const last = rounds[rounds.length - 1];
  if (!last) return { stop: false };
  if (last.bytes / Math.max(1, linkBytesPerSec) * 1000 <= policy.targetFinalMs && rounds.length >= 2) return { stop: true, reason: 'converged' };
  if (rounds.length >= policy.maxRounds) return { stop: true, reason: 'round limit' };
  if (rounds.reduce((s, r) => s + r.ms, 0) >= policy.maxLiveMs) return { stop: true, reason: 'time limit' };
  const prev = rounds[rounds.length - 2];
  if (prev && rounds.length >= 3 && last.bytes >= prev.bytes * policy.notConvergingRatio) return { stop: true, reason: 'not converging' };
  return { stop: false };
}

/** Link rate from what the last uploads achieved (bytes per second), or `fallback` before any. */
export function measuredLinkRate(rounds: readonly RoundRecord[], fallback: number): number {
  const useful = rounds.filter((r) => r.sendMs > 50 && r.bytes > 256 * 1024);
  const last = useful[useful.length - 1];
  return last ? (last.bytes / last.sendMs) * 1000 : fallback;
}
