/**
 * `cloudlet overlay create|info|list|download`. Standalone, `create` works on a launch VM's files;
 * with --api it snapshots an instance of the service (createOverlay), and `download` fetches a
 * published overlay.
 */
import { createHash } from 'node:crypto';
import { createReadStream, promises as fsp } from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { CloudletError } from '../../core/errors';
import { formatBytes } from '../../core/progress';
import { withProgress } from '../context';
import { secondsText, table } from '../format';
import type { Remote } from '../remote';
import { remoteOverlayListText, remoteOverlayText } from '../remote-format';
import { needsApi } from './base';
import type { CommandEnv, WaitOptionValues } from './env';
import { addWaitOptions, intOption, operationOptionGiven, sizeOption, waitFlags } from './env';
import { resultField } from './instance';

const CREATE_NEEDS =
  "`cloudlet overlay create` needs either the launch VM's files (--base, --disk and --memory: standalone, on this machine's store) " +
  'or an instance of a cloudlet service (--instance <id> with --api <url>)';


export function registerOverlayCommands(program: Command, env: CommandEnv): void {
  const overlay = program.command('overlay').description('VM overlays: the compressed difference between a launch VM and its base');

  addWaitOptions(
    overlay
      .command('create')
      .description('make an overlay from a launch VM: its files (qcow2 over the base disk + libvirt save file), or with --api an instance of the service')
      .option('--base <baseId>', 'standalone: the base the launch VM was resumed from')
      .option('--disk <qcow2>', "standalone: the launch VM's disk (a qcow2 whose backing file is the base disk)")
      .option('--memory <save file>', "standalone: the launch VM's libvirt save file")
      .option('-o, --out <file>', 'standalone: write the overlay here (default: into the store, named by its sha256)')
      .option('--lzma-level <0-9>', 'standalone: LZMA preset', intOption(0, 9))
      .option('--no-delta', 'standalone: skip the xdelta3 stage (often smaller and faster)')
      .option('--segment-size <bytes>', 'standalone: input bytes per segment, e.g. 4M', sizeOption)
      .option('--instance <instanceId>', 'with --api: the running instance to make the overlay of')
      .option('--keep', 'with --api: keep the instance running afterwards (default: destroy it)'),
  ).action(
    env.either(
      async (ctx, backend, opts: WaitOptionValues & { base?: string; disk?: string; memory?: string; out?: string; lzmaLevel?: number; delta: boolean; segmentSize?: number; instance?: string; keep?: boolean }) => {
        const apiOnly = opts.instance !== undefined ? '--instance' : opts.keep ? '--keep' : operationOptionGiven(opts);
        if (apiOnly !== undefined) throw needsApi(`overlay create ${apiOnly}`);
        if (opts.base === undefined || opts.disk === undefined || opts.memory === undefined) {
          throw new CloudletError('BAD_INPUT', CREATE_NEEDS, { fix: 'add --base, --disk and --memory, or --api <url> and --instance <id>' });
        }
        const req: Parameters<typeof backend.createOverlay>[0] = { baseId: opts.base, launchDiskPath: opts.disk, launchSavePath: opts.memory, delta: opts.delta };
        if (opts.out !== undefined) req.outPath = opts.out;
        if (opts.lzmaLevel !== undefined) req.lzmaLevel = opts.lzmaLevel;
        if (opts.segmentSize !== undefined) req.segmentSize = opts.segmentSize;
        const r = await withProgress(ctx, (p) => backend.createOverlay(req, p));
        ctx.print(r, () => `created overlay ${r.path}\n  sha256  ${r.sha256}\n  size    ${formatBytes(r.size)}\n  base    ${r.baseId}\n  took    ${secondsText(r.seconds)}`);
      },
      async (ctx, remote, opts: WaitOptionValues & { base?: string; disk?: string; memory?: string; out?: string; instance?: string; keep?: boolean }) => {
        const files = (['base', 'disk', 'memory', 'out'] as const).filter((k) => opts[k] !== undefined);
        if (opts.instance === undefined || files.length > 0) {
          const why = files.length > 0 ? ` (--${files.join(', --')} are for standalone use, on this machine's files)` : '';
          throw new CloudletError('BAD_INPUT', `${CREATE_NEEDS}${why}`, { fix: 'through the API pass only --instance <id> [--keep]; for files, run without --api' });
        }
        const req = opts.keep ? { instanceId: opts.instance, keepInstance: true } : { instanceId: opts.instance };
        await remote.operation(ctx, () => remote.client.createOverlay(req, opts.idempotencyKey), waitFlags(opts), async (s) => {
          const id = resultField(s.result, 'overlayId');
          const info = id !== undefined ? await remote.client.getOverlay(id) : undefined;
          const kept = opts.keep ? `instance ${opts.instance} kept running` : `instance ${opts.instance} destroyed`;
          const head = `created overlay ${id ?? '?'} on ${s.hostId} (${kept})`;
          return { data: info ? { overlay: info } : {}, text: info ? `${head}\n${remoteOverlayText(info)}` : head };
        });
      },
    ),
  );

  overlay
    .command('info')
    .description("show an overlay's meta (file path, http(s) URL, or digest of a stored overlay); with --api the service's record of it")
    .argument('<overlay>', 'path, URL or digest (with --api: id, unique prefix or URL)')
    .action(
      env.either(
        async (ctx, backend, arg: string) => {
          const meta = await backend.overlayInfo(arg);
          ctx.print(meta, () => overlayMetaText(meta));
        },
        async (ctx, remote, arg: string) => {
          const info = await requireOverlay(remote, arg);
          ctx.print(info, () => remoteOverlayText(info));
        },
      ),
    );

  overlay
    .command('list')
    .description('list the overlays in the store (with --api: published by the service, with their URLs)')
    .action(
      env.either(
        async (ctx, backend) => {
          const list = await backend.listOverlays();
          ctx.print(
            list.map(({ meta: _meta, ...r }) => r),
            () => (list.length === 0 ? 'no overlays in the store' : table(['SHA256', 'SIZE', 'BASE', 'ADDED'], list.map((o) => [o.digest, formatBytes(o.size), o.baseId ?? '-', o.addedAt]))),
          );
        },
        async (ctx, remote) => {
          const list = await remote.client.listOverlays();
          ctx.print(list, () => remoteOverlayListText(list));
        },
      ),
    );

  overlay
    .command('download')
    .description('download an overlay published by the service (--api) into a file')
    .argument('<overlay>', 'overlay id, unique prefix or URL')
    .argument('<file>', 'file to write')
    .action(
      env.api(async (ctx, remote, arg: string, file: string) => {
        const info = await requireOverlay(remote, arg);
        const out = path.resolve(file);
        const { bytes } = await remote.client.downloadOverlay(info.id, out);
        // An overlay's id is the sha256 of its bytes: check what arrived.
        const digest = await sha256File(out);
        if (digest !== info.id) {
          await fsp.rm(out, { force: true });
          throw new CloudletError('DIGEST_MISMATCH', `the download of overlay ${info.id} has sha256 ${digest} (removed ${out})`, { fix: 'download it again; if it persists, the published file is damaged' });
        }
        ctx.print({ overlayId: info.id, path: out, bytes }, () => `downloaded overlay ${info.id} to ${out} (${formatBytes(bytes)})`);
      }),
    );
}

