/**
 * An in-memory Hypervisor for unit tests of the layers above (activities, CLI): domains are
 * records, a save writes a small JSON file (so copies and paths behave like real save files),
 * and every call is recorded in `calls`. No VM runs; forwarded ports are not bound.
 */
import fs from 'node:fs';
import path from 'node:path';
import { CloudletError } from '../core/errors';
import { assertCpuModelUsable, type DomainCapabilities } from './domcaps';
import { isValidMac } from './domain-xml';
import { waitForSerialLine } from './serial';
import type { DomainSpec, DomainState, ForwardResult, GuestExecOptions, GuestExecResult, Hypervisor, NicSpec, RamImage, ReplugResult, RestoreIncomingResult, RestoreOptions, RestoreResult, SaveFeed, SharedRam, SnapshotDiskResult, StreamMemoryOptions, StreamMemoryResult, VirtType } from './types';

interface FakeDomain {
  spec: DomainSpec;
  state: Exclude<DomainState, 'absent'>;
  persistent: boolean;
  /** Paused by a completed streamMemory (QEMU's postmigrate): a second stream needs a resume first. */
  postmigrate?: boolean;
}

const SAVE_MAGIC = 'cloudlet-fake-save';

export interface FakeOptions {
  virtType?: VirtType;
  usableCpuModels?: string[];
  /** Lines appended to the domain's serial file when it starts or is restored (e.g. a ready line). */
  onStartSerialLines?: (spec: DomainSpec) => string[];
  /** What a command run through the guest agent does (domains defined with guestAgent only). */
  onGuestExec?: (domain: string, options: GuestExecOptions) => Omit<GuestExecResult, 'ms'>;
}

export class FakeHypervisor implements Hypervisor {
  readonly domains = new Map<string, FakeDomain>();
  readonly calls: { op: string; args: unknown[] }[] = [];
  private nextPort = 20000;

  constructor(private readonly options: FakeOptions = {}) {}

  private record(op: string, ...args: unknown[]): void {
    this.calls.push({ op, args });
  }

  private get(name: string, op: string): FakeDomain {
    const d = this.domains.get(name);
    if (!d) throw new CloudletError('NOT_FOUND', `domain "${name}" is not defined on fake:/// (${op})`, { fix: 'define or restore the domain first' });
    return d;
  }

  private emitSerial(spec: DomainSpec): void {
    const lines = this.options.onStartSerialLines?.(spec) ?? [];
    if (lines.length) fs.appendFileSync(spec.serialPath, lines.map((l) => `${l}\r\n`).join(''));
  }

  async virtType(): Promise<VirtType> {
    return this.options.virtType ?? 'qemu';
  }

  async defineDomain(spec: DomainSpec): Promise<void> {
    this.record('defineDomain', spec);
    if (!isValidMac(spec.nic.mac)) throw new CloudletError('BAD_INPUT', `"${spec.nic.mac}" is not a unicast MAC address`);
    for (const [what, f] of [['kernel', spec.kernel], ['disk image', spec.disk.path]] as const) {
      if (!fs.existsSync(f)) throw new CloudletError('NOT_FOUND', `${what} of domain "${spec.name}" ${f} does not exist`);
    }
    const existing = this.domains.get(spec.name);
    this.domains.set(spec.name, { spec: { ...spec }, state: existing?.state ?? 'shut off', persistent: true });
  }

  async start(name: string): Promise<void> {
    this.record('start', name);
    const d = this.get(name, 'start');
    if (d.state !== 'shut off') throw new CloudletError('HYPERVISOR', `start of domain "${name}" failed: domain is already active`);
    d.state = 'running';
    this.emitSerial(d.spec);
  }

  async destroy(name: string): Promise<void> {
    this.record('destroy', name);
    const d = this.domains.get(name);
    if (!d) return;
    d.postmigrate = false;
    if (d.persistent) d.state = 'shut off';
    else this.domains.delete(name);
  }

