/**
 * libvirt domain XML, built and read with fast-xml-parser (never by string concatenation).
 * Pure functions: no libvirt calls here, so they are unit-tested on their own.
 */
import { XMLBuilder, XMLParser } from 'fast-xml-parser';
import { CloudletError } from '../core/errors';
import type { DiskFormat, DomainSpec, NicSpec, VirtType } from './types';

/** A parsed XML element: attributes as '@_name', text as '#text', children by tag name. */
export type XmlNode = { [key: string]: unknown };

const ATTR = '@_';

const parser = new XMLParser({
  ignoreAttributes: false,
  attributeNamePrefix: ATTR,
  parseTagValue: false,
  parseAttributeValue: false,
  trimValues: true,
  allowBooleanAttributes: true,
});

const builder = new XMLBuilder({
  ignoreAttributes: false,
  attributeNamePrefix: ATTR,
  format: true,
  indentBy: '  ',
  suppressEmptyNode: true,
  suppressBooleanAttributes: false,
});

export function parseXml(xml: string, what: string): XmlNode {
  try {
    return parser.parse(xml, true) as XmlNode;
  } catch (e) {
    throw new CloudletError('CORRUPT', `${what} is not well-formed XML (${(e as Error).message ?? String(e)})`, {
      fix: 'check where this XML came from (libvirt output or a save file header)',
      cause: e,
    });
  }
}

export function buildXml(root: XmlNode): string {
  return builder.build(root) as string;
}

/** The value as an array: fast-xml-parser gives one child as an object, several as an array. */
export function asArray<T = XmlNode>(v: unknown): T[] {
  if (v === undefined || v === null || v === '') return [];
  return (Array.isArray(v) ? v : [v]) as T[];
}

function child(node: XmlNode | undefined, tag: string): XmlNode | undefined {
  const v = node?.[tag];
  const first = Array.isArray(v) ? v[0] : v;
  return first !== null && typeof first === 'object' ? (first as XmlNode) : undefined;
}

function attr(node: XmlNode | undefined, name: string): string | undefined {
  const v = node?.[ATTR + name];
  return v === undefined ? undefined : String(v);
}

function text(node: unknown): string | undefined {
  if (node === undefined || node === null) return undefined;
  if (typeof node === 'string' || typeof node === 'number') return String(node);
  if (typeof node === 'object') {
    const t = (node as XmlNode)['#text'];
    return t === undefined ? undefined : String(t);
  }
  return undefined;
}

/** The NIC element libvirt needs for QEMU user networking (slirp) with a virtio (or given) model. */
export function interfaceNode(nic: NicSpec): XmlNode {
  return {
    [ATTR + 'type']: 'user',
    mac: { [ATTR + 'address']: nic.mac },
    model: { [ATTR + 'type']: nic.model ?? 'virtio' },
  };
}

/** The virtio-serial port qemu-guest-agent listens on in the guest. */
export const GUEST_AGENT_CHANNEL = 'org.qemu.guest_agent.0';

/** A unix channel for qemu-guest-agent; libvirt picks the host socket's path (per domain). */
function guestAgentChannelNode(): XmlNode {
  return {
    [ATTR + 'type']: 'unix',
    target: { [ATTR + 'type']: 'virtio', [ATTR + 'name']: GUEST_AGENT_CHANNEL },
  };
}

/** Whether a domain XML has the qemu-guest-agent channel. */
export function hasGuestAgentChannel(xml: string, what = 'domain XML'): boolean {
  const d = domainRoot(parseXml(xml, what), what);
  return asArray(child(d, 'devices')?.channel).some((c) => attr(child(c, 'target'), 'name') === GUEST_AGENT_CHANNEL);
}

/** `<interface>` XML for virsh attach-device / detach-device. */
export function interfaceXml(nic: NicSpec): string {
  return buildXml({ interface: interfaceNode(nic) });
}

export const DEFAULT_CPU_MODEL = 'qemu64';

/**
 * The default machine type: q35. A NIC replug (ACPI hot-unplug and hot-plug of a PCI device)
 * makes the guest kernel look up the device's legacy interrupt in the ACPI _PRT of the root bus,
 * once on unplug and once on plug. On `pc` (i440fx) QEMU builds that table with an AML loop over
 * 128 entries, which the guest's ACPI interpreter runs in ~0.2-0.3 s under TCG, each time; on q35
 * it is a static package. Measured: unplug 0.4 s on pc vs 0.2 s on q35 (docs/hypervisor.md).
 */
export const DEFAULT_MACHINE = 'q35';

/**
 * The domain XML for a spec: direct kernel boot, one disk, one user NIC, serial console to a file.
 * No USB controller (libvirt would add one the guest never uses: one device less to start, save and
 * restore). On q35 libvirt puts each PCIe device on its own pcie-root-port and adds one spare port,
 * so a hot-plugged NIC has a slot (a replug frees the old NIC's port first).
 */
