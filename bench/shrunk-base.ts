/**
 * Shrunk bases (docs/warm-pool.md): the Debian 12 base VM saved as it is, and saved after the guest
 * dropped its clean caches and its balloon was inflated down to --shrink MiB (default 256), side by
 * side in one run. For each: the base package's size, the memory image's allocated bytes and the
 * save file's size; then, per run, a VM restored from the base as an instance is (the domain XML in
 * the save's header rewritten, a qcow2 over the base disk, a plain libvirt restore), its balloon
 * deflated back to the configured size (the shrunk one), and the first work the guest does with it:
 * the guest agent's first answer, and allocating and touching 600 MiB inside the guest.
 *
 *   npx tsx bench/shrunk-base.ts [--runs N] [--shrink MiB]     (npm run bench -- shrunk-base)
 *
 * Needs the Debian guest (bash infra/debian/build.sh; the setup builds it). The bases are cached
 * under var/cache/bases by their inputs. One VM at a time; everything it makes is removed.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createLogger } from '../src/common/logger';
import { REPO_ROOT } from '../src/config';
import { importBase, openBase } from '../src/core/base';
import { readSaveHeader, rewriteSaveHeaderXml } from '../src/core/snapshot';
import { debianBasePackage } from '../src/guest/base-package';
import { createQcow2Overlay } from '../src/hypervisor/disk';
import { editDomainXml, memorySizes } from '../src/hypervisor/domain-xml';
import { LibvirtHypervisor } from '../src/hypervisor/libvirt';
import { argRuns, median } from './lib';

function argShrink(): number {
  const i = process.argv.indexOf('--shrink');
  const v = i >= 0 ? Number(process.argv[i + 1]) : 256;
  if (!Number.isInteger(v) || v < 64) throw new Error('--shrink needs a whole number of MiB (at least 64)');
  return v;
}

async function main(): Promise<void> {
  const runs = argRuns();
  const shrink = argShrink();
  const varDir = path.join(REPO_ROOT, 'var');
  const hv = new LibvirtHypervisor({ logger: createLogger('bench-hv', 'warn') });
  const emit = (obj: Record<string, unknown>): void => {
    process.stdout.write(`${JSON.stringify({ bench: 'shrunk-base', ...obj })}\n`);
  };
  const progress = (msg: string): void => {
    process.stderr.write(`[bench shrunk-base ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
  };
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'shrunk-base-'));
  const domain = `bench-shrunk-${process.pid}`;
  emit({ metric: 'environment', virtType: await hv.virtType(), runs, shrinkMiB: shrink, loadAverage: os.loadavg().map((x) => Math.round(x * 10) / 10) });
  try {
    for (const variant of ['as saved', `shrunk to ${shrink} MiB`] as const) {
      const shrunk = variant !== 'as saved';
      progress(`${variant}: the Debian base package (cached)`);
      const pkg = await debianBasePackage(hv, varDir, progress, shrunk ? { shrinkToMiB: shrink } : {});
      const store = path.join(scratch, shrunk ? 'store-shrunk' : 'store');
      await importBase(store, pkg.packageFile);
      const base = await openBase(store, pkg.baseId);
      const header = await readSaveHeader(base.savePath);
      const mem = memorySizes(header.domainXml);
      const imageAllocated = fs.statSync(base.memImagePath).blocks * 512;
      emit({
        metric: 'base', variant, packageBytes: fs.statSync(pkg.packageFile).size, saveFileBytes: fs.statSync(base.savePath).size,
        memoryImageAllocatedBytes: imageAllocated, balloonMiB: mem ? Math.round(mem.currentBytes / 1048576) : undefined, memoryMiB: mem ? Math.round(mem.maxBytes / 1048576) : undefined,
      });
      const m: Record<string, number[]> = { restore_ms: [], grow_back_ms: [], agent_answer_ms: [], touch_600mib_ms: [] };
      for (let r = 0; r < runs; r++) {
        const dir = path.join(scratch, `${shrunk ? 's' : 'f'}${r}`);
        fs.mkdirSync(dir, { recursive: true });
        const save = path.join(dir, 'memory.sav');
        const disk = path.join(dir, 'disk.qcow2');
        fs.copyFileSync(base.savePath, save);
        await createQcow2Overlay(disk, base.diskPath, 'raw');
        await rewriteSaveHeaderXml(save, editDomainXml(header.domainXml, { name: domain, uuid: randomUUID(), diskPath: disk, diskFormat: 'qcow2', serialPath: path.join(dir, 'serial.log'), sharedMemory: true, preallocate: false }));
        let t0 = performance.now();
        await hv.restore(save);
        m.restore_ms?.push(performance.now() - t0);
        const t1 = performance.now();
        if (shrunk && mem) {
          await hv.setBalloon(domain, mem.maxBytes);
          for (;;) {
            if ((await hv.balloon(domain)).actualBytes >= mem.maxBytes - 8 * 1048576) break;
            if (performance.now() - t1 > 60_000) throw new Error('the balloon did not deflate within 60 s');
            await new Promise((res) => setTimeout(res, 20));
          }
        }
        m.grow_back_ms?.push(performance.now() - t1);
        await hv.guestExec(domain, { path: '/bin/true', args: [], timeoutMs: 60_000 });
        m.agent_answer_ms?.push(performance.now() - t0);
        t0 = performance.now();
        await hv.guestExec(domain, { path: '/usr/bin/python3', args: ['-c', 'b = bytearray(600 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1'], timeoutMs: 300_000 });
        m.touch_600mib_ms?.push(performance.now() - t0);
        await hv.destroy(domain);
        fs.rmSync(dir, { recursive: true, force: true });
        progress(`${variant}: run ${r + 1}/${runs}: restore ${Math.round(m.restore_ms?.at(-1) ?? 0)} ms, agent answers after ${Math.round(m.agent_answer_ms?.at(-1) ?? 0)} ms`);
      }
      for (const [metric, values] of Object.entries(m)) emit({ metric, variant, unit: 'ms', median: Math.round(median(values)), runs: values.map(Math.round) });
    }
  } finally {
    await hv.destroy(domain).catch(() => undefined);
    await hv.close();
    fs.rmSync(scratch, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
