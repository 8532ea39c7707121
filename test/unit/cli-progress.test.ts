import { createProgressReporter, estimate, formatBytes, formatDuration, progressMode } from '../../src/core/progress';
import { Capture } from '../helpers/capture';

test('mode: json when asked, bar on a terminal, silent in a pipe', () => {
  expect(progressMode({ json: true, stream: { isTTY: true } })).toBe('json');
  expect(progressMode({ stream: { isTTY: true } })).toBe('tty');
  expect(progressMode({ stream: {} })).toBe('silent');
});

test('formatting of bytes and durations', () => {
  expect(formatBytes(512)).toBe('512 B');
  expect(formatBytes(1536)).toBe('1.5 KiB');
  expect(formatBytes(3 * 1024 ** 3)).toBe('3.0 GiB');
  expect(formatDuration(undefined)).toBe('--');
  expect(formatDuration(42.4)).toBe('42s');
  expect(formatDuration(75)).toBe('1m15s');
  expect(formatDuration(3 * 3600 + 120)).toBe('3h02m');
});

test('rate and ETA', () => {
  expect(estimate(50, 100, 1000)).toEqual({ rate: 50, etaSeconds: 1 });
  expect(estimate(0, 100, 0)).toEqual({ rate: 0, etaSeconds: undefined });
});

test('json mode: throttled lines with rate and ETA, and a final line per stage', () => {
  let now = 0;
  const out = new Capture();
  const r = createProgressReporter({ mode: 'json', stream: out, now: () => now, jsonIntervalMs: 500 });
  const s = r.stage('fetch', 1000);
  now = 100;
  s.update(100); // first update is emitted
  now = 200;
  s.update(200); // throttled
  now = 1000;
  s.update(500);
  s.finish();
  s.update(900); // ignored after finish
  r.close();
  const lines = out.text.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
  expect(lines).toEqual([
    { type: 'progress', stage: 'fetch', done: 100, total: 1000, rate: 1000, etaSeconds: 0.9, finished: false },
    { type: 'progress', stage: 'fetch', done: 500, total: 1000, rate: 500, etaSeconds: 1, finished: false },
    { type: 'progress', stage: 'fetch', done: 1000, total: 1000, rate: 1000, etaSeconds: 0, finished: true },
  ]);
});

test('silent mode writes nothing but still tracks progress', () => {
  const out = new Capture();
  const r = createProgressReporter({ mode: 'silent', stream: out });
  const s = r.stage('x', 10);
  s.onProgress(5, 10);
  expect(s.snapshot()).toMatchObject({ stage: 'x', done: 5, total: 10 });
  s.finish();
  r.close();
  expect(out.text).toBe('');
});
