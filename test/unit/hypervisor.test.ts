import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CloudletError } from '../../src/core/errors';
import { buildDomainXml, DEFAULT_MACHINE, editDomainXml, interfaceElements, interfaceXml, isValidMac, parseDomainXml, parseXml } from '../../src/hypervisor/domain-xml';
import { assertCpuModelUsable, parseDomainCapabilities, parseMissingFeatures, suggestModels, usableModels } from '../../src/hypervisor/domcaps';
import { FakeHypervisor } from '../../src/hypervisor/fake';
import { detectVirtType, PROBE_EXIT_CODE, probeFirmware } from '../../src/hypervisor/kvm';
import { findAddon } from '../../src/hypervisor/native';
import { serialSize, waitForSerialLine } from '../../src/hypervisor/serial';
import type { DomainSpec } from '../../src/hypervisor/types';

/** What `virsh save-image-dumpxml` printed for a save of the test guest (libvirt 9.0, TCG). */
const SAVED_XML = `<domain type='qemu'>
  <name>hv-exp</name>
  <uuid>0596145a-800d-4b9c-970e-4dd8c9426660</uuid>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <kernel>/work/main/var/guest/vmlinuz</kernel>
    <initrd>/work/main/var/guest/initrd.img</initrd>
    <cmdline>console=ttyS0 nokaslr init_on_free=1 quiet panic=-1 rdinit=/init</cmdline>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
  </features>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='forbid'>qemu64</model>
  </cpu>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/tmp/hvdev/exp/a.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </disk>
    <controller type='pci' index='0' model='pci-root'/>
    <interface type='user'>
      <mac address='52:54:00:aa:00:01'/>
      <model type='virtio'/>
      <alias name='net0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </interface>
    <serial type='file'>
      <source path='/tmp/hvdev/exp/serial-a.log' append='on'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
    </serial>
    <console type='file'>
      <source path='/tmp/hvdev/exp/serial-a.log' append='on'/>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>`;

/** Trimmed `virsh domcapabilities --virttype qemu` (libvirt 9.0), plus a libvirt-10 style <blockers>. */
const DOMCAPS = `<domainCapabilities>
  <path>/usr/bin/qemu-system-x86_64</path>
  <domain>qemu</domain>
  <machine>pc-i440fx-7.2</machine>
  <arch>x86_64</arch>
  <cpu>
    <mode name='host-passthrough' supported='no'/>
    <mode name='host-model' supported='yes'>
      <model fallback='forbid'>EPYC</model>
      <vendor>AMD</vendor>
      <feature policy='require' name='acpi'/>
    </mode>
    <mode name='custom' supported='yes'>
      <model usable='yes' vendor='unknown'>qemu64</model>
      <model usable='no' vendor='AMD'>EPYC</model>
      <model usable='yes' vendor='unknown'>kvm64</model>
      <model usable='yes' vendor='Intel'>Nehalem</model>
      <model usable='no' vendor='Intel'>Haswell</model>
      <model usable='yes' vendor='unknown'>486</model>
      <blockers model='EPYC'>
        <feature name='sha-ni'/>
        <feature name='xsavec'/>
      </blockers>
    </mode>
  </cpu>
</domainCapabilities>`;

const spec: DomainSpec = {
  name: 'hv-unit',
  uuid: '11111111-2222-3333-4444-555555555555',
  memoryMiB: 256,
  vcpus: 2,
  kernel: '/g/vmlinuz',
  initrd: '/g/initrd.img',
  cmdline: 'console=ttyS0 quiet',
  disk: { path: '/vm/disk.qcow2', format: 'qcow2' },
  nic: { mac: '52:54:00:12:34:56' },
  serialPath: '/vm/serial.log',
};

