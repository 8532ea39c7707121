/**
 * Hold an emulated edge link open until Ctrl-C (docs/links.md), for benchmarks and manual checks:
 *
 *   npx tsx src/links/main.ts --profile wifi38 --target 127.0.0.1:8080 [--port 9000] [--id demo]
 *   npx tsx src/links/main.ts --rate-mbit 20 --rtt-ms 50 --target 127.0.0.1:8080
 *   npx tsx src/links/main.ts --remove-stale [--all]
 *   npx tsx src/links/main.ts --measure [--profile wifi38] [--download-mib 8] [--upload-mib 2]
 *
 * Prints one JSON line with the link (`port` is where clients connect) on stdout; `--remove-stale`
 * prints the ids it removed. Closing on SIGINT/SIGTERM removes the namespaces. `--measure` opens a
 * link to a local HTTP server of its own and prints one JSON line of figures per profile (all
 * three named ones unless a profile is given), then exits.
 */
import { Command } from 'commander';
import { isCloudletError } from '../core/errors';
import { openLink, removeStaleLinks } from './link';
import { measureLink } from './measure';
import { LINK_PROFILES, type LinkProfileInput } from './profiles';

interface Options {
  profile?: string;
  rateMbit?: string;
  rttMs?: string;
  target?: string;
  port?: string;
  id?: string;
  removeStale?: boolean;
  all?: boolean;
  measure?: boolean;
  downloadMib?: string;
  uploadMib?: string;
}

/** Transfer sizes of `--measure` per profile: a couple of seconds at the rate. */
const MEASURE_MIB: Record<string, [number, number]> = { wifi38: [8, 2], mbit100: [16, 4], gbit1: [64, 16] };

async function main(): Promise<void> {
  const o = new Command('cloudlet-link')
    .description('Open an emulated edge link (bandwidth limit + round-trip delay) to a TCP server on 127.0.0.1 and hold it until Ctrl-C')
    .option('--profile <name>', `a named profile: ${Object.keys(LINK_PROFILES).join(', ')}`)
    .option('--rate-mbit <n>', 'a custom rate in Mbit/s (with --rtt-ms)')
    .option('--rtt-ms <n>', 'a custom round-trip delay in ms (with --rate-mbit)')
    .option('--target <host:port>', 'the server, on 127.0.0.0/8')
    .option('--port <n>', 'the 127.0.0.1 port clients connect to (default: any free port)')
    .option('--id <id>', 'the link id in namespace names (lower-case letters and digits)')
    .option('--remove-stale', 'remove links left by processes that died, then exit')
    .option('--all', 'with --remove-stale: remove every link, live or not')
    .option('--measure', 'measure the profile(s) against a local HTTP server and exit')
    .option('--download-mib <n>', 'with --measure: download size in MiB')
    .option('--upload-mib <n>', 'with --measure: upload size in MiB')
    .parse()
    .opts<Options>();
  if (o.removeStale) {
    console.log(JSON.stringify({ removed: await removeStaleLinks({ all: o.all === true }) }));
    return;
  }
  const custom = o.rateMbit !== undefined || o.rttMs !== undefined;
  const profile: LinkProfileInput = custom ? { rateMbit: Number(o.rateMbit), rttMs: Number(o.rttMs) } : ((o.profile ?? 'wifi38') as LinkProfileInput);
  if (o.measure) {
    const profiles: LinkProfileInput[] = custom || o.profile !== undefined ? [profile] : (Object.keys(LINK_PROFILES) as LinkProfileInput[]);
    for (const p of profiles) {
      const [down, up] = MEASURE_MIB[typeof p === 'string' ? p : ''] ?? [8, 2];
      const mib = (x: string | undefined, d: number): number => Math.round((x !== undefined ? Number(x) : d) * 1024 * 1024);
      console.log(JSON.stringify(await measureLink(p, { downloadBytes: mib(o.downloadMib, down), uploadBytes: mib(o.uploadMib, up) })));
    }
    return;
  }
  const [host, portText] = (o.target ?? '').split(':');
  const link = await openLink({
    profile,
    target: { host: host || '127.0.0.1', port: Number(portText) },
    ...(o.id !== undefined ? { id: o.id } : {}),
    ...(o.port !== undefined ? { port: Number(o.port) } : {}),
  });
  console.log(JSON.stringify({ id: link.id, url: link.url('/'), host: link.host, port: link.port, target: link.target, profile: link.profile, tbf: link.tbf, namespaces: link.namespaces }));
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      link.close().then(
        () => process.exit(0),
        (e: unknown) => {
          console.error(e instanceof Error ? e.message : e);
          process.exit(1);
        },
      );
    });
  }
}

main().catch((err: unknown) => {
  console.error(isCloudletError(err) || err instanceof Error ? err.message : err);
  process.exit(1);
});
