/**
 * `cloudlet base create|import|export|list|info|verify|remove`. Standalone they work on the local
 * store; with --api, import/export/list/info go through the cloudlet service (create, verify and
 * remove are standalone only).
 */
import path from 'node:path';
import type { Command } from 'commander';
import { CloudletError } from '../../core/errors';
import { formatBytes } from '../../core/progress';
import { withProgress } from '../context';
import { baseListText, manifestText } from '../format';
import { remoteBaseListText, remoteBaseText } from '../remote-format';
import type { CommandEnv, WaitOptionValues } from './env';
import { addWaitOptions, operationOptionGiven, waitFlags } from './env';
import { resultField } from './instance';

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
    .description('write a base as one package file (with --api: download it from the service)')
    .argument('<baseId>', 'base id (or a unique prefix)')
    .argument('[file]', 'package file to write (or -o)')
    .option('-o, --out <file>', 'package file to write')
    .action(
      env.either(
        async (ctx, backend, baseId: string, file: string | undefined, opts: { out?: string }) => {
          const out = outFile(file, opts.out);
          const m = await withProgress(ctx, (p) => backend.exportBase(baseId, out, p));
          const size = m.members.reduce((s, x) => s + x.size, 0);
          ctx.print({ baseId: m.baseId, path: out, payloadBytes: size }, () => `exported base ${m.baseId} to ${out} (${formatBytes(size)} of data)`);
        },
        async (ctx, remote, ref: string, file: string | undefined, opts: { out?: string }) => {
          const out = path.resolve(outFile(file, opts.out));
          const baseId = await remote.resolveBaseId(ref);
          const { bytes } = await remote.client.downloadBasePackage(baseId, out);
          ctx.print({ baseId, path: out, bytes }, () => `downloaded the package of base ${baseId} to ${out} (${formatBytes(bytes)})`);
        },
      ),
    );

  addWaitOptions(
    base
      .command('import')
      .description('verify a base package and add it to the store (idempotent); with --api, import it on a host of the service (importBaseVm)')
      .argument('<package>', 'package file written by `cloudlet base export`, or its http(s) URL')
      .option('--host <hostId>', 'with --api: the host to import it on'),
  ).action(
    env.either(
      async (ctx, backend, file: string, opts: WaitOptionValues & { host?: string }) => {
        const apiOnly = opts.host !== undefined ? '--host' : operationOptionGiven(opts);
        if (apiOnly !== undefined) throw needsApi(`base import ${apiOnly}`);
        const r = await withProgress(ctx, (p) => backend.importBase(file, p));
        ctx.print({ baseId: r.manifest.baseId, alreadyPresent: r.alreadyPresent, manifest: r.manifest }, () =>
          r.alreadyPresent ? `base ${r.manifest.baseId} is already in the store` : `imported base ${r.manifest.baseId}\n${manifestText(r.manifest)}`,
        );
      },
      async (ctx, remote, source: string, opts: WaitOptionValues & { host?: string }) => {
        if (opts.host === undefined) {
          throw new CloudletError('BAD_INPUT', '`cloudlet base import` through the API needs the host to import on', { fix: 'add --host <hostId> (see `cloudlet --api URL hosts list`)' });
        }
        // The host reads a path itself: make it absolute (the hosts of a development cloudlet share this machine).
        const req = { hostId: opts.host, source: /^https?:\/\//i.test(source) ? source : path.resolve(source) };
        await remote.operation(ctx, () => remote.client.importBase(req, opts.idempotencyKey), waitFlags(opts), async (s) => {
          const baseId = resultField(s.result, 'baseId');
          const info = baseId !== undefined ? await remote.client.getBase(baseId) : undefined;
          const already = (s.result as { alreadyPresent?: boolean }).alreadyPresent === true;
          const head = `${already ? 'base was already on' : 'imported base on'} ${s.hostId}: ${baseId ?? '?'}`;
          return { data: info ? { base: info } : {}, text: info ? `${head}\n${remoteBaseText(info)}` : head };
        });
      },
    ),
  );

  base
    .command('list')
    .description('list the bases in the store (with --api: of the cloudlet, with the hosts holding each)')
    .action(
      env.either(
        async (ctx, backend) => {
          const list = await backend.listBases();
          ctx.print(list, () => baseListText(list));
        },
        async (ctx, remote) => {
          const list = await remote.client.listBases();
          ctx.print(list, () => remoteBaseListText(list));
        },
      ),
    );

  base
    .command('info')
    .description('show a stored base: manifest and files (with --api: sizes, CPU model, hosts)')
    .argument('<baseId>', 'base id (or a unique prefix)')
    .action(
      env.either(
        async (ctx, backend, baseId: string) => {
          const info = await backend.baseInfo(baseId);
          ctx.print(info, () =>
            [manifestText(info.manifest), `directory  ${info.dir}`, ...Object.entries(info.files).map(([role, f]) => `  ${role.padEnd(15)} ${formatBytes(f.size).padStart(10)}  ${f.path}`)].join('\n'),
          );
        },
        async (ctx, remote, ref: string) => {
          const id = await remote.resolveBaseId(ref);
          const info = await remote.client.getBase(id);
          if (!info) throw new CloudletError('NOT_FOUND', `base ${id} does not exist in this cloudlet`, { fix: 'list them with `cloudlet --api URL base list`, or import it' });
          ctx.print(info, () => remoteBaseText(info));
        },
      ),
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

function outFile(file: string | undefined, out: string | undefined): string {
  if (file !== undefined && out !== undefined && file !== out) throw new CloudletError('BAD_INPUT', `two output files given (${file} and -o ${out})`, { fix: 'give one' });
  const f = file ?? out;
  if (f === undefined) throw new CloudletError('BAD_INPUT', 'no output file given', { fix: 'add the file to write, e.g. `cloudlet base export <baseId> base.pkg`' });
  return f;
}

/** An option that only means something through the service. */
export function needsApi(what: string): CloudletError {
  return new CloudletError('BAD_INPUT', `\`cloudlet ${what}\` goes through a cloudlet service, and no API was given`, {
    fix: 'pass --api <url> and --token <token> (or set CLOUDLET_API_URL and CLOUDLET_API_TOKEN), or leave the option out to work on the local store',
  });
}
