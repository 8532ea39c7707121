import {
  chooseNeighbour,
  DEFAULT_MOBILITY_POLICY,
  mergePolicy,
  POLICY_LIMITS,
  shouldCheck,
  smoothedRtt,
  type CandidateReport,
  type CheckVerdict,
  type MobilityPolicy,
  type RttSample,
  type TriggerState,
} from '../../src/workflows/mobility-policy';
import { prng } from './overlay-fixture';

const T0 = 1_700_000_000_000;
const policy = (patch: Partial<MobilityPolicy> = {}): MobilityPolicy => ({ ...DEFAULT_MOBILITY_POLICY, ...patch });
const sample = (rttMs: number, at: number): RttSample => ({ rttMs, at, source: 'device' });
/** Samples one second apart, the last at `end`. */
const series = (values: readonly number[], end = T0): RttSample[] => values.map((v, i) => sample(v, end - (values.length - 1 - i) * 1000));


/**
 * Feed `values` one per `stepMs` and evaluate the policy after each, as the controller does: every
 * fire is a decision, which starts a cooldown.
 */
function runTrace(values: readonly number[], p: MobilityPolicy, stepMs = 1000, start: TriggerState = { cooldownUntil: 0 }) {
  const samples: RttSample[] = [];
  let trigger: TriggerState = { ...start };
  const verdicts: Array<CheckVerdict & { at: number }> = [];
  values.forEach((v, i) => {
    const at = T0 + i * stepMs;
    samples.push(sample(v, at));
    const verdict = shouldCheck(samples, trigger, p, at);
    verdicts.push({ ...verdict, at });
    trigger = { crossedAt: verdict.crossedAt, cooldownUntil: verdict.fire ? at + p.cooldownMs : trigger.cooldownUntil };
  });
  return { verdicts, fires: verdicts.filter((v) => v.fire), trigger };
}

describe('smoothedRtt', () => {
  test('is the median, so one spike does not move it', () => {
    expect(smoothedRtt(series([20, 22, 500, 21, 23]), policy(), T0)).toBe(22);
    expect(smoothedRtt(series([30, 10, 20]), policy(), T0)).toBe(20);
  });

  test('an even number of samples gives the mean of the middle two', () => {
    expect(smoothedRtt(series([10, 40, 20, 30]), policy({ window: 4, minSamples: 2 }), T0)).toBe(25);
  });

  test('uses only the last `window` samples', () => {
    const s = series([100, 100, 100, 100, 10, 11, 12]);
    expect(smoothedRtt(s, policy({ window: 3, minSamples: 3 }), T0)).toBe(11);
    expect(smoothedRtt(s, policy({ window: 7, minSamples: 3 }), T0)).toBe(100);
  });

  test('samples older than sampleMaxAgeMs are left out (one exactly that old is kept)', () => {
    const p = policy({ sampleMaxAgeMs: 10_000, window: 5, minSamples: 3 });
    const s = [sample(900, T0 - 10_001), sample(900, T0 - 10_001), sample(20, T0 - 10_000), sample(30, T0 - 5_000), sample(40, T0)];
    expect(smoothedRtt(s, p, T0)).toBe(30);
    // One millisecond later the oldest kept sample is stale too: two fresh ones are too few.
    expect(smoothedRtt(s, p, T0 + 1)).toBeUndefined();
  });

  test('the window is taken from the fresh samples, not before the age filter', () => {
    const p = policy({ sampleMaxAgeMs: 5_000, window: 3, minSamples: 2 });
    // Four fresh samples and a stale one in between in the array: the last three fresh count.
    const s = [sample(10, T0 - 3000), sample(12, T0 - 2000), sample(999, T0 - 60_000), sample(14, T0 - 1000), sample(16, T0)];
    expect(smoothedRtt(s, p, T0)).toBe(14);
  });

  test('fewer fresh samples than minSamples give undefined', () => {
    expect(smoothedRtt([], policy({ minSamples: 1 }), T0)).toBeUndefined();
    expect(smoothedRtt(series([20, 30]), policy({ minSamples: 3 }), T0)).toBeUndefined();
    expect(smoothedRtt(series([20, 30, 40]), policy({ minSamples: 3 }), T0)).toBe(30);
    expect(smoothedRtt(series([25]), policy({ minSamples: 1, window: 1 }), T0)).toBe(25);
  });

  test('shouldCheck does not decide on too few samples and keeps an ongoing crossing', () => {
    const v = shouldCheck(series([90, 90]), { crossedAt: T0 - 5000, cooldownUntil: 0 }, policy({ minSamples: 3 }), T0);
    expect(v).toMatchObject({ fire: false, smoothedMs: undefined, crossedAt: T0 - 5000 });
    expect(v.why).toContain('too few fresh samples (need 3)');
  });
});

