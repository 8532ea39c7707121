/**
 * Mobility from the command line (docs/mobility.md):
 *
 *   cloudlet neighbour add|list|remove|refresh      the neighbour registry of the cluster behind --api
 *   cloudlet probe serve [--listen host:port]       the device's RTT responder (runs until Ctrl-C)
 *   cloudlet probe report <instance> [--device ..]  measure the RTT to the API and report it (repeatable)
 *   cloudlet probe device <host:port>               the cluster measures its own RTT to a device
 *   cloudlet mobility show|watch|policy|pause|resume|move|stop <instance>
 *   cloudlet discover --app <overlay> --device <host:port>
 */
import { InvalidArgumentError, type Command } from 'commander';
import { CloudletError } from '../../core/errors';
import { formatDeviceAddress, parseDeviceAddress, startRttResponder } from '../../core/mobility/rtt';
import { POLICY_LIMITS, type MobilityPolicy } from '../../workflows/mobility-policy';
import type { Discovery, MobilityState, NeighbourView } from '../../service/mobility-types';
import type { CommandEnv } from './env';
import { intOption } from './env';

const ms = (x: number | undefined): string => (x === undefined ? '–' : `${Math.round(x * 10) / 10} ms`);

export function neighboursText(list: NeighbourView[]): string {
  if (list.length === 0) return 'no neighbours (add one with `cloudlet neighbour add <name> <apiUrl>`)';
  return list.map((n) => `${n.name.padEnd(16)} ${n.status.padEnd(11)} ${ms(n.rtt?.ms).padStart(9)}  ${n.apiUrl}${n.lastError ? `  (${n.lastError.message.slice(0, 80)})` : ''}`).join('\n');
}

export function mobilityText(s: MobilityState): string {
  const last = s.decisions[s.decisions.length - 1];
  return [
    `instance ${s.instanceId} on ${s.hostId}: ${s.phase}${s.paused ? ' (paused)' : ''}`,
    `device ${s.device ?? '(no address)'}; RTT ${ms(s.smoothedMs)} (median of the last ${Math.min(s.samples.length, s.policy.window)}), threshold ${ms(s.policy.thresholdMs)}`,
    s.lastCheck ? `last check: ${s.lastCheck.why}` : '',
    `decisions: ${s.decisionCount}${last ? `; last #${last.seq} (${last.trigger}): ${last.outcome}${last.to ? ` to ${last.to}` : ''}: ${last.why}` : ''}`,
    s.movedTo ? `moved to ${s.movedTo.neighbour} (${s.movedTo.apiUrl}), host ${s.movedTo.hostId}${s.movedTo.appEndpoint ? `, app at ${s.movedTo.appEndpoint}` : ''}` : '',
  ].filter(Boolean).join('\n');
}

function discoveryText(d: Discovery): string {
  const rows = d.clusters.map((c, i) => `${String(i + 1).padStart(2)}. ${c.cluster.padEnd(16)} ${ms(c.rttMs).padStart(9)}  ${c.holdsBase ? 'holds the base' : 'needs the base'}  ${c.servingHosts} serving  ${c.provisionUrl}${c.self ? '  (this cluster)' : ''}`);
  const skipped = d.skipped.map((s) => `    skipped ${s.cluster}: ${s.error.slice(0, 100)}`);
  return [`clusters for overlay ${d.app.slice(0, 12)}… to device ${d.device}, nearest first:`, ...rows, ...skipped].join('\n');
}

function deviceOption(v: string): string {
  try {
    return formatDeviceAddress(parseDeviceAddress(v));
  } catch (e) {
    throw new InvalidArgumentError((e as Error).message);
  }
}

function policyOption(v: string, prev: Partial<MobilityPolicy> = {}): Partial<MobilityPolicy> {
  const m = /^(\w+)=(-?[0-9.]+)$/.exec(v);
  const key = m?.[1] as keyof MobilityPolicy | undefined;
  if (!m || !key || !(key in POLICY_LIMITS)) throw new InvalidArgumentError(`expected field=number with field one of ${Object.keys(POLICY_LIMITS).join(', ')}`);
  return { ...prev, [key]: Number(m[2]) };
}