export function buildDomainXml(spec: DomainSpec, virtType: VirtType): string {
  const os: XmlNode = {
    type: { [ATTR + 'arch']: 'x86_64', [ATTR + 'machine']: spec.machine ?? DEFAULT_MACHINE, '#text': 'hvm' },
    kernel: spec.kernel,
  };
  if (spec.initrd !== undefined) os.initrd = spec.initrd;
  if (spec.cmdline !== undefined) os.cmdline = spec.cmdline;
  const domain: XmlNode = {
    [ATTR + 'type']: virtType,
    name: spec.name,
  };
  if (spec.uuid !== undefined) domain.uuid = spec.uuid;
  Object.assign(domain, {
    memory: { [ATTR + 'unit']: 'MiB', '#text': String(spec.memoryMiB) },
    vcpu: String(spec.vcpus),
    os,
    features: { acpi: '' },
    cpu: {
      [ATTR + 'mode']: 'custom',
      [ATTR + 'match']: 'exact',
      model: { [ATTR + 'fallback']: 'forbid', '#text': spec.cpuModel ?? DEFAULT_CPU_MODEL },
    },
    clock: { [ATTR + 'offset']: 'utc' },
    on_poweroff: 'destroy',
    on_reboot: 'destroy',
    on_crash: 'destroy',
    devices: {
      disk: {
        [ATTR + 'type']: 'file',
        [ATTR + 'device']: 'disk',
        driver: { [ATTR + 'name']: 'qemu', [ATTR + 'type']: spec.disk.format, [ATTR + 'discard']: 'unmap' },
        source: { [ATTR + 'file']: spec.disk.path },
        target: { [ATTR + 'dev']: 'vda', [ATTR + 'bus']: 'virtio' },
      },
      interface: interfaceNode(spec.nic),
      serial: {
        [ATTR + 'type']: 'file',
        source: { [ATTR + 'path']: spec.serialPath, [ATTR + 'append']: 'on' },
        target: { [ATTR + 'port']: '0' },
      },
      ...(spec.guestAgent ? { channel: guestAgentChannelNode() } : {}),
      controller: { [ATTR + 'type']: 'usb', [ATTR + 'model']: 'none' },
      memballoon: spec.balloon
        ? { [ATTR + 'model']: 'virtio', [ATTR + 'freePageReporting']: spec.balloon.freePageReporting ? 'on' : 'off' }
        : { [ATTR + 'model']: 'none' },
    },
  });
  // features/acpi is an empty element: keep it (suppressEmptyNode writes <acpi/>).
  return buildXml({ domain });
}

export interface DiskInfo {
  target: string;
  path: string;
  format: string | undefined;
}

export interface InterfaceInfo {
  type: string;
  mac: string | undefined;
  model: string | undefined;
  /** libvirt's device alias (live XML only), e.g. "net0"; QEMU's netdev id is "host" + alias. */
  alias: string | undefined;
}

export interface DomainXmlInfo {
  name: string;
  uuid: string | undefined;
  virtType: string;
  memoryKiB: number | undefined;
  cpuModel: string | undefined;
  /** Direct kernel boot files. */
  kernel: string | undefined;
  initrd: string | undefined;
  disks: DiskInfo[];
  interfaces: InterfaceInfo[];
  serialPaths: string[];
}

function domainRoot(doc: XmlNode, what: string): XmlNode {
  const d = child(doc, 'domain');
  if (!d) {
    throw new CloudletError('CORRUPT', `${what} has no <domain> root element`, {
      fix: 'pass a libvirt domain XML (virsh dumpxml or a save file header)',
    });
  }
  return d;
}

function toKiB(value: number, unit: string | undefined): number {
  const u = (unit ?? 'KiB').toLowerCase();
  const f: Record<string, number> = { b: 1 / 1024, bytes: 1 / 1024, k: 1, kib: 1, kb: 1000 / 1024, m: 1024, mib: 1024, mb: 1e6 / 1024, g: 1048576, gib: 1048576, gb: 1e9 / 1024 };
  return Math.round(value * (f[u] ?? 1));
}

