/** `cloudlet base create|import|export|list|info|remove`. */
import type { Command } from 'commander';
import { CloudletError } from '../../core/errors';
import { formatBytes } from '../../core/progress';
import { withProgress } from '../context';
import { baseListText, manifestText } from '../format';
import type { CommandEnv } from './env';

export function registerBaseCommands(program: Command, env: CommandEnv): void {
  const base = program.command('base').description('base VMs: a raw disk + a memory snapshot, and their chunk indexes');

  base
    .command('create')
    .description('register a base made from a booted-and-saved VM (raw disk + `virsh save` file)')
    .requiredOption('--disk <raw>', 'raw disk image of the saved VM')
    .requiredOption('--memory <save file>', 'its libvirt save file')
    .action(
      env.run(async (ctx, backend, opts: { disk: string; memory: string }) => {
        const m = await withProgress(ctx, (p) => backend.createBase({ diskPath: opts.disk, savePath: opts.memory }, p));
        ctx.print({ baseId: m.baseId, manifest: m }, () => `created base ${m.baseId}\n${manifestText(m)}`);
      }),
    );

  base
    .command('export')
    .description('write a stored base as one package file')
    .argument('<baseId>', 'base id')
    .requiredOption('-o, --out <file>', 'package file to write')
    .action(
      env.run(async (ctx, backend, baseId: string, opts: { out: string }) => {
        const m = await withProgress(ctx, (p) => backend.exportBase(baseId, opts.out, p));
        const size = m.members.reduce((s, x) => s + x.size, 0);
        ctx.print({ baseId: m.baseId, path: opts.out, payloadBytes: size }, () => `exported base ${m.baseId} to ${opts.out} (${formatBytes(size)} of data)`);
      }),
    );

  base
    .command('import')
    .description('verify a base package and add it to the store (idempotent)')
    .argument('<package>', 'package file written by `cloudlet base export`, or its http(s) URL')
    .action(
      env.run(async (ctx, backend, file: string) => {
        const r = await withProgress(ctx, (p) => backend.importBase(file, p));
        ctx.print({ baseId: r.manifest.baseId, alreadyPresent: r.alreadyPresent, manifest: r.manifest }, () =>
          r.alreadyPresent ? `base ${r.manifest.baseId} is already in the store` : `imported base ${r.manifest.baseId}\n${manifestText(r.manifest)}`,
        );
      }),
    );

  base
    .command('list')
    .description('list the bases in the store')
    .action(
      env.run(async (ctx, backend) => {
        const list = await backend.listBases();
        ctx.print(list, () => baseListText(list));
      }),
    );

  base
    .command('info')
    .description('show a stored base: manifest and files')
    .argument('<baseId>', 'base id')
    .action(
      env.run(async (ctx, backend, baseId: string) => {
        const info = await backend.baseInfo(baseId);
        ctx.print(info, () =>
          [manifestText(info.manifest), `directory  ${info.dir}`, ...Object.entries(info.files).map(([role, f]) => `  ${role.padEnd(15)} ${formatBytes(f.size).padStart(10)}  ${f.path}`)].join('\n'),
        );
      }),
    );

  base
    .command('verify')
    .description("re-check a stored base's files against its manifest (exit 1 if damaged)")
    .argument('<baseId>', 'base id')
    .action(
      env.run(async (ctx, backend, baseId: string) => {
        const report = await withProgress(ctx, (p) => backend.verifyBase(baseId, p));
        if (!report.ok) {
          throw new CloudletError('CORRUPT', `stored base ${report.baseId} is damaged: ${report.problems.join('; ')}`, {
            fix: `remove it (cloudlet base remove ${report.baseId}) and import its package again`,
            details: { baseId: report.baseId, problems: report.problems },
          });
        }
        ctx.print(report, () => `base ${report.baseId}: all files match the manifest`);
      }),
    );

  base
    .command('remove')
    .description('remove a base from the store')
    .argument('<baseId>', 'base id')
    .action(
      env.run(async (ctx, backend, baseId: string) => {
        await backend.removeBase(baseId);
        ctx.print({ baseId, removed: true }, () => `removed base ${baseId}`);
      }),
    );
}