  async undefine(name: string): Promise<void> {
    this.record('undefine', name);
    const d = this.domains.get(name);
    if (!d) return;
    if (d.state === 'shut off') this.domains.delete(name);
    else d.persistent = false;
  }

  async state(name: string): Promise<DomainState> {
    return this.domains.get(name)?.state ?? 'absent';
  }

  readonly balloons = new Map<string, number>();

  async setBalloon(name: string, bytes: number): Promise<void> {
    this.record('setBalloon', name, bytes);
    this.balloons.set(name, bytes);
  }

  async balloon(name: string): Promise<{ actualBytes: number; maxBytes: number }> {
    const max = (this.domains.get(name)?.spec.memoryMiB ?? 0) * 1024 * 1024;
    return { actualBytes: this.balloons.get(name) ?? max, maxBytes: max };
  }

  async listDomains(prefix: string): Promise<string[]> {
    return [...this.domains.keys()].filter((n) => n.startsWith(prefix)).sort();
  }

  async suspend(name: string): Promise<void> {
    this.record('suspend', name);
    this.get(name, 'suspend').state = 'paused';
  }

  async resume(name: string): Promise<void> {
    this.record('resume', name);
    const d = this.get(name, 'resume');
    d.state = 'running';
    d.postmigrate = false;
  }

  async domainXml(name: string): Promise<string> {
    return JSON.stringify(this.get(name, 'dumpxml').spec);
  }

  async save(name: string, file: string): Promise<{ ms: number }> {
    this.record('save', name, file);
    const d = this.get(name, 'save');
    if (d.state === 'shut off') throw new CloudletError('HYPERVISOR', `save of domain "${name}" failed: domain is not running`);
    if (d.postmigrate) throw new CloudletError('HYPERVISOR', `save of domain "${name}" failed: Can't migrate the vm that was paused due to previous migration`);
    fs.writeFileSync(file, JSON.stringify({ magic: SAVE_MAGIC, spec: d.spec }));
    d.state = 'shut off';
    if (!d.persistent) this.domains.delete(name);
    return { ms: 1 };
  }

  private readSave(file: string): DomainSpec {
    if (!fs.existsSync(file)) throw new CloudletError('NOT_FOUND', `save file ${file} does not exist`);
    const parsed = JSON.parse(fs.readFileSync(file, 'utf8')) as { magic?: string; spec?: DomainSpec };
    if (parsed.magic !== SAVE_MAGIC || !parsed.spec) throw new CloudletError('CORRUPT', `${file} is not a save file of the fake hypervisor`);
    return parsed.spec;
  }

  async saveFileXml(file: string): Promise<string> {
    return JSON.stringify(this.readSave(file));
  }

  /** The fake's domains keep no RAM file: handoffs take the stream-only path. */
  async sharedRamFile(name: string): Promise<SharedRam | undefined> {
    this.record('sharedRamFile', name);
    return undefined;
  }

  async restoreIncoming(file: string, ram: RamImage, options: { paused?: boolean } = {}): Promise<RestoreIncomingResult> {
    this.record('restoreIncoming', file, ram.path);
    const r = await this.restore(file, options.paused ? { paused: true } : {});
    return { ...r, startMs: 0, fillMs: 0, incomingMs: 0 };
  }

  async startIncoming(xml: string): Promise<{ name: string; ramFile: SharedRam; ms: number }> {
    this.record('startIncoming', xml.length);
    throw new CloudletError('HYPERVISOR', 'the fake hypervisor keeps no guest RAM in files', { fix: 'use the libvirt adapter' });
  }

  async completeIncoming(name: string, file: string): Promise<{ ms: number }> {
    this.record('completeIncoming', name, file);
    throw new CloudletError('HYPERVISOR', 'the fake hypervisor keeps no guest RAM in files', { fix: 'use the libvirt adapter' });
  }

