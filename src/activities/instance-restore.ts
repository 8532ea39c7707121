/**
 * Restoring a save file as an instance's VM (resume, synthesis, handoff): under the instance's own
 * name and UUID, from a whole save, a device-state save over a shared RAM image, a VM a handoff
 * started ahead, or a warm pool VM the synthesis loaded already; then the NIC (replugged unless it
 * is new already or kept), the balloon and the app port.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { step } from '../common/tracing';
import { readSaveHeader, rewriteSaveHeaderXml } from '../core/snapshot';
import type { Hypervisor, RestoreIncomingResult, RestoreResult } from '../hypervisor/types';
import { editDomainXml, interfaceElements, memorySizes } from '../hypervisor/domain-xml';
import type { Fingerprint } from '../client/handoff-peer';
import { withHeartbeats } from './heartbeat';
import { randomMac } from './guest';
import { SHARED_RAM_IMAGE, type InstanceRecord, type instanceRecords } from './instance-records';
import { fingerprintVm, type VmFingerprint } from './vm-fingerprint';
import { POOL_LOADED } from './pool-entries';
import { CloudletError } from '../core/errors';

/** Whether every NIC of a domain is a user-mode one (a network of its own QEMU process, private to the VM). */
function userModeNicsOnly(domainXml: string): boolean {
  const nics = interfaceElements(domainXml);
  return nics.length > 0 && nics.every((n) => n.info.type === 'user');
}

export interface RestoredInstance {
  restoreMs: number;
  replugMs: number;
  replugged: boolean;
  hostPort: number;
  verified?: VmFingerprint;
  incoming?: { startMs?: number; fillMs?: number; incomingMs: number };
}

