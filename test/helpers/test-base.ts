/** A real base VM package made from the test guest (cached; see src/guest/base-package.ts). */
import path from 'node:path';
import { guestBasePackage } from '../../src/guest/base-package';
import { LibvirtHypervisor } from '../../src/hypervisor/libvirt';
import { REPO } from './infra';

export async function testBasePackage(memoryMiB = 256, diskMiB?: number): Promise<{ packageFile: string; baseId: string }> {
  const hv = new LibvirtHypervisor();
  try {
    return await guestBasePackage(hv, path.join(REPO, 'var'), memoryMiB, undefined, diskMiB === undefined ? {} : { diskMiB });
  } finally {
    await hv.close();
  }
}