describe('shouldCheck', () => {
  test('a noisy trace with spikes that stays below the threshold never fires', () => {
    const rand = prng(0xc10d1e7);
    const p = policy({ thresholdMs: 40, hysteresisMs: 10, window: 5, minSamples: 3, cooldownMs: 30_000 });
    const values: number[] = [];
    let sinceSpike = 99;
    for (let i = 0; i < 500; i++) {
      // Wi-Fi: 15–37 ms most of the time, and isolated spikes of 60–400 ms (never two in three
      // samples, so no window of five ever holds more than two).
      if (sinceSpike >= 2 && rand() < 0.12) {
        values.push(60 + rand() * 340);
        sinceSpike = 0;
      } else {
        values.push(15 + rand() * 22);
        sinceSpike++;
      }
    }
    // The trace is not trivially calm: it has many spikes, and a window mean would have crossed.
    const spikes = values.filter((v) => v > p.thresholdMs).length;
    expect(spikes).toBeGreaterThan(30);
    const windowMeans = values.map((_, i) => values.slice(Math.max(0, i - 4), i + 1)).filter((w) => w.length === 5).map((w) => w.reduce((a, b) => a + b, 0) / 5);
    expect(windowMeans.some((m) => m > p.thresholdMs)).toBe(true);

    const { verdicts, fires } = runTrace(values, p);
    expect(fires).toHaveLength(0);
    expect(verdicts.every((v) => v.crossedAt === undefined)).toBe(true);
    // Every decision was made on enough samples, and every median stayed below the threshold.
    const decided = verdicts.slice(p.minSamples - 1);
    expect(decided.every((v) => v.smoothedMs !== undefined && v.smoothedMs <= p.thresholdMs)).toBe(true);
  });

  test('the same trace shifted above the threshold does fire (the trace check can fail)', () => {
    const p = policy({ thresholdMs: 40, cooldownMs: 30_000 });
    const { fires } = runTrace(Array.from({ length: 100 }, (_, i) => 45 + (i % 7)), p);
    // 100 s of a crossing with a 30 s cooldown: at the third sample, then every 30 s.
    expect(fires.map((f) => f.at - T0)).toEqual([2000, 32_000, 62_000, 92_000]);
  });

  test('noise at and just under the threshold before any crossing never starts one', () => {
    const rand = prng(42);
    const p = policy({ thresholdMs: 40, hysteresisMs: 10 });
    // 31–40 ms, the threshold itself included: "above" means strictly above.
    const values = Array.from({ length: 300 }, (_, i) => (i % 10 === 0 ? 40 : 31 + rand() * 9));
    const { verdicts, fires } = runTrace(values, p);
    expect(fires).toHaveLength(0);
    expect(verdicts.every((v) => v.crossedAt === undefined)).toBe(true);
    expect(shouldCheck(series([40, 40, 40]), { cooldownUntil: 0 }, p, T0).crossedAt).toBeUndefined();
  });

  test('after a crossing, values oscillating around the threshold keep it crossed until below threshold − hysteresis', () => {
    const p = policy({ thresholdMs: 40, hysteresisMs: 10, window: 3, minSamples: 3, cooldownMs: 1_000_000 });
    const calm = [25, 25, 25];
    const cross = [50, 50, 50];
    // Oscillating 32 ↔ 48 ms: medians between 32 and 48, above 30 (= 40 − 10) throughout.
    const oscillate = Array.from({ length: 40 }, (_, i) => (i % 2 === 0 ? 32 : 48));
    const down = [31, 30, 30, 29, 29, 29];
    const { verdicts } = runTrace([...calm, ...cross, ...oscillate, ...down], p);
    const crossStart = T0 + 4000; // the median passes 40 at the second 50 ms sample
    expect(verdicts.slice(0, 4).every((v) => v.crossedAt === undefined)).toBe(true);
    expect(verdicts[4]).toMatchObject({ fire: true, crossedAt: crossStart, smoothedMs: 50 });
    const during = verdicts.slice(5, 6 + oscillate.length);
    expect(during.some((v) => (v.smoothedMs ?? 0) < p.thresholdMs)).toBe(true); // some medians are under 40...
    expect(during.every((v) => v.crossedAt === crossStart)).toBe(true); // ...and the crossing holds
    // The cooldown of the first decision keeps them from firing again.
    expect(during.filter((v) => v.fire)).toHaveLength(0);
    // Median exactly 30 (threshold − hysteresis) still counts as crossed; 29 ends the crossing.
    const tail = verdicts.slice(-6);
    expect(tail.map((v) => v.smoothedMs)).toEqual([32, 31, 30, 30, 29, 29]);
    expect(tail.map((v) => v.crossedAt)).toEqual([crossStart, crossStart, crossStart, crossStart, undefined, undefined]);
    expect(tail[4]?.why).toContain('below the threshold');
  });

  test('a crossing that ended must pass the threshold itself again to restart', () => {
    const p = policy({ thresholdMs: 40, hysteresisMs: 10, window: 1, minSamples: 1, cooldownMs: 0 });
    const { verdicts } = runTrace([50, 20, 35, 39, 40, 41], p);
    expect(verdicts.map((v) => v.crossedAt !== undefined)).toEqual([true, false, false, false, false, true]);
    expect(verdicts.map((v) => v.fire)).toEqual([true, false, false, false, false, true]);
  });

  test('no fire while a cooldown runs; it fires again when the cooldown ends if still crossed', () => {
    const p = policy({ thresholdMs: 40, window: 1, minSamples: 1 });
    const s = [sample(80, T0)];
    const cooling = shouldCheck(s, { crossedAt: T0 - 1000, cooldownUntil: T0 + 12_500 }, p, T0);
    expect(cooling).toMatchObject({ fire: false, smoothedMs: 80, crossedAt: T0 - 1000 });
    expect(cooling.why).toBe('80 ms is above the threshold, cooling down for 13 s');
    // At the cooldown's end exactly, it fires.
    expect(shouldCheck(s, { crossedAt: T0 - 1000, cooldownUntil: T0 }, p, T0)).toMatchObject({ fire: true, crossedAt: T0 - 1000 });
    expect(shouldCheck(s, { cooldownUntil: T0 + 1 }, p, T0).fire).toBe(false);
    // A cooldown does not hide a crossing's start.
    expect(shouldCheck(s, { cooldownUntil: T0 + 60_000 }, p, T0).crossedAt).toBe(T0);
  });

  test('a sustained crossing fires once per cooldown', () => {
    const p = policy({ thresholdMs: 40, window: 3, minSamples: 3, cooldownMs: 10_000 });
    const { fires } = runTrace(Array.from({ length: 60 }, () => 70), p);
    expect(fires.map((f) => (f.at - T0) / 1000)).toEqual([2, 12, 22, 32, 42, 52]);
    expect(fires[0]?.why).toBe('70 ms is above the threshold 40 ms');
  });
});

