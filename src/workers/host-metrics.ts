/**
 * A host worker's metrics: every activity's duration and outcome, the stages and bytes its result
 * reports (an activity interceptor), and gauges read at scrape time: the host's available memory,
 * its store's free space, and its instances by libvirt state. Names: docs/observability.md.
 */
import type { ActivityInterceptorsFactory } from '@temporalio/worker';
import { metrics, recordActivityResult, scrapedGauge } from '../common/metrics';
import type { Hypervisor } from '../hypervisor/types';
import { availableMemory, instancesByState, storeFreeBytes } from '../activities/host-stats';
import { poolLevels } from '../activities/pool-entries';

/** Times each activity and records what its result says (stages, bytes). */
export function activityMetrics(hostId: string): ActivityInterceptorsFactory {
  return (ctx) => ({
    inbound: {
      async execute(input, next) {
        const activity = ctx.info.activityType;
        const end = metrics.activitySeconds.startTimer({ host: hostId, activity });
        try {
          const result = await next(input);
          end({ outcome: 'succeeded' });
          recordActivityResult(hostId, activity, result);
          return result;
        } catch (e) {
          end({ outcome: ctx.cancellationSignal.aborted ? 'cancelled' : 'failed' });
          throw e;
        }
      },
    },
  });
}

interface HostView {
  dataDir: string;
  hypervisor: Hypervisor;
}
const hosts = new Map<string, HostView>();
let gauges = false;

/** Adds a host of this process to the scraped gauges (created once per process). */
export function watchHost(hostId: string, dataDir: string, hypervisor: Hypervisor): void {
  hosts.set(hostId, { dataDir, hypervisor });
  if (gauges) return;
  gauges = true;
  scrapedGauge('cloudlet_host_memory_available_bytes', 'Memory available for new VMs on the host (MemAvailable)', ['host'], async () => {
    const bytes = await availableMemory();
    return [...hosts.keys()].map((host) => ({ labels: { host }, value: bytes }));
  });
  scrapedGauge('cloudlet_store_free_bytes', "Free space of the file system holding the host's store", ['host'], async () =>
    Promise.all(
      [...hosts].map(async ([host, h]) => ({ labels: { host }, value: await storeFreeBytes(h.dataDir) })),
    ),
  );
  scrapedGauge('cloudlet_instances', 'Instances on the host by the state of their VM (running, paused, shut off, absent...)', ['host', 'state'], async () => {
    const out: Array<{ labels: { host: string; state: string }; value: number }> = [];
    for (const [host, h] of hosts) {
      for (const [state, n] of await instancesByState(host, h.dataDir, h.hypervisor)) out.push({ labels: { host, state }, value: n });
    }
    return out;
  });
  // The warm pool (docs/warm-pool.md), per base: a base with a target and no ready VM shows 0.
  scrapedGauge('cloudlet_warm_pool_vms', "Warm pool VMs on the host per base: ready (waiting for a synthesis) and target (what the pool keeps)", ['host', 'base', 'kind'], async () => {
    const out: Array<{ labels: { host: string; base: string; kind: string }; value: number }> = [];
    for (const [host, h] of hosts) {
      const levels = await poolLevels(h.dataDir);
      for (const base of new Set([...levels.ready.keys(), ...Object.keys(levels.targets)])) {
        out.push({ labels: { host, base, kind: 'ready' }, value: levels.ready.get(base) ?? 0 });
        out.push({ labels: { host, base, kind: 'target' }, value: levels.targets[base] ?? 0 });
      }
    }
    return out;
  });
  scrapedGauge('cloudlet_warm_pool_taken', 'Warm pool VMs taken by syntheses whose instances still exist', ['host'], async () =>
    Promise.all([...hosts].map(async ([host, h]) => ({ labels: { host }, value: (await poolLevels(h.dataDir)).taken }))),
  );
}

/** The host's worker stopped: its gauges go. */
export function unwatchHost(hostId: string): void {
  hosts.delete(hostId);
}
