/**
 * What every command gets: the global options (--store, --json, --debug), the progress display
 * and the output printer. Commands never write to stdout themselves; they return a result that
 * `output` prints as text or as one JSON document.
 */
import path from 'node:path';
import type { OnProgress, ProgressReporter } from '../core/progress';
import { createProgressReporter, progressMode } from '../core/progress';

/** The repository root (src/cli/ or dist/cli/ -> two levels up). */
export const REPO_ROOT = path.resolve(__dirname, '..', '..');

export interface GlobalOptions {
  store?: string;
  json?: boolean;
  debug?: boolean;
  /** `--api <url>`: talk to a cloudlet service instead of the local store. */
  api?: string;
  token?: string;
}

/** Where the cloudlet API is, when the CLI talks to a service (`--api` or $CLOUDLET_API_URL). */
export interface ApiTarget {
  url: string;
  token?: string;
}

export interface CliIo {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream & { isTTY?: boolean };
  env: NodeJS.ProcessEnv;
}

export interface CliContext {
  storeRoot: string;
  json: boolean;
  debug: boolean;
  /** Set in API mode: the commands then go through the cloudlet HTTP API. */
  api: ApiTarget | undefined;
  io: CliIo;
  /** A progress callback for one command; stages become successive bars (or JSON lines). */
  progress(): { onProgress: OnProgress; done(): void };
  /** Print a result: `text()` on a terminal or in pipes, `data` as JSON with --json. */
  print(data: unknown, text: () => string): void;
}

export function defaultStoreRoot(env: NodeJS.ProcessEnv): string {
  return env.CLOUDLET_STORE && env.CLOUDLET_STORE.length > 0 ? path.resolve(env.CLOUDLET_STORE) : path.join(REPO_ROOT, 'var', 'store');
}

/** `--api`/`--token`, else $CLOUDLET_API_URL/$CLOUDLET_API_TOKEN; undefined: standalone. */
export function apiTarget(opts: GlobalOptions, env: NodeJS.ProcessEnv): ApiTarget | undefined {
  const url = nonEmpty(opts.api) ?? nonEmpty(env.CLOUDLET_API_URL);
  if (url === undefined) return undefined;
  const token = nonEmpty(opts.token) ?? nonEmpty(env.CLOUDLET_API_TOKEN);
  return token === undefined ? { url } : { url, token };
}

function nonEmpty(s: string | undefined): string | undefined {
  return s !== undefined && s.trim().length > 0 ? s.trim() : undefined;
}

export function makeContext(opts: GlobalOptions, io: CliIo): CliContext {
  const json = opts.json === true;
  return {
    storeRoot: opts.store ? path.resolve(opts.store) : defaultStoreRoot(io.env),
    json,
    debug: opts.debug === true,
    api: apiTarget(opts, io.env),
    io,
    progress() {
      const reporter: ProgressReporter = createProgressReporter({ mode: progressMode({ json, stream: io.stderr }), stream: io.stderr });
      let current: ReturnType<ProgressReporter['stage']> | undefined;
      return {
        onProgress(done, total, stage = 'working') {
          if (current?.name !== stage) {
            current?.finish();
            current = reporter.stage(stage, total);
          }
          current.update(done, total);
        },
        done() {
          current?.finish();
          reporter.close();
        },
      };
    },
    print(data, text) {
      io.stdout.write(json ? JSON.stringify(data, null, 2) + '\n' : text().replace(/\n?$/, '\n'));
    },
  };
}

/** Run `fn` with a progress callback, closing the display whatever happens. */
export async function withProgress<T>(ctx: CliContext, fn: (onProgress: OnProgress) => Promise<T>): Promise<T> {
  const p = ctx.progress();
  try {
    return await fn(p.onProgress);
  } finally {
    p.done();
  }
}
