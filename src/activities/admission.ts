/**
 * Admission by memory (docs/operations.md, "Admission"): a host starts a synthesized VM only when
 * the memory its admitted VMs are given, plus this one's, fits in what the host gives VMs in all
 * (CLOUDLET_VM_MEMORY_MIB, or its total memory less CLOUDLET_MEMORY_RESERVE_MIB). An admission is
 * a small file `<host>/admitted/<instanceId>.json`; terminating the instance removes it, so a
 * failed or ended synthesis gives its memory back. The check and the write are one step under a
 * lock (one worker process per host). A request that does not fit now is told so, and its
 * workflow waits on a timer and asks again: no activity slot is held while it waits.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CloudletError } from '../core/errors';

export interface AdmissionConfig {
  /** What the host gives its VMs in all; absent: total memory less `reserveBytes`. */
  vmMemoryBytes?: number;
  reserveBytes: number;
}

const MiB = 1024 * 1024;

export function admissionsDir(dataDir: string): string {
  return path.join(dataDir, 'admitted');
}

/** The guest memory a domain XML gives its VM (its <memory> element). */
export function domainMemoryBytes(xml: string): number {
  const m = /<memory(?:\s+unit=['"](\w+)['"])?\s*>(\d+)<\/memory>/.exec(xml);
  const unit = (m?.[1] ?? 'KiB').toLowerCase();
  const scale: Record<string, number> = { b: 1, bytes: 1, kib: 1024, k: 1024, kb: 1000, mib: MiB, m: MiB, mb: 1e6, gib: 1024 * MiB, g: 1024 * MiB, gb: 1e9, tib: 1024 ** 4, t: 1024 ** 4, tb: 1e12 };
  const factor = scale[unit];
  // Fail closed: a size that cannot be read must not admit a VM of any size.
  if (!m?.[2] || factor === undefined) {
    throw new CloudletError('CORRUPT', `the domain XML gives no guest memory size that can be read (${m ? `unit "${m[1]}"` : 'no <memory> element'})`, { fix: 'rebuild the overlay from a VM saved by libvirt' });
  }
  return Number(m[2]) * factor;
}

/** What a host gives its VMs in all: CLOUDLET_VM_MEMORY_MIB, else its total memory less the reserve. */
export function vmCapacityBytes(admission: AdmissionConfig): number {
  return admission.vmMemoryBytes ?? Math.max(0, os.totalmem() - admission.reserveBytes);
}

/** The guest memory of the host's admitted VMs (all but `except`'s). */
export async function admittedBytes(dataDir: string, except?: string): Promise<number> {
  const dir = admissionsDir(dataDir);
  let sum = 0;
  for (const n of await fs.promises.readdir(dir).catch(() => [] as string[])) {
    if (!n.endsWith('.json') || n === `${except}.json`) continue;
    const text = await fs.promises.readFile(path.join(dir, n), 'utf8').catch(() => '');
    sum += Number((JSON.parse(text || '{}') as { memoryBytes?: number }).memoryBytes ?? 0);
  }
  return sum;
}

export function createAdmissionActivities(deps: { hostId: string; dataDir: string; admission: AdmissionConfig }) {
  const dir = admissionsDir(deps.dataDir);
  const capacity = (): number => vmCapacityBytes(deps.admission);
  let lock: Promise<unknown> = Promise.resolve();
  const exclusive = <T>(f: () => Promise<T>): Promise<T> => {
    const run = lock.then(f, f);
    lock = run.catch(() => undefined);
    return run;
  };
  const committed = (except: string): Promise<number> => admittedBytes(deps.dataDir, except);

  return {
    /**
     * Admits the instance when its memory fits beside the admitted ones (again: yes). Otherwise
     * `admitted: false` with the figures, and the caller asks again later. A VM larger than all
     * the host gives VMs never fits: NO_MEMORY.
     */
    async admitInstance(input: { instanceId: string; memoryBytes: number; hostId?: string }): Promise<{ admitted: boolean; committedBytes: number; capacityBytes: number }> {
      if (input.hostId !== undefined && input.hostId !== deps.hostId) {
        throw new CloudletError('BAD_INPUT', `admission for host ${input.hostId} ran on host ${deps.hostId}`, { fix: "start the workflow on the host's own queue" });
      }
      const cap = capacity();
      if (input.memoryBytes > cap) {
        throw new CloudletError('NO_MEMORY', `instance ${input.instanceId} needs ${Math.round(input.memoryBytes / MiB)} MiB of guest memory; host ${deps.hostId} gives its VMs ${Math.round(cap / MiB)} MiB in all`, {
          fix: 'synthesize it on a host with more memory, or raise CLOUDLET_VM_MEMORY_MIB (or lower CLOUDLET_MEMORY_RESERVE_MIB) there',
          details: { hostId: deps.hostId, needBytes: input.memoryBytes, capacityBytes: cap },
        });
      }
      return exclusive(async () => {
        const file = path.join(dir, `${input.instanceId}.json`);
        const others = await committed(input.instanceId);
        if (fs.existsSync(file)) return { admitted: true, committedBytes: others + input.memoryBytes, capacityBytes: cap };
        if (others + input.memoryBytes > cap) return { admitted: false, committedBytes: others, capacityBytes: cap };
        await fs.promises.mkdir(dir, { recursive: true });
        await fs.promises.writeFile(`${file}.tmp`, JSON.stringify({ instanceId: input.instanceId, memoryBytes: input.memoryBytes, at: new Date().toISOString() }));
        await fs.promises.rename(`${file}.tmp`, file);
        return { admitted: true, committedBytes: others + input.memoryBytes, capacityBytes: cap };
      });
    },
  };
}

/** Gives an instance's memory back (terminate and compensation call it; absent is fine). */
export async function releaseAdmission(dataDir: string, instanceId: string): Promise<void> {
  await fs.promises.rm(path.join(admissionsDir(dataDir), `${instanceId}.json`), { force: true });
}

export type AdmissionActivities = ReturnType<typeof createAdmissionActivities>;
