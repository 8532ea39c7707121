/**
 * The libvirt implementation of the Hypervisor adapter: the @unraid/libvirt native addon where
 * it covers a call, virsh (execFile) where it does not. See docs/hypervisor.md.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type pino from 'pino';
import { CloudletError } from '../core/errors';
import { encodeSaveHeader, readSaveHeader } from '../core/snapshot/header';
import { createLogger } from '../common/logger';
import { assertCpuModelUsable, parseDomainCapabilities, parseMissingFeatures, usableModels, type DomainCapabilities } from './domcaps';
import { buildDomainXml, buildXml, editDomainXml, hasGuestAgentChannel, interfaceElements, interfaceXml, isValidMac, parseDomainXml } from './domain-xml';
import { guestExec, type AgentSend } from './guest-agent';
import { virtTypeVerdict } from './kvm';
import { migrateToFile, saveCookieXml } from './memory-stream';
import { IncomingFeed, listenIncoming, migrateFromFile } from './incoming-stream';
import { fillRamFile } from './ram-file';
import { nativeMessage, openHypervisor, type NativeDomain, type NativeHypervisor } from './native';
import { parseQmpReply, QmpError, type QmpBatch, type QmpSend } from './qmp';
import { waitForSerialLine } from './serial';
import type { DomainSpec, DomainState, ForwardResult, GuestExecOptions, GuestExecResult, Hypervisor, NicSpec, RamImage, ReplugResult, RestoreIncomingResult, RestoreOptions, RestoreResult, SaveFeed, SharedRam, SnapshotDiskResult, StreamMemoryOptions, StreamMemoryResult, VirtType } from './types';
import { runVirsh, VirshError } from './virsh';

export const DEFAULT_URI = 'qemu:///system';
const START_FIX = 'start it with: bash infra/libvirt.sh start (then check: virsh -c qemu:///system version)';
const NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
/** virDomainXMLFlags: what libvirt's own save writes into the header (secure + migratable). */
const XML_SECURE = 1;
const XML_MIGRATABLE = 8;
/** The disk the handoff primitives work on. */
const HANDOFF_DISK = 'vda';

export interface LibvirtOptions {
  uri?: string;
  logger?: pino.Logger;
  /** How long a NIC unplug may take before replugNic gives up (the guest must acknowledge it). */
  detachTimeoutMs?: number;
}

const since = (t0: number): number => Math.round(performance.now() - t0);

function isUnavailable(msg: string): boolean {
  return /Failed to connect socket|failed to connect to the hypervisor|Connection refused|libvirt-sock|no connection driver|client socket is closed|Cannot recv data|Cannot write data|End of file while reading/i.test(msg);
}

function isNoDomain(msg: string): boolean {
  return /Domain not found|no domain with matching name|failed to get domain/i.test(msg);
}

function assertName(name: string): void {
  if (!NAME.test(name)) {
    throw new CloudletError('BAD_INPUT', `"${name}" is not a valid domain name`, { fix: 'use letters, digits, "-", "_" and "." (at most 64 characters)' });
  }
}

function assertFile(file: string, what: string, fix: string): void {
  if (!fs.existsSync(file)) {
    throw new CloudletError('NOT_FOUND', `${what} ${file} does not exist`, { fix, details: { path: file } });
  }
}

/** A free TCP port on 127.0.0.1 (the OS picks it; tiny race until QEMU binds it). */
export function freeLocalPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

export class LibvirtHypervisor implements Hypervisor {
  readonly uri: string;
  private readonly log: pino.Logger;
  private readonly detachTimeoutMs: number;
  private conn: Promise<NativeHypervisor> | undefined;
  private readonly caps = new Map<VirtType, Promise<DomainCapabilities>>();

  constructor(options: LibvirtOptions = {}) {
    this.uri = options.uri ?? process.env.CLOUDLET_LIBVIRT_URI ?? DEFAULT_URI;
    this.log = options.logger ?? createLogger('hypervisor');
    this.detachTimeoutMs = options.detachTimeoutMs ?? 15000;
  }

  // ---- plumbing -------------------------------------------------------------------------------

  private connection(): Promise<NativeHypervisor> {
    this.conn ??= (async () => {
      let h: NativeHypervisor;
      try {
        h = openHypervisor(this.uri);
      } catch (e) {
        throw new CloudletError('HYPERVISOR_UNAVAILABLE', `the libvirt binding cannot be loaded (${nativeMessage(e)})`, {
          fix: 'reinstall npm dependencies so @unraid/libvirt builds its addon (npm run setup; needs libvirt-dev and build-essential)',
          cause: e,
        });
      }
      try {
        await h.connectOpen();
      } catch (e) {
        throw this.unavailable(nativeMessage(e), e);
      }
      return h;
    })().catch((e: unknown) => {
      this.conn = undefined;
      throw e;
    });
    return this.conn;
  }