describe('domain XML', () => {
  it('builds a domain that parses back to the spec', () => {
    const xml = buildDomainXml(spec, 'qemu');
    const info = parseDomainXml(xml);
    expect(info).toMatchObject({
      name: 'hv-unit',
      uuid: spec.uuid,
      virtType: 'qemu',
      memoryKiB: 256 * 1024,
      cpuModel: 'qemu64',
      kernel: '/g/vmlinuz',
      initrd: '/g/initrd.img',
      disks: [{ target: 'vda', path: '/vm/disk.qcow2', format: 'qcow2' }],
      interfaces: [{ type: 'user', mac: '52:54:00:12:34:56', model: 'virtio', alias: undefined }],
      serialPaths: ['/vm/serial.log'],
    });
    const root = parseXml(xml, 'built') as { domain: { vcpu: string; os: { cmdline: string }; cpu: { model: Record<string, string> } } };
    expect(root.domain.vcpu).toBe('2');
    expect(root.domain.os.cmdline).toBe('console=ttyS0 quiet');
    expect(root.domain.cpu.model['@_fallback']).toBe('forbid');
    expect(xml).toContain('<acpi/>');
  });

  it('builds a q35 machine without a USB controller unless told otherwise', () => {
    const root = (xml: string) => parseXml(xml, 'built') as { domain: { os: { type: Record<string, string> }; devices: { controller: Record<string, string> } } };
    const q35 = root(buildDomainXml(spec, 'qemu'));
    expect(q35.domain.os.type['@_machine']).toBe(DEFAULT_MACHINE);
    expect(DEFAULT_MACHINE).toBe('q35');
    expect(q35.domain.devices.controller).toEqual({ '@_type': 'usb', '@_model': 'none' });
    expect(root(buildDomainXml({ ...spec, machine: 'pc' }, 'qemu')).domain.os.type['@_machine']).toBe('pc');
  });

  it('uses the given virt type and CPU model, and escapes text', () => {
    const xml = buildDomainXml({ ...spec, cpuModel: 'Nehalem', cmdline: 'a<b & "c"' }, 'kvm');
    const info = parseDomainXml(xml);
    expect(info.virtType).toBe('kvm');
    expect(info.cpuModel).toBe('Nehalem');
    expect(xml).not.toContain('a<b');
    const root = parseXml(xml, 'built') as { domain: { os: { cmdline: string } } };
    expect(root.domain.os.cmdline).toBe('a<b & "c"');
  });

  it('parses a saved domain XML', () => {
    const info = parseDomainXml(SAVED_XML);
    expect(info.name).toBe('hv-exp');
    expect(info.memoryKiB).toBe(262144);
    expect(info.disks).toEqual([{ target: 'vda', path: '/tmp/hvdev/exp/a.qcow2', format: 'qcow2' }]);
    expect(info.interfaces[0]).toEqual({ type: 'user', mac: '52:54:00:aa:00:01', model: 'virtio', alias: 'net0' });
    expect(info.serialPaths).toEqual(['/tmp/hvdev/exp/serial-a.log']);
  });

  it('edits the disk and serial paths and keeps everything else', () => {
    const out = editDomainXml(SAVED_XML, { diskPath: '/new/b.qcow2', serialPath: '/new/serial-b.log' });
    const a = parseDomainXml(SAVED_XML);
    const b = parseDomainXml(out);
    expect(b.disks[0]?.path).toBe('/new/b.qcow2');
    expect(b.serialPaths).toEqual(['/new/serial-b.log']);
    expect(out.match(/serial-b\.log/g)).toHaveLength(2); // serial and console
    expect({ ...b, disks: [], serialPaths: [] }).toEqual({ ...a, disks: [], serialPaths: [] });
    expect(out).toContain('<address type="pci" domain="0x0000" bus="0x00" slot="0x02" function="0x0"/>');
  });

  it('edits name and uuid when asked, and names a missing disk target', () => {
    const out = parseDomainXml(editDomainXml(SAVED_XML, { name: 'hv-2', uuid: 'abc' }));
    expect(out.name).toBe('hv-2');
    expect(out.uuid).toBe('abc');
    expect(() => editDomainXml(SAVED_XML, { diskPath: '/x', diskTarget: 'vdz' })).toThrow(/no disk with target vdz/);
  });

  it('rejects XML that is not a domain, naming it', () => {
    expect(() => parseDomainXml('<network/>', 'save file header')).toThrow(/save file header has no <domain>/);
    try {
      parseDomainXml('<domain><name>x</name>', 'save file header');
      throw new Error('expected a failure');
    } catch (e) {
      expect(e).toBeInstanceOf(CloudletError);
      expect((e as CloudletError).code).toBe('CORRUPT');
      expect((e as CloudletError).message).toContain('save file header is not well-formed XML');
    }
  });

  it('extracts interface elements for detach and builds one for attach', () => {
    const els = interfaceElements(SAVED_XML);
    expect(els).toHaveLength(1);
    expect(els[0]?.xml).toContain('<mac address="52:54:00:aa:00:01"/>');
    expect(parseXml(els[0]?.xml ?? '', 'nic')).toHaveProperty('interface.alias.@_name', 'net0');
    const x = interfaceXml({ mac: '52:54:00:bb:00:02' });
    expect(parseXml(x, 'nic')).toEqual({ interface: { '@_type': 'user', mac: { '@_address': '52:54:00:bb:00:02' }, model: { '@_type': 'virtio' } } });
  });

  it('validates MAC addresses', () => {
    expect(isValidMac('52:54:00:12:34:56')).toBe(true);
    expect(isValidMac('53:54:00:12:34:56')).toBe(false); // multicast
    expect(isValidMac('52:54:00:12:34')).toBe(false);
    expect(isValidMac('zz:54:00:12:34:56')).toBe(false);
  });
});

