/**
 * A real base VM package made from the test guest: boot it under libvirt on a raw copy of its
 * disk, wait for the ready line, save its memory, index it into a store and export the package.
 * Cached under var/test-cache/ by the guest's inputs digest and the RAM size.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createBase, exportBase } from '../../src/core/base';
import { loadGuestImage } from '../../src/guest/manifest';
import { LibvirtHypervisor } from '../../src/hypervisor/libvirt';
import { randomMac } from '../../src/activities/guest';
import { REPO } from './infra';

export async function testBasePackage(memoryMiB = 256): Promise<{ packageFile: string; baseId: string }> {
  const guest = loadGuestImage(path.join(REPO, 'var', 'guest'));
  const cacheDir = path.join(REPO, 'var', 'test-cache');
  const packageFile = path.join(cacheDir, `base-${guest.inputsDigest.slice(0, 16)}-${memoryMiB}.cloudletbase`);
  const idFile = `${packageFile}.id`;
  if (fs.existsSync(packageFile) && fs.existsSync(idFile)) return { packageFile, baseId: fs.readFileSync(idFile, 'utf8').trim() };

  fs.mkdirSync(cacheDir, { recursive: true });
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'test-base-'));
  const hv = new LibvirtHypervisor();
  const domain = `tb-${path.basename(work).slice(-6).toLowerCase()}`;
  try {
    const disk = path.join(work, 'disk.raw');
    const serial = path.join(work, 'serial.log');
    fs.copyFileSync(guest.diskPath, disk);
    await hv.defineDomain({
      name: domain, memoryMiB, vcpus: 1, kernel: guest.kernelPath, initrd: guest.initrdPath, cmdline: guest.cmdline,
      disk: { path: disk, format: 'raw' }, nic: { mac: randomMac() }, serialPath: serial,
    });
    await hv.start(domain);
    await hv.waitForSerialLine(serial, guest.readyPattern, 180_000);
    const save = path.join(work, 'memory.sav');
    await hv.save(domain, save);
    const store = path.join(work, 'store');
    const manifest = await createBase({ diskPath: disk, savePath: save, storeRoot: store });
    await exportBase(store, manifest.baseId, `${packageFile}.tmp`);
    fs.renameSync(`${packageFile}.tmp`, packageFile);
    fs.writeFileSync(idFile, manifest.baseId);
    return { packageFile, baseId: manifest.baseId };
  } finally {
    await hv.destroy(domain).catch(() => undefined);
    await hv.undefine(domain).catch(() => undefined);
    await hv.close();
    fs.rmSync(work, { recursive: true, force: true });
  }
}
