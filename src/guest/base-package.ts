/**
 * Base VM packages made from the guests the project builds: boot the guest under libvirt on its
 * own copy of the disk, wait until it is ready (and, for the Debian guest, until it is idle), save
 * its memory, index both into a scratch store and export the package. Cached under
 * <varDir>/cache/bases/ by the guest's inputs digest and every parameter of the domain it is saved
 * from (the domain is part of the base).
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { createBase, exportBase } from '../core/base';
import { CloudletError } from '../core/errors';
import { loadGuestImage, type GuestImage } from './manifest';
import { DEFAULT_MACHINE } from '../hypervisor/domain-xml';
import type { DomainSpec, Hypervisor } from '../hypervisor/types';
import { randomMac } from '../activities/guest';
import { waitUntilIdle } from './settle';

export interface GuestBaseOptions {
  /**
   * Grow the guest's disk image to this many MiB (zeros at the end; the guest's file system keeps
   * its size). Benchmarks use it to compare methods on VM disks of realistic size.
   */
  diskMiB?: number;
}

export interface BasePackageRef {
  packageFile: string;
  baseId: string;
}

type Log = (msg: string) => void;

interface BootedBaseInput {
  guest: GuestImage;
  packageFile: string;
  memoryMiB: number;
  vcpus: number;
  diskBytes: number;
  log: Log;
  /** What else the domain has (guest agent, balloon). */
  extra?: Pick<DomainSpec, 'guestAgent' | 'balloon'>;
  /** After the ready line, before the save (e.g. wait for the guest to settle). */
  beforeSave?: (domain: string) => Promise<void>;
  bootTimeoutMs: number;
}

