/**
 * The Resumer backed by the hypervisor adapter (libvirt). The adapter is imported on first use,
 * so commands that only touch files never load the libvirt binding.
 */
import { createLogger } from '../common/logger';
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
    const xml = editDomainXml(savedXml, { diskPath: input.diskPath, diskFormat: 'qcow2', serialPath: input.serialPath }, `domain XML of ${input.savePath}`);
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
