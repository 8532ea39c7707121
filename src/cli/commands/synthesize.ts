/** `cloudlet synthesize <overlay> --base <id> [--resume]`. */
import path from 'node:path';
import type { Command } from 'commander';
import { withProgress } from '../context';
import { secondsText } from '../format';
import type { CommandEnv } from './env';
import { intOption } from './overlay';

export function registerSynthesizeCommand(program: Command, env: CommandEnv): void {
  program
    .command('synthesize')
    .description("rebuild a launch VM's disk (qcow2 over the base disk) and memory snapshot from an overlay, and optionally resume it")
    .argument('<overlay>', 'overlay file path, http(s) URL, or digest of a stored overlay')
    .option('--base <baseId>', 'the base to apply it to (default: the one the overlay names)')
    .option('--out <dir>', 'directory for disk.qcow2 and memory.sav', 'synthesized')
    .option('--concurrency <n>', 'parallel segment decoders (default: the cores)', intOption(1, 256))
    .option('--resume', 'resume the result under libvirt (needs libvirtd)')
    .option('--forward <guestPort>', 'with --resume: forward a 127.0.0.1 port to this guest port', intOption(1, 65535))
    .action(
      env.run(async (ctx, backend, overlay: string, opts: { base?: string; out: string; concurrency?: number; resume?: boolean; forward?: number }) => {
        const req: Parameters<typeof backend.synthesize>[0] = { overlay, outDir: path.resolve(opts.out) };
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
      }),
    );
}