describe('domain capabilities and the CPU model check', () => {
  const caps = parseDomainCapabilities(DOMCAPS);

  it('parses models, usability, vendor, blockers and the host model', () => {
    expect(caps.virtType).toBe('qemu');
    expect(caps.machine).toBe('pc-i440fx-7.2');
    expect(caps.hostModel).toBe('EPYC');
    expect(caps.cpuModels).toHaveLength(6);
    expect(caps.cpuModels.find((m) => m.name === 'EPYC')).toEqual({ name: 'EPYC', usable: false, vendor: 'AMD', blockers: ['sha-ni', 'xsavec'] });
    expect(usableModels(caps)).toEqual(['qemu64', 'kvm64', 'Nehalem', '486']);
    expect(suggestModels(caps, 3)).toEqual(['qemu64', 'kvm64', 'Nehalem']);
  });

  it('accepts a usable model', () => {
    expect(() => assertCpuModelUsable(caps, 'qemu64', 'qemu')).not.toThrow();
  });

  it('names the blockers libvirt lists', () => {
    expect(() => assertCpuModelUsable(caps, 'EPYC', 'qemu')).toThrow(
      /CPU model "EPYC" is not usable with virt type qemu on this host; the host\/hypervisor lacks: sha-ni, xsavec\. Fix: use a usable model such as qemu64/,
    );
  });

  it('names missing features found by hypervisor-cpu-compare when domcapabilities has no blockers', () => {
    const missing = parseMissingFeatures('error: the CPU is incompatible with host CPU: Host CPU does not provide required features: pcid, x2apic, tsc-deadline\n');
    expect(missing).toEqual(['pcid', 'x2apic', 'tsc-deadline']);
    try {
      assertCpuModelUsable(caps, 'Haswell', 'qemu', missing);
      throw new Error('expected a failure');
    } catch (e) {
      const err = e as CloudletError;
      expect(err.code).toBe('CPU_MODEL_UNUSABLE');
      expect(err.retryable).toBe(false);
      expect(err.details).toMatchObject({ model: 'Haswell', virtType: 'qemu', missingFeatures: ['pcid', 'x2apic', 'tsc-deadline'] });
    }
  });

  it('rejects a model QEMU does not know', () => {
    expect(() => assertCpuModelUsable(caps, 'Pentium9', 'kvm')).toThrow(/"Pentium9" is unknown to libvirt\/QEMU for virt type kvm/);
  });

  it('says when domcapabilities output is not what it expects', () => {
    expect(() => parseDomainCapabilities('<capabilities/>')).toThrow(/no <domainCapabilities>/);
  });
});

describe('KVM detection', () => {
  it('honours CLOUDLET_VIRT_TYPE and rejects other values', async () => {
    await expect(detectVirtType({ CLOUDLET_VIRT_TYPE: 'qemu' })).resolves.toEqual({ virtType: 'qemu', reason: 'CLOUDLET_VIRT_TYPE=qemu' });
    await expect(detectVirtType({ CLOUDLET_VIRT_TYPE: 'kvm' })).resolves.toMatchObject({ virtType: 'kvm' });
    await expect(detectVirtType({ CLOUDLET_VIRT_TYPE: 'xen' })).rejects.toThrow(/set CLOUDLET_VIRT_TYPE to kvm or qemu/);
  });

  it('builds a 64 KiB probe firmware with a far jump at the reset vector', () => {
    const fw = probeFirmware();
    expect(fw.length).toBe(65536);
    expect([...fw.subarray(0xfff0, 0xfff5)]).toEqual([0xea, 0x00, 0x00, 0x00, 0xf0]);
    expect(fw[0]).toBe(0xfa); // cli
    // The long-mode code writes 0x21 to port 0xf4: mov $0x21,%al; out %al,$0xf4.
    expect(fw.includes(Buffer.from([0xb0, 0x21, 0xe6, 0xf4]))).toBe(true);
    expect(PROBE_EXIT_CODE).toBe((0x21 << 1) | 1);
  });
});

