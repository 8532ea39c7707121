/**
 * Host activities of the warm pool (docs/warm-pool.md): set how many ready VMs a base should have
 * here, and bring the pool towards that, one step per call (the warmPool workflow calls it in a
 * loop, so each VM started shows in its history). A step first discards what cannot serve (QEMU
 * gone, base removed, no longer wanted, half-made), then gives memory back when the host needs it
 * (its admitted VMs plus the pool's would pass what it gives VMs, or MemAvailable fell under the
 * reserve), then starts at most one VM where a base is short and the memory allows.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { openBase, readBaseManifest } from '../core/base';
import { CloudletError, isCloudletError } from '../core/errors';
import { readSaveHeader } from '../core/snapshot';
import type { Hypervisor } from '../hypervisor/types';
import { admittedBytes, domainMemoryBytes, vmCapacityBytes, type AdmissionConfig } from './admission';
import { availableMemory } from './host-stats';
import { CLAIM, giveBackEntry, poolDomainName, isEntryId, poolDir, readEntry, readTargets, removeListening, STALE_CLAIM_MS, takeEntry, writeTargets, type PoolEntry } from './pool-entries';
import { startPoolEntry } from './pool-start';

export interface PoolReport {
  hostId: string;
  /** Ready VMs wanted per base. */
  targets: Record<string, number>;
  /** Ready VMs (paused, waiting for a synthesis). */
  entries: Array<Pick<PoolEntry, 'entryId' | 'baseId' | 'domain' | 'memoryBytes' | 'createdAt' | 'startMs'>>;
  /** Entries taken by syntheses whose instances still exist. */
  taken: number;
  /** What this step did. */
  started: string[];
  discarded: Array<{ entryId: string; reason: string }>;
  /** Why the pool is below its targets, when it is and cannot grow now. */
  short?: string;
  /** More to start: the caller should call again at once. */
  more: boolean;
  memory: { capacityBytes: number; admittedBytes: number; poolBytes: number; availableBytes: number; reserveBytes: number };
  at: number;
}

const MAX_POOL_SIZE = 16;
/** How long after a VM was taken the pool waits before it starts another (ms). */
export const REFILL_QUIET_MS = 5_000;

