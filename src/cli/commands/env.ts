/**
 * What command modules receive: wrappers that turn an action into a run with context and backend.
 * A command is standalone (`run`: the core on the local store), API-only (`api`: through the
 * cloudlet HTTP API, needs --api), or both (`either`: the mode is chosen by --api).
 */
import type { Command } from 'commander';
import { InvalidArgumentError } from 'commander';
import type { Backend } from '../backend';
import type { CliContext } from '../context';
import type { Remote, WaitFlags } from '../remote';

// Commander passes the declared arguments, then the options object, then the command.
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type Action = (ctx: CliContext, backend: Backend, ...args: any[]) => Promise<void>;
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type ApiAction = (ctx: CliContext, remote: Remote, ...args: any[]) => Promise<void>;

export interface CommandEnv {
  /** A standalone command: refused with --api (it works on this machine's files). */
  run(action: Action): (...args: unknown[]) => Promise<void>;
  /** A command of the service: refused without --api. */
  api(action: ApiAction): (...args: unknown[]) => Promise<void>;
  /** A command of both modes: `local` standalone, `remote` with --api. */
  either(local: Action, remote: ApiAction): (...args: unknown[]) => Promise<void>;
}

/** The Command object commander passes last to every action. */
export function commandOf(args: unknown[]): Command {
  return args[args.length - 1] as Command;
}

/** "base import", "instance list": the command's name under `cloudlet`. */
export function commandPath(cmd: Command): string {
  const names: string[] = [];
  for (let c: Command | null = cmd; c?.parent; c = c.parent) names.unshift(c.name());
  return names.join(' ');
}

/** `--no-wait` and `--wait-timeout` of the commands that start an operation. */
export function addWaitOptions(cmd: Command): Command {
  return cmd
    .option('--no-wait', 'return as soon as the operation started (print its id)')
    .option('--wait-timeout <seconds>', 'stop waiting after this long (the operation goes on)', positiveNumber)
    .option('--idempotency-key <key>', 'make a retried command start the operation only once');
}

export interface WaitOptionValues {
  wait: boolean;
  waitTimeout?: number;
  idempotencyKey?: string;
}

/** The name of an operation option given to a standalone command (they mean nothing there), if any. */
export function operationOptionGiven(opts: Partial<WaitOptionValues>): string | undefined {
  if (opts.wait === false) return '--no-wait';
  if (opts.waitTimeout !== undefined) return '--wait-timeout';
  if (opts.idempotencyKey !== undefined) return '--idempotency-key';
  return undefined;
}

export function waitFlags(opts: WaitOptionValues): WaitFlags {
  return opts.waitTimeout !== undefined ? { wait: opts.wait, waitTimeout: opts.waitTimeout } : { wait: opts.wait };
}

function positiveNumber(v: string): number {
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) throw new InvalidArgumentError('expected a positive number of seconds');
  return n;
}

export function intOption(min: number, max: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < min || n > max) throw new InvalidArgumentError(`expected an integer from ${min} to ${max}`);
    return n;
  };
}

/** "4M", "512k", "1048576" -> bytes. */
export function sizeOption(v: string): number {
  const m = /^(\d+)([kKmMgG]?)(i?[bB])?$/.exec(v.trim());
  if (!m) throw new InvalidArgumentError('expected a size such as 4M, 512k or 1048576');
  const mult = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3 }[(m[2] ?? '').toLowerCase()] ?? 1;
  const n = Number(m[1]) * mult;
  if (n < 4096) throw new InvalidArgumentError('at least 4k');
  return n;
}
