/**
 * Guest RAM in a shared file and `-incoming defer` in the domain XML: what a handoff's cut-over
 * without a memory stream needs (docs/handoff.md), added, kept once, and removed again.
 */
import { buildDomainXml, editDomainXml, hasSharedMemory, memorySizes, parseXml, type XmlNode } from '../../src/hypervisor/domain-xml';
import type { DomainSpec } from '../../src/hypervisor/types';

const spec: DomainSpec = {
  name: 'ram-unit',
  memoryMiB: 256,
  vcpus: 1,
  kernel: '/g/vmlinuz',
  initrd: '/g/initrd.img',
  cmdline: 'console=ttyS0',
  disk: { path: '/vm/disk.qcow2', format: 'qcow2' },
  nic: { mac: '52:54:00:12:34:56' },
  serialPath: '/vm/serial.log',
};

const domainOf = (xml: string): XmlNode => parseXml(xml, 'test') ['domain'] as XmlNode;
const args = (xml: string): string[] => {
  const cmd = domainOf(xml)['qemu:commandline'] as XmlNode | undefined;
  const a = cmd?.['qemu:arg'];
  return (a === undefined ? [] : Array.isArray(a) ? a : [a]).map((x) => String((x as XmlNode)['@_value']));
};

describe('shared guest RAM and incoming defer in the domain XML', () => {
  const plain = buildDomainXml(spec, 'qemu');

  it('a built domain has no shared RAM and no QEMU arguments of ours', () => {
    expect(hasSharedMemory(plain)).toBe(false);
    expect(args(plain)).toEqual([]);
  });

  it('sharedMemory adds a file source with shared access, once, keeping the rest', () => {
    const once = editDomainXml(plain, { sharedMemory: true });
    const twice = editDomainXml(once, { sharedMemory: true, name: 'other' });
    for (const x of [once, twice]) {
      expect(hasSharedMemory(x)).toBe(true);
      expect(domainOf(x).memoryBacking).toEqual({ source: { '@_type': 'file' }, access: { '@_mode': 'shared' } });
    }
    expect(domainOf(twice).name).toBe('other');
    expect(editDomainXml(once, {})).toBe(once);
  });

  it('incomingDefer adds -incoming defer with the qemu namespace, never twice, and false removes only that pair', () => {
    const on = editDomainXml(plain, { incomingDefer: true });
    expect(args(on)).toEqual(['-incoming', 'defer']);
    expect(domainOf(on)['@_xmlns:qemu']).toBe('http://libvirt.org/schemas/domain/qemu/1.0');
    expect(args(editDomainXml(on, { incomingDefer: true }))).toEqual(['-incoming', 'defer']);
    expect(args(editDomainXml(on, { incomingDefer: false }))).toEqual([]);
    expect(domainOf(editDomainXml(on, { incomingDefer: false }))['qemu:commandline']).toBeUndefined();
    // Arguments of someone else stay.
    const mixed = on.replace("<qemu:arg value=\"-incoming\"", "<qemu:arg value=\"-msg\"></qemu:arg><qemu:arg value=\"timestamp=on\"></qemu:arg><qemu:arg value=\"-incoming\"");
    expect(args(mixed)).toEqual(['-msg', 'timestamp=on', '-incoming', 'defer']);
    expect(args(editDomainXml(mixed, { incomingDefer: false }))).toEqual(['-msg', 'timestamp=on']);
  });
});

describe('warm pool and shrunk-base settings in the domain XML', () => {
  const plain = buildDomainXml(spec, 'qemu');

  it('preallocates the guest RAM for a pool VM, and drops that for the VMs restored from its saves', () => {
    const pooled = editDomainXml(plain, { sharedMemory: true, preallocate: true, mac: '52:54:00:aa:bb:cc' });
    const mb = domainOf(pooled)['memoryBacking'] as XmlNode;
    expect((mb['allocation'] as XmlNode)['@_mode']).toBe('immediate');
    expect(pooled).toContain("52:54:00:aa:bb:cc");
    const restored = editDomainXml(pooled, { preallocate: false });
    expect(restored).not.toContain('allocation');
    expect(hasSharedMemory(restored)).toBe(true);
  });

  it('reads the configured memory and the balloon size', () => {
    expect(memorySizes(plain)).toEqual({ maxBytes: 256 * 1048576, currentBytes: 256 * 1048576 });
    const shrunk = plain.replace(/<currentMemory[^>]*>\d+<\/currentMemory>/, '').replace('</memory>', "</memory><currentMemory unit='KiB'>98304</currentMemory>");
    expect(memorySizes(shrunk)).toEqual({ maxBytes: 256 * 1048576, currentBytes: 96 * 1048576 });
  });
});
