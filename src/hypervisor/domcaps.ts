/**
 * CPU models from `virsh domcapabilities` (XML) and the verdict on one model. Pure functions.
 */
import { CloudletError } from '../core/errors';
import { asArray, parseXml, type XmlNode } from './domain-xml';
import type { VirtType } from './types';

export interface CpuModelInfo {
  name: string;
  usable: boolean;
  vendor: string | undefined;
  /** Features libvirt names as blocking this model (libvirt >= 10 lists them in domcapabilities). */
  blockers: string[];
}

export interface DomainCapabilities {
  virtType: string;
  machine: string | undefined;
  emulator: string | undefined;
  cpuModels: CpuModelInfo[];
  hostModel: string | undefined;
}

function obj(v: unknown): XmlNode | undefined {
  const first = Array.isArray(v) ? v[0] : v;
  return first !== null && typeof first === 'object' ? (first as XmlNode) : undefined;
}

function str(v: unknown): string | undefined {
  if (typeof v === 'string' || typeof v === 'number') return String(v);
  const o = obj(v);
  const t = o?.['#text'];
  return t === undefined ? undefined : String(t);
}

export function parseDomainCapabilities(xml: string): DomainCapabilities {
  const root = obj(parseXml(xml, 'virsh domcapabilities output').domainCapabilities);
  if (!root) {
    throw new CloudletError('HYPERVISOR', 'virsh domcapabilities returned no <domainCapabilities> element', {
      fix: 'check that libvirtd and QEMU work: virsh -c qemu:///system domcapabilities',
    });
  }
  const modes = asArray(obj(root.cpu)?.mode);
  const custom = modes.find((m) => m['@_name'] === 'custom');
  const hostModel = modes.find((m) => m['@_name'] === 'host-model');
  const blockersByModel = new Map<string, string[]>();
  for (const b of asArray(custom?.blockers)) {
    const model = String(b['@_model'] ?? '');
    blockersByModel.set(model, asArray(b.feature).map((f) => String(f['@_name'] ?? '')).filter(Boolean));
  }
  const cpuModels = asArray<unknown>(custom?.model).map((m): CpuModelInfo => {
    const name = str(m) ?? '';
    const node = obj(m);
    return {
      name,
      usable: node?.['@_usable'] === 'yes',
      vendor: node?.['@_vendor'] === undefined ? undefined : String(node['@_vendor']),
      blockers: blockersByModel.get(name) ?? [],
    };
  });
  return {
    virtType: str(root.domain) ?? '',
    machine: str(root.machine),
    emulator: str(root.path),
    cpuModels,
    hostModel: str(hostModel?.model),
  };
}

/** Names of the models usable for this virt type, in libvirt's order. */
export function usableModels(caps: DomainCapabilities): string[] {
  return caps.cpuModels.filter((m) => m.usable).map((m) => m.name);
}

/** Preferred suggestions first (common, generic models), then the rest. */
const PREFERRED = ['qemu64', 'kvm64', 'Nehalem', 'Westmere', 'Penryn', 'Opteron_G2', 'core2duo'];

export function suggestModels(caps: DomainCapabilities, max = 5): string[] {
  const usable = usableModels(caps);
  const preferred = PREFERRED.filter((m) => usable.includes(m));
  const rest = usable.filter((m) => !preferred.includes(m)).reverse(); // libvirt lists newest first
  return [...preferred, ...rest].slice(0, max);
}

/**
 * Throws CPU_MODEL_UNUSABLE unless `model` is listed usable='yes'. `missingFeatures` are the
 * features libvirt reported as missing (from hypervisor-cpu-compare) when domcapabilities has no
 * blockers of its own.
 */
export function assertCpuModelUsable(caps: DomainCapabilities, model: string, virtType: VirtType, missingFeatures: string[] = []): void {
  const info = caps.cpuModels.find((m) => m.name === model);
  const suggestions = suggestModels(caps);
  const fix = `use a usable model such as ${suggestions.join(', ') || '(none listed)'} (see virsh domcapabilities --virttype ${virtType})`;
  if (!info) {
    throw new CloudletError('CPU_MODEL_UNUSABLE', `CPU model "${model}" is unknown to libvirt/QEMU for virt type ${virtType}`, {
      fix,
      details: { model, virtType, suggestions },
    });
  }
  if (info.usable) return;
  const features = info.blockers.length > 0 ? info.blockers : missingFeatures;
  const why = features.length > 0 ? `; the host/hypervisor lacks: ${features.join(', ')}` : '';
  throw new CloudletError('CPU_MODEL_UNUSABLE', `CPU model "${model}" is not usable with virt type ${virtType} on this host${why}`, {
    fix,
    details: { model, virtType, missingFeatures: features, suggestions },
  });
}

/** Features named by `virsh hypervisor-cpu-compare --error` ("... does not provide required features: a, b"). */
export function parseMissingFeatures(message: string): string[] {
  const m = /required features?:\s*([^\n]+)/i.exec(message);
  if (!m?.[1]) return [];
  return m[1].split(',').map((s) => s.trim()).filter((s) => /^[\w.-]+$/.test(s));
}