  async listenIncoming(name: string): Promise<void> {
    this.record('listenIncoming', name);
    throw new CloudletError('HYPERVISOR', 'the fake hypervisor keeps no guest RAM in files', { fix: 'use the libvirt adapter' });
  }

  feedIncoming(name: string): SaveFeed {
    this.record('feedIncoming', name);
    return {
      write: async () => undefined,
      complete: async () => {
        throw new CloudletError('HYPERVISOR', 'the fake hypervisor keeps no guest RAM in files', { fix: 'use the libvirt adapter' });
      },
      close: async () => undefined,
    };
  }

  async restore(file: string, options: RestoreOptions = {}): Promise<RestoreResult> {
    this.record('restore', file, options);
    const saved = this.readSave(file);
    const spec: DomainSpec = {
      ...saved,
      disk: { ...saved.disk, path: options.diskPath ?? saved.disk.path },
      serialPath: options.serialPath ?? saved.serialPath,
    };
    if (!fs.existsSync(spec.disk.path)) throw new CloudletError('NOT_FOUND', `disk image of domain "${spec.name}" ${spec.disk.path} does not exist`);
    const existing = this.domains.get(spec.name);
    if (existing && existing.state !== 'shut off') throw new CloudletError('HYPERVISOR', `restore of domain "${spec.name}" failed: domain is already active`);
    this.domains.set(spec.name, { spec, state: options.paused ? 'paused' : 'running', persistent: existing?.persistent ?? false });
    return { name: spec.name, ms: 1 };
  }

  async replugNic(name: string, nic: NicSpec): Promise<ReplugResult> {
    this.record('replugNic', name, nic);
    const d = this.get(name, 'replug');
    if (d.state !== 'running') throw new CloudletError('CONFLICT', `domain "${name}" is ${d.state}; a NIC can only be replugged in a running guest`);
    const oldMac = d.spec.nic.mac;
    d.spec = { ...d.spec, nic: { ...nic, mac: nic.mac.toLowerCase() } };
    return { oldMac, newMac: nic.mac.toLowerCase(), detachMs: 1, attachMs: 1 };
  }

  async forwardPort(name: string, options: { hostPort?: number; guestPort: number }): Promise<ForwardResult> {
    this.record('forwardPort', name, options);
    if (this.get(name, 'forward').state !== 'running') throw new CloudletError('CONFLICT', `domain "${name}" is not running`);
    return { hostPort: options.hostPort ?? this.nextPort++, guestPort: options.guestPort, hostAddress: '127.0.0.1' };
  }

  async unforwardPort(name: string, hostPort: number): Promise<void> {
    this.record('unforwardPort', name, { hostPort });
    if (this.get(name, 'remove a forward').state !== 'running') throw new CloudletError('CONFLICT', `domain "${name}" is not running`);
  }

  private caps(virtType: VirtType): DomainCapabilities {
    const usable = this.options.usableCpuModels ?? ['qemu64', 'kvm64'];
    return {
      virtType, machine: 'pc', emulator: undefined, hostModel: undefined,
      cpuModels: [...usable.map((name) => ({ name, usable: true, vendor: undefined, blockers: [] })),
        { name: 'Haswell', usable: false, vendor: 'Intel', blockers: ['pcid', 'x2apic'] }],
    };
  }

  async checkCpuModel(model: string, virtType?: VirtType): Promise<void> {
    this.record('checkCpuModel', model, virtType);
    const t = virtType ?? (await this.virtType());
    assertCpuModelUsable(this.caps(t), model, t);
  }

  async usableCpuModels(virtType?: VirtType): Promise<string[]> {
    return this.caps(virtType ?? (await this.virtType())).cpuModels.filter((m) => m.usable).map((m) => m.name);
  }

  async hasGuestAgent(name: string): Promise<boolean> {
    return this.get(name, 'hasGuestAgent').spec.guestAgent === true;
  }

