/**
 * Progress of long steps (hashing, packing, synthesis): bytes done, rate and ETA.
 *
 * Core functions only take a plain `OnProgress(done, total)` callback; a front end turns it into a
 * display with a `ProgressReporter`:
 *   - 'tty'    a cli-progress bar on a terminal (stderr), with bytes, rate and ETA;
 *   - 'json'   one JSON line per update on the stream (throttled), for machines;
 *   - 'silent' nothing (pipes, tests).
 * `progressMode()` picks the mode from the output options and whether stderr is a terminal.
 */
import cliProgress from 'cli-progress';

/**
 * Called by long operations with bytes done and bytes in total of the current step; operations of
 * several steps name the step in `stage` (a new stage restarts `done` at 0).
 */
export type OnProgress = (done: number, total: number, stage?: string) => void;

export type ProgressMode = 'tty' | 'json' | 'silent';

export interface ProgressSnapshot {
  stage: string;
  done: number;
  total: number;
  /** Bytes per second since the stage started. */
  rate: number;
  /** Seconds left at the current rate, undefined until it can be estimated. */
  etaSeconds: number | undefined;
}

export interface ProgressStage {
  readonly name: string;
  /** Report absolute progress. */
  update(done: number, total?: number): void;
  /** The stage's callback, to hand to core functions. */
  readonly onProgress: OnProgress;
  /** Mark the stage complete (idempotent). */
  finish(): void;
  snapshot(): ProgressSnapshot;
}

export interface ProgressReporter {
  readonly mode: ProgressMode;
  stage(name: string, total?: number): ProgressStage;
  /** Stop every display (idempotent). */
  close(): void;
}

export interface ProgressOptions {
  mode: ProgressMode;
  /** Where the bar or the JSON lines go; stderr by default, so stdout keeps the command's result. */
  stream?: NodeJS.WritableStream;
  /** Minimum milliseconds between two JSON lines of a stage (default 500). */
  jsonIntervalMs?: number;
  /** Clock, for tests. */
  now?: () => number;
}

/** 'json' when asked for, 'tty' on a terminal, 'silent' in pipes. */
export function progressMode(opts: { json?: boolean; stream?: { isTTY?: boolean } }): ProgressMode {
  if (opts.json) return 'json';
  return (opts.stream ?? process.stderr).isTTY ? 'tty' : 'silent';
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

/** 1536 -> "1.5 KiB". */
export function formatBytes(n: number): string {
  let v = n;
  let u = 0;
  while (Math.abs(v) >= 1024 && u < UNITS.length - 1) {
    v /= 1024;
    u += 1;
  }
  return u === 0 ? `${v} B` : `${v.toFixed(1)} ${UNITS[u]}`;
}

/** 75 -> "1m15s". */
export function formatDuration(seconds: number | undefined): string {
  if (seconds === undefined || !Number.isFinite(seconds)) return '--';
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(m / 60)}h${String(m % 60).padStart(2, '0')}m`;
}

/** Rate and ETA of `done` out of `total` bytes after `elapsedMs`. */
export function estimate(done: number, total: number, elapsedMs: number): { rate: number; etaSeconds: number | undefined } {
  const rate = elapsedMs > 0 ? (done * 1000) / elapsedMs : 0;
  const etaSeconds = rate > 0 && total >= done ? (total - done) / rate : undefined;
  return { rate, etaSeconds };
}

export function createProgressReporter(options: ProgressOptions): ProgressReporter {
  const stream = options.stream ?? process.stderr;
  const now = options.now ?? Date.now;
  const interval = options.jsonIntervalMs ?? 500;
  const bars: cliProgress.SingleBar[] = [];
  let closed = false;

  const stage = (name: string, initialTotal = 0): ProgressStage => {
    const started = now();
    let done = 0;
    let total = initialTotal;
    let finished = false;
    let lastJson = -Infinity;
    let bar: cliProgress.SingleBar | undefined;

    const snapshot = (): ProgressSnapshot => ({ stage: name, done, total, ...estimate(done, total, now() - started) });
    const emitJson = (force: boolean): void => {
      const t = now();
      if (!force && t - lastJson < interval) return;
      lastJson = t;
      const s = snapshot();
      stream.write(
        JSON.stringify({ type: 'progress', ...s, rate: Math.round(s.rate), etaSeconds: s.etaSeconds === undefined ? null : Math.round(s.etaSeconds * 10) / 10, finished }) + '\n',
      );
    };
    if (options.mode === 'tty' && !closed) {
      bar = new cliProgress.SingleBar(
        {
          stream: stream as NodeJS.WritableStream & { isTTY?: boolean },
          format: `${name.padEnd(18)} [{bar}] {percentage}% | {doneBytes} / {totalBytes} | {rateBytes}/s | ETA {etaText}`,
          hideCursor: true,
          clearOnComplete: false,
          fps: 8,
        },
        cliProgress.Presets.shades_classic,
      );
      bar.start(Math.max(total, 1), 0, payload(snapshot()));
      bars.push(bar);
    }

    const update = (d: number, t?: number): void => {
      if (finished) return;
      done = d;
      if (t !== undefined) total = t;
      if (bar) {
        bar.setTotal(Math.max(total, 1));
        bar.update(Math.min(done, Math.max(total, 1)), payload(snapshot()));
      } else if (options.mode === 'json') {
        emitJson(false);
      }
    };
    return {
      name,
      update,
      onProgress: (d, t) => update(d, t),
      finish() {
        if (finished) return;
        if (total < done) total = done;
        done = total;
        if (bar) {
          bar.setTotal(Math.max(total, 1));
          bar.update(Math.max(total, 1), payload(snapshot()));
          bar.stop();
        }
        finished = true;
        if (options.mode === 'json') emitJson(true);
      },
      snapshot,
    };
  };

  return {
    mode: options.mode,
    stage,
    close() {
      if (closed) return;
      closed = true;
      for (const b of bars) b.stop();
    },
  };
}

function payload(s: ProgressSnapshot): Record<string, string> {
  return {
    doneBytes: formatBytes(s.done),
    totalBytes: formatBytes(s.total),
    rateBytes: formatBytes(Math.round(s.rate)),
    etaText: formatDuration(s.etaSeconds),
  };
}
