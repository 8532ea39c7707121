/**
 * Hypervisor bench: boot-to-ready, save and restore under libvirt, then the steps every resume on
 * a target host ends with (NIC replug, port forward, polling the guest's application until it
 * answers), and QEMU's own restore of the same save file measured in the same run (QEMU started by
 * hand with libvirt's command line and `-incoming exec:` on the QEMU stream inside the save file),
 * so the ratio shows what libvirt adds.
 *
 *   npx tsx bench/hypervisor.ts [--runs N] [--machine pc|q35]      (npm run bench -- hypervisor)
 *
 * Prints one JSON line per metric: {"bench","metric","unit","median","runs",...} with the context
 * that makes two outputs comparable (virt type, machine type, guest inputs digest, load average at
 * start and end). restore_to_answer_ms is "save file ready" to "application answers": restore
 * (header rewrite + libvirt restore, as an instance does it) + replug + forward + first answer. Needs libvirtd (bash infra/libvirt.sh start) and the test guest
 * (bash infra/guest/build.sh); uses one VM at a time.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { z } from 'zod';
import { readSaveHeader, rewriteSaveHeaderXml } from '../src/core/snapshot/header';
import { createQcow2Overlay, editDomainXml, LibvirtHypervisor } from '../src/hypervisor';
import { GuestAppClient } from '../src/guest/app-client';
import { argRuns, median } from './lib';
import { lastQemuArgv, qemuRestoreMs } from './qemu-restore';

const ROOT = path.resolve(__dirname, '..');
const GUEST = path.join(ROOT, 'var', 'guest');
const NAME = 'hv-bench';
const ManifestSchema = z.object({
  kernel: z.string(), initrd: z.string(), disk: z.string(), cmdline: z.string(), readyLine: z.string(), appPort: z.number().int(),
  defaultMemoryMiB: z.number().int(), inputsDigest: z.string(),
});

/** `--machine pc|q35`: the machine type of the benchmarked domain (default: the adapter's). */
function argMachine(): string | undefined {
  const i = process.argv.indexOf('--machine');
  if (i < 0) return undefined;
  const v = process.argv[i + 1];
  if (v !== 'pc' && v !== 'q35') throw new Error('--machine needs pc or q35');
  return v;
}