export function parseDomainXml(xml: string, what = 'domain XML'): DomainXmlInfo {
  const d = domainRoot(parseXml(xml, what), what);
  const name = text(d.name);
  if (!name) throw new CloudletError('CORRUPT', `${what} has no <name>`, { fix: 'pass a complete libvirt domain XML' });
  const devices = child(d, 'devices');
  const mem = child(d, 'memory') ?? (d.memory !== undefined ? { '#text': d.memory } : undefined);
  const memText = text(mem);
  const disks: DiskInfo[] = asArray(devices?.disk)
    .filter((x) => (attr(x, 'device') ?? 'disk') === 'disk')
    .map((x) => ({
      target: attr(child(x, 'target'), 'dev') ?? '',
      path: attr(child(x, 'source'), 'file') ?? attr(child(x, 'source'), 'dev') ?? '',
      format: attr(child(x, 'driver'), 'type'),
    }));
  const interfaces: InterfaceInfo[] = asArray(devices?.interface).map((x) => ({
    type: attr(x, 'type') ?? '',
    mac: attr(child(x, 'mac'), 'address'),
    model: attr(child(x, 'model'), 'type'),
    alias: attr(child(x, 'alias'), 'name'),
  }));
  const serialPaths = asArray(devices?.serial)
    .filter((x) => attr(x, 'type') === 'file')
    .map((x) => attr(child(x, 'source'), 'path'))
    .filter((p): p is string => p !== undefined);
  return {
    name,
    uuid: text(d.uuid),
    virtType: attr(d, 'type') ?? '',
    memoryKiB: memText === undefined ? undefined : toKiB(Number(memText), attr(mem, 'unit')),
    cpuModel: text(child(d, 'cpu')?.model),
    kernel: text(child(d, 'os')?.kernel),
    initrd: text(child(d, 'os')?.initrd),
    disks,
    interfaces,
    serialPaths,
  };
}

export interface DomainXmlEdits {
  /** New source file for the disk with target `diskTarget` (default: the first disk). */
  diskPath?: string;
  diskTarget?: string;
  /** New format of that disk (e.g. qcow2 when a raw base disk becomes a qcow2 layer over it). */
  diskFormat?: DiskFormat;
  /** New path for every file-backed serial port (and console) of the domain. */
  serialPath?: string;
  name?: string;
  uuid?: string;
  /**
   * Guest RAM in a shared file (libvirt's `<memoryBacking><source type='file'/><access
   * mode='shared'/>`, under qemu.conf's memory_backing_dir): the host can read it while the VM runs,
   * and a migration with QEMU's `x-ignore-shared` carries only the device state (docs/handoff.md).
   * A restore may add it to a save made without it (the RAM block keeps its id, pc.ram).
   */
  sharedMemory?: boolean;
  /**
   * true: QEMU starts waiting for an incoming migration (`-incoming defer`, a `<qemu:commandline>`
   * argument; libvirt marks the domain tainted); false: that argument is removed if present.
   */
  incomingDefer?: boolean;
  /** New MAC address of the first network interface. */
  mac?: string;
  /**
   * true: the guest RAM is allocated when QEMU starts (`<allocation mode='immediate'/>`), not page
   * by page as the guest or an incoming stream first touches it: a warm pool's VM pays that ahead.
   * false: that setting is removed.
   */
  preallocate?: boolean;
}

const QEMU_NS = 'http://libvirt.org/schemas/domain/qemu/1.0';

/** The `-incoming defer` pair among a domain's `<qemu:commandline>` arguments. */
function setIncomingDefer(d: XmlNode, on: boolean): void {
  const cmd = child(d, 'qemu:commandline');
  const args = asArray(cmd?.['qemu:arg']).filter((a, i, all) => {
    const v = attr(a, 'value');
    const prev = i > 0 ? attr(all[i - 1], 'value') : undefined;
    return !(v === '-incoming' && attr(all[i + 1], 'value') === 'defer') && !(v === 'defer' && prev === '-incoming');
  });
  if (on) args.push({ [ATTR + 'value']: '-incoming' }, { [ATTR + 'value']: 'defer' });
  if (args.length === 0) {
    delete d['qemu:commandline'];
    return;
  }
  d[ATTR + 'xmlns:qemu'] = QEMU_NS;
  d['qemu:commandline'] = { ...(cmd ?? {}), 'qemu:arg': args };
}

