/** `cloudlet --api URL hosts list` and `instance resume|list|info|terminate`: the service's hosts and VMs. */
import type { Command } from 'commander';
import { CloudletError } from '../../core/errors';
import type { OperationStatus } from '../../service/types';
import type { Remote, Rendered } from '../remote';
import { hostsText, instanceListText, instanceText, timingsText } from '../remote-format';
import type { CommandEnv, WaitOptionValues } from './env';
import { addWaitOptions, waitFlags } from './env';
import { intOption } from './env';

export function registerHostCommands(program: Command, env: CommandEnv): void {
  const hosts = program.command('hosts').description('the hosts of the cloudlet behind --api, and whether their workers serve');
  hosts
    .command('list')
    .description('list the hosts (each runs one worker on its own task queue)')
    .action(
      env.api(async (ctx, remote) => {
        const list = await remote.client.listHosts();
        ctx.print(list, () => hostsText(list));
      }),
    );
}

export function registerInstanceCommands(program: Command, env: CommandEnv): void {
  const instance = program.command('instance').description('VM instances of the cloudlet behind --api: resumed from a base or synthesized from an overlay');

  addWaitOptions(
    instance
      .command('resume')
      .description('resume a base VM on a host (resumeBaseVm), to customize it and then make an overlay of it')
      .requiredOption('--base <baseId>', 'the base (id or unique prefix); it must be imported on the host')
      .requiredOption('--host <hostId>', 'the host to run it on')
      .option('--app-port <port>', "guest port to forward to 127.0.0.1 (the application's port)", intOption(1, 65535)),
  ).action(
    env.api(async (ctx, remote, opts: WaitOptionValues & { base: string; host: string; appPort?: number }) => {
      const baseId = await remote.resolveBaseId(opts.base);
      const req = opts.appPort === undefined ? { hostId: opts.host, baseId } : { hostId: opts.host, baseId, appPort: opts.appPort };
      await remote.operation(ctx, () => remote.client.resumeBase(req, opts.idempotencyKey), waitFlags(opts), (s) => instanceOutcome(remote, s, 'resumed'));
    }),
  );

  instance
    .command('list')
    .description('list the instances')
    .action(
      env.api(async (ctx, remote) => {
        const list = await remote.client.listInstances();
        ctx.print(list, () => instanceListText(list));
      }),
    );

  instance
    .command('info')
    .description('show an instance: host, state, base, overlay, application endpoint, synthesis timings')
    .argument('<instanceId>', 'instance id')
    .action(
      env.api(async (ctx, remote, id: string) => {
        const inst = await requireInstance(remote, id);
        ctx.print(inst, () => instanceText(inst));
      }),
    );

  addWaitOptions(
    instance
      .command('handoff')
      .description('hand a running instance off to another cloudlet cluster, live (handoffVm); prints each round')
      .argument('<instanceId>', 'instance id')
      .requiredOption('--to <apiUrl>', "the destination cluster's API, e.g. http://west:8080")
      .option('--to-token <token>', "a token the destination's API accepts (default: $CLOUDLET_DESTINATION_TOKEN)")
      .option('--to-host <hostId>', 'a host of the destination (default: its choice among the hosts with the base)')
      .option('--link-mbit <rate>', 'expected link rate for the first round (later rounds measure it)', intOption(1, 100_000))
      .option('--max-rounds <n>', 'live rounds at most before the cut-over (default 6)', intOption(1, 100))
      .option('--verify <mode>', "'digests' (default) or 'full': also compare guest memory and disk hashes before the destination resumes the VM", 'digests'),
  ).action(
    env.api(async (ctx, remote, id: string, opts: WaitOptionValues & { to: string; toToken?: string; toHost?: string; linkMbit?: number; maxRounds?: number; verify: string }) => {
      const token = opts.toToken ?? ctx.io.env.CLOUDLET_DESTINATION_TOKEN;
      if (!token) throw new CloudletError('BAD_INPUT', 'no credentials for the destination cluster', { fix: 'pass --to-token or set CLOUDLET_DESTINATION_TOKEN to a token of its CLOUDLET_API_TOKENS' });
      if (opts.verify !== 'digests' && opts.verify !== 'full') throw new CloudletError('BAD_INPUT', `--verify ${opts.verify} is not a mode`, { fix: "use 'digests' or 'full'" });
      const req = {
        destination: { apiUrl: opts.to, credentials: { token } },
        verify: opts.verify,
        ...(opts.toHost ? { hostId: opts.toHost } : {}),
        ...(opts.linkMbit ? { linkMbit: opts.linkMbit } : {}),
        ...(opts.maxRounds ? { policy: { maxRounds: opts.maxRounds } } : {}),
      } as const;
      await remote.operation(ctx, () => remote.client.handoffInstance(id, req), waitFlags(opts), async (s) => handoffOutcome(s));
    }),
  );

  addWaitOptions(
    instance
      .command('terminate')
      .description('destroy an instance and remove its files (terminateVm)')
      .argument('<instanceId>', 'instance id'),
  ).action(
    env.api(async (ctx, remote, id: string, opts: WaitOptionValues) => {
      await remote.operation(ctx, () => remote.client.terminateInstance(id, opts.idempotencyKey), waitFlags(opts), async (s) => ({
        text: `terminated instance ${id} on ${s.hostId}`,
      }));
    }),
  );
}