async function main(): Promise<void> {
  const runs = argRuns();
  const machine = argMachine();
  const loadStart = os.loadavg().map((x) => Math.round(x * 100) / 100);
  const manifest = ManifestSchema.parse(JSON.parse(fs.readFileSync(path.join(GUEST, 'manifest.json'), 'utf8')));
  const hv = new LibvirtHypervisor();
  const virtType = await hv.virtType();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hv-bench-'));
  const m: Record<string, number[]> = {
    boot_to_ready_ms: [], save_ms: [], restore_libvirt_ms: [], restore_qemu_ms: [], restore_pool_ms: [],
    replug_nic_ms: [], replug_detach_ms: [], replug_attach_ms: [], forward_ms: [], app_answer_ms: [], restore_to_answer_ms: [],
  };
  let machineType = machine ?? '';
  try {
    await hv.destroy(NAME);
    await hv.undefine(NAME);
    const base = path.join(dir, 'base.raw');
    fs.copyFileSync(path.join(GUEST, manifest.disk), base);
    for (let r = 0; r < runs; r++) {
      const disk = path.join(dir, `disk-${r}.qcow2`);
      const disk2 = path.join(dir, `disk-${r}-restored.qcow2`);
      const serial = path.join(dir, `serial-${r}.log`);
      await createQcow2Overlay(disk, base);
      let t0 = performance.now();
      await hv.defineDomain({
        name: NAME, memoryMiB: manifest.defaultMemoryMiB, vcpus: 1, virtType,
        kernel: path.join(GUEST, manifest.kernel), initrd: path.join(GUEST, manifest.initrd), cmdline: manifest.cmdline,
        disk: { path: disk, format: 'qcow2' }, nic: { mac: '52:54:00:be:00:01' }, serialPath: serial,
        ...(machine ? { machine } : {}),
      });
      await hv.start(NAME);
      await hv.waitForSerialLine(serial, new RegExp(`^${manifest.readyLine} `), 120000);
      m.boot_to_ready_ms?.push(performance.now() - t0);

      const saveFile = path.join(dir, `save-${r}.img`);
      t0 = performance.now();
      await hv.save(NAME, saveFile);
      m.save_ms?.push(performance.now() - t0);

      fs.copyFileSync(disk, disk2);
      // "Save file ready" to "application answers": the steps every resume ends with, as an
      // instance does them (src/activities/instances.ts): the domain XML in the save file's header
      // points at the new disk and serial file, then a plain restore of that file.
      t0 = performance.now();
      const header = await readSaveHeader(saveFile);
      await rewriteSaveHeaderXml(saveFile, editDomainXml(header.domainXml, { diskPath: disk2, serialPath: path.join(dir, `serial-${r}-restored.log`) }));
      await hv.restore(saveFile);
      const tRestored = performance.now();
      m.restore_libvirt_ms?.push(tRestored - t0);
      const replug = await hv.replugNic(NAME, { mac: '52:54:00:be:00:02' });
      const tReplugged = performance.now();
      m.replug_nic_ms?.push(tReplugged - tRestored);
      m.replug_detach_ms?.push(replug.detachMs);
      m.replug_attach_ms?.push(replug.attachMs);
      const fwd = await hv.forwardPort(NAME, { guestPort: manifest.appPort });
      const tForwarded = performance.now();
      m.forward_ms?.push(tForwarded - tReplugged);
      await new GuestAppClient(fwd.hostPort).waitForState(60000);
      const tAnswered = performance.now();
      m.app_answer_ms?.push(tAnswered - tForwarded);
      m.restore_to_answer_ms?.push(tAnswered - t0);
      machineType = /machine='([^']+)'/.exec(await hv.domainXml(NAME))?.[1] ?? machineType;
      const argv = lastQemuArgv(NAME);
      await hv.destroy(NAME);

      // The same restore without libvirt: QEMU alone, same devices, on a fresh copy of the disk.
      fs.copyFileSync(disk, disk2);
      m.restore_qemu_ms?.push(await qemuRestoreMs(argv, saveFile, dir));
      await hv.undefine(NAME);

      // The same save file into a VM a warm pool started ahead (docs/warm-pool.md): QEMU already
      // runs, paused, waiting; only the stream and the resume are on the clock.
      fs.copyFileSync(disk, disk2);
      const saved = await readSaveHeader(saveFile);
      await hv.startIncoming(editDomainXml(saved.domainXml, { diskPath: disk2, serialPath: path.join(dir, `serial-${r}-pool.log`), sharedMemory: true, preallocate: true }));
      t0 = performance.now();
      await hv.completeIncoming(NAME, saveFile, { wholeStream: true });
      m.restore_pool_ms?.push(performance.now() - t0);
      const poolFwd = await hv.forwardPort(NAME, { guestPort: manifest.appPort });
      await new GuestAppClient(poolFwd.hostPort).waitForState(60000);
      await hv.destroy(NAME);
      fs.rmSync(saveFile, { force: true });
    }
  } finally {
    await hv.destroy(NAME).catch(() => undefined);
    await hv.undefine(NAME).catch(() => undefined);
    await hv.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const loadEnd = os.loadavg().map((x) => Math.round(x * 100) / 100);
  const context = { virtType, machine: machineType, guest: manifest.inputsDigest.slice(0, 12), loadStart, loadEnd };
  for (const [metric, values] of Object.entries(m)) {
    console.log(JSON.stringify({ bench: 'hypervisor', metric, unit: 'ms', median: Math.round(median(values)), runs: values.map(Math.round), ...context }));
  }
  const ratio = median(m.restore_libvirt_ms ?? []) / median(m.restore_qemu_ms ?? []);
  console.log(JSON.stringify({ bench: 'hypervisor', metric: 'restore_libvirt_over_qemu', unit: 'ratio', median: Math.round(ratio * 100) / 100, runs, ...context }));
  const poolRatio = median(m.restore_pool_ms ?? []) / median(m.restore_qemu_ms ?? []);
  console.log(JSON.stringify({ bench: 'hypervisor', metric: 'restore_pool_over_qemu', unit: 'ratio', median: Math.round(poolRatio * 100) / 100, runs, target: '<= 1.5', ...context }));
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
