/**
 * A host's warm pool on disk (docs/warm-pool.md): `<host data>/pool/<entryId>/` holds a VM started
 * ahead of demand, paused and waiting for an incoming stream (QEMU `-incoming defer`), with its RAM
 * in a shared file, an empty qcow2 layer over its base (`disk.qcow2`, opened inactive: rewritten in
 * place when the entry is taken) and `entry.json`. `pool/targets.json` holds how many entries each
 * base should have. A synthesis takes an entry whose VM has the launch VM's devices (same "shape")
 * by renaming its directory into the instance's: one rename, so two syntheses never take the same
 * entry. A symlink is left at the entry's old path (libvirt knows the VM's files by those paths)
 * until the instance is gone.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { editDomainXml } from '../hypervisor/domain-xml';
import type { Hypervisor } from '../hypervisor/types';

export interface PoolEntry {
  entryId: string;
  baseId: string;
  domain: string;
  /** domainShape of the VM's XML: a launch VM with the same shape can take it. */
  shape: string;
  memoryBytes: number;
  createdAt: string;
  /** How long starting its QEMU took (ms). */
  startMs: number;
  /**
   * Its RAM block `block` was filled with the base's memory image from `imageOffset` (`size`
   * bytes) while it waited: a synthesis streams only the pages that differ from the base.
   */
  prefilled?: { block: string; imageOffset: number; size: number };
  /** How long that fill took (ms). */
  fillMs?: number;
  /** The unix socket its QEMU listens on for the stream (Hypervisor.listenIncoming), set up while it waited. */
  listening?: string;
  /** Its app port forward, set up while it waited (`guestPort` is the default app port). */
  forward?: { guestPort: number; hostPort: number };
}

/**
 * Where an entry's QEMU listens for its stream: in the pool's directory (beside, not in, the
 * entry's directory, which moves when it is taken).
 */
export function listeningPath(dataDir: string, entryId: string): string {
  return path.join(poolDir(dataDir), `.in-${entryId}.sock`);
}

/** Removes an entry's listening socket (left when its VM goes unused). */
export async function removeListening(entry: Pick<PoolEntry, 'listening'>): Promise<void> {
  if (entry.listening && /^\.in-p[0-9a-f]{8}\.sock$/.test(path.basename(entry.listening))) await fs.promises.rm(entry.listening, { force: true });
}

/** What an instance directory holds while (and after) its synthesis takes a pool entry. */
export const POOL_CLAIM = 'pool-claim.json';
/** Written once the taken VM has loaded the synthesized save file (early start): resume only runs it. */
export const POOL_LOADED = 'pool-loaded';

const ENTRY_ID = /^p[0-9a-f]{8}$/;

export function poolDir(dataDir: string): string {
  return path.join(dataDir, 'pool');
}

export function poolDomainName(hostId: string, entryId: string): string {
  return `cl-${hostId}-pool-${entryId}`;
}

export function isEntryId(name: string): boolean {
  return ENTRY_ID.test(name);
}

/**
 * A digest of what a migration stream must match in the VM that takes it: the domain XML less
 * what differs between any two VMs of the same kind (name, UUID, disk and serial paths, MAC).
 */
export function domainShape(xml: string): string {
  // Every instance's RAM is a shared file, whatever the XML says (and where it says it).
  const unshared = xml.replace(/<memoryBacking>[\s\S]*?<\/memoryBacking>/, '');
  const norm = editDomainXml(unshared, {
    name: 'pool',
    uuid: '00000000-0000-0000-0000-000000000000',
    diskPath: '/pool/disk.qcow2',
    diskFormat: 'qcow2',
    serialPath: '/pool/serial.log',
    incomingDefer: false,
    mac: '52:54:00:00:00:00',
  }, 'domain XML of a warm pool VM');
  return createHash('sha256').update(norm).digest('hex');
}

export async function readEntry(dir: string): Promise<PoolEntry | undefined> {
  try {
    return JSON.parse(await fs.promises.readFile(path.join(dir, 'entry.json'), 'utf8')) as PoolEntry;
  } catch {
    return undefined;
  }
}

export async function readTargets(dataDir: string): Promise<Record<string, number>> {
  try {
    return JSON.parse(await fs.promises.readFile(path.join(poolDir(dataDir), 'targets.json'), 'utf8')) as Record<string, number>;
  } catch {
    return {};
  }
}

export async function writeTargets(dataDir: string, targets: Record<string, number>): Promise<void> {
  const file = path.join(poolDir(dataDir), 'targets.json');
  await fs.promises.mkdir(path.dirname(file), { recursive: true });
  await fs.promises.writeFile(`${file}.tmp`, JSON.stringify(targets, null, 2));
  await fs.promises.rename(`${file}.tmp`, file);
}