describe('chooseNeighbour', () => {
  const cand = (neighbour: string, rttMs: number | undefined, extra: Partial<CandidateReport> = {}): CandidateReport => ({
    neighbour,
    apiUrl: `https://${neighbour}.example.org`,
    reachable: true,
    servingHosts: 2,
    ...(rttMs !== undefined ? { rttMs } : {}),
    ...extra,
  });

  test('a neighbour must beat the current RTT by minGainMs', () => {
    const p = policy({ minGainMs: 10, minGainRatio: 0, tieMs: 0 });
    const stay = chooseNeighbour(50, [cand('west', 41)], p);
    expect(stay).toMatchObject({ move: false, best: { neighbour: 'west' } });
    expect(stay.why).toBe('best neighbour west at 41 ms is not enough nearer than 50 ms (gain 9 ms < 10 ms)');
    const move = chooseNeighbour(50, [cand('west', 40)], p);
    expect(move).toMatchObject({ move: true, to: { neighbour: 'west' }, gainMs: 10 });
    expect(move.why).toBe('west at 40 ms beats 50 ms by 10 ms');
  });

  test('...and by minGainRatio of it, whichever is larger', () => {
    const p = policy({ minGainMs: 10, minGainRatio: 0.25, tieMs: 0 });
    const stay = chooseNeighbour(100, [cand('west', 80)], p);
    expect(stay.move).toBe(false);
    expect(stay.why).toContain('(gain 20 ms < 25 ms)');
    expect(chooseNeighbour(100, [cand('west', 75)], p)).toMatchObject({ move: true, gainMs: 25 });
    // At a small RTT the absolute minimum is the larger one.
    expect(chooseNeighbour(20, [cand('west', 14)], p).move).toBe(false);
    expect(chooseNeighbour(20, [cand('west', 10)], p).move).toBe(true);
  });

  test('a neighbour slower than the current RTT is never chosen', () => {
    const c = chooseNeighbour(30, [cand('west', 35)], policy({ minGainMs: 0, minGainRatio: 0 }));
    expect(c.move).toBe(false);
  });

  test('the lowest RTT wins among neighbours farther apart than tieMs', () => {
    const p = policy({ tieMs: 5, minGainMs: 0, minGainRatio: 0 });
    const c = chooseNeighbour(100, [cand('a', 30, { holdsBase: true }), cand('b', 20), cand('c', 50)], p);
    expect(c).toMatchObject({ move: true, to: { neighbour: 'b' }, gainMs: 80 });
    expect(c.why).toBe('b at 20 ms beats 100 ms by 80 ms');
  });

  test('within tieMs of the best, a neighbour holding the base is preferred', () => {
    const p = policy({ tieMs: 5, minGainMs: 0, minGainRatio: 0 });
    const c = chooseNeighbour(100, [cand('near', 20), cand('based', 24, { holdsBase: true }), cand('far', 26, { holdsBase: true })], p);
    expect(c).toMatchObject({ move: true, to: { neighbour: 'based' }, gainMs: 76 });
    expect(c.why).toBe('based at 24 ms beats 100 ms by 76 ms (within 5 ms of near; it holds the base)');
    // At the edge of the tie (exactly tieMs) it still counts as equally near.
    expect(chooseNeighbour(100, [cand('near', 20), cand('based', 25, { holdsBase: true })], p)).toMatchObject({ move: true, to: { neighbour: 'based' } });
  });

  test('within tieMs and both (or neither) holding the base, the nearer wins', () => {
    const p = policy({ tieMs: 5, minGainMs: 0, minGainRatio: 0 });
    const both = chooseNeighbour(100, [cand('x', 23, { holdsBase: true }), cand('y', 21, { holdsBase: true })], p);
    expect(both).toMatchObject({ move: true, to: { neighbour: 'y' } });
    const neither = chooseNeighbour(100, [cand('x', 23), cand('y', 21)], p);
    expect(neither).toMatchObject({ move: true, to: { neighbour: 'y' } });
    expect(neither.why).toContain('(within 5 ms of x; nearest)');
  });

  test('unreachable neighbours and ones without a serving host are skipped and named', () => {
    const p = policy({ minGainMs: 0, minGainRatio: 0, tieMs: 0 });
    const c = chooseNeighbour(
      80,
      [
        cand('down', 5, { reachable: false, error: 'connect ECONNREFUSED' }),
        cand('silent', undefined, { reachable: false }),
        cand('empty', 6, { servingHosts: 0 }),
        cand('ok', 30),
      ],
      p,
    );
    expect(c).toMatchObject({ move: true, to: { neighbour: 'ok' } });
    expect(c.why).toBe('ok at 30 ms beats 80 ms by 50 ms; skipped down (connect ECONNREFUSED), silent (unreachable), empty (no serving host)');
  });

  test('a reachable neighbour that could not measure the device is skipped with its error', () => {
    const c = chooseNeighbour(80, [cand('blind', undefined, { error: 'device does not answer' })], policy());
    expect(c).toEqual({ move: false, why: 'no neighbour can take it; skipped blind (device does not answer)' });
  });

  test('no candidates, or none usable: stay, and say why', () => {
    expect(chooseNeighbour(80, [], policy())).toEqual({ move: false, why: 'no neighbour can take it' });
    const none = chooseNeighbour(80, [cand('down', 5, { reachable: false }), cand('empty', 5, { servingHosts: 0 })], policy());
    expect(none).toEqual({ move: false, why: 'no neighbour can take it; skipped down (unreachable), empty (no serving host)' });
  });

  test('a neighbour whose hosts have less memory available than the VM needs is skipped and named', () => {
    const need = 2 * 2 ** 30;
    const c = chooseNeighbour(80, [cand('small', 10, { memAvailableBytes: 2 ** 30 }), cand('big', 30, { memAvailableBytes: 8 * 2 ** 30 }), cand('unknown', 40)], policy({ minGainMs: 10, minGainRatio: 0 }), need);
    expect(c).toMatchObject({ move: true, to: { neighbour: 'big' } });
    expect(c.why).toMatch(/skipped small \(1\.00 GiB available, the VM needs 2\.00 GiB\)$/);
    // Without knowing the VM's size, memory is not weighed.
    expect(chooseNeighbour(80, [cand('small', 10, { memAvailableBytes: 2 ** 30 })], policy({ minGainMs: 10, minGainRatio: 0 }))).toMatchObject({ move: true, to: { neighbour: 'small' } });
  });

  test('the skipped list is kept when the best is not good enough', () => {
    const c = chooseNeighbour(50, [cand('down', 1, { reachable: false }), cand('west', 45)], policy({ minGainMs: 10, minGainRatio: 0 }));
    expect(c.move).toBe(false);
    expect(c.why).toMatch(/^best neighbour west at 45 ms .*; skipped down \(unreachable\)$/);
  });
});