export function registerMobilityCommands(program: Command, env: CommandEnv): void {
  const neighbour = program.command('neighbour').description('the neighbour clusters of the cluster behind --api (its mobility registry)');
  neighbour
    .command('add')
    .description('add a neighbour cluster; its token comes from $CLOUDLET_NEIGHBOUR_TOKEN (kept out of the process list)')
    .argument('<name>', 'a DNS label, e.g. west')
    .argument('<apiUrl>', "the neighbour's API URL")
    .action(
      env.api(async (ctx, remote, name: string, apiUrl: string) => {
        const token = ctx.io.env.CLOUDLET_NEIGHBOUR_TOKEN;
        if (!token) throw new CloudletError('BAD_INPUT', 'no token for the neighbour', { fix: 'export CLOUDLET_NEIGHBOUR_TOKEN=<a bearer token its API accepts>' });
        const n = await remote.client.mobility.addNeighbour({ name, apiUrl, token });
        ctx.print(n, () => `added neighbour ${n.name} at ${n.apiUrl}`);
      }),
    );
  neighbour
    .command('list')
    .description('list the neighbours: status (fresh, stale, unreachable, unmeasured) and RTT')
    .action(
      env.api(async (ctx, remote) => {
        const list = await remote.client.mobility.listNeighbours();
        ctx.print(list, () => neighboursText(list));
      }),
    );
  neighbour
    .command('remove')
    .argument('<name>')
    .description('remove a neighbour')
    .action(
      env.api(async (ctx, remote, name: string) => {
        await remote.client.mobility.removeNeighbour(name);
        ctx.print({ removed: name }, () => `removed neighbour ${name}`);
      }),
    );
  neighbour
    .command('refresh')
    .description('measure every neighbour now')
    .action(
      env.api(async (ctx, remote) => {
        const list = await remote.client.mobility.refreshNeighbours();
        ctx.print(list, () => neighboursText(list));
      }),
    );

  const probe = program.command('probe').description('RTT between a device and cloudlets (the device side, and the cluster\'s own probe)');
  probe
    .command('serve')
    .description("run the device's RTT responder (answers PING <n> with PONG <n>) until interrupted")
    .option('--listen <host:port>', 'where to listen', deviceOption, '0.0.0.0:7070')
    .action(
      env.either(
        async (ctx, _backend, opts: { listen: string }) => serve(ctx, opts.listen),
        async (ctx, _remote, opts: { listen: string }) => serve(ctx, opts.listen),
      ),
    );
  probe
    .command('report')
    .description('measure the RTT to the cloudlet behind --api and report it for an instance (starts its mobility controller)')
    .argument('<instanceId>')
    .option('--device <host:port>', "where this device's RTT responder listens (so neighbours can measure theirs)", deviceOption)
    .option('--samples <n>', 'pings per report', intOption(1, 100), 3)
    .option('--count <n>', 'reports to send', intOption(1, 1_000_000), 1)
    .option('--every <ms>', 'between reports', intOption(100, 3_600_000), 2000)
    .action(
      env.api(async (ctx, remote, id: string, opts: { device?: string; samples: number; count: number; every: number }) => {
        let state: MobilityState | undefined;
        for (let i = 0; i < opts.count; i++) {
          if (i > 0) await new Promise((r) => setTimeout(r, opts.every));
          const samples = await remote.client.mobility.measureRtt(opts.samples);
          state = await remote.client.mobility.reportRtt(id, samples, opts.device);
          if (!ctx.json) ctx.io.stderr.write(`${new Date().toISOString()} rtt ${samples.map((x) => ms(x)).join(' ')} -> smoothed ${ms(state.smoothedMs)}, ${state.phase}, ${state.decisionCount} decisions\n`);
        }
        if (state) ctx.print(state, () => mobilityText(state as MobilityState));
      }),
    );
  probe
    .command('device')
    .description("have the cluster behind --api measure its own RTT to a device's responder")
    .argument('<device>', 'host:port', deviceOption)
    .action(
      env.api(async (ctx, remote, device: string) => {
        const a = await remote.client.mobility.probeDevice(device);
        ctx.print(a, () => `${a.cluster} -> ${a.device}: ${ms(a.rttMs)} median (min ${ms(a.minMs)}; ${a.samples.map((x) => ms(x)).join(', ')})`);
      }),
    );

  const mobility = program.command('mobility').description('the mobility controller of an instance (follows its user by RTT)');
  mobility
    .command('show')
    .argument('<instanceId>')
    .description('RTT, threshold, policy and the last decision with its reason')
    .action(
      env.api(async (ctx, remote, id: string) => {
        const s = await remote.client.mobility.mobilityState(id);
        if (!s) throw new CloudletError('NOT_FOUND', `instance ${id} has no mobility controller`, { fix: `start one: cloudlet mobility watch ${id} --device <host:port>` });
        ctx.print(s, () => mobilityText(s));
      }),
    );
  mobility
    .command('watch')
    .argument('<instanceId>')
    .description('start the controller (or change its device and policy)')
    .option('--device <host:port>', "the device's RTT responder", deviceOption)
    .option('--set <field=value>', 'a policy field, e.g. thresholdMs=50 (repeatable)', policyOption)
    .action(
      env.api(async (ctx, remote, id: string, opts: { device?: string; set?: Partial<MobilityPolicy> }) => {
        const s = await remote.client.mobility.watchInstance(id, { ...(opts.device ? { device: opts.device } : {}), ...(opts.set ? { policy: opts.set } : {}) });
        ctx.print(s, () => mobilityText(s));
      }),
    );
  mobility
    .command('policy')
    .argument('<instanceId>')
    .description('change policy fields')
    .requiredOption('--set <field=value>', 'a policy field, e.g. cooldownMs=30000 (repeatable)', policyOption)
    .action(
      env.api(async (ctx, remote, id: string, opts: { set: Partial<MobilityPolicy> }) => {
        const p = await remote.client.mobility.setMobilityPolicy(id, opts.set);
        ctx.print(p, () => Object.entries(p).map(([k, v]) => `${k.padEnd(18)} ${v}`).join('\n'));
      }),
    );
  for (const [name, paused] of [['pause', true], ['resume', false]] as const) {
    mobility
      .command(name)
      .argument('<instanceId>')
      .description(paused ? 'stop moving the instance automatically (samples are still kept)' : 'move it automatically again')
      .action(
        env.api(async (ctx, remote, id: string) => {
          const s = await remote.client.mobility.pauseMobility(id, paused);
          ctx.print(s, () => mobilityText(s));
        }),
      );
  }
  mobility
    .command('move')
    .argument('<instanceId>')
    .description('move now: to --to, or to the nearest neighbour that can take it')
    .option('--to <neighbour>', 'a neighbour name')
    .action(
      env.api(async (ctx, remote, id: string, opts: { to?: string }) => {
        const d = await remote.client.mobility.moveInstance(id, opts.to);
        ctx.print(d, () => `decision #${d.seq}: ${d.outcome}${d.to ? ` to ${d.to}` : ''}: ${d.why}${d.handoff ? `\nhandoff: ${d.handoff.workflowId} (cloudlet operation wait ${d.handoff.workflowId})` : ''}`);
      }),
    );
  mobility
    .command('stop')
    .argument('<instanceId>')
    .description('stop the controller (the instance keeps running)')
    .action(
      env.api(async (ctx, remote, id: string) => {
        await remote.client.mobility.unwatchInstance(id);
        ctx.print({ stopped: id }, () => `stopped watching ${id}`);
      }),
    );

  program
    .command('discover')
    .description('the clusters that can serve an application to a device, nearest first')
    .requiredOption('--app <id>', 'an overlay id, a recipe id (its last verified overlay) or a base id')
    .requiredOption('--device <host:port>', "the device's RTT responder", deviceOption)
    .action(
      env.api(async (ctx, remote, opts: { app: string; device: string }) => {
        const d = await remote.client.mobility.discover(opts.app, opts.device);
        ctx.print(d, () => discoveryText(d));
      }),
    );
}

async function serve(ctx: { io: { stderr: NodeJS.WritableStream } }, listen: string): Promise<void> {
  const a = parseDeviceAddress(listen);
  const r = await startRttResponder({ host: a.host, port: a.port });
  ctx.io.stderr.write(`RTT responder listening on ${formatDeviceAddress(r.address)} (Ctrl-C stops it)\n`);
  await new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
  await r.close();
}