describe('native addon', () => {
  it('is found by walking up from the adapter to node_modules', () => {
    const found = findAddon(path.join(__dirname, '..', '..', 'src', 'hypervisor'));
    expect(found).toMatch(/node_modules\/@unraid\/libvirt\/build\/Release\/libvirt\.node$/);
    expect(findAddon(os.tmpdir())).toBeUndefined();
  });
});

describe('waitForSerialLine', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hv-serial-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('finds a line written later, only once it is complete', async () => {
    const file = path.join(dir, 'serial.log');
    const p = waitForSerialLine(file, /READY bootId=(\S+)/, 5000);
    setTimeout(() => fs.writeFileSync(file, 'booting\r\nREADY bootId=ab'), 50);
    setTimeout(() => fs.appendFileSync(file, 'c\r\n'), 200);
    await expect(p).resolves.toBe('READY bootId=abc');
  });

  it('ignores lines before fromByte', async () => {
    const file = path.join(dir, 'serial.log');
    fs.writeFileSync(file, 'NET-UP mac=old\n');
    const from = await serialSize(file);
    expect(from).toBe(15);
    setTimeout(() => fs.appendFileSync(file, 'NET-UP mac=new\n'), 50);
    await expect(waitForSerialLine(file, /NET-UP/, 5000, from)).resolves.toBe('NET-UP mac=new');
  });

  it('times out naming the file and the last lines', async () => {
    const file = path.join(dir, 'serial.log');
    fs.writeFileSync(file, 'one\ntwo\nkernel panic\n');
    const err = (await waitForSerialLine(file, /READY/, 150).catch((e: unknown) => e)) as CloudletError;
    expect(err.code).toBe('TIMEOUT');
    expect(err.message).toContain(file);
    expect(err.message).toContain('"kernel panic"');
    await expect(waitForSerialLine(path.join(dir, 'none.log'), /READY/, 100)).rejects.toThrow(/did not appear within 100 ms/);
  });
});

describe('FakeHypervisor', () => {
  it('follows the same life cycle and errors as the real adapter', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hv-fake-'));
    try {
      const file = (n: string): string => {
        const f = path.join(dir, n);
        fs.writeFileSync(f, '');
        return f;
      };
      const hv = new FakeHypervisor({ onStartSerialLines: () => ['CLOUDLET-GUEST-READY bootId=fake'] });
      const s: DomainSpec = { ...spec, kernel: file('vmlinuz'), disk: { path: file('a.qcow2'), format: 'qcow2' }, serialPath: path.join(dir, 'serial.log') };
      await hv.defineDomain(s);
      expect(await hv.state('hv-unit')).toBe('shut off');
      await hv.start('hv-unit');
      await expect(hv.waitForSerialLine(s.serialPath, /READY/, 1000)).resolves.toBe('CLOUDLET-GUEST-READY bootId=fake');
      const save = path.join(dir, 'save');
      await hv.save('hv-unit', save);
      expect(await hv.state('hv-unit')).toBe('shut off');
      const r = await hv.restore(save, { diskPath: file('b.qcow2') });
      expect(r.name).toBe('hv-unit');
      expect(JSON.parse(await hv.domainXml('hv-unit'))).toMatchObject({ disk: { path: path.join(dir, 'b.qcow2') } });
      await expect(hv.replugNic('hv-unit', { mac: '52:54:00:00:00:02' })).resolves.toMatchObject({ oldMac: spec.nic.mac, newMac: '52:54:00:00:00:02' });
      expect((await hv.forwardPort('hv-unit', { guestPort: 8080 })).hostAddress).toBe('127.0.0.1');
      await expect(hv.checkCpuModel('Haswell')).rejects.toMatchObject({ code: 'CPU_MODEL_UNUSABLE' });
      await expect(hv.start('hv-none')).rejects.toMatchObject({ code: 'NOT_FOUND' });
      await hv.destroy('hv-unit');
      await hv.undefine('hv-unit');
      expect(await hv.state('hv-unit')).toBe('absent');
      expect(hv.calls.map((c) => c.op)).toEqual(['defineDomain', 'start', 'save', 'restore', 'replugNic', 'forwardPort', 'checkCpuModel', 'start', 'destroy', 'undefine']);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
