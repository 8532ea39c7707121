/**
 * The hypervisor adapter's contract. The libvirt implementation (./libvirt.ts) is the only code
 * in the project that talks to libvirt, virsh or QEMU's monitor.
 */

/** libvirt domain type: `kvm` where KVM really runs guests, `qemu` (TCG emulation) otherwise. */
export type VirtType = 'kvm' | 'qemu';

export type DomainState = 'running' | 'paused' | 'shut off' | 'absent';

export type DiskFormat = 'raw' | 'qcow2';

export interface NicSpec {
  /** Unicast MAC, e.g. 52:54:00:12:34:56. */
  mac: string;
  /** Default virtio. */
  model?: 'virtio' | 'e1000' | 'vmxnet3' | 'rtl8139';
}

export interface DomainSpec {
  name: string;
  uuid?: string;
  memoryMiB: number;
  vcpus: number;
  /** Direct kernel boot. */
  kernel: string;
  initrd?: string;
  cmdline?: string;
  /** The VM's disk (virtio, vda). A qcow2 file records its backing file itself. */
  disk: { path: string; format: DiskFormat };
  /** One NIC on QEMU user networking (slirp). */
  nic: NicSpec;
  /** The serial console (ttyS0) goes to this file (appended). */
  serialPath: string;
  /** Default qemu64 (usable under TCG and KVM). */
  cpuModel?: string;
  /** Default: the detected virt type (see virtType()). */
  virtType?: VirtType;
  /** Default q35 (see DEFAULT_MACHINE in domain-xml.ts: a NIC replug is faster there than on pc). */
  machine?: string;
  /**
   * A virtio-serial channel for qemu-guest-agent (org.qemu.guest_agent.0), so the host can run
   * commands in the guest (guestExec) without a network port. Part of the device set: a base VM
   * saved without it cannot gain it later (a restore keeps the saved devices).
   */
  guestAgent?: boolean;
  /**
   * A virtio balloon device; with freePageReporting the guest hands the pages it frees back to
   * the host, so they are not in the memory snapshot (and not in overlays). Default: none.
   */
  balloon?: { freePageReporting: boolean };
}

export interface GuestExecResult {
  exitCode: number;
  /** The command's standard output and error, as text (control characters kept). */
  stdout: string;
  stderr: string;
  ms: number;
}

export interface GuestExecOptions {
  /** Absolute path of the program in the guest, e.g. /bin/sh. */
  path: string;
  args?: string[];
  /** Given to the program on its standard input. */
  input?: Buffer | string;
  /** The command is killed (exit code 143) after this long. */
  timeoutMs: number;
  /** Called while waiting (e.g. to heartbeat). */
  onWait?: () => void;
}

export interface RestoreOptions {
  /** A complete domain XML to restore with (must stay ABI-compatible with the saved one). */
  xml?: string;
  /** New disk path (edits the saved XML; the first disk or `diskTarget`). */
  diskPath?: string;
  diskTarget?: string;
  /** New serial console file (edits the saved XML). */
  serialPath?: string;
  /** Leave the restored domain paused (default: running). */
  paused?: boolean;
}

export interface RestoreResult {
  name: string;
  ms: number;
}

export interface ReplugResult {
  oldMac: string | undefined;
  newMac: string;
  detachMs: number;
  attachMs: number;
}

export interface ForwardResult {
  hostPort: number;
  guestPort: number;
  /** Always 127.0.0.1. */
  hostAddress: string;
}

export interface SnapshotDiskResult {
  /** The file that backed vda before: now the new top's backing file, read-only and stable. */
  previousTop: string;
  ms: number;
}

export interface StreamMemoryOptions {
  /** Called with the bytes received so far (every few MiB and once at the end). */
  onProgress?(bytes: number): void;
  /** Give up (cancel the migration, TIMEOUT) after this long. Default 10 minutes. */
  timeoutMs?: number;
  /**
   * Leave the guest's shared RAM out (QEMU's x-ignore-shared): the stream holds the device state and
   * the small unshared RAM blocks; the shared block's pages are read from its file (sharedRamFile).
   */
  ignoreShared?: boolean;
}

