/**
 * Run as a child process (node --expose-gc --import tsx, UV_THREADPOOL_SIZE=1) by
 * native-calls.test.ts: many libvirt calls on domain objects the caller no longer holds, queued
 * behind a busy pool thread while the garbage collector runs, as under 20 syntheses at once.
 *   native-gc-stress.ts <domain> wrapped|raw <rounds>
 * "wrapped" goes through openHypervisor; "raw" through the addon itself, to show that the
 * conditions here do expose the hazard. Prints one JSON line: { rounds, calls, wrong, inFlight }.
 */
import crypto from 'node:crypto';
import { findAddon, nativeCallsInFlight, openHypervisor, type NativeDomain, type NativeHypervisor } from '../../src/hypervisor/native';

const [domain = '', mode = 'wrapped', roundsArg = '20'] = process.argv.slice(2);
const exposed = (globalThis as { gc?: () => void }).gc;
if (!exposed) throw new Error('run with node --expose-gc');
const gc: () => void = exposed;

function connect(): NativeHypervisor {
  if (mode === 'wrapped') return openHypervisor('qemu:///system');
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const addon = require(findAddon() ?? 'libvirt.node') as { Hypervisor: new (o: { uri: string }) => NativeHypervisor };
  return new addon.Hypervisor({ uri: 'qemu:///system' });
}

async function main(): Promise<void> {
  const h = connect();
  await h.connectOpen();
  const rounds = Number(roundsArg);
  let calls = 0;
  let wrong = 0;
  for (let round = 0; round < rounds; round++) {
    const domains: NativeDomain[] = await Promise.all(Array.from({ length: 40 }, () => h.domainLookupByName(domain)));
    // Keep the only pool thread busy, so the calls below wait in its queue.
    const busy = new Promise((resolve) => crypto.pbkdf2('key', 'salt', 100_000, 32, 'sha512', resolve));
    const names = domains.map((d) => h.domainGetName(d).catch((e: unknown) => `rejected: ${String(e)}`));
    const infos = domains.map((d) => h.domainGetInfo(d).then((i) => (i.maxMem > 0 ? domain : 'no memory'), (e: unknown) => `rejected: ${String(e)}`));
    domains.length = 0; // the calls' own references are all that is left
    gc();
    gc();
    // Reuse the freed memory, as a busy process would.
    const churn = Array.from({ length: 4000 }, (_, i) => Buffer.alloc(64, i % 251).toString('hex'));
    await busy;
    const got = await Promise.all([...names, ...infos]);
    void churn;
    calls += got.length;
    wrong += got.filter((n) => n !== domain).length;
    if (mode === 'raw' && wrong > 0) break;
  }
  await h.connectClose();
  process.stdout.write(`${JSON.stringify({ rounds, calls, wrong, inFlight: nativeCallsInFlight() })}\n`);
}

main().catch((e: unknown) => {
  process.stderr.write(`${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
  process.exit(1);
});
