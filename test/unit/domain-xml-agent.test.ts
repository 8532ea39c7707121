/**
 * The guest agent channel and the free-page-reporting balloon in the domain XML: built when the
 * spec asks for them (and only then), recognized in a domain XML, and a channel's host socket
 * path dropped when a saved domain is restored under another name.
 */
import { buildDomainXml, editDomainXml, GUEST_AGENT_CHANNEL, hasGuestAgentChannel, parseDomainXml, parseXml, type XmlNode } from '../../src/hypervisor/domain-xml';
import type { DomainSpec } from '../../src/hypervisor/types';

const spec: DomainSpec = {
  name: 'agent-unit',
  memoryMiB: 512,
  vcpus: 1,
  kernel: '/g/vmlinuz',
  initrd: '/g/initrd.img',
  cmdline: 'console=ttyS0 root=/dev/vda',
  disk: { path: '/vm/disk.qcow2', format: 'qcow2' },
  nic: { mac: '52:54:00:12:34:56' },
  serialPath: '/vm/serial.log',
};

interface Devices {
  channel?: XmlNode | XmlNode[];
  memballoon?: XmlNode | XmlNode[];
  [k: string]: unknown;
}

const devicesOf = (xml: string): Devices => (parseXml(xml, 'built') as { domain: { devices: Devices } }).domain.devices;
const list = (v: XmlNode | XmlNode[] | undefined): XmlNode[] => (v === undefined ? [] : Array.isArray(v) ? v : [v]);

/** A saved domain (as virsh save-image-dumpxml prints one) with the agent channel and a second channel. */
const SAVED_XML = `<domain type='qemu'>
  <name>base-build-7</name>
  <uuid>0596145a-800d-4b9c-970e-4dd8c9426660</uuid>
  <memory unit='KiB'>524288</memory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <kernel>/g/vmlinuz</kernel>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/vm/a.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='/vm/serial-a.log' append='on'/>
      <target type='isa-serial' port='0'/>
    </serial>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-7-base-build-7/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='/run/cloudlet/other.sock'/>
      <target type='virtio' name='org.example.other.0'/>
      <address type='virtio-serial' controller='0' bus='0' port='2'/>
    </channel>
    <memballoon model='virtio' freePageReporting='on'>
      <address type='pci' domain='0x0000' bus='0x05' slot='0x00' function='0x0'/>
    </memballoon>
  </devices>
</domain>`;

describe('buildDomainXml: guest agent channel and balloon', () => {
  it('adds a unix channel with a virtio target named org.qemu.guest_agent.0 when guestAgent is set', () => {
    expect(GUEST_AGENT_CHANNEL).toBe('org.qemu.guest_agent.0');
    const channels = list(devicesOf(buildDomainXml({ ...spec, guestAgent: true }, 'qemu')).channel);
    expect(channels).toHaveLength(1);
    expect(channels[0]).toMatchObject({ '@_type': 'unix', target: { '@_type': 'virtio', '@_name': 'org.qemu.guest_agent.0' } });
    // libvirt picks the socket path per domain.
    expect(channels[0]).not.toHaveProperty('source');
  });

  it('adds a virtio balloon with free page reporting when asked', () => {
    const xml = buildDomainXml({ ...spec, balloon: { freePageReporting: true } }, 'kvm');
    expect(list(devicesOf(xml).memballoon)).toEqual([{ '@_model': 'virtio', '@_freePageReporting': 'on' }]);
    expect(xml).toContain('<memballoon model="virtio" freePageReporting="on"');
    const off = buildDomainXml({ ...spec, balloon: { freePageReporting: false } }, 'kvm');
    expect(list(devicesOf(off).memballoon)).toEqual([{ '@_model': 'virtio', '@_freePageReporting': 'off' }]);
  });

  it('has memballoon model none and no channel without them', () => {
    for (const s of [spec, { ...spec, guestAgent: false }]) {
      const xml = buildDomainXml(s, 'qemu');
      const devices = devicesOf(xml);
      expect(list(devices.memballoon)).toEqual([{ '@_model': 'none' }]);
      expect(devices.channel).toBeUndefined();
      expect(xml).not.toContain('<channel');
      expect(xml).not.toContain('guest_agent');
      expect(hasGuestAgentChannel(xml)).toBe(false);
    }
  });

  it('keeps the rest of the domain as it was', () => {
    const plain = parseDomainXml(buildDomainXml(spec, 'qemu'));
    const both = parseDomainXml(buildDomainXml({ ...spec, guestAgent: true, balloon: { freePageReporting: true } }, 'qemu'));
    expect(both).toEqual(plain);
    const devices = devicesOf(buildDomainXml({ ...spec, guestAgent: true, balloon: { freePageReporting: true } }, 'qemu'));
    expect(Object.keys(devices).sort()).toEqual(['channel', 'controller', 'disk', 'interface', 'memballoon', 'serial']);
  });
});