export function createInstanceRestore(deps: { hypervisor: Hypervisor; log: Logger; records: ReturnType<typeof instanceRecords> }) {
  const { hypervisor: hv, log } = deps;
  const writeRecord = deps.records.write;
  /**
   * Restore a save file as this instance's VM: libvirt refuses a restore under another name or
   * UUID, so the domain XML is rewritten inside the (padded) header of the instance's own copy of
   * the save file; then the NIC is replugged with a fresh MAC and the app port forwarded.
   * `keepNic`: keep the saved NIC (MAC and guest address), as a live migration does: a VM that
   * arrives by handoff is the same VM on the same virtual network, so its guest need not notice a
   * new device (no hot-plug, no DHCP before it answers).
   */
  return async function restoreAsInstance(rec: InstanceRecord, savePath: string, diskPath: string, verify?: Fingerprint, keepNic = false): Promise<RestoredInstance> {
    const state = await hv.state(rec.domain);
    if (state === 'running' && rec.hostPort !== undefined) return { restoreMs: 0, replugMs: 0, replugged: false, hostPort: rec.hostPort };
    const ramImage = path.join(path.dirname(savePath), SHARED_RAM_IMAGE);
    const sharedRam = fs.existsSync(`${ramImage}.json`) ? (JSON.parse(await fs.promises.readFile(`${ramImage}.json`, 'utf8')) as { offset: number; length: number; startedAhead?: string }) : undefined;
    // What the synthesis left when it streamed the save into a warm pool VM (early start).
    const preloaded = rec.poolEntry === undefined ? undefined : await fs.promises.readFile(path.join(path.dirname(savePath), POOL_LOADED), 'utf8').then((t) => JSON.parse(t) as { hostPort?: number }).catch(() => undefined);
    // A VM a handoff started ahead (paused, waiting for its device state, its RAM filled) is used
    // as it is, and so is a warm pool's VM this synthesis took and loaded (paused, waiting to run);
    // anything else under this name is a leftover.
    const ahead = sharedRam?.startedAhead === rec.domain && state === 'paused';
    const pooled = preloaded !== undefined && !sharedRam && state === 'paused';
    if (state !== 'absent' && !ahead && !pooled) {
      await hv.destroy(rec.domain);
      await hv.undefine(rec.domain);
    }
    const header = await readSaveHeader(savePath);
    const serialPath = path.join(path.dirname(savePath), 'serial.log');
    // Every instance's RAM is a shared file: a handoff reads it and hands it over without a memory stream.
    const xml = editDomainXml(header.domainXml, { name: rec.domain, uuid: randomUUID(), diskPath, diskFormat: 'qcow2', serialPath, sharedMemory: true, incomingDefer: false, preallocate: false }, `domain XML of ${savePath}`);
    await rewriteSaveHeaderXml(savePath, xml);
    let servedByPool = false;
    const restored: RestoreResult & Partial<RestoreIncomingResult> = await step('restore', async (): Promise<RestoreResult & Partial<RestoreIncomingResult>> => {
      if (pooled) {
        // The synthesis streamed the save into it already (early start): it only waits to run.
        const t1 = Date.now();
        if (!verify) await hv.resume(rec.domain);
        servedByPool = true;
        return { name: rec.domain, ms: Date.now() - t1 };
      }
      if (!sharedRam) return withHeartbeats(hv.restore(savePath, verify ? { paused: true } : {}), () => ({ stage: 'resume' }));
      if (ahead) {
        try {
          const c = await withHeartbeats(hv.completeIncoming(rec.domain, savePath, verify ? { paused: true } : {}), () => ({ stage: 'resume' }));
          return { name: rec.domain, ms: c.ms, incomingMs: c.ms };
        } catch (e) {
          // E.g. a retry after the device state was taken: start afresh from the memory image.
          log.warn({ domain: rec.domain, err: String(e) }, 'the VM started ahead did not take its device state; restoring it anew');
          await hv.destroy(rec.domain);
        }
      }
      // A device-state save (x-ignore-shared): the RAM block comes from the rebuilt memory image.
      // (The image stays until the instance runs: a retried step needs it again.)
      return withHeartbeats(hv.restoreIncoming(savePath, { path: ramImage, offset: sharedRam.offset, length: sharedRam.length }, verify ? { paused: true } : {}), () => ({ stage: 'resume' }));
    }, { 'cloudlet.domain': rec.domain });
    let verified: VmFingerprint | undefined;
    if (verify) {
      // Before the guest runs a single instruction: its memory and disk must be the source's.
      verified = await step('verify memory and disk', () => withHeartbeats(fingerprintVm(hv, rec.domain, diskPath, path.dirname(savePath)), () => ({ stage: 'verify memory and disk' })));
      if (verified.memorySha256 !== verify.memorySha256 || verified.diskSha256 !== verify.diskSha256) {
        await hv.destroy(rec.domain);
        await hv.undefine(rec.domain);
        throw new CloudletError('DIGEST_MISMATCH', `instance ${rec.instanceId}: the restored VM's ${verified.memorySha256 !== verify.memorySha256 ? 'guest memory' : 'disk'} differs from the source's (memory ${verified.memorySha256.slice(0, 12)}… vs ${verify.memorySha256.slice(0, 12)}…, disk ${verified.diskSha256.slice(0, 12)}… vs ${verify.diskSha256.slice(0, 12)}…)`, {
          fix: 'the VM was not resumed here; the source resumes its own',
        });
      }
      await hv.resume(rec.domain);
    }
    // A shrunk base's VM (its balloon inflated when it was saved) gets its memory back at once.
    const mem = memorySizes(header.domainXml);
    if (mem && mem.currentBytes < mem.maxBytes) {
      await step('grow the balloon back', () => hv.setBalloon(rec.domain, mem.maxBytes)).catch((e: unknown) => log.warn({ domain: rec.domain, err: String(e) }, 'could not give the VM its memory back; it runs with what its base was shrunk to'));
    }
    // A warm pool VM's NIC is already a new one: the user-mode network of a QEMU started for this
    // VM alone, which gives the guest the same address and gateway as any other. The guest keeps
    // the launch VM's MAC on it (the loaded device state carries it), and nothing outside that
    // private network sees it, so the NIC is not hot-plugged again. A NIC on a shared network
    // (bridge, libvirt network) is replugged with a fresh MAC as for any synthesized VM.
    const nicIsNew = servedByPool && userModeNicsOnly(header.domainXml);
    const replugged = !keepNic && !nicIsNew;
    const t0 = Date.now();
    if (replugged) await step('replug NIC', () => hv.replugNic(rec.domain, { mac: randomMac() }));
    const replugMs = Date.now() - t0;
    const fwd = servedByPool && preloaded?.hostPort !== undefined ? { hostPort: preloaded.hostPort } : await step('forward app port', () => hv.forwardPort(rec.domain, { guestPort: rec.appPort }));
    rec.hostPort = fwd.hostPort;
    await writeRecord(rec);
    if (sharedRam) {
      // Not awaited: freeing a 1 GiB file takes ~0.5 s, and the VM already runs (a retry of this
      // step finds it running and returns early).
      void fs.promises.rm(`${ramImage}.json`, { force: true }).then(() => fs.promises.rm(ramImage, { force: true })).catch((e: unknown) => log.warn({ file: ramImage, err: String(e) }, 'could not remove the shared RAM image'));
    }
    log.info({ instanceId: rec.instanceId, domain: rec.domain, restoreMs: restored.ms, replugMs, hostPort: fwd.hostPort }, 'instance running');
    const incoming = restored.incomingMs !== undefined ? { ...(restored.startMs !== undefined ? { startMs: restored.startMs } : {}), ...(restored.fillMs !== undefined ? { fillMs: restored.fillMs } : {}), incomingMs: restored.incomingMs } : undefined;
    return { restoreMs: restored.ms, replugMs, replugged, hostPort: fwd.hostPort, ...(verified ? { verified } : {}), ...(incoming ? { incoming } : {}) };
  };
}
