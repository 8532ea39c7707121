/**
 * "Left idle until it settles": after boot a Debian guest keeps working for a while (udev,
 * systemd generators, first-boot units). A base VM saved in the middle of that work differs
 * from every later snapshot in pages that have nothing to do with the application, so the base
 * builder waits until the guest's CPU is idle over a whole window, measured inside the guest from
 * /proc/stat through the guest agent.
 */
import type { Hypervisor } from '../hypervisor/types';

export interface SettleOptions {
  timeoutMs: number;
  /** Length of one measurement window (default 5 s). */
  windowMs?: number;
  /**
   * Idle share of CPU time over a window that counts as settled (default 0.9: under emulation the
   * measurement itself, timer ticks and the agent cost a few per cent).
   */
  idleShare?: number;
}

export interface SettleResult {
  waitedMs: number;
  /** The idle share of the last window. */
  idleShare: number;
  windowMs: number;
  settled: boolean;
}

/** Idle share between two `cpu` lines of /proc/stat (idle + iowait over all). */
export function idleShareBetween(before: string, after: string): number {
  // user nice system idle iowait irq softirq steal; guest and guest_nice are already in user and nice.
  const parse = (line: string): number[] => line.trim().split(/\s+/).slice(1, 9).map(Number);
  const a = parse(before);
  const b = parse(after);
  const delta = b.map((v, i) => v - (a[i] ?? 0));
  const total = delta.reduce((n, v) => n + v, 0);
  if (!(total > 0)) return 0;
  return ((delta[3] ?? 0) + (delta[4] ?? 0)) / total;
}

export async function waitUntilIdle(hv: Hypervisor, domain: string, options: SettleOptions): Promise<SettleResult> {
  const windowMs = options.windowMs ?? 5000;
  const want = options.idleShare ?? 0.9;
  const t0 = Date.now();
  let share = 0;
  while (Date.now() - t0 < options.timeoutMs) {
    const r = await hv.guestExec(domain, {
      path: '/bin/sh',
      args: ['-c', `head -n1 /proc/stat; sleep ${(windowMs / 1000).toFixed(1)}; head -n1 /proc/stat`],
      timeoutMs: windowMs + 30_000,
    });
    const [before, after] = r.stdout.split('\n');
    share = before && after ? idleShareBetween(before, after) : 0;
    if (share >= want) return { waitedMs: Date.now() - t0, idleShare: share, windowMs, settled: true };
  }
  return { waitedMs: Date.now() - t0, idleShare: share, windowMs, settled: false };
}