  private unavailable(msg: string, cause?: unknown): CloudletError {
    return new CloudletError('HYPERVISOR_UNAVAILABLE', `libvirtd does not answer on ${this.uri} (${msg.trim()})`, { fix: START_FIX, cause });
  }

  /** Maps a libvirt/virsh failure to a CloudletError naming the operation and the domain. */
  private fail(op: string, e: unknown, name?: string): CloudletError {
    if (e instanceof CloudletError) return e;
    const msg = e instanceof VirshError ? e.stderr : nativeMessage(e);
    if (isUnavailable(msg)) {
      this.conn = undefined; // reconnect next time
      return this.unavailable(msg, e);
    }
    if (name !== undefined && isNoDomain(msg)) {
      return new CloudletError('NOT_FOUND', `domain "${name}" is not defined on ${this.uri} (${op})`, {
        fix: 'check the name with `virsh -c qemu:///system list --all`; define or restore the domain first',
        details: { domain: name, operation: op },
        cause: e,
      });
    }
    if (/is already active|already exists with uuid|already defined with uuid/i.test(msg)) {
      return new CloudletError('CONFLICT', `${op}${name ? ` of domain "${name}"` : ''} failed: ${msg.trim()}`, {
        fix: 'destroy the active domain of that name first, or give this VM its own name and UUID (for a save file: in its header)',
        details: { domain: name, operation: op },
        cause: e,
      });
    }
    if (name !== undefined && /cannot acquire state change lock/i.test(msg)) {
      // Usually a long call on the domain still runs; if it lists as "paused (starting up)" with no
      // QEMU, a libvirtd that died while starting it left it so, and only a restart clears it.
      return new CloudletError('HYPERVISOR', `${op} of domain "${name}" failed: ${msg.trim()}`, {
        fix: `retry when the domain's running call ends; if \`virsh -c ${this.uri} domstate --reason ${name}\` says "paused (starting up)", a libvirtd that died while starting it left it behind: restart libvirtd through infra/libvirt.sh, which drops such domains before it starts one (bash infra/libvirt.sh stop && bash infra/libvirt.sh start; a libvirtd started otherwise: kill $(cat /run/libvirtd.pid) first; docs/hypervisor.md)`,
        details: { domain: name, operation: op },
        cause: e,
      });
    }
    return new CloudletError('HYPERVISOR', `${op}${name ? ` of domain "${name}"` : ''} failed: ${msg.trim()}`, {
      fix: `see /var/log/libvirt/qemu/${name ?? '<domain>'}.log and var/libvirt/libvirtd.log`,
      details: { domain: name, operation: op },
      cause: e,
    });
  }

  private async virsh(op: string, args: string[], name?: string): Promise<string> {
    const t0 = performance.now();
    try {
      const out = await runVirsh(this.uri, args);
      this.log.debug({ args, ms: since(t0) }, 'virsh');
      return out;
    } catch (e) {
      throw this.fail(op, e, name);
    }
  }

  private async domain(name: string, op: string): Promise<{ h: NativeHypervisor; d: NativeDomain }> {
    assertName(name);
    const h = await this.connection();
    try {
      return { h, d: await h.domainLookupByName(name) };
    } catch (e) {
      throw this.fail(op, e, name);
    }
  }