/** A save file streamed into a waiting domain as it is written (Hypervisor.feedIncoming). */
export interface SaveFeed {
  /**
   * The next part of the save file, from its first byte; `last`: its final part, held back whole
   * until `complete`. Never rejects: a failure is kept for `complete`.
   */
  write(part: Buffer, opts?: { last?: boolean }): Promise<void>;
  /** Sends the bytes held back, waits until the domain has loaded the stream (paused); throws what went wrong. */
  complete(): Promise<{ ms: number; bytes: number; tailMs: number }>;
  /** Stops feeding; the domain is left as it is (the caller destroys it). */
  close(): Promise<void>;
}

/** Where a domain's guest RAM is, when it is a shared file (DomainXmlEdits.sharedMemory). */
export interface SharedRam {
  /** The RAM block's id in migration streams (libvirt's pc.ram). */
  block: string;
  path: string;
}

/** The content of the shared RAM block for restoreIncoming: `length` bytes of `path` from `offset`. */
export interface RamImage {
  path: string;
  offset: number;
  length: number;
}

export interface RestoreIncomingResult extends RestoreResult {
  /** Starting QEMU waiting for the stream, filling its RAM, and loading the device state. */
  startMs: number;
  fillMs: number;
  incomingMs: number;
}

export interface StreamMemoryResult {
  /** Size of the save file written (libvirt header + QEMU stream). */
  bytes: number;
  /** From the first monitor command to the renamed file. */
  ms: number;
  /** QEMU's own measure of how long the guest was stopped (query-migrate `downtime`), when it reports it. */
  downtimeMs?: number;
  /** Whether the domain was running when the stream began (a live stream; pages may repeat, the last copy wins). */
  wasRunning: boolean;
}

