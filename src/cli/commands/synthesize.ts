/**
 * `cloudlet synthesize <overlay>`: standalone, rebuild a launch VM from an overlay on this
 * machine's store (and optionally resume it); with --api, provision an instance on a host of the
 * service from the overlay's URL (synthesizeVm), following its stages to the first response.
 */
import path from 'node:path';
import type { Command } from 'commander';
import { CloudletError } from '../../core/errors';
import type { ProvisionRequest } from '../../service/types';
import { withProgress } from '../context';
import type { Remote } from '../remote';
import { secondsText } from '../format';
import { needsApi } from './base';
import type { CommandEnv, WaitOptionValues } from './env';
import { addWaitOptions, operationOptionGiven, waitFlags } from './env';
import { instanceOutcome } from './instance';
import { intOption } from './env';

interface SynthesizeOptions extends WaitOptionValues {
  base?: string;
  out?: string;
  concurrency?: number;
  resume?: boolean;
  forward?: number;
  host?: string;
  waitForApp?: number;
}

export function registerSynthesizeCommand(program: Command, env: CommandEnv): void {
  addWaitOptions(
    program
      .command('synthesize')
      .description(
        "rebuild a launch VM's disk (qcow2 over the base disk) and memory snapshot from an overlay, and optionally resume it; " +
          'with --api, provision an instance on a host of the service from the overlay (synthesizeVm)',
      )
      .argument('<overlay>', 'overlay file path, http(s) URL, or digest of a stored overlay (with --api: its URL, or the id of an overlay of the service)')
      .option('--base <baseId>', 'standalone: the base to apply it to (default: the one the overlay names)')
      .option('--out <dir>', 'standalone: directory for disk.qcow2 and memory.sav (default: ./synthesized)')
      .option('--concurrency <n>', 'standalone: parallel segment decoders (default: the cores)', intOption(1, 256))
      .option('--resume', 'standalone: resume the result under libvirt (needs libvirtd)')
      .option('--forward <guestPort>', 'standalone, with --resume: forward a 127.0.0.1 port to this guest port', intOption(1, 65535))
      .option('--host <hostId>', 'with --api: the host to provision on')
      .option('--wait-for-app <guestPort>', "with --api: succeed only once the guest's application answers on this port", intOption(1, 65535)),
  ).action(
    env.either(
      async (ctx, backend, overlay: string, opts: SynthesizeOptions) => {
        const apiOnly = opts.host !== undefined ? '--host' : opts.waitForApp !== undefined ? '--wait-for-app' : operationOptionGiven(opts);
        if (apiOnly !== undefined) throw needsApi(`synthesize ${apiOnly}`);
        const req: Parameters<typeof backend.synthesize>[0] = { overlay, outDir: path.resolve(opts.out ?? 'synthesized') };
        if (opts.base !== undefined) req.baseId = opts.base;
        if (opts.concurrency !== undefined) req.concurrency = opts.concurrency;
        if (opts.resume) req.resume = opts.forward !== undefined ? { forwardGuestPort: opts.forward } : {};
        const r = await withProgress(ctx, (p) => backend.synthesize(req, p));
        ctx.print(r, () => {
          const lines = [`synthesized from base ${r.baseId} in ${secondsText(r.seconds)}`, `  disk    ${r.diskPath}`, `  memory  ${r.savePath}`];
          const t = Object.entries(r.timings).map(([k, v]) => `${k}=${v.toFixed(0)}ms`);
          if (t.length) lines.push(`  timings ${t.join(' ')}`);
          if (r.resumed) {
            lines.push(`resumed domain ${r.resumed.domain} in ${secondsText(r.resumed.seconds)} (restore ${r.resumed.restoreMs} ms); serial console ${r.resumed.serialPath}`);
            if (r.resumed.forward) lines.push(`  guest port ${r.resumed.forward.guestPort} at http://${r.resumed.forward.hostAddress}:${r.resumed.forward.hostPort}/`);
          }
          return lines.join('\n');
        });
      },
      async (ctx, remote, overlay: string, opts: SynthesizeOptions) => {
        const local = (['base', 'out', 'concurrency', 'resume', 'forward'] as const).filter((k) => opts[k] !== undefined);
        if (local.length > 0) {
          throw new CloudletError('BAD_INPUT', `--${local.join(', --')} of \`cloudlet synthesize\` work on this machine's store, not through the cloudlet API`, {
            fix: 'through the API pass --host <hostId> [--wait-for-app <port>]; for a local synthesis, run without --api',
          });
        }
        if (opts.host === undefined) {
          throw new CloudletError('BAD_INPUT', '`cloudlet synthesize` through the API needs the host to provision on', { fix: 'add --host <hostId> (see `cloudlet --api URL hosts list`)' });
        }
        // An overlay of this cloudlet may be named by id; the service synthesizes from a URL.
        const overlayUrl = /^https?:\/\//i.test(overlay) ? overlay : await overlayUrlOf(remote, overlay);
        const req: ProvisionRequest = { hostId: opts.host, overlayUrl };
        if (opts.waitForApp !== undefined) req.waitForAppPort = opts.waitForApp;
        await remote.operation(ctx, () => remote.client.provisionInstance(req, opts.idempotencyKey), waitFlags(opts), (s) => instanceOutcome(remote, s, 'provisioned'));
      },
    ),
  );
}

