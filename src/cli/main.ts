#!/usr/bin/env node
/**
 * `cloudlet`: the standalone command-line tool (docs/cli.md).
 *
 *   cloudlet [--store DIR] [--json] [--debug] base create|import|export|list|info|remove
 *   cloudlet ... overlay create|info|list
 *   cloudlet ... synthesize <overlay> [--base ID] [--out DIR] [--resume]
 *
 * Results go to stdout (text, or one JSON document with --json); progress and errors go to stderr.
 * Exit status: 0 ok, 1 a CloudletError (its message says what to do), 2 a usage error,
 * 70 an unexpected failure.
 */
import { Command, CommanderError } from 'commander';
import { isCloudletError } from '../core/errors';
import type { Backend } from './backend';
import { registerBaseCommands } from './commands/base';
import type { CommandEnv } from './commands/env';
import { commandOf } from './commands/env';
import { registerOverlayCommands } from './commands/overlay';
import { registerSynthesizeCommand } from './commands/synthesize';
import type { CliContext, CliIo, GlobalOptions } from './context';
import { makeContext } from './context';
import { LocalBackend } from './local-backend';
import type { Resumer } from './resume';
import { hypervisorResumer } from './resume-libvirt';

export const EXIT = { ok: 0, failed: 1, usage: 2, internal: 70 } as const;

export interface CliDeps {
  /** Pick the backend for a context (default: the core on the local store). */
  backend?: (ctx: CliContext) => Backend;
  resumer?: Resumer;
}

/** The backend for these options. An `--api URL` mode would return an HTTP implementation here. */
export function selectBackend(ctx: CliContext, deps: CliDeps): Backend {
  if (deps.backend) return deps.backend(ctx);
  return new LocalBackend(ctx.storeRoot, deps.resumer ?? hypervisorResumer);
}

export function buildProgram(io: CliIo, deps: CliDeps = {}): Command {
  const program = new Command('cloudlet')
    .description('Cloudlet VM synthesis: base VM packages, overlays, synthesis')
    .option('--store <dir>', 'the store directory (default: $CLOUDLET_STORE or var/store of the repository)')
    .option('--json', 'machine-readable output (results on stdout, progress as JSON lines on stderr)')
    .option('--debug', 'print stack traces of failures')
    .showHelpAfterError()
    .exitOverride()
    .configureOutput({
      writeOut: (s) => io.stdout.write(s),
      writeErr: (s) => io.stderr.write(s),
    });
  const env: CommandEnv = {
    run:
      (action) =>
      async (...args: unknown[]) => {
        const ctx = makeContext(commandOf(args).optsWithGlobals<GlobalOptions>(), io);
        await action(ctx, selectBackend(ctx, deps), ...args.slice(0, -1));
      },
  };
  registerBaseCommands(program, env);
  registerOverlayCommands(program, env);
  registerSynthesizeCommand(program, env);
  return program;
}

/** Run the CLI on `argv` (without node and script); resolves with the exit status. */
export async function runCli(argv: string[], io: CliIo = { stdout: process.stdout, stderr: process.stderr, env: process.env }, deps: CliDeps = {}): Promise<number> {
  const program = buildProgram(io, deps);
  const wantsJson = argv.includes('--json');
  const debug = argv.includes('--debug');
  try {
    await program.parseAsync(argv, { from: 'user' });
    return EXIT.ok;
  } catch (e) {
    if (e instanceof CommanderError) {
      // Help and version exit 0; usage errors were already printed by commander.
      return e.exitCode === 0 ? EXIT.ok : EXIT.usage;
    }
    if (isCloudletError(e)) {
      if (wantsJson) {
        io.stdout.write(JSON.stringify({ error: { code: e.code, message: e.message, fix: e.fix, retryable: e.retryable, details: e.details } }, null, 2) + '\n');
      }
      io.stderr.write(`cloudlet: ${e.code}: ${e.message}\n`);
      if (debug && e.stack) io.stderr.write(e.stack + '\n');
      return EXIT.failed;
    }
    const err = e instanceof Error ? e : new Error(String(e));
    if (wantsJson) io.stdout.write(JSON.stringify({ error: { code: 'INTERNAL', message: err.message } }, null, 2) + '\n');
    io.stderr.write(`cloudlet: unexpected failure: ${err.message}${debug ? '' : ' (run with --debug for the stack trace)'}\n`);
    if (debug && err.stack) io.stderr.write(err.stack + '\n');
    return EXIT.internal;
  }
}

if (require.main === module) {
  void runCli(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}