describe('mergePolicy', () => {
  test('applies a patch inside the limits and leaves the base alone', () => {
    const base = { ...DEFAULT_MOBILITY_POLICY };
    const r = mergePolicy(base, { thresholdMs: 80, window: 9, minSamples: 9 });
    expect(r).toEqual({ policy: { ...DEFAULT_MOBILITY_POLICY, thresholdMs: 80, window: 9, minSamples: 9 } });
    expect(base).toEqual(DEFAULT_MOBILITY_POLICY);
    expect(mergePolicy(DEFAULT_MOBILITY_POLICY, {})).toEqual({ policy: DEFAULT_MOBILITY_POLICY });
  });

  test('the defaults respect the limits', () => {
    for (const [k, [lo, hi]] of Object.entries(POLICY_LIMITS) as [keyof MobilityPolicy, readonly [number, number]][]) {
      expect([k, DEFAULT_MOBILITY_POLICY[k] >= lo && DEFAULT_MOBILITY_POLICY[k] <= hi]).toEqual([k, true]);
    }
  });

  test('every field is refused just outside its limits, and NaN or Infinity anywhere', () => {
    // A base where every bound itself passes the cross-field rules.
    const roomy: MobilityPolicy = { ...DEFAULT_MOBILITY_POLICY, thresholdMs: 5000, hysteresisMs: 0, window: 100, minSamples: 1 };
    for (const [k, [lo, hi]] of Object.entries(POLICY_LIMITS) as [keyof MobilityPolicy, readonly [number, number]][]) {
      const below = lo === 0 ? -0.001 : lo - (lo < 1 ? 0.001 : 1);
      const above = hi < 1 ? hi + 0.001 : hi + 1;
      for (const bad of [below, above, NaN, Infinity]) {
        const r = mergePolicy(roomy, { [k]: bad });
        expect([k, bad, 'error' in r ? r.error : 'accepted']).toEqual([k, bad, `policy.${k} must be between ${lo} and ${hi} (got ${bad})`]);
      }
    }
  });

  test('the bounds themselves are accepted', () => {
    const roomy: MobilityPolicy = { ...DEFAULT_MOBILITY_POLICY, thresholdMs: 5000, hysteresisMs: 0, window: 100, minSamples: 1 };
    for (const [k, [lo, hi]] of Object.entries(POLICY_LIMITS) as [keyof MobilityPolicy, readonly [number, number]][]) {
      for (const v of [lo, hi]) {
        // The two pairs tied by a cross-field rule get a partner that allows the bound.
        const partner: Partial<MobilityPolicy> = k === 'hysteresisMs' ? { thresholdMs: 10_000 } : k === 'thresholdMs' ? { hysteresisMs: 0 } : k === 'window' ? { minSamples: 1 } : k === 'minSamples' ? { window: 100 } : {};
        const patch = k === 'hysteresisMs' && v === hi ? { hysteresisMs: hi - 1, ...partner } : { [k]: v, ...partner };
        const r = mergePolicy(roomy, patch);
        expect([k, v, 'error' in r ? r.error : 'ok']).toEqual([k, v, 'ok']);
      }
    }
  });

  test('minSamples may not exceed window', () => {
    expect(mergePolicy(DEFAULT_MOBILITY_POLICY, { window: 4, minSamples: 5 })).toEqual({ error: 'policy.minSamples (5) cannot exceed policy.window (4)' });
    // A patch of one field is checked against the other as it stands.
    expect(mergePolicy(DEFAULT_MOBILITY_POLICY, { minSamples: 6 })).toEqual({ error: 'policy.minSamples (6) cannot exceed policy.window (5)' });
    expect(mergePolicy(DEFAULT_MOBILITY_POLICY, { window: 4, minSamples: 4 })).toHaveProperty('policy');
  });

  test('hysteresisMs must stay below thresholdMs', () => {
    expect(mergePolicy(DEFAULT_MOBILITY_POLICY, { hysteresisMs: 40 })).toEqual({ error: 'policy.hysteresisMs (40) must be below policy.thresholdMs (40)' });
    expect(mergePolicy(DEFAULT_MOBILITY_POLICY, { thresholdMs: 8 })).toEqual({ error: 'policy.hysteresisMs (10) must be below policy.thresholdMs (8)' });
    expect(mergePolicy(DEFAULT_MOBILITY_POLICY, { hysteresisMs: 39 })).toHaveProperty('policy.hysteresisMs', 39);
  });

  test('window and minSamples must be whole numbers (a fractional one silently stops every decision)', () => {
    // With window 2.5 the median takes 2 samples, and 2 < minSamples 2.5: smoothedRtt is never defined.
    const broken: MobilityPolicy = { ...DEFAULT_MOBILITY_POLICY, window: 2.5, minSamples: 2.5 };
    expect(smoothedRtt(series([90, 90, 90, 90, 90, 90]), broken, T0)).toBeUndefined();
    const r = mergePolicy(DEFAULT_MOBILITY_POLICY, { window: 2.5, minSamples: 2.5 });
    expect(r).toHaveProperty('error');
    expect(mergePolicy(DEFAULT_MOBILITY_POLICY, { window: 4.5 })).toHaveProperty('error');
  });
});
