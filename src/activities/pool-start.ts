/**
 * Starting a VM that waits for a synthesis (docs/warm-pool.md): QEMU started from a base's saved
 * domain XML with `-incoming defer`, paused, its RAM in a preallocated shared file filled with the
 * base's memory image, listening for its stream, its default app port forwarded. The warm pool
 * starts such VMs ahead of demand; a synthesis with no ready VM starts one for itself while its
 * overlay arrives (early start, pool-early-start.ts).
 */
import { randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { openBase } from '../core/base';
import { CloudletError } from '../core/errors';
import { decodeSkeleton, readSaveHeader } from '../core/snapshot';
import { createQcow2Overlay } from '../hypervisor/disk';
import { editDomainXml } from '../hypervisor/domain-xml';
import { fillRamFile } from '../hypervisor/ram-file';
import type { Hypervisor } from '../hypervisor/types';
import { domainMemoryBytes } from './admission';
import { randomMac } from './guest';
import { APP_PORT_DEFAULT } from './instance-records';
import { CLAIM, domainShape, listeningPath, poolDir, poolDomainName, removeListening, type PoolEntry } from './pool-entries';

export interface PoolStartDeps {
  hostId: string;
  dataDir: string;
  hypervisor: Hypervisor;
  log: Logger;
}

/** What a base's RAM block holds when a VM is filled with it: its place in the base's memory image. */
export type Prefill = NonNullable<PoolEntry['prefilled']>;

/**
 * Keeps a start's claim fresh: the pool's step takes over a claim older than STALE_CLAIM_MS, and
 * a start on a busy host (QEMU, then filling its RAM) must not look abandoned.
 */
async function touchClaim(dir: string, claimFor: string | undefined): Promise<void> {
  if (claimFor === undefined) return;
  const now = new Date();
  await fs.promises.utimes(path.join(dir, CLAIM), now, now).catch(() => undefined);
}

/** Where block `block` of a stored base's memory image is; undefined when the image has no such block. */
export async function basePrefill(dataDir: string, baseId: string, block: string): Promise<Prefill | undefined> {
  return blockIn((await openBase(path.join(dataDir, 'store'), baseId)).skeletonPath, block);
}

/** Where block `block` is in the memory image a skeleton describes. */
async function blockIn(skeletonPath: string, block: string): Promise<Prefill | undefined> {
  const found = decodeSkeleton(await fs.promises.readFile(skeletonPath)).header.blocks.find((b) => b.name === block);
  return found ? { block: found.name, imageOffset: found.imageOffset, size: found.size } : undefined;
}

/** The saved domain XML of a stored base's VM. */
export async function baseDomainXml(dataDir: string, baseId: string): Promise<string> {
  return (await readSaveHeader((await openBase(path.join(dataDir, 'store'), baseId)).savePath)).domainXml;
}

/**
 * Starts one VM of `baseId` waiting for a stream, as an entry of the pool; its directory appears
 * complete or not at all. `claimFor`: the entry appears already claimed so (startClaim of an
 * instance directory's name), so neither the pool nor another synthesis takes it. `expectPrefill`: the
 * caller has already told a join which pages the VM holds; the start fails unless it fills exactly
 * that block.
 */
export async function startPoolEntry(deps: PoolStartDeps, baseId: string, opts: { claimFor?: string; expectPrefill?: Prefill } = {}): Promise<PoolEntry> {
  const { hypervisor: hv, log } = deps;
  const root = poolDir(deps.dataDir);
  const entryId = `p${randomBytes(4).toString('hex')}`;
  const domain = poolDomainName(deps.hostId, entryId);
  const tmp = path.join(root, `.new-${entryId}`);
  const dir = path.join(root, entryId);
  let listening: string | undefined;
  try {
    const base = await openBase(path.join(deps.dataDir, 'store'), baseId);
    await fs.promises.mkdir(tmp, { recursive: true });
    if (opts.claimFor !== undefined) await fs.promises.writeFile(path.join(tmp, CLAIM), opts.claimFor, { flag: 'wx' });
    // The VM's files are named by the entry's final path, which libvirt keeps.
    const diskPath = path.join(dir, 'disk.qcow2');
    await createQcow2Overlay(path.join(tmp, 'disk.qcow2'), base.diskPath, 'raw');
    const header = await readSaveHeader(base.savePath);
    const xml = editDomainXml(header.domainXml, { name: domain, uuid: randomUUID(), diskPath, diskFormat: 'qcow2', serialPath: path.join(dir, 'serial.log'), sharedMemory: true, preallocate: true, mac: randomMac() }, `domain XML of base ${baseId}`);
    await fs.promises.rename(tmp, dir);
    const vm = await hv.startIncoming(xml);
    await touchClaim(dir, opts.claimFor);
    // Its RAM gets the base's memory now, before any stream: a synthesis then streams only the
    // pages its launch VM changed (QEMU keeps what a stream leaves out).
    const t0 = Date.now();
    const prefilled = await blockIn(base.skeletonPath, vm.ramFile.block);
    if (opts.expectPrefill && JSON.stringify(prefilled) !== JSON.stringify(opts.expectPrefill)) {
      throw new CloudletError('HYPERVISOR', `the VM started for early start has RAM block ${vm.ramFile.block}, not ${opts.expectPrefill.block} as its stream assumes`, { fix: 'none needed: the synthesis restores its VM as usual' });
    }
    if (prefilled) await fillRamFile(vm.ramFile.path, { path: base.memImagePath, offset: prefilled.imageOffset, length: prefilled.size });
    const fillMs = Date.now() - t0;
    await touchClaim(dir, opts.claimFor);
    // Its QEMU listens for the stream, and its app port is forwarded, now: neither is then on a
    // synthesis's path (each is a monitor command, a virsh process).
    // (A unix socket's path has at most 107 bytes: on a deeper data directory, the synthesis has
    // QEMU listen on one of its own.)
    const socket = listeningPath(deps.dataDir, entryId);
    if (Buffer.byteLength(path.resolve(socket)) <= 100) {
      await hv.listenIncoming(domain, socket);
      listening = socket;
    }
    const fwd = await hv.forwardPort(domain, { guestPort: APP_PORT_DEFAULT });
    const entry: PoolEntry = {
      entryId, baseId, domain, shape: domainShape(header.domainXml), memoryBytes: domainMemoryBytes(header.domainXml), createdAt: new Date().toISOString(), startMs: Math.round(vm.ms),
      ...(prefilled ? { prefilled, fillMs } : {}), ...(listening ? { listening } : {}), forward: { guestPort: APP_PORT_DEFAULT, hostPort: fwd.hostPort },
    };
    await fs.promises.writeFile(path.join(dir, 'entry.tmp'), JSON.stringify(entry));
    await fs.promises.rename(path.join(dir, 'entry.tmp'), path.join(dir, 'entry.json'));
    log.info({ entryId, domain, baseId, startMs: entry.startMs, fillMs, claimedFor: opts.claimFor }, 'warm pool entry ready');
    return entry;
  } catch (e) {
    await hv.destroy(domain).catch(() => undefined);
    await hv.undefine(domain).catch(() => undefined);
    await removeListening({ listening });
    await fs.promises.rm(tmp, { recursive: true, force: true });
    await fs.promises.rm(dir, { recursive: true, force: true });
    throw e;
  }
}
