/**
 * A base VM package made from the test guest: boot it under libvirt on a raw copy of its disk,
 * wait for the ready line, save its memory, index both into a scratch store and export the
 * package. Cached under <varDir>/cache/ by the guest's inputs digest, the RAM size and the machine
 * type (the domain the base is saved from is part of the base).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createBase, exportBase } from '../core/base';
import { CloudletError } from '../core/errors';
import { loadGuestImage } from './manifest';
import { DEFAULT_MACHINE } from '../hypervisor/domain-xml';
import type { Hypervisor } from '../hypervisor/types';
import { randomMac } from '../activities/guest';

export interface GuestBaseOptions {
  /**
   * Grow the guest's disk image to this many MiB (zeros at the end; the guest's file system keeps
   * its size). Benchmarks use it to compare methods on VM disks of realistic size.
   */
  diskMiB?: number;
}

export async function guestBasePackage(hv: Hypervisor, varDir: string, memoryMiB = 256, log: (msg: string) => void = () => undefined, options: GuestBaseOptions = {}): Promise<{ packageFile: string; baseId: string }> {
  const guest = loadGuestImage(path.join(varDir, 'guest'));
  const cacheDir = path.join(varDir, 'cache', 'bases');
  const machine = DEFAULT_MACHINE;
  const guestDiskBytes = fs.statSync(guest.diskPath).size;
  const diskBytes = options.diskMiB === undefined ? guestDiskBytes : options.diskMiB * 1024 * 1024;
  if (!Number.isInteger(diskBytes) || diskBytes < guestDiskBytes) {
    throw new CloudletError('BAD_INPUT', `a disk of ${options.diskMiB} MiB cannot hold the test guest's ${guestDiskBytes} byte disk image`, { fix: `pass a whole number of MiB of at least ${Math.ceil(guestDiskBytes / 1048576)}` });
  }
  const diskTag = diskBytes === guestDiskBytes ? '' : `-disk${diskBytes / 1048576}m`;
  const packageFile = path.join(cacheDir, `test-guest-${guest.inputsDigest.slice(0, 16)}-${memoryMiB}-${machine}${diskTag}.cloudletbase`);
  const idFile = `${packageFile}.id`;
  if (fs.existsSync(packageFile) && fs.existsSync(idFile)) return { packageFile, baseId: fs.readFileSync(idFile, 'utf8').trim() };

  fs.mkdirSync(cacheDir, { recursive: true });
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'guest-base-'));
  const domain = `cl-base-${path.basename(work).slice(-6).toLowerCase()}`;
  try {
    const disk = path.join(work, 'disk.raw');
    const serial = path.join(work, 'serial.log');
    fs.copyFileSync(guest.diskPath, disk);
    if (diskBytes > guestDiskBytes) fs.truncateSync(disk, diskBytes);
    log(`booting the test guest (${memoryMiB} MiB) to make a base VM`);
    await hv.defineDomain({
      name: domain, memoryMiB, vcpus: 1, kernel: guest.kernelPath, initrd: guest.initrdPath, cmdline: guest.cmdline,
      disk: { path: disk, format: 'raw' }, nic: { mac: randomMac() }, serialPath: serial, machine,
    });
    await hv.start(domain);
    await hv.waitForSerialLine(serial, guest.readyPattern, 180_000);
    const save = path.join(work, 'memory.sav');
    await hv.save(domain, save);
    log('indexing the base VM and writing its package');
    const store = path.join(work, 'store');
    const manifest = await createBase({ diskPath: disk, savePath: save, storeRoot: store });
    await exportBase(store, manifest.baseId, `${packageFile}.tmp`);
    fs.renameSync(`${packageFile}.tmp`, packageFile);
    fs.writeFileSync(idFile, manifest.baseId);
    return { packageFile, baseId: manifest.baseId };
  } finally {
    await hv.destroy(domain).catch(() => undefined);
    await hv.undefine(domain).catch(() => undefined);
    fs.rmSync(work, { recursive: true, force: true });
  }
}
