/**
 * Host activities of the destination side of a handoff: prepare the working files from the base
 * and open the receiver to the ticket, apply each round as it arrives, rebuild and verify the VM
 * after the last (then the instance activities resume it), or remove everything on an abort.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { openBase, readBaseManifest } from '../core/base';
import { CloudletError, isCloudletError } from '../core/errors';
import { HandoffDestination } from '../core/handoff/destination';
import { handoffPaths } from '../core/handoff/paths';
import type { Hypervisor } from '../hypervisor/types';
import { withHeartbeats } from './heartbeat';
import { releaseAdmission } from './admission';
import { randomUUID } from 'node:crypto';
import { instanceRecords, SHARED_RAM_IMAGE, type InstanceRecord } from './instance-records';
import { createQcow2Overlay } from '../hypervisor/disk';
import { editDomainXml } from '../hypervisor/domain-xml';
import { fillRamFile } from '../hypervisor/ram-file';
import type { PreparePart } from '../core/handoff/round';

export interface HandoffDestinationDeps {
  hostId: string;
  dataDir: string;
  hypervisor: Hypervisor;
  publicUrl: () => string;
  log: Logger;
}

export interface ReceiveInput {
  handoffId: string;
  instanceId: string;
  baseId: string;
}

/** In the handoff's directory: the VM started ahead of the cut-over (startAhead). */
const STARTED_AHEAD = 'started-ahead.json';

interface StartedAhead {
  domain: string;
  ramFile: string;
  offset: number;
  length: number;
}

async function readStarted(dir: string): Promise<StartedAhead | undefined> {
  try {
    return JSON.parse(await fs.promises.readFile(path.join(dir, STARTED_AHEAD), 'utf8')) as StartedAhead;
  } catch {
    return undefined;
  }
}