/** Boot, wait, save, index and export; the package file appears only when complete. */
async function bootAndPackage(hv: Hypervisor, input: BootedBaseInput): Promise<BasePackageRef> {
  const { guest, packageFile, log } = input;
  const idFile = `${packageFile}.id`;
  if (fs.existsSync(packageFile) && fs.existsSync(idFile)) return { packageFile, baseId: fs.readFileSync(idFile, 'utf8').trim() };
  fs.mkdirSync(path.dirname(packageFile), { recursive: true });
  const work = fs.mkdtempSync(path.join(path.dirname(packageFile), '.work-'));
  const domain = `cl-base-${path.basename(work).slice(-6).toLowerCase().replace(/[^a-z0-9]/g, 'x')}`;
  try {
    const disk = path.join(work, 'disk.raw');
    const serial = path.join(work, 'serial.log');
    // A sparse copy: the Debian guest's 4 GiB disk holds ~0.5 GB of data.
    await promisify(execFile)('cp', ['--sparse=always', guest.diskPath, disk]);
    const guestDiskBytes = fs.statSync(disk).size;
    if (input.diskBytes > guestDiskBytes) fs.truncateSync(disk, input.diskBytes);
    log(`booting the ${guest.kind} guest (${input.memoryMiB} MiB, ${input.vcpus} vCPU) to make a base VM`);
    const t0 = Date.now();
    await hv.defineDomain({
      name: domain, memoryMiB: input.memoryMiB, vcpus: input.vcpus, kernel: guest.kernelPath, initrd: guest.initrdPath, cmdline: guest.cmdline,
      disk: { path: disk, format: 'raw' }, nic: { mac: randomMac() }, serialPath: serial, machine: DEFAULT_MACHINE, ...input.extra,
    });
    await hv.start(domain);
    await hv.waitForSerialLine(serial, guest.readyPattern, input.bootTimeoutMs);
    log(`the guest is ready after ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    await input.beforeSave?.(domain);
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

/** The busybox test guest's base VM (256 MiB by default). */
export async function guestBasePackage(hv: Hypervisor, varDir: string, memoryMiB = 256, log: Log = () => undefined, options: GuestBaseOptions = {}): Promise<BasePackageRef> {
  const guest = loadGuestImage(path.join(varDir, 'guest'));
  const guestDiskBytes = fs.statSync(guest.diskPath).size;
  const diskBytes = options.diskMiB === undefined ? guestDiskBytes : options.diskMiB * 1024 * 1024;
  if (!Number.isInteger(diskBytes) || diskBytes < guestDiskBytes) {
    throw new CloudletError('BAD_INPUT', `a disk of ${options.diskMiB} MiB cannot hold the test guest's ${guestDiskBytes} byte disk image`, { fix: `pass a whole number of MiB of at least ${Math.ceil(guestDiskBytes / 1048576)}` });
  }
  const diskTag = diskBytes === guestDiskBytes ? '' : `-disk${diskBytes / 1048576}m`;
  const packageFile = path.join(varDir, 'cache', 'bases', `test-guest-${guest.inputsDigest.slice(0, 16)}-${memoryMiB}-${DEFAULT_MACHINE}${diskTag}.cloudletbase`);
  return bootAndPackage(hv, { guest, packageFile, memoryMiB, vcpus: 1, diskBytes, log, bootTimeoutMs: 180_000 });
}

export interface DebianBaseOptions {
  /** Guest RAM (default: the manifest's, 1024 MiB). */
  memoryMiB?: number;
  /** Free page reporting through the virtio balloon (default on): freed guest pages stay out of snapshots. */
  freePageReporting?: boolean;
  /**
   * A shrunk base (docs/warm-pool.md): before the save, the guest drops its clean caches and its
   * balloon is inflated until the guest holds this many MiB; VMs restored from it get their memory
   * back at once (restoreAsInstance deflates the balloon).
   */
  shrinkToMiB?: number;
}

/** Drops the guest's clean caches and inflates its balloon to `mib`; waits until the guest holds no more than that (plus 8 MiB). */
export async function shrinkGuest(hv: Hypervisor, domain: string, mib: number, timeoutMs = 120_000): Promise<{ ms: number; actualMiB: number }> {
  const t0 = Date.now();
  await hv.guestExec(domain, { path: '/bin/sh', args: ['-c', 'sync; echo 3 > /proc/sys/vm/drop_caches'], timeoutMs: 60_000 });
  await hv.setBalloon(domain, mib * 1024 * 1024);
  for (;;) {
    const b = await hv.balloon(domain);
    if (b.actualBytes <= (mib + 8) * 1024 * 1024) return { ms: Date.now() - t0, actualMiB: Math.round(b.actualBytes / 1048576) };
    if (Date.now() - t0 > timeoutMs) {
      throw new CloudletError('TIMEOUT', `the guest of domain "${domain}" still holds ${Math.round(b.actualBytes / 1048576)} MiB after ${timeoutMs / 1000} s of asking its balloon for ${mib} MiB`, { fix: 'shrink to a size the guest can give back (its used memory and more), or check that virtio_balloon is loaded in the guest' });
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

/**
 * The Debian 12 guest's base VM: booted with the guest agent channel and a virtio balloon (free
 * page reporting on by default), left until it is idle, then saved.
 */
export async function debianBasePackage(hv: Hypervisor, varDir: string, log: Log = () => undefined, options: DebianBaseOptions = {}): Promise<BasePackageRef> {
  const guest = loadGuestImage(path.join(varDir, 'debian'), 'debian');
  const memoryMiB = options.memoryMiB ?? guest.defaultMemoryMiB;
  const fpr = options.freePageReporting ?? true;
  const shrink = options.shrinkToMiB;
  if (shrink !== undefined && (!Number.isInteger(shrink) || shrink < 64 || shrink >= memoryMiB)) {
    throw new CloudletError('BAD_INPUT', `a shrunk base needs a whole number of MiB from 64 to less than its ${memoryMiB} MiB (got ${shrink})`, { fix: 'pass e.g. shrinkToMiB: 256' });
  }
  const packageFile = path.join(varDir, 'cache', 'bases', `debian-${guest.inputsDigest.slice(0, 16)}-${memoryMiB}-${DEFAULT_MACHINE}${fpr ? '-fpr' : ''}${shrink !== undefined ? `-shrunk${shrink}` : ''}.cloudletbase`);
  return bootAndPackage(hv, {
    guest, packageFile, memoryMiB, vcpus: 1, diskBytes: 0, log,
    extra: { guestAgent: true, balloon: { freePageReporting: fpr } },
    bootTimeoutMs: 300_000,
    beforeSave: async (domain) => {
      await hv.waitForGuestAgent(domain, 60_000);
      const settled = await waitUntilIdle(hv, domain, { timeoutMs: 120_000 });
      log(`the guest settled after ${(settled.waitedMs / 1000).toFixed(1)} s (idle ${Math.round(settled.idleShare * 100)}% over the last ${settled.windowMs / 1000} s)`);
      if (shrink !== undefined) {
        const r = await shrinkGuest(hv, domain, shrink);
        log(`the guest dropped its caches and gave back its memory down to ${r.actualMiB} MiB in ${(r.ms / 1000).toFixed(1)} s`);
      }
    },
  });
}