/**
 * The pool's levels as its files say (no hypervisor call: cheap enough for a scrape): ready
 * entries per base, targets per base, and entries taken whose instance still exists.
 */
export async function poolLevels(dataDir: string): Promise<{ ready: Map<string, number>; targets: Record<string, number>; taken: number }> {
  const root = poolDir(dataDir);
  const ready = new Map<string, number>();
  let taken = 0;
  for (const name of await fs.promises.readdir(root).catch(() => [] as string[])) {
    if (!isEntryId(name)) continue;
    const st = await fs.promises.lstat(path.join(root, name)).catch(() => undefined);
    if (st?.isSymbolicLink()) {
      if (fs.existsSync(path.join(root, name))) taken += 1;
      continue;
    }
    const entry = st?.isDirectory() ? await readEntry(path.join(root, name)) : undefined;
    if (entry) ready.set(entry.baseId, (ready.get(entry.baseId) ?? 0) + 1);
  }
  return { ready, targets: await readTargets(dataDir), taken };
}

/**
 * The exclusive right to an entry: a file `claim` created with O_EXCL in its directory, holding
 * who took it (an instance id, or "discard" for the pool's own step). A synthesis and the pool's
 * step both take it before they touch the entry, so neither moves nor destroys a VM the other
 * has. A claim left by a process that died before it finished (older than STALE_CLAIM_MS while
 * the entry is still in the pool) may be taken over by the pool's step.
 */
export const CLAIM = 'claim';
export const STALE_CLAIM_MS = 60_000;

/** Takes the entry directory `dir` for `owner`; false when someone else has it (or it is gone). */
export async function takeEntry(dir: string, owner: string, opts: { takeStale?: boolean } = {}): Promise<boolean> {
  const file = path.join(dir, CLAIM);
  try {
    await fs.promises.writeFile(file, owner, { flag: 'wx' });
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') return false;
    // Ours already (a retried synthesis that died before it moved the entry).
    if ((await fs.promises.readFile(file, 'utf8').catch(() => '')) === owner) return true;
    if (!opts.takeStale) return false;
    const st = await fs.promises.stat(file).catch(() => undefined);
    if (!st || Date.now() - st.mtimeMs < STALE_CLAIM_MS) return false;
    await fs.promises.writeFile(file, owner);
    return true;
  }
}

/** Gives back an entry taken by `owner` that stays in the pool. */
export async function giveBackEntry(dir: string, owner: string): Promise<void> {
  const file = path.join(dir, CLAIM);
  if ((await fs.promises.readFile(file, 'utf8').catch(() => '')) === owner) await fs.promises.rm(file, { force: true });
}

/**
 * Takes a ready entry of base `baseId` whose VM has the shape of `launchXml` into `instanceDir`
 * (as `.pool-<entryId>`, a symlink left at its old path): from then on the synthesis owns its VM.
 * Entries whose QEMU is gone are skipped (the pool discards them). Returns the entry, or undefined
 * when none is ready (the synthesis restores as usual). The VM still has the pool's empty disk
 * until installPoolDisk.
 */
export async function takePoolEntry(deps: { hostId: string; dataDir: string; hypervisor: Hypervisor; log: Logger }, input: { baseId: string; launchXml: string; instanceDir: string }): Promise<PoolEntry | undefined> {
  const root = poolDir(deps.dataDir);
  const names = await fs.promises.readdir(root).catch(() => [] as string[]);
  const owner = path.basename(input.instanceDir);
  let shape: string;
  try {
    shape = domainShape(input.launchXml);
  } catch {
    return undefined;
  }
  for (const name of names.filter(isEntryId).sort()) {
    const from = path.join(root, name);
    const st = await fs.promises.lstat(from).catch(() => undefined);
    if (!st?.isDirectory()) continue; // taken (a symlink) or gone
    const entry = await readEntry(from);
    if (!entry || entry.baseId !== input.baseId || entry.shape !== shape) continue;
    if (!(await takeEntry(from, owner))) continue; // another synthesis, or the pool's step, has it
    if ((await deps.hypervisor.state(entry.domain).catch(() => 'unknown')) !== 'paused') {
      await giveBackEntry(from, owner); // the pool's step discards it
      continue;
    }
    return moveEntryInto(deps, entry, input.instanceDir);
  }
  return undefined;
}

/**
 * Moves an entry the instance directory's owner has claimed into it (as `.pool-<entryId>`, a
 * symlink left at its old path): from then on the synthesis owns its VM.
 */
export async function moveEntryInto(deps: { dataDir: string; log: Logger }, entry: PoolEntry, instanceDir: string): Promise<PoolEntry> {
  const root = poolDir(deps.dataDir);
  const from = path.join(root, entry.entryId);
  // Written before the move: a retry of a synthesis cut off from here on knows what it took.
  await fs.promises.writeFile(path.join(instanceDir, POOL_CLAIM), JSON.stringify(entry));
  await fs.promises.rename(from, path.join(instanceDir, `.pool-${entry.entryId}`));
  await fs.promises.symlink(path.relative(root, instanceDir), from);
  deps.log.info({ entryId: entry.entryId, domain: entry.domain, instanceDir }, 'warm pool entry taken');
  return entry;
}

