/**
 * What a host has room for: available memory (MemAvailable: what a new VM can use without
 * swapping), its store's free space, and its running instances. The hostMonitor workflow reads it
 * on its host every few seconds; the API shows it (GET /v1/hosts) and neighbours weigh it before a
 * move (docs/mobility.md).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Hypervisor } from '../hypervisor/types';
import { instanceRecords } from './instance-records';

export interface HostStats {
  memAvailableBytes: number;
  memTotalBytes: number;
  storeFreeBytes: number;
  /** Instances whose VM runs. */
  runningInstances: number;
  /** When read (epoch ms). */
  at: number;
}

/** MemAvailable, else the kernel's free memory. */
export async function availableMemory(): Promise<number> {
  try {
    const m = /^MemAvailable:\s+(\d+) kB$/m.exec(await fs.promises.readFile('/proc/meminfo', 'utf8'));
    if (m?.[1]) return Number(m[1]) * 1024;
  } catch {
    // not Linux
  }
  return os.freemem();
}

/** Free space of the file system holding `dir` (NaN when it cannot be read). */
export async function storeFreeBytes(dir: string): Promise<number> {
  const s = await fs.promises.statfs(dir).catch(() => undefined);
  return s ? s.bavail * s.bsize : Number.NaN;
}

/** The host's instances, counted by the state of their VM (running, paused, shut off, absent...). */
export async function instancesByState(hostId: string, dataDir: string, hypervisor: Hypervisor): Promise<Map<string, number>> {
  const records = instanceRecords(hostId, dataDir);
  const ids = await fs.promises.readdir(path.join(dataDir, 'instances')).catch(() => [] as string[]);
  const counts = new Map<string, number>();
  for (const id of ids) {
    if (!records.exists(id)) continue;
    const state = await hypervisor.state(await records.domainOf(id)).catch(() => 'unknown');
    counts.set(state, (counts.get(state) ?? 0) + 1);
  }
  return counts;
}

export function createHostStatsActivities(deps: { hostId: string; dataDir: string; hypervisor: Hypervisor }) {
  return {
    async hostStats(): Promise<HostStats> {
      const [byState, free, mem] = await Promise.all([instancesByState(deps.hostId, deps.dataDir, deps.hypervisor), storeFreeBytes(deps.dataDir), availableMemory()]);
      return { memAvailableBytes: mem, memTotalBytes: os.totalmem(), storeFreeBytes: Number.isNaN(free) ? 0 : free, runningInstances: byState.get('running') ?? 0, at: Date.now() };
    },
  };
}

export type HostStatsActivities = ReturnType<typeof createHostStatsActivities>;