async function requireOverlay(remote: Remote, ref: string) {
  const id = await remote.resolveOverlayId(ref);
  const info = await remote.client.getOverlay(id);
  if (!info) throw new CloudletError('NOT_FOUND', `overlay ${id} does not exist in this cloudlet`, { fix: 'list them with `cloudlet --api URL overlay list`' });
  return info;
}

interface MetaView {
  base?: { id?: string };
  createdAt?: string;
  launch?: { cpuModel?: string; disk?: { virtualSize?: number; changedChunks?: number }; memory?: { imageSize?: number; changedChunks?: number; saveFileSize?: number; mode?: string } };
  options?: Record<string, unknown>;
  segments?: Array<{ length: number; rawLength: number }>;
  stats?: Record<string, number>;
}

function overlayMetaText(raw: unknown): string {
  const m = raw as MetaView;
  const segs = m.segments ?? [];
  const packed = segs.reduce((s, x) => s + x.length, 0);
  const unpacked = segs.reduce((s, x) => s + x.rawLength, 0);
  const lines = [
    `base       ${m.base?.id ?? '?'}`,
    `created    ${m.createdAt ?? '?'}`,
    `disk       ${formatBytes(m.launch?.disk?.virtualSize ?? 0)}, ${m.launch?.disk?.changedChunks ?? 0} changed chunks`,
    `memory     image ${formatBytes(m.launch?.memory?.imageSize ?? 0)} (${m.launch?.memory?.mode ?? '?'}), ${m.launch?.memory?.changedChunks ?? 0} changed chunks; save file ${formatBytes(m.launch?.memory?.saveFileSize ?? 0)}`,
    `cpu model  ${m.launch?.cpuModel ?? '(none)'}`,
    `segments   ${segs.length}: ${formatBytes(packed)} compressed, ${formatBytes(unpacked)} decoded`,
    `options    ${JSON.stringify(m.options ?? {})}`,
  ];
  if (m.stats) lines.push(`stats      ${Object.entries(m.stats).map(([k, v]) => `${k}=${v}`).join(' ')}`);
  return lines.join('\n');
}

async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file)) h.update(chunk as Buffer);
  return h.digest('hex');
}