export interface Hypervisor {
  /** kvm if KVM really runs a guest here (probed once per process), else qemu; CLOUDLET_VIRT_TYPE overrides. */
  virtType(): Promise<VirtType>;
  defineDomain(spec: DomainSpec): Promise<void>;
  start(name: string): Promise<void>;
  /** Stops a running/paused domain at once (no-op when it is shut off). */
  destroy(name: string): Promise<void>;
  /** Removes a shut-off domain's definition (no-op when absent). */
  undefine(name: string): Promise<void>;
  state(name: string): Promise<DomainState>;
  /**
   * The virtio balloon of a running domain: `setBalloon` asks the guest to give back memory down
   * to `bytes` (or to take it again, up to its configured size); `balloon` reads what the guest
   * has now (`actualBytes`) and at most (`maxBytes`).
   */
  setBalloon(name: string, bytes: number): Promise<void>;
  balloon(name: string): Promise<{ actualBytes: number; maxBytes: number }>;
  /** The names of every domain libvirt knows (running or defined) that start with `prefix`. */
  listDomains(prefix: string): Promise<string[]>;
  suspend(name: string): Promise<void>;
  resume(name: string): Promise<void>;
  /** The live (or inactive) domain XML. */
  domainXml(name: string): Promise<string>;
  /** libvirt save of a running/paused domain to `path` (memory snapshot + domain XML header); the domain stops. */
  save(name: string, path: string): Promise<{ ms: number }>;
  /** The domain XML stored in a save file's header. */
  saveFileXml(path: string): Promise<string>;
  /** Restores a save file, optionally with an edited domain XML (new disk / serial paths). */
  restore(path: string, options?: RestoreOptions): Promise<RestoreResult>;
  /**
   * Restores a save file of an x-ignore-shared stream (streamMemory with ignoreShared): starts the
   * domain of its header XML with its RAM in a shared file and `-incoming defer`, copies `ram` into
   * that file, then feeds it the stream. Paused when `paused`, else running.
   */
  restoreIncoming(path: string, ram: RamImage, options?: { paused?: boolean }): Promise<RestoreIncomingResult>;
  /**
   * The first half of restoreIncoming, ahead of time: starts a (transient) domain from `xml` with
   * its RAM in a shared file and `-incoming defer`, paused, waiting for a device state; returns its
   * RAM file for the caller to fill. Its disks are opened inactive: until completeIncoming, their
   * files may still be rewritten in place (QEMU re-reads them when the migration completes).
   */
  startIncoming(xml: string): Promise<{ name: string; ramFile: SharedRam; ms: number }>;
  /**
   * The second half: loads the device state from a save file of an x-ignore-shared stream, or with
   * `wholeStream` a plain save (RAM pages included, loaded into the RAM file: a warm pool's VM);
   * paused when `paused`, else running.
   */
  completeIncoming(name: string, path: string, options?: { paused?: boolean; wholeStream?: boolean }): Promise<{ ms: number }>;
  /**
   * Early start into a domain waiting with `-incoming defer` (a warm pool's VM): a feed that takes
   * a plain save file (RAM pages included) part by part while it is being rebuilt, and lets QEMU
   * finish loading it only on `complete`. The domain ends paused.
   */
  feedIncoming(name: string, options?: { listening?: string }): SaveFeed;
  /**
   * Has a domain waiting with `-incoming defer` listen for a plain save's stream (RAM pages
   * included) on the unix socket `socketPath` (in a directory only this host's processes reach;
   * at most ~100 bytes long), ahead of time, for feedIncoming's `listening`. The socket file goes
   * when a feed has connected; whoever destroys the domain unused removes it.
   */
  listenIncoming(name: string, socketPath: string): Promise<void>;
  /** The domain's guest RAM file, when its RAM is a shared file; undefined otherwise. */
  sharedRamFile(name: string): Promise<SharedRam | undefined>;
  /** Hot-unplugs the domain's NIC and plugs a new user-mode virtio NIC with `mac`. */
  replugNic(name: string, nic: NicSpec): Promise<ReplugResult>;
  /** 127.0.0.1:hostPort -> guest:guestPort via QEMU's hostfwd_add; a free port is picked if none is given. Lost on restore and replug. */
  forwardPort(name: string, options: { hostPort?: number; guestPort: number }): Promise<ForwardResult>;
  /** Removes the forward of 127.0.0.1:hostPort (QEMU's hostfwd_remove); a no-op if there is none. */
  unforwardPort(name: string, hostPort: number): Promise<void>;
  /** Throws CPU_MODEL_UNUSABLE unless the model is usable='yes' in domcapabilities for the virt type. */
  checkCpuModel(model: string, virtType?: VirtType): Promise<void>;
  usableCpuModels(virtType?: VirtType): Promise<string[]>;
  /** Answers once qemu-guest-agent in the guest answers a ping; TIMEOUT after `timeoutMs`. */
  waitForGuestAgent(name: string, timeoutMs: number): Promise<{ waitedMs: number }>;
  /** Whether the domain has a qemu-guest-agent channel (from its live XML). */
  hasGuestAgent(name: string): Promise<boolean>;
  /** Runs a program in the guest through qemu-guest-agent and waits for it to end. */
  guestExec(name: string, options: GuestExecOptions): Promise<GuestExecResult>;
  // ---- handoff primitives (docs/hypervisor.md, "Handoff primitives") ----
  /** Absolute path of the file currently backing the domain's vda (from the live XML). */
  diskTop(name: string): Promise<string>;
  /**
   * External disk-only snapshot of vda (running or paused domain): creates `newTopPath`
   * (qcow2, absolute path, must not exist) whose backing file is the previous top; later guest
   * writes land in the new top, the previous top is no longer written. The domain's persistent
   * definition follows (it names the new top as well). No libvirt snapshot metadata is kept.
   */
  snapshotDisk(name: string, newTopPath: string): Promise<SnapshotDiskResult>;
  /**
   * Writes a complete libvirt save file to `outPath` (libvirt header with the migratable domain XML
   * and the save cookie, then QEMU's migration stream), from a running domain (live: the guest
   * keeps running while pages are sent) or a paused one (exact). Afterwards the domain is
   * **paused** (QEMU runstate postmigrate, its disks released): the caller resumes it with
   * `resume`, or destroys it. QEMU refuses a second stream before a resume (CONFLICT).
   */
  streamMemory(name: string, outPath: string, options?: StreamMemoryOptions): Promise<StreamMemoryResult>;
  /** Guest-physical memory [0, bytes) to `outPath` (QMP pmemsave); the domain should be paused. For tests. */
  pmemsave(name: string, outPath: string, bytes: number): Promise<void>;
  /** Resolves with the first serial-console line matching `pattern`; TIMEOUT names the file and the last lines. */
  waitForSerialLine(path: string, pattern: RegExp, timeoutMs: number): Promise<string>;
  close(): Promise<void>;
}