describe('hasGuestAgentChannel', () => {
  it('finds the channel in a built and in a saved domain XML', () => {
    expect(hasGuestAgentChannel(buildDomainXml({ ...spec, guestAgent: true }, 'qemu'))).toBe(true);
    expect(hasGuestAgentChannel(SAVED_XML)).toBe(true);
  });

  it('does not take another channel (or a spice one) for it', () => {
    const other = SAVED_XML.replace(/<channel type='unix'>\s*<source mode='bind' path='\/var[^']*'\/>\s*<target type='virtio' name='org.qemu.guest_agent.0'\/>[\s\S]*?<\/channel>/, '');
    expect(other).not.toContain('guest_agent');
    expect(other).toContain('org.example.other.0');
    expect(hasGuestAgentChannel(other)).toBe(false);
    const spice = SAVED_XML.replace(/<channel[\s\S]*<\/channel>/, "<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>");
    expect(hasGuestAgentChannel(spice)).toBe(false);
    expect(hasGuestAgentChannel("<domain type='qemu'><name>x</name></domain>")).toBe(false);
  });

  it('rejects XML that is not a domain, naming it', () => {
    expect(() => hasGuestAgentChannel('<network/>', 'live XML of "x"')).toThrow(/live XML of "x" has no <domain>/);
  });
});

describe('editDomainXml and agent channels', () => {
  const channels = (xml: string): XmlNode[] => list(devicesOf(xml).channel);

  it('with a new name drops the source of a channel whose socket path names the old domain, keeping other channels', () => {
    const out = editDomainXml(SAVED_XML, { name: 'instance-42' });
    expect(parseDomainXml(out).name).toBe('instance-42');
    const [agent, other] = channels(out);
    expect(agent).toMatchObject({ '@_type': 'unix', target: { '@_type': 'virtio', '@_name': 'org.qemu.guest_agent.0' } });
    expect(agent).not.toHaveProperty('source');
    expect(agent).toHaveProperty('address.@_port', '1');
    expect(other).toMatchObject({ source: { '@_mode': 'bind', '@_path': '/run/cloudlet/other.sock' }, target: { '@_name': 'org.example.other.0' } });
    expect(out).not.toContain('base-build-7');
    expect(hasGuestAgentChannel(out)).toBe(true);
    // The balloon and its address stay.
    expect(list(devicesOf(out).memballoon)[0]).toMatchObject({ '@_model': 'virtio', '@_freePageReporting': 'on', address: { '@_bus': '0x05' } });
  });

  it('keeps the source of a single unix channel outside libvirt\'s channel directory', () => {
    const own = SAVED_XML.replace('/var/lib/libvirt/qemu/channel/target/domain-7-base-build-7/org.qemu.guest_agent.0', '/srv/sockets/agent.sock');
    const [agent] = channels(editDomainXml(own, { name: 'instance-43' }));
    expect(agent).toHaveProperty('source.@_path', '/srv/sockets/agent.sock');
  });

  it('leaves a domain without channels as it was, but for the name', () => {
    const built = buildDomainXml(spec, 'qemu');
    const out = editDomainXml(built, { name: 'renamed' });
    expect(out).toBe(built.replace('<name>agent-unit</name>', '<name>renamed</name>'));
  });
});