export function createHandoffDestinationActivities(deps: HandoffDestinationDeps) {
  const { hypervisor: hv, log } = deps;
  const records = instanceRecords(deps.hostId, deps.dataDir);
  const storeRoot = path.join(deps.dataDir, 'store');

  async function open(input: ReceiveInput): Promise<HandoffDestination> {
    const base = await openBase(storeRoot, input.baseId);
    return HandoffDestination.open(handoffPaths(deps.dataDir, input.handoffId).work, base);
  }

  /**
   * Starts the VM's QEMU ahead of the cut-over, paused and waiting for its device state, on an
   * empty disk layer over the base (rewritten in place at the cut-over) and with its RAM file
   * filled from the memory image as of this round; later rounds write their pages into that file
   * too. A failure here is logged and costs nothing but time: the cut-over then starts the VM
   * itself. Returns how long it took, or undefined when it did not happen.
   */
  async function startAhead(input: ReceiveInput, dest: HandoffDestination, prepare: PreparePart): Promise<number | undefined> {
    const t0 = performance.now();
    const dir = records.dir(input.instanceId);
    const domain = records.domainName(input.instanceId);
    try {
      const base = await openBase(storeRoot, input.baseId);
      await fs.promises.mkdir(dir, { recursive: true });
      const diskPath = path.join(dir, 'disk.qcow2');
      await fs.promises.rm(diskPath, { force: true });
      await createQcow2Overlay(diskPath, base.diskPath, 'raw');
      const xml = editDomainXml(prepare.domainXml, { name: domain, uuid: randomUUID(), diskPath, diskFormat: 'qcow2', serialPath: path.join(dir, 'serial.log'), sharedMemory: true, preallocate: false }, 'domain XML of a handoff round');
      const vm = await hv.startIncoming(xml);
      await fillRamFile(vm.ramFile.path, { path: dest.memPath, offset: prepare.sharedRam.offset, length: prepare.sharedRam.length });
      const started: StartedAhead = { domain, ramFile: vm.ramFile.path, offset: prepare.sharedRam.offset, length: prepare.sharedRam.length };
      await fs.promises.writeFile(path.join(handoffPaths(deps.dataDir, input.handoffId).dir, STARTED_AHEAD), JSON.stringify(started));
      return Math.round(performance.now() - t0);
    } catch (e) {
      log.warn({ handoffId: input.handoffId, domain, err: isCloudletError(e) ? e.message : String(e) }, 'could not start the VM ahead of the cut-over; the cut-over will');
      await hv.destroy(domain).catch(() => undefined);
      await fs.promises.rm(dir, { recursive: true, force: true });
      return undefined;
    }
  }

  return {
    /**
     * The receiver accepts the ticket from now on. Says whether this host holds the VM's base (if
     * not, the source sends its package to `basePackage` and the workflow imports it).
     */
    async receiveOpen(input: ReceiveInput): Promise<{ receiverUrl: string; hasBase: boolean; basePackage: string }> {
      let hasBase = true;
      try {
        await readBaseManifest(storeRoot, input.baseId);
      } catch (e) {
        if (!isCloudletError(e) || e.code !== 'NOT_FOUND') throw e;
        hasBase = false;
      }
      if (records.exists(input.instanceId)) {
        const rec = await records.read(input.instanceId);
        if (rec.handoffId !== input.handoffId) {
          throw new CloudletError('CONFLICT', `host ${deps.hostId} already has an instance ${input.instanceId}`, { fix: 'terminate it first, or hand off under another id' });
        }
      }
      const p = handoffPaths(deps.dataDir, input.handoffId);
      await fs.promises.mkdir(p.incoming, { recursive: true });
      await fs.promises.writeFile(p.receiving, JSON.stringify({ instanceId: input.instanceId, since: new Date().toISOString() }));
      return { receiverUrl: `${deps.publicUrl()}/handoffs/${input.handoffId}`, hasBase, basePackage: p.incomingBase };
    },

    /** Working files from the base (imported by now); a base package the source sent goes. */
    async receivePrepare(input: ReceiveInput): Promise<void> {
      try {
        await readBaseManifest(storeRoot, input.baseId);
      } catch (e) {
        if (isCloudletError(e) && e.code === 'NOT_FOUND') {
          throw new CloudletError('WRONG_BASE', `host ${deps.hostId} does not have base ${input.baseId.slice(0, 12)}…, which the VM runs on`, {
            fix: `import the base on host ${deps.hostId} first (POST /v1/bases), or hand off to a host that has it`,
          });
        }
        throw e;
      }
      const p = handoffPaths(deps.dataDir, input.handoffId);
      await fs.promises.rm(p.incomingBase, { force: true });
      await withHeartbeats(open(input), () => ({ stage: 'prepare working files' }));
    },

    async receiveApplyRound(input: ReceiveInput & { round: number }): Promise<{ round: number; ms: number; stats: Record<string, number>; final: boolean }> {
      const dest = await open(input);
      const file = handoffPaths(deps.dataDir, input.handoffId).incomingRound(input.round);
      if (dest.lastRound >= input.round) return { round: input.round, ms: 0, stats: {}, final: dest.finalRound === input.round };
      if (!fs.existsSync(file)) {
        throw new CloudletError('CONFLICT', `round ${input.round} of handoff ${input.handoffId} has not arrived on host ${deps.hostId}`, { fix: 'upload it to the receiver first' });
      }
      const p = handoffPaths(deps.dataDir, input.handoffId);
      const started = await readStarted(p.dir);
      const mirror = started ? { path: started.ramFile, offset: started.offset, length: started.length } : undefined;
      const { prepare, ...r } = await withHeartbeats(dest.applyRound(file, { handoffId: input.handoffId, round: input.round }, mirror), () => ({ stage: `apply round ${input.round}` }));
      await fs.promises.rm(file, { force: true });
      let startMs: number | undefined;
      if (prepare && !r.final && !started) startMs = await startAhead(input, dest, prepare);
      log.info({ handoffId: input.handoffId, round: r.round, ms: r.ms, stats: r.stats, ...(startMs !== undefined ? { startAheadMs: startMs } : {}) }, 'handoff round applied');
      return r;
    },

    /**
     * After the last round: the receiver closes (the ticket is used up), the VM's save file and
     * disk are rebuilt and verified into the instance's directory, ready for resumeInstance.
     */
    async receiveFinish(input: ReceiveInput & { appPort: number }): Promise<{ timings: Record<string, number> }> {
      const p = handoffPaths(deps.dataDir, input.handoffId);
      await fs.promises.rm(p.receiving, { force: true });
      const dir = records.dir(input.instanceId);
      if (fs.existsSync(path.join(dir, 'synthesized'))) return { timings: {} };
      await fs.promises.mkdir(dir, { recursive: true });
      const dest = await open(input);
      const started = await readStarted(p.dir);
      const r = await withHeartbeats(dest.finish({ diskPath: path.join(dir, 'disk.qcow2'), savePath: path.join(dir, 'memory.sav'), ramPath: path.join(dir, SHARED_RAM_IMAGE), inPlaceDisk: started !== undefined }), () => ({ stage: 'rebuild and verify' }));
      // The VM's shared RAM block is loaded from the rebuilt memory image (restoreAsInstance), or
      // is already in the RAM file of the VM started ahead, which then only takes the device state.
      if (r.final.sharedRam) await fs.promises.writeFile(path.join(dir, `${SHARED_RAM_IMAGE}.json`), JSON.stringify({ ...r.final.sharedRam, ...(started ? { startedAhead: started.domain } : {}) }));
      const rec: InstanceRecord = {
        instanceId: input.instanceId,
        hostId: deps.hostId,
        domain: records.domainName(input.instanceId),
        baseId: input.baseId,
        appPort: input.appPort,
        createdAt: new Date().toISOString(),
        handoffId: input.handoffId,
      };
      await records.write(rec);
      await fs.promises.writeFile(path.join(dir, 'synthesized'), '');
      await fs.promises.rm(p.dir, { recursive: true, force: true });
      return { timings: { 'rebuild memoryMs': r.ms.join, 'rebuild diskMs': r.ms.disk, 'verifyMs': r.ms.verify, ...(r.ms.verifyMemory !== undefined ? { 'verify memoryMs': r.ms.verifyMemory } : {}) } };
    },

    /** The handoff ends without a VM here: whatever it made goes (an instance it made too). */
    async receiveAbort(input: ReceiveInput): Promise<{ removedInstance: boolean }> {
      const p = handoffPaths(deps.dataDir, input.handoffId);
      await fs.promises.rm(p.receiving, { force: true });
      let removedInstance = false;
      if (records.exists(input.instanceId)) {
        const rec = await records.read(input.instanceId).catch(() => undefined);
        if (rec?.handoffId === input.handoffId) {
          await hv.destroy(rec.domain);
          await hv.undefine(rec.domain);
          await fs.promises.rm(records.dir(input.instanceId), { recursive: true, force: true });
          await releaseAdmission(deps.dataDir, input.instanceId);
          removedInstance = true;
        }
      } else {
        // Files of a finish that stopped half-way (no record yet), and a VM started ahead (the
        // destination refuses an instance id it already runs, so that domain name is this handoff's).
        if (fs.existsSync(path.join(p.dir, STARTED_AHEAD))) await hv.destroy(records.domainName(input.instanceId));
        await fs.promises.rm(records.dir(input.instanceId), { recursive: true, force: true });
        // Its admission (receiveHandoff admits the VM before it prepares anything).
        await releaseAdmission(deps.dataDir, input.instanceId);
      }
      await fs.promises.rm(p.dir, { recursive: true, force: true });
      log.info({ handoffId: input.handoffId, removedInstance }, 'handoff aborted at the destination; its files are removed');
      return { removedInstance };
    },
  };
}

export type HandoffDestinationActivities = ReturnType<typeof createHandoffDestinationActivities>;
