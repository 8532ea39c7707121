#!/usr/bin/env node
/**
 * `cloudlet`: the standalone command-line tool (docs/cli.md).
 *
 *   cloudlet [--store DIR] [--json] [--debug] base create|import|export|list|info|remove
 *   cloudlet ... overlay create|info|list
 *   cloudlet ... synthesize <overlay> [--base ID] [--out DIR] [--resume]
 *
 * With `--api URL` (or $CLOUDLET_API_URL) and `--token T` ($CLOUDLET_API_TOKEN) the commands go
 * through a running cloudlet service instead (src/cli/remote.ts): hosts, base import/list/info/
 * export, instance resume/list/info/terminate, overlay create/list/info/download, synthesize
 * (provision), operation status/wait, schedule create/list/info/trigger/pause/unpause/delete.
 *
 * Results go to stdout (text, or one JSON document with --json); progress and errors go to stderr.
 * Exit status: 0 ok, 1 a CloudletError (its message says what to do), 2 a usage error,
 * 70 an unexpected failure.
 */
import { Command, CommanderError } from 'commander';
import { CloudletApiError } from '../api/client';
import { CloudletError, isCloudletError } from '../core/errors';
import type { Backend } from './backend';
import { registerBaseCommands } from './commands/base';
import type { CommandEnv } from './commands/env';
import { commandOf, commandPath } from './commands/env';
import { registerOperationCommands } from './commands/operation';
import { registerOverlayCommands } from './commands/overlay';
import { registerHostCommands, registerInstanceCommands } from './commands/instance';
import { registerScheduleCommands } from './commands/schedule';
import { registerMobilityCommands } from './commands/mobility';
import { registerDeployCommand, registerSynthesizeCommand } from './commands/synthesize';
import type { ApiTarget, CliContext, CliIo, GlobalOptions } from './context';
import { makeContext } from './context';
import { LocalBackend } from './local-backend';
import { Remote, type PollOptions } from './remote';
import type { Resumer } from './resume';
import { hypervisorResumer } from './resume-libvirt';

export const EXIT = { ok: 0, failed: 1, usage: 2, internal: 70 } as const;

export interface CliDeps {
  /** Pick the backend for a context (default: the core on the local store). */
  backend?: (ctx: CliContext) => Backend;
  resumer?: Resumer;
  /** How often `--api` commands poll a running operation (tests shorten it). */
  poll?: PollOptions;
}

/** The standalone backend for these options: the core on the local store. */
export function selectBackend(ctx: CliContext, deps: CliDeps): Backend {
  if (deps.backend) return deps.backend(ctx);
  return new LocalBackend(ctx.storeRoot, deps.resumer ?? hypervisorResumer);
}

/** The API session of `--api` mode. */
export function selectRemote(target: ApiTarget, deps: CliDeps): Remote {
  return new Remote(target, deps.poll ?? {});
}

const API_HINT = 'pass --api <url> and --token <token> (or set CLOUDLET_API_URL and CLOUDLET_API_TOKEN), e.g. --api http://127.0.0.1:8080';

export function buildProgram(io: CliIo, deps: CliDeps = {}): Command {
  const program = new Command('cloudlet')
    .description('Cloudlet VM synthesis: base VM packages, overlays, synthesis; standalone on files, or through a cloudlet service with --api')
    .option('--store <dir>', 'the store directory (default: $CLOUDLET_STORE or var/store of the repository)')
    .option('--json', 'machine-readable output (results on stdout, progress as JSON lines on stderr)')
    .option('--debug', 'print stack traces of failures')
    .option('--api <url>', 'talk to a running cloudlet service at this URL (default: $CLOUDLET_API_URL; unset: standalone)')
    .option('--token <token>', 'bearer token for --api (default: $CLOUDLET_API_TOKEN)')
    .showHelpAfterError()
    .exitOverride()
    .configureOutput({
      writeOut: (s) => io.stdout.write(s),
      writeErr: (s) => io.stderr.write(s),
    });
  const contextOf = (args: unknown[]): { ctx: CliContext; name: string } => {
    const cmd = commandOf(args);
    return { ctx: makeContext(cmd.optsWithGlobals<GlobalOptions>(), io), name: commandPath(cmd) };
  };
  const env: CommandEnv = {
    run:
      (action) =>
      async (...args: unknown[]) => {
        const { ctx, name } = contextOf(args);
        if (ctx.api) {
          throw new CloudletError('BAD_INPUT', `\`cloudlet ${name}\` works on this machine's files and is not offered through the cloudlet API (${ctx.api.url})`, {
            fix: 'run it without --api (and with CLOUDLET_API_URL unset) on the host that holds the store',
          });
        }
        await action(ctx, selectBackend(ctx, deps), ...args.slice(0, -1));
      },
    api:
      (action) =>
      async (...args: unknown[]) => {
        const { ctx, name } = contextOf(args);
        if (!ctx.api) throw new CloudletError('BAD_INPUT', `\`cloudlet ${name}\` talks to a running cloudlet service, and no API was given`, { fix: API_HINT });
        await action(ctx, selectRemote(ctx.api, deps), ...args.slice(0, -1));
      },
    either:
      (local, remote) =>
      async (...args: unknown[]) => {
        const { ctx } = contextOf(args);
        if (ctx.api) await remote(ctx, selectRemote(ctx.api, deps), ...args.slice(0, -1));
        else await local(ctx, selectBackend(ctx, deps), ...args.slice(0, -1));
      },
  };
  registerHostCommands(program, env);
  registerBaseCommands(program, env);
  registerInstanceCommands(program, env);
  registerOverlayCommands(program, env);
  registerSynthesizeCommand(program, env);
  registerOperationCommands(program, env);
  registerScheduleCommands(program, env);
  registerMobilityCommands(program, env);
  registerDeployCommand(program, env);
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
      const issues = e instanceof CloudletApiError ? e.issues : [];
      if (wantsJson) {
        const error = { code: e.code, message: e.message, fix: e.fix, retryable: e.retryable, details: e.details, ...(issues.length > 0 ? { issues } : {}) };
        io.stdout.write(JSON.stringify({ error }, null, 2) + '\n');
      }
      io.stderr.write(`cloudlet: ${e.code}: ${e.message}\n`);
      // The API's validation issues (400): which field of the request is wrong, and why (unless the message lists them).
      for (const i of issues.filter((x) => !e.message.includes(x.message))) io.stderr.write(`  ${i.path.length > 0 ? i.path.join('.') : '(body)'}: ${i.message}\n`);
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
