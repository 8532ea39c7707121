/** What command modules receive: a wrapper that turns an action into a run with context + backend. */
import type { Command } from 'commander';
import type { Backend } from '../backend';
import type { CliContext } from '../context';

// Commander passes the declared arguments, then the options object, then the command.
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type Action = (ctx: CliContext, backend: Backend, ...args: any[]) => Promise<void>;

export interface CommandEnv {
  /** Wrap an action: build the context from the global options, pick the backend, run. */
  run(action: Action): (...args: unknown[]) => Promise<void>;
}

/** The Command object commander passes last to every action. */
export function commandOf(args: unknown[]): Command {
  return args[args.length - 1] as Command;
}