export function createWarmPoolActivities(deps: { hostId: string; dataDir: string; hypervisor: Hypervisor; log: Logger; admission: AdmissionConfig }) {
  const { hypervisor: hv, log } = deps;
  const root = poolDir(deps.dataDir);
  const storeRoot = path.join(deps.dataDir, 'store');

  /**
   * Discards an entry: takes it first (a synthesis that has it keeps it), then destroys its VM;
   * when the VM cannot be destroyed now (libvirtd restarting) the entry stays for the next step.
   */
  async function discard(name: string, domain: string, reason: string, out: PoolReport['discarded']): Promise<boolean> {
    const dir = path.join(root, name);
    if (!(await takeEntry(dir, 'discard', { takeStale: true }))) return false;
    try {
      await hv.destroy(domain);
      await hv.undefine(domain);
    } catch (e) {
      await giveBackEntry(dir, 'discard');
      log.warn({ entryId: name, domain, reason, err: isCloudletError(e) ? e.message : String(e) }, 'could not discard a warm pool entry now; the next step tries again');
      return false;
    }
    const entry = await readEntry(dir);
    if (entry) await removeListening(entry);
    await fs.promises.rm(dir, { recursive: true, force: true });
    out.push({ entryId: name, reason });
    log.info({ entryId: name, domain, reason }, 'warm pool entry discarded');
    return true;
  }

  /** The guest memory of a stored base's VM, or why it cannot be read. */
  async function baseMemoryBytes(baseId: string): Promise<number | string> {
    try {
      return domainMemoryBytes((await readSaveHeader((await openBase(storeRoot, baseId)).savePath)).domainXml);
    } catch (e) {
      if (isCloudletError(e) && e.code === 'NOT_FOUND') return `base ${baseId.slice(0, 12)}… is not on this host: import it here`;
      return `base ${baseId.slice(0, 12)}… cannot be read: ${isCloudletError(e) ? e.message : String(e)}`;
    }
  }

  /** One step towards the targets (see the module's comment); `dryRun`: only look. */
  async function step(dryRun: boolean): Promise<PoolReport> {
    const targets = await readTargets(deps.dataDir);
    const report: PoolReport = {
      hostId: deps.hostId, targets, entries: [], taken: 0, started: [], discarded: [], more: false,
      memory: { capacityBytes: vmCapacityBytes(deps.admission), admittedBytes: await admittedBytes(deps.dataDir), poolBytes: 0, availableBytes: await availableMemory(), reserveBytes: deps.admission.reserveBytes },
      at: Date.now(),
    };
    const names = (await fs.promises.readdir(root).catch(() => [] as string[])).sort();
    let lastTakenMs = 0;
    const ready: PoolEntry[] = [];
    for (const name of names) {
      const file = path.join(root, name);
      if (name.startsWith('.new-')) {
        // A start cut off half-way (its worker died): nothing refers to it. Not a young one: a
        // synthesis may be starting a VM for itself there (early start).
        const young = Date.now() - ((await fs.promises.lstat(file).catch(() => undefined))?.mtimeMs ?? 0) < STALE_CLAIM_MS;
        if (!dryRun && !young) await discard(name, poolDomainName(deps.hostId, name.slice(5)), 'half-made', report.discarded);
        continue;
      }
      const socketOf = /^\.in-(p[0-9a-f]{8})\.sock$/.exec(name)?.[1];
      if (socketOf !== undefined) {
        // The listening socket of an entry that is gone (its start was cut off half-way). Not a
        // young one: a synthesis taking its entry has it between a rename and a symlink.
        const gone = !(await fs.promises.lstat(path.join(root, socketOf)).then(() => true, () => false));
        const old = Date.now() - ((await fs.promises.lstat(file).catch(() => undefined))?.mtimeMs ?? Date.now()) > STALE_CLAIM_MS;
        if (!dryRun && gone && old) await fs.promises.rm(file, { force: true });
        continue;
      }
      if (!isEntryId(name)) continue;
      const st = await fs.promises.lstat(file).catch(() => undefined);
      if (!st) continue;
      if (st.isSymbolicLink()) {
        // Taken by a synthesis: kept while its instance exists.
        lastTakenMs = Math.max(lastTakenMs, st.mtimeMs);
        if (fs.existsSync(file)) report.taken += 1;
        else if (!dryRun) await fs.promises.rm(file, { force: true });
        continue;
      }
      const entry = await readEntry(file);
      const domain = entry?.domain ?? poolDomainName(deps.hostId, name);
      const claim = await fs.promises.stat(path.join(file, CLAIM)).catch(() => undefined);
      if (claim && Date.now() - claim.mtimeMs < STALE_CLAIM_MS) continue; // a synthesis is taking it
      const state = await hv.state(domain).catch(() => 'unknown');
      let reason: string | undefined;
      if (claim) reason = 'taken by a synthesis that did not finish taking it';
      else if (!entry) reason = 'half-made';
      else if (state !== 'paused') reason = `its VM is ${state} (QEMU gone?), not paused waiting`;
      else if (!(await readBaseManifest(storeRoot, entry.baseId).then(() => true, () => false))) reason = `base ${entry.baseId.slice(0, 12)}… is no longer on this host`;
      else if (ready.filter((e) => e.baseId === entry.baseId).length >= (targets[entry.baseId] ?? 0)) reason = 'more than its base\'s target';
      if (reason !== undefined) {
        if (!dryRun) await discard(name, domain, reason, report.discarded);
        continue;
      }
      if (entry) ready.push(entry);
    }
    const poolBytes = (): number => ready.reduce((n, e) => n + e.memoryBytes, 0);
    // Memory first: the host's VMs come before ready ones. The newest entries go first.
    ready.sort((a, b) => a.createdAt.localeCompare(b.createdAt));
    const m = report.memory;
    while (!dryRun && ready.length > 0 && (m.admittedBytes + poolBytes() > m.capacityBytes || m.availableBytes < m.reserveBytes)) {
      const e = ready.pop() as PoolEntry;
      // (Not discarded when a synthesis took it meanwhile: it then counts as an instance.)
      if (await discard(e.entryId, e.domain, m.availableBytes < m.reserveBytes ? `memory needed: MemAvailable ${Math.round(m.availableBytes / 1048576)} MiB is under the reserve` : 'memory needed: admitted VMs and the pool would pass what the host gives VMs', report.discarded)) {
        m.availableBytes += e.memoryBytes;
      }
    }
    m.poolBytes = poolBytes();
    // Then at most one start, for the base furthest below its target that fits; the others say why not.
    const deficits = Object.entries(targets)
      .map(([baseId, want]) => ({ baseId, missing: Math.min(want, MAX_POOL_SIZE) - ready.filter((e) => e.baseId === baseId).length }))
      .filter((d) => d.missing > 0)
      .sort((a, b) => b.missing - a.missing);
    const why: string[] = [];
    // A VM taken moments ago is still starting its application: a new QEMU start now would take
    // the CPU from it. The refill waits until the host is quiet again.
    const quietInMs = lastTakenMs + REFILL_QUIET_MS - Date.now();
    if (deficits.length > 0 && quietInMs > 0) why.push(`a VM was taken ${Math.round((REFILL_QUIET_MS - quietInMs) / 1000)} s ago: refilling after ${REFILL_QUIET_MS / 1000} s, while its synthesis finishes`);
    for (const d of quietInMs > 0 ? [] : deficits) {
      if (report.started.length > 0) {
        report.more = true;
        break;
      }
      const size = await baseMemoryBytes(d.baseId);
      if (typeof size === 'string') why.push(size);
      else if (m.admittedBytes + m.poolBytes + size > m.capacityBytes) why.push(`no memory for base ${d.baseId.slice(0, 12)}…: admitted VMs ${Math.round(m.admittedBytes / 1048576)} MiB + pool ${Math.round(m.poolBytes / 1048576)} MiB + ${Math.round(size / 1048576)} MiB would pass the ${Math.round(m.capacityBytes / 1048576)} MiB the host gives VMs`);
      else if (m.availableBytes - size < m.reserveBytes) why.push(`no memory for base ${d.baseId.slice(0, 12)}…: MemAvailable ${Math.round(m.availableBytes / 1048576)} MiB less ${Math.round(size / 1048576)} MiB would fall under the reserve`);
      else if (!dryRun) {
        const e = await startPoolEntry(deps, d.baseId);
        ready.push(e);
        report.started.push(e.entryId);
        m.poolBytes = poolBytes();
        report.more = d.missing > 1;
      }
    }
    if (why.length > 0) report.short = why.join('; ');
    report.entries = ready.map(({ entryId, baseId, domain, memoryBytes, createdAt, startMs }) => ({ entryId, baseId, domain, memoryBytes, createdAt, startMs }));
    return report;
  }

  return {
    /** Sets how many ready VMs base `baseId` should have on this host (0: none). */
    async setPoolTarget(input: { baseId: string; size: number; hostId?: string }): Promise<Record<string, number>> {
      if (input.hostId !== undefined && input.hostId !== deps.hostId) {
        throw new CloudletError('BAD_INPUT', `a pool target of host ${input.hostId} reached host ${deps.hostId}`, { fix: "signal the host's own warmPool workflow" });
      }
      if (!Number.isInteger(input.size) || input.size < 0 || input.size > MAX_POOL_SIZE) {
        throw new CloudletError('BAD_INPUT', `a warm pool size must be a whole number from 0 to ${MAX_POOL_SIZE} (got ${input.size})`, { fix: `ask for at most ${MAX_POOL_SIZE} ready VMs per base` });
      }
      const targets = await readTargets(deps.dataDir);
      if (input.size === 0) delete targets[input.baseId];
      else targets[input.baseId] = input.size;
      await writeTargets(deps.dataDir, targets);
      log.info({ baseId: input.baseId, size: input.size }, 'warm pool target set');
      return targets;
    },

    /** One step towards the targets; the report says whether to call again at once (`more`). */
    async maintainPool(): Promise<PoolReport> {
      try {
        return await step(false);
      } catch (e) {
        // A VM that would not start (e.g. libvirtd restarting) is retried on the next step.
        log.warn({ err: isCloudletError(e) ? e.message : String(e) }, 'warm pool step failed');
        const r = await step(true).catch(() => undefined);
        if (!r) throw e;
        return { ...r, more: false, short: `the last step failed: ${isCloudletError(e) ? e.message : String(e)}` };
      }
    },

    /** The pool as it is, without changing it. */
    async poolReport(): Promise<PoolReport> {
      return step(true);
    },
  };
}

export type WarmPoolActivities = ReturnType<typeof createWarmPoolActivities>;
