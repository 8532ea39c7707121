/**
 * Reconciliation of a host's instance records with its hypervisor (docs/reliability.md): after a
 * crash or a reboot of the host, an instance whose record says it ran (it had its port forwarded)
 * but whose VM no longer runs is lost. Its files, its domain definition and its admission are
 * removed, and it is reported, so the API lists it as lost. An instance an overlay is being made
 * from (its launch.sav exists, or is being written) is left to that operation. Domains of this
 * host that nothing accounts for (no instance record names them, not a warm pool's, not a VM a
 * handoff started ahead) are reported as orphans, not removed: whoever made one (a benchmark, an
 * operator by hand) may still want it.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import type { Hypervisor } from '../hypervisor/types';
import { instanceRecords, type InstanceRecord } from './instance-records';
import { releaseAdmission } from './admission';
import { poolDir, poolDomainName, releaseClaimIn } from './pool-entries';

export interface LostInstance {
  instanceId: string;
  domain: string;
  /** What the hypervisor said of its domain. */
  domainState: string;
}

export interface OrphanDomain {
  domain: string;
  state: string;
}

export function createReconcileActivities(deps: { hostId: string; dataDir: string; hypervisor: Hypervisor; log: Logger }) {
  const records = instanceRecords(deps.hostId, deps.dataDir);
  const instancesDir = path.join(deps.dataDir, 'instances');
  return {
    async reconcileInstances(): Promise<{ checked: number; lost: LostInstance[]; orphans: OrphanDomain[] }> {
      // Domains first, records after: a synthesis that starts in between has its record read.
      const domains = await deps.hypervisor.listDomains(`cl-${deps.hostId}-`);
      const ids = await fs.promises.readdir(instancesDir).catch(() => [] as string[]);
      const lost: LostInstance[] = [];
      // Domains something accounts for: instances' (with a record or being made), handoffs' started ahead.
      const accounted = new Set<string>();
      let checked = 0;
      for (const id of ids) {
        accounted.add(records.domainName(id));
        let rec: InstanceRecord;
        try {
          rec = await records.read(id);
        } catch {
          continue; // a directory being made (no record yet)
        }
        accounted.add(rec.domain);
        checked += 1;
        // Never resumed yet (a synthesis on its way), or an overlay is being made from it (its
        // memory is being or was saved): not lost, whatever libvirt says.
        if (rec.hostPort === undefined || ['launch.sav', 'launch.sav.partial'].some((f) => fs.existsSync(path.join(records.dir(id), f)))) continue;
        const state = await deps.hypervisor.state(rec.domain);
        if (state === 'running' || state === 'paused') continue;
        await deps.hypervisor.destroy(rec.domain);
        await deps.hypervisor.undefine(rec.domain);
        // A VM started early (a pool entry's): its entry's path in the pool and its socket go too.
        await releaseClaimIn(deps, records.dir(id));
        await releaseAdmission(deps.dataDir, id);
        await fs.promises.rm(records.dir(id), { recursive: true, force: true });
        deps.log.warn({ instanceId: id, domain: rec.domain, domainState: state }, 'instance lost: its VM no longer runs; its files and admission were removed');
        lost.push({ instanceId: id, domain: rec.domain, domainState: state });
      }
      for (const id of await fs.promises.readdir(path.join(deps.dataDir, 'handoffs')).catch(() => [] as string[])) {
        const started = await fs.promises.readFile(path.join(deps.dataDir, 'handoffs', id, 'started-ahead.json'), 'utf8').catch(() => undefined);
        if (started) accounted.add((JSON.parse(started) as { domain: string }).domain);
      }
      const poolPrefix = poolDomainName(deps.hostId, '');
      // Hosts of this machine (siblings of this host's directory) whose ids start with this one's
      // (host-a, host-a-2) share its domain prefix: their domains are theirs.
      const longerHosts = (await fs.promises.readdir(path.dirname(deps.dataDir)).catch(() => [] as string[]))
        .filter((h) => h !== deps.hostId && h.startsWith(`${deps.hostId}-`))
        .map((h) => `cl-${h}-`);
      const orphans: OrphanDomain[] = [];
      for (const domain of domains) {
        if (accounted.has(domain) || longerHosts.some((p) => domain.startsWith(p))) continue;
        // A warm pool's VMs are the pool's to keep or discard (activities/warm-pool.ts), while it
        // has their entry (ready, or taken by an instance).
        if (domain.startsWith(poolPrefix) && (await fs.promises.lstat(path.join(poolDir(deps.dataDir), domain.slice(poolPrefix.length))).then(() => true, () => false))) continue;
        const state = await deps.hypervisor.state(domain).catch(() => 'unknown');
        if (state === 'absent') continue;
        orphans.push({ domain, state });
        deps.log.warn({ domain, state }, 'domain without a record on this host (reported, not removed)');
      }
      return { checked, lost, orphans };
    },
  };
}

export type ReconcileActivities = ReturnType<typeof createReconcileActivities>;
