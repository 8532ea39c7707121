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

export function createHostStatsActivities(deps: { hostId: string; dataDir: string; hypervisor: Hypervisor }) {
  return {
    async hostStats(): Promise<HostStats> {
      const records = instanceRecords(deps.hostId, deps.dataDir);
      const ids = await fs.promises.readdir(path.join(deps.dataDir, 'instances')).catch(() => [] as string[]);
      let running = 0;
      for (const id of ids) {
        if (!records.exists(id)) continue;
        if ((await deps.hypervisor.state(records.domainName(id)).catch(() => 'unknown')) === 'running') running++;
      }
      const s = await fs.promises.statfs(deps.dataDir).catch(() => undefined);
      return { memAvailableBytes: await availableMemory(), memTotalBytes: os.totalmem(), storeFreeBytes: s ? s.bavail * s.bsize : 0, runningInstances: running, at: Date.now() };
    },
  };
}

export type HostStatsActivities = ReturnType<typeof createHostStatsActivities>;