  async waitForGuestAgent(name: string, _timeoutMs: number): Promise<{ waitedMs: number }> {
    this.record('waitForGuestAgent', name);
    const d = this.get(name, 'waitForGuestAgent');
    if (!d.spec.guestAgent) throw new CloudletError('CONFLICT', `domain "${name}" has no qemu-guest-agent channel`);
    if (d.state !== 'running') throw new CloudletError('TIMEOUT', `qemu-guest-agent of "${name}" did not answer (the domain is ${d.state})`);
    return { waitedMs: 0 };
  }

  async guestExec(name: string, options: GuestExecOptions): Promise<GuestExecResult> {
    this.record('guestExec', name, options);
    await this.waitForGuestAgent(name, options.timeoutMs);
    const r = this.options.onGuestExec?.(name, options) ?? { exitCode: 0, stdout: '', stderr: '' };
    return { ...r, ms: 0 };
  }

  private active(name: string, op: string): FakeDomain {
    const d = this.get(name, op);
    if (d.state === 'shut off') throw new CloudletError('CONFLICT', `domain "${name}" is shut off; ${op} needs a running or paused domain`);
    return d;
  }

  async diskTop(name: string): Promise<string> {
    return path.resolve(this.get(name, 'diskTop').spec.disk.path);
  }

  /** Writes a small JSON stand-in for the qcow2 top (naming its backing file) and points vda at it. */
  async snapshotDisk(name: string, newTopPath: string): Promise<SnapshotDiskResult> {
    this.record('snapshotDisk', name, newTopPath);
    const d = this.get(name, 'snapshotDisk');
    const abs = path.resolve(newTopPath);
    if (fs.existsSync(abs)) throw new CloudletError('CONFLICT', `the new disk top ${abs} for domain "${name}" already exists`);
    const previousTop = path.resolve(d.spec.disk.path);
    fs.writeFileSync(abs, JSON.stringify({ format: 'qcow2', backing: previousTop }));
    d.spec = { ...d.spec, disk: { path: abs, format: 'qcow2' } };
    return { previousTop, ms: 1 };
  }

  /** Writes a fake save file (restore accepts it); the domain ends paused as after a real stream. */
  async streamMemory(name: string, outPath: string, options: StreamMemoryOptions = {}): Promise<StreamMemoryResult> {
    this.record('streamMemory', name, outPath);
    const d = this.active(name, 'a memory stream');
    if (d.postmigrate) throw new CloudletError('CONFLICT', `QEMU refuses to stream the memory of domain "${name}" again: it is paused after a completed memory stream`);
    const wasRunning = d.state === 'running';
    const abs = path.resolve(outPath);
    fs.writeFileSync(`${abs}.tmp`, JSON.stringify({ magic: SAVE_MAGIC, spec: d.spec }));
    fs.renameSync(`${abs}.tmp`, abs);
    d.state = 'paused';
    d.postmigrate = true;
    const bytes = fs.statSync(abs).size;
    options.onProgress?.(bytes);
    return { bytes, ms: 1, downtimeMs: wasRunning ? 1 : 0, wasRunning };
  }

  /** A file of `bytes` zero bytes (sparse): the fake has no guest memory. */
  async pmemsave(name: string, outPath: string, bytes: number): Promise<void> {
    this.record('pmemsave', name, outPath, bytes);
    this.active(name, 'pmemsave');
    if (!Number.isSafeInteger(bytes) || bytes <= 0) throw new CloudletError('BAD_INPUT', `pmemsave of domain "${name}" needs a positive byte count (got ${bytes})`);
    fs.writeFileSync(outPath, Buffer.alloc(0));
    fs.truncateSync(outPath, bytes);
  }

  waitForSerialLine(file: string, pattern: RegExp, timeoutMs: number, fromByte = 0): Promise<string> {
    return waitForSerialLine(file, pattern, timeoutMs, fromByte);
  }

  async close(): Promise<void> {}
}
