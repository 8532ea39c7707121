/** `cloudlet overlay create|info|list`. */
import { InvalidArgumentError } from 'commander';
import type { Command } from 'commander';
import { formatBytes } from '../../core/progress';
import { withProgress } from '../context';
import { secondsText, table } from '../format';
import type { CommandEnv } from './env';

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

export function registerOverlayCommands(program: Command, env: CommandEnv): void {
  const overlay = program.command('overlay').description('VM overlays: the compressed difference between a launch VM and its base');

  overlay
    .command('create')
    .description('make an overlay from a launch VM (qcow2 over the base disk + libvirt save file)')
    .requiredOption('--base <baseId>', 'the base the launch VM was resumed from')
    .requiredOption('--disk <qcow2>', "the launch VM's disk (a qcow2 whose backing file is the base disk)")
    .requiredOption('--memory <save file>', "the launch VM's libvirt save file")
    .option('-o, --out <file>', 'write the overlay here (default: into the store, named by its sha256)')
    .option('--lzma-level <0-9>', 'LZMA preset', intOption(0, 9))
    .option('--no-delta', 'skip the xdelta3 stage (often smaller and faster)')
    .option('--segment-size <bytes>', 'input bytes per segment, e.g. 4M', sizeOption)
    .action(
      env.run(async (ctx, backend, opts: { base: string; disk: string; memory: string; out?: string; lzmaLevel?: number; delta: boolean; segmentSize?: number }) => {
        const req: Parameters<typeof backend.createOverlay>[0] = { baseId: opts.base, launchDiskPath: opts.disk, launchSavePath: opts.memory, delta: opts.delta };
        if (opts.out !== undefined) req.outPath = opts.out;
        if (opts.lzmaLevel !== undefined) req.lzmaLevel = opts.lzmaLevel;
        if (opts.segmentSize !== undefined) req.segmentSize = opts.segmentSize;
        const r = await withProgress(ctx, (p) => backend.createOverlay(req, p));
        ctx.print(r, () => `created overlay ${r.path}\n  sha256  ${r.sha256}\n  size    ${formatBytes(r.size)}\n  base    ${r.baseId}\n  took    ${secondsText(r.seconds)}`);
      }),
    );

  overlay
    .command('info')
    .description("show an overlay's meta (file path, http(s) URL, or digest of a stored overlay)")
    .argument('<overlay>', 'path, URL or digest')
    .action(
      env.run(async (ctx, backend, arg: string) => {
        const meta = await backend.overlayInfo(arg);
        ctx.print(meta, () => overlayMetaText(meta));
      }),
    );

  overlay
    .command('list')
    .description('list the overlays in the store')
    .action(
      env.run(async (ctx, backend) => {
        const list = await backend.listOverlays();
        ctx.print(
          list.map(({ meta: _meta, ...r }) => r),
          () => (list.length === 0 ? 'no overlays in the store' : table(['SHA256', 'SIZE', 'BASE', 'ADDED'], list.map((o) => [o.digest, formatBytes(o.size), o.baseId ?? '-', o.addedAt]))),
        );
      }),
    );
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