/**
 * Makes the synthesized disk (`disk.qcow2` in the instance directory) the taken VM's disk: it is
 * copied into the entry's disk file in place (the paused QEMU holds it open, inactive, and re-reads
 * it when its incoming stream completes), which then becomes the instance's `disk.qcow2`.
 */
export async function installPoolDisk(instanceDir: string, entry: PoolEntry): Promise<void> {
  const taken = path.join(instanceDir, `.pool-${entry.entryId}`);
  const disk = path.join(instanceDir, 'disk.qcow2');
  await fs.promises.copyFile(disk, path.join(taken, 'disk.qcow2'));
  await fs.promises.rename(path.join(taken, 'disk.qcow2'), disk);
  await fs.promises.rename(path.join(taken, 'serial.log'), path.join(instanceDir, 'serial.log')).catch(() => undefined);
  await fs.promises.rm(taken, { recursive: true, force: true });
}

/** takePoolEntry then installPoolDisk, for a synthesis whose disk is already written. */
export async function claimPoolEntry(deps: { hostId: string; dataDir: string; hypervisor: Hypervisor; log: Logger }, input: { baseId: string; launchXml: string; instanceDir: string }): Promise<PoolEntry | undefined> {
  const entry = await takePoolEntry(deps, input);
  if (entry) await installPoolDisk(input.instanceDir, entry);
  return entry;
}

/**
 * Undoes what a pool claim left in an instance directory that is being removed or started again.
 * The pool VM goes only when this directory really took it (its entry was moved here, or the
 * entry's old path links here); a claim that never got that far gives the entry back to the pool.
 */
export async function releaseClaimIn(deps: { hostId: string; dataDir: string; hypervisor: Hypervisor }, instanceDir: string): Promise<void> {
  await discardUnmovedStarts(deps, path.basename(instanceDir));
  const entry = await fs.promises.readFile(path.join(instanceDir, POOL_CLAIM), 'utf8').then((t) => JSON.parse(t) as PoolEntry).catch(() => undefined);
  if (!entry) return;
  const link = path.join(poolDir(deps.dataDir), entry.entryId);
  const st = await fs.promises.lstat(link).catch(() => undefined);
  const linksHere = st?.isSymbolicLink() === true && (await fs.promises.realpath(link).catch(() => '')) === (await fs.promises.realpath(instanceDir).catch(() => instanceDir));
  if (linksHere || fs.existsSync(path.join(instanceDir, `.pool-${entry.entryId}`))) {
    await deps.hypervisor.destroy(entry.domain);
    await deps.hypervisor.undefine(entry.domain);
    await removeListening(entry);
    if (linksHere) await fs.promises.rm(link, { force: true });
    await fs.promises.rm(path.join(instanceDir, `.pool-${entry.entryId}`), { recursive: true, force: true });
  } else if (st?.isDirectory()) {
    await giveBackEntry(link, path.basename(instanceDir));
  }
  await fs.promises.rm(path.join(instanceDir, POOL_CLAIM), { force: true });
}

/** The claim of an entry a synthesis starts for itself (not one it takes from the pool, which goes back to the pool). */
export function startClaim(owner: string): string {
  return `start:${owner}`;
}

/**
 * Removes the VMs a synthesis started for itself (early start) that never reached its directory:
 * entries still in the pool, half-made or not, claimed as started by `owner`. A worker killed while it started
 * one leaves it so; nobody else would take or remove it for a minute (the claim is fresh).
 */
async function discardUnmovedStarts(deps: { hostId: string; dataDir: string; hypervisor: Hypervisor }, owner: string): Promise<void> {
  const root = poolDir(deps.dataDir);
  for (const name of await fs.promises.readdir(root).catch(() => [] as string[])) {
    const entryId = name.startsWith('.new-') ? name.slice(5) : name;
    if (!isEntryId(entryId)) continue;
    const dir = path.join(root, name);
    const st = await fs.promises.lstat(dir).catch(() => undefined);
    if (!st?.isDirectory()) continue;
    if ((await fs.promises.readFile(path.join(dir, CLAIM), 'utf8').catch(() => '')) !== startClaim(owner)) continue;
    const domain = poolDomainName(deps.hostId, entryId);
    await deps.hypervisor.destroy(domain);
    await deps.hypervisor.undefine(domain).catch(() => undefined);
    await removeListening({ listening: listeningPath(deps.dataDir, entryId) });
    await fs.promises.rm(dir, { recursive: true, force: true });
  }
}
