/**
 * The Resumer backed by the hypervisor adapter (libvirt). The adapter is imported on first use,
 * so commands that only touch files never load the libvirt binding.
 */
import { createLogger } from '../common/logger';
import type { XmlNode } from '../hypervisor/domain-xml';
import { asArray, buildXml, parseXml } from '../hypervisor/domain-xml';
import type { ResumeResult } from './backend';
import type { ResumeInput, Resumer } from './resume';

export const hypervisorResumer: Resumer = async (input: ResumeInput): Promise<ResumeResult> => {
  const { LibvirtHypervisor, editDomainXml } = await import('../hypervisor');
  const hv = new LibvirtHypervisor({ logger: createLogger('cloudlet-cli', process.env.CLOUDLET_LOG_LEVEL ?? 'warn') });
  try {
    // Fail early and non-retryably when this host cannot run the launch VM's CPU model.
    if (input.cpuModel !== undefined) await hv.checkCpuModel(input.cpuModel);
    // The synthesized disk is a qcow2 over the base disk: point the saved domain at it as qcow2.
    const savedXml = await hv.saveFileXml(input.savePath);
    const xml = qcow2Disk(editDomainXml(savedXml, { diskPath: input.diskPath, serialPath: input.serialPath }, `domain XML of ${input.savePath}`));
    const restored = await hv.restore(input.savePath, { xml });
    const result: ResumeResult = { domain: restored.name, restoreMs: restored.ms, serialPath: input.serialPath };
    if (input.forwardGuestPort !== undefined) {
      const f = await hv.forwardPort(restored.name, { guestPort: input.forwardGuestPort });
      result.forward = { hostAddress: f.hostAddress, hostPort: f.hostPort, guestPort: f.guestPort };
    }
    return result;
  } finally {
    await hv.close();
  }
};

/** The domain XML with its first disk as a qcow2 whose backing chain libvirt reads from the image. */
export function qcow2Disk(xml: string): string {
  const doc = parseXml(xml, 'domain XML');
  const domain = doc.domain as XmlNode | undefined;
  const devices = asArray(domain?.devices)[0];
  const disk = asArray(devices?.disk).find((d) => (d['@_device'] ?? 'disk') === 'disk');
  if (!disk) return xml;
  const driver = asArray(disk.driver)[0];
  if (driver) driver['@_type'] = 'qcow2';
  else disk.driver = { '@_name': 'qemu', '@_type': 'qcow2' };
  // A saved raw disk carries an empty <backingStore/> ("no backing file"); drop it so libvirt reads
  // the backing chain (the base disk) from the qcow2 header.
  delete disk.backingStore;
  return buildXml(doc);
}