export async function requireInstance(remote: Remote, id: string) {
  const inst = await remote.client.getInstance(id);
  if (!inst) throw new CloudletError('NOT_FOUND', `instance ${id} does not exist`, { fix: 'list them with `cloudlet --api URL instance list`' });
  return inst;
}

/** A string field of an operation's result. */
export function resultField(result: unknown, key: string): string | undefined {
  const v = result !== null && typeof result === 'object' ? (result as Record<string, unknown>)[key] : undefined;
  return typeof v === 'string' ? v : undefined;
}

/** After resumeBaseVm / synthesizeVm: the instance it made, with the timings of its stages. */
export async function instanceOutcome(remote: Remote, status: OperationStatus, verb: string): Promise<Rendered> {
  const id = resultField(status.result, 'instanceId');
  const inst = id !== undefined ? await remote.client.getInstance(id) : undefined;
  if (!inst) return { text: `${verb} instance ${id ?? '?'} on ${status.hostId}` };
  const lines = [`${verb} instance ${inst.id} on ${inst.hostId}`, instanceText(inst)];
  const timings = (status.result as { timings?: Record<string, number> }).timings;
  if (!inst.timings && timings && Object.keys(timings).length > 0) lines.push('timings', timingsText(timings));
  return { data: { instance: inst }, text: lines.join('\n') };
}

/** After handoffVm: where the VM runs now, and what the handoff cost. */
function handoffOutcome(status: OperationStatus): Rendered {
  const r = status.result as { instanceId: string; rounds: number; bytes: number; pausedMs: number; totalMs: number; stopReason?: string; destination: { hostId: string; appEndpoint?: string }; verified?: { memorySha256: string } };
  const lines = [
    `handed off instance ${r.instanceId}: it runs on ${r.destination.hostId} of the destination${r.destination.appEndpoint ? ` (application ${r.destination.appEndpoint})` : ''}`,
    `  ${r.rounds} rounds (${r.stopReason ?? 'stopped'}), ${(r.bytes / 1e6).toFixed(2)} MB sent, ${(r.totalMs / 1000).toFixed(1)} s in all, paused ${(r.pausedMs / 1000).toFixed(2)} s at the cut-over`,
    ...(r.verified ? [`  verified: guest memory and disk equal the paused source's (memory sha256 ${r.verified.memorySha256.slice(0, 16)}…)`] : []),
  ];
  return { data: r, text: lines.join('\n') };
}
