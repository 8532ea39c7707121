import { chooseCompression } from '../../src/core/handoff/policy';
import { decideNext, measuredLinkRate, type RoundRecord } from '../../src/workflows/handoff-policy';
import { issueTicket, verifyTicket } from '../../src/core/handoff/ticket';
import { isCloudletError } from '../../src/core/errors';

const r = (round: number, bytes: number, ms = 1000, sendMs = 500): RoundRecord => ({ round, bytes, rawBytes: bytes * 2, ms, sendMs });
const MB = 1024 * 1024;

describe('decideNext', () => {
  test('goes on while rounds shrink and the next one would take long', () => {
    expect(decideNext([r(1, 100 * MB)], 3 * MB)).toEqual({ stop: false });
    expect(decideNext([r(1, 100 * MB), r(2, 20 * MB)], 3 * MB)).toEqual({ stop: false });
  });
  test('stops when converged, not converging, or at the limits', () => {
    expect(decideNext([r(1, 100 * MB), r(2, 2 * MB)], 3 * MB)).toEqual({ stop: true, reason: 'converged' });
    expect(decideNext([r(1, 100 * MB), r(2, 20 * MB), r(3, 19 * MB)], 3 * MB)).toEqual({ stop: true, reason: 'not converging' });
    const many = [1, 2, 3, 4, 5, 6].map((i) => r(i, (100 - i * 10) * MB));
    expect(decideNext(many, 3 * MB)).toEqual({ stop: true, reason: 'round limit' });
    expect(decideNext([r(1, 100 * MB, 11 * 60_000)], 3 * MB)).toEqual({ stop: true, reason: 'time limit' });
  });
});

describe('chooseCompression', () => {
  const samples = [
    { compression: { codec: 'none' as const }, ratio: 1, bytesPerSec: Infinity },
    { compression: { codec: 'xz' as const, level: 1 }, ratio: 0.4, bytesPerSec: 20 * MB },
    { compression: { codec: 'xz' as const, level: 6 }, ratio: 0.3, bytesPerSec: 3 * MB },
  ];
  test('a slow link buys strong compression, a fast one none', () => {
    expect(chooseCompression(samples, 0.3 * MB, 2).choice).toEqual({ codec: 'xz', level: 6 });
    expect(chooseCompression(samples, 3 * MB, 2).choice).toEqual({ codec: 'xz', level: 1 });
    expect(chooseCompression(samples, 1000 * MB, 2).choice).toEqual({ codec: 'none' });
  });
  test('a busy CPU and an edge link pick the fast codec: compress and send add up', () => {
    // xz 1 at 5 MB/s per core (TCG guests take the cores), zstd 3 at 90 MB/s for a fifth more bytes.
    const measured = [
      { compression: { codec: 'none' as const }, ratio: 1, bytesPerSec: Infinity },
      { compression: { codec: 'zstd' as const, level: 3 }, ratio: 0.31, bytesPerSec: 90 * MB },
      { compression: { codec: 'xz' as const, level: 1 }, ratio: 0.26, bytesPerSec: 5 * MB },
    ];
    expect(chooseCompression(measured, 3.1 * MB, 2).choice).toEqual({ codec: 'zstd', level: 3 });
    // Over a link 50 times slower the smaller output wins.
    expect(chooseCompression(measured, 0.06 * MB, 2).choice).toEqual({ codec: 'xz', level: 1 });
  });
  test('link rate comes from the last upload that was long enough to measure', () => {
    expect(measuredLinkRate([], 42)).toBe(42);
    expect(measuredLinkRate([r(1, 4 * MB, 1000, 1000), r(2, 1000, 1000, 10)], 42)).toBe(4 * MB);
  });
});

describe('tickets', () => {
  const secret = Buffer.alloc(32, 7);
  const claims = { hid: 'h-1', host: 'west-1', inst: 'vm-1', exp: Date.now() + 60_000 };
  test('a ticket verifies under its secret and carries its claims', () => {
    expect(verifyTicket(secret, issueTicket(secret, claims))).toMatchObject(claims);
  });
  test.each([
    ['another secret', (t: string) => verifyTicket(Buffer.alloc(32, 8), t)],
    ['an altered claim', (t: string) => verifyTicket(secret, `${Buffer.from(JSON.stringify({ ...claims, host: 'x' })).toString('base64url')}.${t.split('.')[1]}`)],
    ['garbage', () => verifyTicket(secret, 'nonsense')],
    ['expiry', (t: string) => verifyTicket(secret, t, claims.exp + 1)],
  ])('refuses %s with UNAUTHORIZED', (_name, check) => {
    const t = issueTicket(secret, claims);
    let err: unknown;
    try {
      check(t);
    } catch (e) {
      err = e;
    }
    expect(isCloudletError(err) && err.code).toBe('UNAUTHORIZED');
  });
});
