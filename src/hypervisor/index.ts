/** The hypervisor adapter: the only module that talks to libvirt, virsh and QEMU. */
export type { DiskFormat, DomainSpec, DomainState, ForwardResult, Hypervisor, NicSpec, ReplugResult, RestoreOptions, RestoreResult, VirtType } from './types';
export { LibvirtHypervisor, DEFAULT_URI, freeLocalPort, type LibvirtOptions } from './libvirt';
export { detectVirtType, virtTypeVerdict, type VirtTypeVerdict } from './kvm';
export { createQcow2Overlay } from './disk';
export { serialSize, waitForSerialLine } from './serial';
export { buildDomainXml, editDomainXml, parseDomainXml, interfaceXml, isValidMac, DEFAULT_CPU_MODEL, DEFAULT_MACHINE, type DomainXmlInfo } from './domain-xml';
export { parseDomainCapabilities, assertCpuModelUsable, usableModels, type DomainCapabilities, type CpuModelInfo } from './domcaps';
export { FakeHypervisor, type FakeOptions } from './fake';