/** `cloudlet --api URL deploy <overlay> --hosts a,b --count N`: the same application on many hosts (deployOverlay). */
export function registerDeployCommand(program: Command, env: CommandEnv): void {
  addWaitOptions(
    program
      .command('deploy')
      .description('synthesize the same overlay on many hosts at once; each host fetches it once (docs/deployments.md)')
      .argument('<overlay>', 'the overlay URL, or its id (or a unique prefix) in this cloudlet')
      .requiredOption('--hosts <ids>', 'comma-separated hosts to spread the VMs over')
      .requiredOption('--count <n>', 'how many VMs in all', intOption(1, 200))
      .option('--wait-for-app <port>', 'report each VM once the guest answers on this port', intOption(1, 65535)),
  ).action(
    env.api(async (ctx, remote, overlay: string, opts: WaitOptionValues & { hosts: string; count: number; waitForApp?: number }) => {
      const overlayUrl = /^https?:\/\//i.test(overlay) ? overlay : await overlayUrlOf(remote, overlay);
      const hosts = opts.hosts.split(',').map((h) => h.trim()).filter(Boolean);
      await remote.operation(ctx, () => remote.client.deploy({ overlayUrl, hosts, count: opts.count, ...(opts.waitForApp !== undefined ? { waitForAppPort: opts.waitForApp } : {}) }, opts.idempotencyKey), waitFlags(opts), async (st) => {
        const r = st.result as { answering: number; requested: number; allAnsweringMs?: number; hosts: Array<{ hostId: string; fetchedBytes?: number; error?: string; vms: Array<{ instanceId: string; hostPort?: number; error?: string }> }> };
        const lines = [`${r.answering} of ${r.requested} VMs answer${r.allAnsweringMs !== undefined ? ` (all within ${(r.allAnsweringMs / 1000).toFixed(1)} s)` : ''}`];
        for (const h of r.hosts) {
          lines.push(`  ${h.hostId}: ${h.error ? `failed: ${h.error}` : `overlay fetched once (${((h.fetchedBytes ?? 0) / 1e6).toFixed(2)} MB)`}`);
          for (const v of h.vms) lines.push(`    ${v.instanceId}  ${v.hostPort !== undefined ? `127.0.0.1:${v.hostPort}` : `failed: ${v.error ?? ''}`}`);
        }
        return { text: lines.join('\n') };
      });
    }),
  );
}

async function overlayUrlOf(remote: Remote, ref: string): Promise<string> {
  const id = await remote.resolveOverlayId(ref);
  const info = await remote.client.getOverlay(id);
  if (!info) {
    throw new CloudletError('NOT_FOUND', `${ref} is neither an http(s) URL nor an overlay of this cloudlet`, { fix: 'pass the overlay URL, or an id from `cloudlet --api URL overlay list`' });
  }
  return info.url;
}