/** Returns the domain XML with the edits applied; everything else is kept. */
export function editDomainXml(xml: string, edits: DomainXmlEdits, what = 'domain XML'): string {
  const doc = parseXml(xml, what);
  const d = domainRoot(doc, what);
  if (edits.name !== undefined) d.name = edits.name;
  if (edits.uuid !== undefined) d.uuid = edits.uuid;
  const devices = child(d, 'devices');
  if (edits.diskPath !== undefined) {
    const disks = asArray(devices?.disk).filter((x) => (attr(x, 'device') ?? 'disk') === 'disk');
    const disk = edits.diskTarget === undefined ? disks[0] : disks.find((x) => attr(child(x, 'target'), 'dev') === edits.diskTarget);
    if (!disk) {
      throw new CloudletError('BAD_INPUT', `${what} has no disk${edits.diskTarget ? ` with target ${edits.diskTarget}` : ''} to point at ${edits.diskPath}`, {
        fix: 'restore a save file of a domain with a file-backed disk',
      });
    }
    const source = child(disk, 'source');
    if (source) {
      delete source[ATTR + 'dev'];
      source[ATTR + 'file'] = edits.diskPath;
    } else {
      disk.source = { [ATTR + 'file']: edits.diskPath };
    }
    disk[ATTR + 'type'] = 'file';
    // The saved XML describes the old image's backing chain (for a raw disk an explicit empty
    // <backingStore/>, i.e. "none"); drop it so libvirt reads the new image's own chain.
    delete disk.backingStore;
    if (edits.diskFormat !== undefined) {
      const driver = child(disk, 'driver');
      if (driver) driver[ATTR + 'type'] = edits.diskFormat;
      else disk.driver = { [ATTR + 'name']: 'qemu', [ATTR + 'type']: edits.diskFormat };
    }
  }
  if (edits.name !== undefined) {
    // libvirt names a unix channel's host socket after the domain (…/domain-N-<name>/…): a path
    // saved with another domain's name would point into a directory that no longer exists.
    for (const c of asArray(devices?.channel)) {
      if (attr(c, 'type') !== 'unix') continue;
      const source = child(c, 'source');
      if (source && /\/var\/lib\/libvirt\/qemu\/channel\/target\//.test(attr(source, 'path') ?? '')) delete c.source;
    }
  }
  if (edits.serialPath !== undefined) {
    for (const tag of ['serial', 'console']) {
      for (const s of asArray(devices?.[tag])) {
        if (attr(s, 'type') !== 'file') continue;
        const source = child(s, 'source');
        if (source) source[ATTR + 'path'] = edits.serialPath;
      }
    }
  }
  if (edits.sharedMemory) {
    const mb = child(d, 'memoryBacking') ?? {};
    mb.source = { [ATTR + 'type']: 'file' };
    mb.access = { [ATTR + 'mode']: 'shared' };
    d.memoryBacking = mb;
  }
  if (edits.preallocate) {
    const mb = child(d, 'memoryBacking') ?? {};
    mb.allocation = { [ATTR + 'mode']: 'immediate' };
    d.memoryBacking = mb;
  } else if (edits.preallocate === false) {
    // A warm pool's VM preallocates; the VMs restored from its saves need not.
    const mb = child(d, 'memoryBacking');
    if (mb) delete mb.allocation;
  }
  if (edits.incomingDefer !== undefined) setIncomingDefer(d, edits.incomingDefer);
  if (edits.mac !== undefined) {
    const nic = asArray(devices?.interface)[0];
    if (!nic) throw new CloudletError('BAD_INPUT', `${what} has no network interface to give MAC ${edits.mac}`, { fix: 'edit the MAC of a domain with a NIC' });
    nic.mac = { [ATTR + 'address']: edits.mac };
  }
  return buildXml(doc);
}

/** The guest memory a domain XML configures (`<memory>`) and its balloon's size (`<currentMemory>`, else the same). */
export function memorySizes(xml: string, what = 'domain XML'): { maxBytes: number; currentBytes: number } | undefined {
  const d = domainRoot(parseXml(xml, what), what);
  const read = (node: unknown): number | undefined => {
    const t = text(node);
    return t === undefined ? undefined : toKiB(Number(t), attr(node as XmlNode, 'unit')) * 1024;
  };
  const max = read(d.memory);
  if (max === undefined || !Number.isFinite(max)) return undefined;
  const cur = read(d.currentMemory);
  return { maxBytes: max, currentBytes: cur !== undefined && Number.isFinite(cur) ? cur : max };
}

/** Whether the domain's RAM is a shared file (see DomainXmlEdits.sharedMemory). */
export function hasSharedMemory(xml: string, what = 'domain XML'): boolean {
  const mb = child(domainRoot(parseXml(xml, what), what), 'memoryBacking');
  return attr(child(mb, 'source'), 'type') === 'file' && attr(child(mb, 'access'), 'mode') === 'shared';
}

/** The `<interface>` elements of a (live) domain XML, as XML strings usable with detach-device. */
export function interfaceElements(xml: string, what = 'domain XML'): { info: InterfaceInfo; xml: string }[] {
  const d = domainRoot(parseXml(xml, what), what);
  const devices = child(d, 'devices');
  return asArray(devices?.interface).map((x) => ({
    info: {
      type: attr(x, 'type') ?? '',
      mac: attr(child(x, 'mac'), 'address'),
      model: attr(child(x, 'model'), 'type'),
      alias: attr(child(x, 'alias'), 'name'),
    },
    xml: buildXml({ interface: x }),
  }));
}

const MAC = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i;

export function isValidMac(mac: string): boolean {
  // Unicast (bit 0 of the first octet clear).
  return MAC.test(mac) && (parseInt(mac.slice(0, 2), 16) & 1) === 0;
}