  private async withTempFile<T>(content: string, fn: (file: string) => Promise<T>): Promise<T> {
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'cloudlet-hv-'));
    const file = path.join(dir, 'x.xml');
    try {
      await fs.promises.writeFile(file, content);
      return await fn(file);
    } finally {
      await fs.promises.rm(dir, { recursive: true, force: true });
    }
  }

  /** Files a domain XML refers to (kernel, initrd, disks) must exist before libvirt sees them. */
  private assertXmlFiles(xml: string, what: string): void {
    const info = parseDomainXml(xml, what);
    for (const disk of info.disks) {
      if (disk.path) assertFile(disk.path, `disk image of domain "${info.name}" (${disk.target})`, 'create the disk first (copy the base image or qemu-img create -b), or pass the right diskPath');
    }
    for (const [kind, file] of [['kernel', info.kernel], ['initrd', info.initrd]] as const) {
      if (file) assertFile(file, `${kind} of domain "${info.name}"`, 'build the guest (bash infra/guest/build.sh) or pass the right path');
    }
  }

  // ---- Hypervisor -----------------------------------------------------------------------------

  async virtType(): Promise<VirtType> {
    const v = await virtTypeVerdict();
    return v.virtType;
  }

  async defineDomain(spec: DomainSpec): Promise<void> {
    assertName(spec.name);
    if (!isValidMac(spec.nic.mac)) {
      throw new CloudletError('BAD_INPUT', `"${spec.nic.mac}" is not a unicast MAC address`, { fix: 'use six hex octets with an even first octet, e.g. 52:54:00:12:34:56' });
    }
    if (!(spec.memoryMiB >= 16) || !Number.isInteger(spec.vcpus) || spec.vcpus < 1) {
      throw new CloudletError('BAD_INPUT', `domain "${spec.name}" needs memoryMiB >= 16 and vcpus >= 1 (got ${spec.memoryMiB} MiB, ${spec.vcpus} vCPUs)`, { fix: 'correct the domain spec' });
    }
    const fix = 'build the guest (bash infra/guest/build.sh) or pass the right path';
    assertFile(spec.kernel, `kernel of domain "${spec.name}"`, fix);
    if (spec.initrd !== undefined) assertFile(spec.initrd, `initrd of domain "${spec.name}"`, fix);
    assertFile(spec.disk.path, `disk image of domain "${spec.name}"`, 'create the disk first (copy the base image or qemu-img create -b)');
    const virtType = spec.virtType ?? (await this.virtType());
    const xml = buildDomainXml(spec, virtType);
    const h = await this.connection();
    try {
      await h.domainDefineXML(xml);
    } catch (e) {
      throw this.fail('define', e, spec.name);
    }
    this.log.info({ domain: spec.name, virtType }, 'domain defined');
  }

  async start(name: string): Promise<void> {
    const { h, d } = await this.domain(name, 'start');
    this.assertXmlFiles(await h.domainGetXMLDesc(d, 0).catch((e: unknown) => { throw this.fail('start', e, name); }), `domain "${name}"`);
    const t0 = performance.now();
    try {
      await h.domainCreate(d);
    } catch (e) {
      throw this.fail('start', e, name);
    }
    this.log.info({ domain: name, ms: since(t0) }, 'domain started');
  }

  async destroy(name: string): Promise<void> {
    const state = await this.state(name);
    if (state === 'absent' || state === 'shut off') return;
    const { h, d } = await this.domain(name, 'destroy');
    const t0 = performance.now();
    try {
      await h.domainDestroy(d);
    } catch (e) {
      // Stopped (or vanished) between the state check and the call: the goal is reached.
      if (/not running|Domain not found/i.test(nativeMessage(e))) return;
      throw this.fail('destroy', e, name);
    }
    this.log.info({ domain: name, ms: since(t0) }, 'domain destroyed');
  }

  async undefine(name: string): Promise<void> {
    if ((await this.state(name)) === 'absent') return;
    const { h, d } = await this.domain(name, 'undefine');
    try {
      await h.domainUndefine(d);
    } catch (e) {
      // A transient domain (restored without a definition) vanishes when destroyed.
      const msg = nativeMessage(e);
      if (/transient/i.test(msg) || isNoDomain(msg)) return;
      throw this.fail('undefine', e, name);
    }
  }

  async setBalloon(name: string, bytes: number): Promise<void> {
    assertName(name);
    if (!Number.isSafeInteger(bytes) || bytes < 1024 * 1024) {
      throw new CloudletError('BAD_INPUT', `a balloon target for domain "${name}" must be a whole number of bytes of at least 1 MiB (got ${bytes})`, { fix: 'pass the guest memory wanted in bytes' });
    }
    await this.virsh('set the balloon', ['setmem', name, `${Math.floor(bytes / 1024)}KiB`, '--live'], name);
  }

  async balloon(name: string): Promise<{ actualBytes: number; maxBytes: number }> {
    const { h, d } = await this.domain(name, 'read the balloon');
    try {
      const info = await h.domainGetInfo(d);
      // domainGetInfo's memory is the balloon's current size (KiB), maxMem the configured one.
      return { actualBytes: info.memory * 1024, maxBytes: info.maxMem * 1024 };
    } catch (e) {
      throw this.fail('read the balloon', e, name);
    }
  }

  async listDomains(prefix: string): Promise<string[]> {
    const h = await this.connection();
    try {
      // A domain may go between the listing and the lookup: it is then not listed.
      const running = await Promise.all((await h.connectListDomains()).map(async (id) => h.domainLookupByID(id).then((d) => h.domainGetName(d)).catch(() => '')));
      return [...new Set([...running, ...(await h.connectListDefinedDomains())])].filter((n) => n !== '' && n.startsWith(prefix)).sort();
    } catch (e) {
      throw this.fail('list domains', e, prefix);
    }
  }

  async state(name: string): Promise<DomainState> {
    assertName(name);
    const h = await this.connection();
    let d: NativeDomain;
    try {
      d = await h.domainLookupByName(name);
    } catch (e) {
      if (isNoDomain(nativeMessage(e))) return 'absent';
      throw this.fail('state', e, name);
    }
    let info;
    try {
      info = await h.domainGetInfo(d);
    } catch (e) {
      if (isNoDomain(nativeMessage(e))) return 'absent';
      throw this.fail('state', e, name);
    }
    switch (info.state) {
      case 0: // no state (transitional)
      case 1: // running
      case 2: // blocked
      case 4: // shutting down
        return 'running';
      case 3: // paused
      case 7: // pmsuspended
        return 'paused';
      default: // 5 shutoff, 6 crashed
        return 'shut off';
    }
  }

  async suspend(name: string): Promise<void> {
    const { h, d } = await this.domain(name, 'suspend');
    await h.domainSuspend(d).catch((e: unknown) => { throw this.fail('suspend', e, name); });
  }

  async resume(name: string): Promise<void> {
    const { h, d } = await this.domain(name, 'resume');
    await h.domainResume(d).catch((e: unknown) => { throw this.fail('resume', e, name); });
  }

  async domainXml(name: string): Promise<string> {
    const { h, d } = await this.domain(name, 'dumpxml');
    return h.domainGetXMLDesc(d, 0).catch((e: unknown) => { throw this.fail('dumpxml', e, name); });
  }

  async save(name: string, file: string): Promise<{ ms: number }> {
    const { h, d } = await this.domain(name, 'save');
    const abs = path.resolve(file);
    assertFile(path.dirname(abs), 'directory for the save file', 'create the directory first');
    const t0 = performance.now();
    try {
      await h.domainSave(d, abs);
    } catch (e) {
      throw this.fail('save', e, name);
    }
    const ms = since(t0);
    this.log.info({ domain: name, file: abs, ms }, 'domain saved');
    return { ms };
  }

  /**
   * The domain XML in the save file's header, read directly (what `virsh save-image-dumpxml`
   * prints, without spawning virsh and a libvirt connection on the restore path).
   */
  async saveFileXml(file: string): Promise<string> {
    const abs = path.resolve(file);
    assertFile(abs, 'save file', 'pass the path of a file written by save (virsh save)');
    return (await readSaveHeader(abs)).domainXml;
  }

  async restore(file: string, options: RestoreOptions = {}): Promise<RestoreResult> {
    const abs = path.resolve(file);
    assertFile(abs, 'save file', 'pass the path of a file written by save (virsh save)');
    const edited = options.xml !== undefined || options.diskPath !== undefined || options.serialPath !== undefined;
    let xml = options.xml ?? (await this.saveFileXml(abs));
    if (options.diskPath !== undefined || options.serialPath !== undefined) {
      xml = editDomainXml(xml, { diskPath: options.diskPath, diskTarget: options.diskTarget, serialPath: options.serialPath }, `domain XML of ${abs}`);
    }
    this.assertXmlFiles(xml, `domain XML of ${abs}`);
    const name = parseDomainXml(xml).name;
    const h = await this.connection();
    const t0 = performance.now();
    if (!edited && !options.paused) {
      try {
        await h.domainRestore(abs);
      } catch (e) {
        throw this.fail('restore', e, name);
      }
    } else {
      await this.withTempFile(xml, (x) =>
        this.virsh('restore', ['restore', abs, ...(edited ? ['--xml', x] : []), options.paused ? '--paused' : '--running'], name));
    }
    const ms = since(t0);
    this.log.info({ domain: name, file: abs, ms, edited }, 'domain restored');
    return { name, ms };
  }

  async replugNic(name: string, nic: NicSpec): Promise<ReplugResult> {
    if (!isValidMac(nic.mac)) {
      throw new CloudletError('BAD_INPUT', `"${nic.mac}" is not a unicast MAC address`, { fix: 'use six hex octets with an even first octet, e.g. 52:54:00:12:34:56' });
    }
    const state = await this.state(name);
    if (state !== 'running') {
      throw new CloudletError(state === 'absent' ? 'NOT_FOUND' : 'CONFLICT', `domain "${name}" is ${state}; a NIC can only be replugged in a running guest (the guest acknowledges the unplug)`, {
        fix: state === 'absent' ? 'restore or start the domain first' : 'resume the domain first',
      });
    }
    const before = interfaceElements(await this.domainXml(name), `live XML of "${name}"`);
    const t0 = performance.now();
    for (const old of before) {
      await this.withTempFile(old.xml, (x) => this.virsh('detach the NIC', ['detach-device', name, x, '--live'], name));
    }
    // libvirt returns once QEMU has the unplug request; the NIC is gone when the guest released it.
    const deadline = Date.now() + this.detachTimeoutMs;
    const oldMacs = new Set(before.map((b) => b.info.mac?.toLowerCase()));
    for (;;) {
      const now = interfaceElements(await this.domainXml(name));
      if (!now.some((n) => oldMacs.has(n.info.mac?.toLowerCase()))) break;
      if (Date.now() > deadline) {
        throw new CloudletError('TIMEOUT', `the guest of "${name}" did not release its NIC within ${this.detachTimeoutMs} ms`, {
          fix: 'check that the guest runs and its kernel supports PCI hot-unplug (ACPI); see the serial console',
        });
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    const detachMs = since(t0);
    const t1 = performance.now();
    await this.withTempFile(interfaceXml(nic), (x) => this.virsh('attach the NIC', ['attach-device', name, x, '--live'], name));
    const attachMs = since(t1);
    const result = { oldMac: before[0]?.info.mac, newMac: nic.mac.toLowerCase(), detachMs, attachMs };
    this.log.info({ domain: name, ...result }, 'NIC replugged');
    return result;
  }

  async forwardPort(name: string, options: { hostPort?: number; guestPort: number }): Promise<ForwardResult> {
    const { guestPort } = options;
    if (!Number.isInteger(guestPort) || guestPort < 1 || guestPort > 65535) {
      throw new CloudletError('BAD_INPUT', `guest port ${guestPort} is not a TCP port`, { fix: 'pass 1..65535' });
    }
    // The newest user-mode NIC (after a replug, the plugged one).
    const netdev = (await this.userNetdevs(name)).at(-1);
    if (!netdev) {
      throw new CloudletError('CONFLICT', `domain "${name}" has no running user-mode NIC to forward a port through`, {
        fix: 'start/restore the domain with an <interface type="user"> NIC (or replug one)',
      });
    }
    for (let attempt = 0; ; attempt++) {
      const hostPort = options.hostPort ?? (await freeLocalPort());
      const out = await this.virsh('forward a port', ['qemu-monitor-command', name, '--hmp', `hostfwd_add ${netdev} tcp:127.0.0.1:${hostPort}-:${guestPort}`], name);
      if (out.trim() === '') {
        this.log.info({ domain: name, hostPort, guestPort, netdev }, 'port forwarded');
        return { hostPort, guestPort, hostAddress: '127.0.0.1' };
      }
      // QEMU reports HMP failures as output, not as an error status.
      if (options.hostPort !== undefined || attempt >= 2) {
        throw new CloudletError(options.hostPort !== undefined ? 'CONFLICT' : 'HYPERVISOR', `QEMU refused to forward 127.0.0.1:${hostPort} to port ${guestPort} of "${name}": ${out.trim()}`, {
          fix: options.hostPort !== undefined ? 'pick another host port or omit it to get a free one' : 'retry; see the QEMU log',
        });
      }
    }
  }

  async unforwardPort(name: string, hostPort: number): Promise<void> {
    if (!Number.isInteger(hostPort) || hostPort < 1 || hostPort > 65535) {
      throw new CloudletError('BAD_INPUT', `host port ${hostPort} is not a TCP port`, { fix: 'pass 1..65535' });
    }
    for (const netdev of await this.userNetdevs(name)) {
      const out = await this.virsh('remove a port forward', ['qemu-monitor-command', name, '--hmp', `hostfwd_remove ${netdev} tcp:127.0.0.1:${hostPort}`], name);
      // QEMU answers "host forwarding rule for ... removed", or that it found none on this netdev.
      if (/removed/i.test(out)) {
        this.log.info({ domain: name, hostPort }, 'port forward removed');
        return;
      }
    }
  }

  /** QEMU's netdev ids of the running domain's user-mode NICs ("host" + the NIC's alias), in XML order. */
  private async userNetdevs(name: string): Promise<string[]> {
    return interfaceElements(await this.domainXml(name))
      .filter((n) => n.info.type === 'user' && n.info.alias)
      .map((n) => `host${n.info.alias ?? ''}`);
  }

  private capabilities(virtType: VirtType): Promise<DomainCapabilities> {
    let p = this.caps.get(virtType);
    if (!p) {
      p = this.virsh('read domain capabilities', ['domcapabilities', '--virttype', virtType]).then(parseDomainCapabilities);
      p.catch(() => this.caps.delete(virtType));
      this.caps.set(virtType, p);
    }
    return p;
  }

  async usableCpuModels(virtType?: VirtType): Promise<string[]> {
    return usableModels(await this.capabilities(virtType ?? (await this.virtType())));
  }

  async checkCpuModel(model: string, virtType?: VirtType): Promise<void> {
    const t = virtType ?? (await this.virtType());
    const caps = await this.capabilities(t);
    const info = caps.cpuModels.find((m) => m.name === model);
    let missing: string[] = [];
    if (info && !info.usable && info.blockers.length === 0) {
      const cpu = buildXml({ cpu: { '@_mode': 'custom', '@_match': 'exact', model: { '@_fallback': 'forbid', '#text': model } } });
      missing = await this.withTempFile(cpu, async (x) => {
        try {
          await runVirsh(this.uri, ['hypervisor-cpu-compare', '--virttype', t, '--error', x]);
          return [];
        } catch (e) {
          return e instanceof VirshError ? parseMissingFeatures(e.stderr) : [];
        }
      });
    }
    assertCpuModelUsable(caps, model, t, missing);
  }

  // ---- handoff primitives --------------------------------------------------------------------

  /** One QMP command through libvirt (`virsh qemu-monitor-command`); its `return` value, QmpError if QEMU refused. */
  private qmp(name: string): QmpSend {
    return async (command) => parseQmpReply(await this.virsh(`QEMU monitor command ${command.execute}`, ['qemu-monitor-command', name, JSON.stringify(command)], name), command.execute);
  }

  /** Several QMP commands in one virsh process (its command string separates them with ";"). */
  private qmpBatch(name: string): QmpBatch {
    return async (commands) => {
      assertName(name);
      const texts = commands.map((c) => JSON.stringify(c));
      if (texts.some((t) => t.includes("'"))) {
        // Not quotable in virsh's command string: one process per command.
        const out: Array<unknown | QmpError> = [];
        for (const c of commands) out.push(await this.qmp(name)(c).catch((e: unknown) => (e instanceof QmpError ? e : Promise.reject(e))));
        return out;
      }
      const script = texts.map((t) => `qemu-monitor-command ${name} '${t}'`).join(' ; ');
      const stdout = await this.virsh(`QEMU monitor commands ${commands.map((c) => c.execute).join(', ')}`, [script], name);
      const replies = stdout.split('\n').map((l) => l.trim()).filter((l) => l.startsWith('{'));
      if (replies.length !== commands.length) {
        throw new CloudletError('HYPERVISOR', `QEMU of domain "${name}" answered ${replies.length} of ${commands.length} monitor commands (${commands.map((c) => c.execute).join(', ')})`, {
          fix: `see /var/log/libvirt/qemu/${name}.log and var/libvirt/libvirtd.log`,
        });
      }
      return replies.map((r, i) => {
        try {
          return parseQmpReply(r, commands[i]?.execute ?? '?');
        } catch (e) {
          if (e instanceof QmpError) return e;
          throw e;
        }
      });
    };
  }

  private qmpError(name: string, e: unknown): CloudletError {
    if (!(e instanceof QmpError)) return this.fail('QEMU monitor command', e, name);
    return new CloudletError('HYPERVISOR', `QEMU of domain "${name}" refused ${e.execute}: ${e.desc}`, {
      fix: `see /var/log/libvirt/qemu/${name}.log`,
      details: { domain: name, qmp: e.execute, desc: e.desc },
      cause: e,
    });
  }

  /** Throws unless the domain is running or paused (a QEMU process to talk to). */
  private async assertActive(name: string, what: string): Promise<DomainState> {
    const state = await this.state(name);
    if (state === 'running' || state === 'paused') return state;
    throw new CloudletError(state === 'absent' ? 'NOT_FOUND' : 'CONFLICT', `domain "${name}" is ${state}; ${what} needs a running or paused domain`, {
      fix: state === 'absent' ? 'start or restore the domain first' : 'start or restore the domain first (a shut-off domain has no memory)',
      details: { domain: name, state },
    });
  }

  async diskTop(name: string): Promise<string> {
    const xml = await this.domainXml(name);
    const disk = parseDomainXml(xml, `live XML of "${name}"`).disks.find((x) => x.target === HANDOFF_DISK);
    if (!disk?.path) {
      throw new CloudletError('CONFLICT', `domain "${name}" has no file-backed disk ${HANDOFF_DISK}`, {
        fix: 'define the domain with its disk on vda (DomainSpec.disk)',
        details: { domain: name },
      });
    }
    return disk.path;
  }

  async snapshotDisk(name: string, newTopPath: string): Promise<SnapshotDiskResult> {
    const abs = path.resolve(newTopPath);
    assertFile(path.dirname(abs), 'directory for the new disk top', 'create the directory first');
    if (fs.existsSync(abs)) {
      throw new CloudletError('CONFLICT', `the new disk top ${abs} for domain "${name}" already exists`, {
        fix: 'pass the path of a file that does not exist yet (libvirt creates it)',
        details: { domain: name, path: abs },
      });
    }
    const previousTop = await this.diskTop(name);
    const t0 = performance.now();
    // virsh splits --diskspec at commas; a comma inside the path is written twice.
    await this.virsh('snapshot the disk', ['snapshot-create-as', name, '--disk-only', '--atomic', '--no-metadata', '--diskspec', `${HANDOFF_DISK},file=${abs.replaceAll(',', ',,')},snapshot=external`], name);
    const ms = since(t0);
    const top = await this.diskTop(name);
    if (top !== abs) {
      throw new CloudletError('HYPERVISOR', `after the disk snapshot of domain "${name}", vda is backed by ${top}, not by the new top ${abs}`, {
        fix: `see /var/log/libvirt/qemu/${name}.log`,
        details: { domain: name, previousTop, top },
      });
    }
    this.log.info({ domain: name, previousTop, newTop: abs, ms }, 'disk snapshot');
    return { previousTop, ms };
  }

  /**
   * A save file written by this process from QEMU's migration stream (memory-stream.ts). The
   * header holds the migratable XML (what libvirt's own save writes) and a cookie with the CPU
   * QEMU runs. The domain ends paused (runstate postmigrate): resume or destroy it.
   */
  async streamMemory(name: string, outPath: string, options: StreamMemoryOptions = {}): Promise<StreamMemoryResult> {
    const abs = path.resolve(outPath);
    assertFile(path.dirname(abs), 'directory for the memory stream', 'create the directory first');
    const state = await this.assertActive(name, 'a memory stream');
    const { h, d } = await this.domain(name, 'stream memory');
    let xml: string;
    let live: string;
    try {
      [xml, live] = await Promise.all([h.domainGetXMLDesc(d, XML_SECURE | XML_MIGRATABLE), h.domainGetXMLDesc(d, 0)]);
    } catch (e) {
      throw this.fail('dumpxml', e, name);
    }
    const cookie = saveCookieXml(live, `live XML of "${name}"`);
    const header = encodeSaveHeader(xml, cookie === undefined ? {} : { cookie });
    return migrateToFile({
      domain: name,
      outPath: abs,
      header,
      qmp: this.qmp(name),
      qmpBatch: this.qmpBatch(name),
      wasRunning: state === 'running',
      onProgress: options.onProgress,
      timeoutMs: options.timeoutMs,
      ...(options.ignoreShared ? { ignoreShared: true } : {}),
      log: this.log,
    });
  }

  async sharedRamFile(name: string): Promise<SharedRam | undefined> {
    const block = 'pc.ram';
    try {
      const ret = await this.qmp(name)({ execute: 'qom-get', arguments: { path: `/objects/${block}`, property: 'mem-path' } });
      // (Not shared, its pages would still be in an x-ignore-shared stream; the file is read anyway.)
      return typeof ret === 'string' && ret !== '' ? { block, path: ret } : undefined;
    } catch (e) {
      // A memory-backend-ram has no mem-path property: the RAM is not a file.
      if (e instanceof QmpError) return undefined;
      throw e;
    }
  }

  async restoreIncoming(file: string, ram: RamImage, options: { paused?: boolean } = {}): Promise<RestoreIncomingResult> {
    const abs = path.resolve(file);
    assertFile(abs, 'save file', 'pass the path of a file written by streamMemory with ignoreShared');
    assertFile(ram.path, 'RAM image', 'pass the memory image the handoff rebuilt');
    const header = await readSaveHeader(abs);
    const t0 = performance.now();
    const started = await this.startIncoming(header.domainXml);
    const { name } = started;
    try {
      const t1 = performance.now();
      await fillRamFile(started.ramFile.path, ram);
      const fillMs = since(t1);
      const inc = await this.completeIncoming(name, abs, options);
      const ms = since(t0);
      this.log.info({ domain: name, file: abs, ms, startMs: started.ms, fillMs, incomingMs: inc.ms }, 'domain restored from shared RAM and its device state');
      return { name, ms, startMs: started.ms, fillMs, incomingMs: inc.ms };
    } catch (e) {
      await this.destroy(name).catch(() => undefined);
      throw e;
    }
  }

  async startIncoming(domainXml: string): Promise<{ name: string; ramFile: SharedRam; ms: number }> {
    const xml = editDomainXml(domainXml, { sharedMemory: true, incomingDefer: true }, 'domain XML for an incoming VM');
    this.assertXmlFiles(xml, 'domain XML for an incoming VM');
    const name = parseDomainXml(xml).name;
    assertName(name);
    const t0 = performance.now();
    await this.withTempFile(xml, (x) => this.virsh('start the domain for an incoming migration', ['create', x, '--paused'], name));
    try {
      const ramFile = await this.sharedRamFile(name);
      if (!ramFile) {
        throw new CloudletError('HYPERVISOR', `domain "${name}" started without its RAM in a shared file`, { fix: 'check memory_backing_dir in /etc/libvirt/qemu.conf (bash infra/libvirt.sh start sets it)' });
      }
      const ms = since(t0);
      this.log.info({ domain: name, ramFile: ramFile.path, ms }, 'domain started, waiting for its device state');
      return { name, ramFile, ms };
    } catch (e) {
      await this.destroy(name).catch(() => undefined);
      throw e;
    }
  }

  async completeIncoming(name: string, file: string, options: { paused?: boolean; wholeStream?: boolean } = {}): Promise<{ ms: number }> {
    const abs = path.resolve(file);
    assertFile(abs, 'save file', 'pass the path of a file written by streamMemory with ignoreShared');
    const header = await readSaveHeader(abs);
    const t0 = performance.now();
    await migrateFromFile({ domain: name, file: abs, streamOffset: header.qemuStreamOffset, qmp: this.qmp(name), qmpBatch: this.qmpBatch(name), log: this.log, ignoreShared: options.wholeStream !== true });
    if (!options.paused) await this.resume(name);
    return { ms: since(t0) };
  }

  feedIncoming(name: string, options: { listening?: string } = {}): SaveFeed {
    assertName(name);
    return new IncomingFeed({ domain: name, qmp: this.qmp(name), qmpBatch: this.qmpBatch(name), log: this.log, ignoreShared: false }, options.listening);
  }

  async listenIncoming(name: string, socketPath: string): Promise<void> {
    assertName(name);
    await listenIncoming({ domain: name, qmp: this.qmp(name), qmpBatch: this.qmpBatch(name), log: this.log, ignoreShared: false }, path.resolve(socketPath));
  }

  async pmemsave(name: string, outPath: string, bytes: number): Promise<void> {
    if (!Number.isSafeInteger(bytes) || bytes <= 0) {
      throw new CloudletError('BAD_INPUT', `pmemsave of domain "${name}" needs a positive byte count (got ${bytes})`, { fix: 'pass the guest RAM size in bytes, e.g. memoryMiB * 1048576' });
    }
    const abs = path.resolve(outPath);
    assertFile(path.dirname(abs), 'directory for the memory dump', 'create the directory first');
    await this.assertActive(name, 'pmemsave');
    const tmp = `${abs}.tmp`;
    const t0 = performance.now();
    try {
      await this.qmp(name)({ execute: 'pmemsave', arguments: { val: 0, size: bytes, filename: tmp } });
      await fs.promises.rename(tmp, abs);
    } catch (e) {
      await fs.promises.rm(tmp, { force: true });
      throw this.qmpError(name, e);
    }
    this.log.debug({ domain: name, file: abs, bytes, ms: since(t0) }, 'pmemsave');
  }

  // ---- qemu-guest-agent ----------------------------------------------------------------------

  /** One agent command through libvirt (`virsh qemu-agent-command`); its `return` value. */
  private agent(name: string, timeoutSeconds = 10): AgentSend {
    return async (command) => {
      const out = await this.virsh(`guest agent ${command.execute}`, ['qemu-agent-command', name, '--timeout', String(timeoutSeconds), JSON.stringify(command)], name);
      try {
        return (JSON.parse(out) as { return?: unknown }).return;
      } catch (cause) {
        throw new CloudletError('HYPERVISOR', `qemu-guest-agent of "${name}" answered ${command.execute} with something that is not JSON: ${out.slice(0, 200)}`, { fix: 'check the guest agent in the guest', cause });
      }
    };
  }

  async hasGuestAgent(name: string): Promise<boolean> {
    return hasGuestAgentChannel(await this.domainXml(name), `live XML of "${name}"`);
  }

  async waitForGuestAgent(name: string, timeoutMs: number): Promise<{ waitedMs: number }> {
    if (!(await this.hasGuestAgent(name))) {
      throw new CloudletError('CONFLICT', `domain "${name}" has no qemu-guest-agent channel`, {
        fix: 'make the base VM with the guest agent channel (DomainSpec.guestAgent) and qemu-guest-agent installed in the guest',
      });
    }
    const t0 = Date.now();
    const ping = this.agent(name, 2);
    let last = '';
    while (Date.now() - t0 < timeoutMs) {
      try {
        await ping({ execute: 'guest-ping' });
        return { waitedMs: Date.now() - t0 };
      } catch (e) {
        last = (e as Error).message;
      }
      await new Promise((r) => setTimeout(r, 200));
    }
    throw new CloudletError('TIMEOUT', `qemu-guest-agent of "${name}" did not answer within ${timeoutMs} ms (last: ${last})`, {
      fix: 'check that the guest has booted and runs qemu-guest-agent (see its serial console)',
    });
  }

  async guestExec(name: string, options: GuestExecOptions): Promise<GuestExecResult> {
    const r = await guestExec(this.agent(name), name, options);
    this.log.debug({ domain: name, path: options.path, exitCode: r.exitCode, ms: r.ms }, 'guest exec');
    return r;
  }

  waitForSerialLine(file: string, pattern: RegExp, timeoutMs: number, fromByte = 0): Promise<string> {
    return waitForSerialLine(file, pattern, timeoutMs, fromByte);
  }

  async close(): Promise<void> {
    const c = this.conn;
    this.conn = undefined;
    if (c) await (await c.catch(() => undefined))?.connectClose();
  }
}
