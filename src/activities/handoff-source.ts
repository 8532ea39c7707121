/**
 * Host activities of the source side of a handoff: ship a round (freeze the disk's top layer,
 * stream the VM's memory, diff both against what the destination holds, upload, have the
 * destination apply it), the cut-over (pause, last round, the destination resumes the VM), and
 * the two endings: the source VM removed, or resumed and serving as before.
 */
import { releaseAdmission } from './admission';
import fs from 'node:fs';
import { availableParallelism } from 'node:os';
import type { Logger } from 'pino';
import { exportBase, openBase } from '../core/base';
import { CloudletError, isCloudletError } from '../core/errors';
import { buildChunkIndex, type ChunkIndex } from '../core/chunk';
import { HandoffSource } from '../core/handoff/source';
import { handoffPaths } from '../core/handoff/paths';
import { chooseCompression, type CompressionSample } from '../core/handoff/policy';
import { probeCompression } from '../core/handoff/compression-probe';
import type { Compression } from '../core/handoff/round';
import { HandoffPeer, uploadBase, uploadRound, type HandoffTicket, type ReceivedVm } from '../client/handoff-peer';
import type { Hypervisor } from '../hypervisor/types';
import { heartbeat, heartbeatOrCancel, withHeartbeats, cancellationSignal } from './heartbeat';
import { instanceRecords } from './instance-records';
import { releaseClaimIn } from './pool-entries';
import { fingerprintVm, type VmFingerprint } from './vm-fingerprint';
import path from 'node:path';

export interface HandoffSourceDeps {
  hostId: string;
  dataDir: string;
  hypervisor: Hypervisor;
  log: Logger;
}

/** Where the source stands between rounds (persisted: a retried activity carries on). */
interface Layers {
  /** Disk layers frozen so far, oldest first (the instance's disk.qcow2 is the first). */
  frozen: string[];
  /** How many of them the destination has. */
  shipped: number;
}

export interface RoundInput {
  instanceId: string;
  ticket: HandoffTicket;
  destinationApiUrl: string;
  round: number;
  /** Default: chosen from a sample of the round's first records and `linkBytesPerSec`. */
  compression?: Compression;
  /** Link rate to plan the next round's compression with (bytes/s). */
  linkBytesPerSec: number;
}

export interface RoundReport {
  round: number;
  final: boolean;
  /** Bytes that crossed the link. */
  bytes: number;
  rawBytes: number;
  compression: Compression;
  memPages: number;
  memRawPages: number;
  diskChunks: number;
  diskRawChunks: number;
  /** Time the VM was paused by this round (the memory stream's last phase, until resumed). */
  pausedMs: number;
  ms: { capture: number; build: number; send: number; apply: number; total: number };
  /** Where the build's time went (see BuiltRound.ms). */
  buildMs?: { split: number; hashMemory: number; memory: number; disk: number; finish: number };
  sendBytesPerSec: number;
  /** What the next round should use, from this round's payload and link. */
  nextCompression: Compression;
}

/** A base package sent to a destination host that lacked it. */
export interface BaseSent {
  baseId: string;
  /** The package's size, and the bytes this attempt sent (less after a resumed upload). */
  bytes: number;
  sent: number;
  exportMs: number;
  uploadMs: number;
  importMs: number;
}

export function createHandoffSourceActivities(deps: HandoffSourceDeps) {
  const { hypervisor: hv, log } = deps;
  const records = instanceRecords(deps.hostId, deps.dataDir);
  const storeRoot = path.join(deps.dataDir, 'store');

  async function readLayers(file: string): Promise<Layers> {
    try {
      return JSON.parse(await fs.promises.readFile(file, 'utf8')) as Layers;
    } catch {
      return { frozen: [], shipped: 0 };
    }
  }

  async function writeLayers(file: string, l: Layers): Promise<void> {
    await fs.promises.writeFile(`${file}.tmp`, JSON.stringify(l));
    await fs.promises.rename(`${file}.tmp`, file);
  }

  let samples: { handoffId: string; samples: CompressionSample[] } | undefined;

  /**
   * One round: capture, diff, upload, apply at the destination, commit. The last round pauses the
   * VM itself, once everything that does not need the pause is ready (base and state opened, the
   * base's digest tables built); `onPause` hears when.
   */
  async function sendRound(input: RoundInput, final: boolean, onPause?: (at: number) => void): Promise<RoundReport> {
    const t0 = performance.now();
    const rec = await records.read(input.instanceId);
    const hid = input.ticket.handoffId;
    const p = handoffPaths(deps.dataDir, hid);
    await fs.promises.mkdir(p.source, { recursive: true });
    const peer = new HandoffPeer(input.destinationApiUrl);
    const base = await openBase(storeRoot, rec.baseId);
    const layers = await readLayers(p.layers);

    // A retry after the destination applied this round but before we committed: commit, done.
    const reportFile = path.join(p.source, `round-${input.round}.report.json`);
    if (fs.existsSync(reportFile) && (await peer.status(input.ticket)).applied >= input.round) {
      const report = JSON.parse(await fs.promises.readFile(reportFile, 'utf8')) as RoundReport;
      const src = await HandoffSource.open(p.source, hid, base);
      await src.commitPending();
      return report;
    }

    // Capture: freeze the disk's top layer (live rounds) and stream the memory. A VM whose RAM is
    // a shared file streams only its device state and small RAM blocks (x-ignore-shared); its RAM
    // is read from the file.
    let sharedRam: { block: string; path: string; index?: Promise<ChunkIndex> } | undefined = await hv.sharedRamFile(rec.domain);
    const streamOptions = sharedRam ? { ignoreShared: true } : {};
    /** Starts hashing the RAM file on worker threads, to overlap the device-state stream; the build awaits it. */
    const hashRamAhead = (): void => {
      if (!sharedRam) return;
      const index = buildChunkIndex(sharedRam.path, { holes: 'skip' });
      index.catch(() => undefined); // a capture failure must not leave it unhandled
      sharedRam = { ...sharedRam, index };
    };
    const tc = performance.now();
    let pausedMs = 0;
    const save = p.sourceSave(input.round);
    let diskLayers: string[];
    if (!final) {
      // A name of its own per attempt: a retried round freezes the layer the failed attempt made too.
      const top = path.join(records.dir(input.instanceId), `disk-${hid}-${input.round}-${Date.now().toString(36)}.qcow2`);
      const snap = await hv.snapshotDisk(rec.domain, top);
      layers.frozen.push(snap.previousTop);
      await writeLayers(p.layers, layers);
      diskLayers = layers.frozen.slice(layers.shipped);
      // The running VM's RAM is hashed while its device state streams (the last round corrects what changes meanwhile).
      hashRamAhead();
      try {
        const s = await withHeartbeats(hv.streamMemory(rec.domain, save, streamOptions), () => ({ stage: `round ${input.round}: stream memory` }));
        const tr = performance.now();
        await hv.resume(rec.domain);
        pausedMs = (s.downtimeMs ?? 0) + Math.round(performance.now() - tr);
      } finally {
        if ((await hv.state(rec.domain)) === 'paused') await hv.resume(rec.domain);
      }
    } else {
      // Pause as late as possible: what the build needs that does not change is ready first.
      (await HandoffSource.open(p.source, hid, base)).warm();
      if ((await hv.state(rec.domain)) === 'running') {
        onPause?.(performance.now());
        await hv.suspend(rec.domain);
      }
      // Paused: the memory stream is exact and the top layer still.
      hashRamAhead();
      await withHeartbeats(hv.streamMemory(rec.domain, save, streamOptions), () => ({ stage: 'last round: stream memory' }));
      diskLayers = [...layers.frozen.slice(layers.shipped), await hv.diskTop(rec.domain)];
    }
    const captureMs = Math.round(performance.now() - tc);

    // Build the round against what the destination holds.
    const src = await HandoffSource.open(p.source, hid, base);
    const out = p.sourceRound(input.round);
    const choose = async (sample: Buffer): Promise<Compression> => {
      if (samples?.handoffId !== hid) samples = { handoffId: hid, samples: await probeCompression(sample) };
      return chooseCompression(samples.samples, input.linkBytesPerSec, availableParallelism()).choice;
    };
    let built;
    try {
      built = await src.buildRound({
        round: input.round,
        memorySave: save,
        diskLayers,
        outPath: out,
        compression: input.compression ?? choose,
        final,
        ...(sharedRam ? { sharedRam } : {}),
        onProgress: (done, total, stage) => heartbeatOrCancel({ stage: `round ${input.round}: ${stage}`, bytesDone: done, bytesTotal: total }),
      });
    } finally {
      await fs.promises.rm(save, { force: true });
    }
    const buildMs = Math.round(built.ms.total);

    // Upload and have it applied.
    const signal = cancellationSignal();
    const up = await uploadRound(input.ticket, input.round, out, {
      onProgress: (sent, total) => heartbeat({ stage: `round ${input.round}: send`, bytesDone: sent, bytesTotal: total }),
      ...(signal && !final ? { signal } : {}),
    });
    await src.stagePending();
    const ta = performance.now();
    const applied = await withHeartbeats(peer.roundReady(input.ticket, input.round, final), () => ({ stage: `round ${input.round}: destination applies` }));
    const applyMs = Math.round(performance.now() - ta);
    const sendBytesPerSec = up.ms > 0 ? (up.bytes / up.ms) * 1000 : input.linkBytesPerSec;

    // The next round's compression, from this round's payload and the link just measured.
    if (samples?.handoffId !== hid && built.sample.length > 0) samples = { handoffId: hid, samples: await probeCompression(built.sample) };
    const link = up.ms > 200 && up.bytes > 256 * 1024 ? sendBytesPerSec : input.linkBytesPerSec;
    const next = samples ? chooseCompression(samples.samples, link, availableParallelism()).choice : built.meta.compression;

    const report: RoundReport = {
      round: input.round,
      final,
      bytes: built.bytes,
      rawBytes: built.rawBytes,
      compression: built.meta.compression,
      memPages: built.meta.stats.memPages,
      memRawPages: built.meta.stats.memRaw,
      diskChunks: built.meta.stats.diskChunks,
      diskRawChunks: built.meta.stats.diskRaw,
      pausedMs,
      ms: { capture: captureMs, build: buildMs, send: up.ms, apply: applyMs, total: Math.round(performance.now() - t0) },
      buildMs: { split: built.ms.split, hashMemory: built.ms.hashMemory, memory: built.ms.memory, disk: built.ms.disk, finish: built.ms.finish },
      sendBytesPerSec: Math.round(sendBytesPerSec),
      nextCompression: next,
    };
    await fs.promises.writeFile(reportFile, JSON.stringify(report));
    await src.commitPending();
    if (!final) {
      layers.shipped = layers.frozen.length;
      await writeLayers(p.layers, layers);
    }
    await fs.promises.rm(out, { force: true });
    log.info({ handoffId: hid, instanceId: input.instanceId, round: input.round, final, bytes: report.bytes, memRawPages: report.memRawPages, diskRawChunks: report.diskRawChunks, ms: report.ms, applied: applied.round }, 'handoff round shipped');
    return report;
  }

  return {
    /** Checks the instance can be handed off from here; its base and application port. */
    async handoffInspectSource(input: { instanceId: string }): Promise<{ baseId: string; appPort: number; domain: string }> {
      const rec = await records.read(input.instanceId);
      const state = await hv.state(rec.domain);
      if (state !== 'running') {
        throw new CloudletError('CONFLICT', `instance ${input.instanceId} is ${state} on host ${deps.hostId}; only a running VM can be handed off`, { fix: 'resume or provision it first' });
      }
      return { baseId: rec.baseId, appPort: rec.appPort, domain: rec.domain };
    },

    async handoffLiveRound(input: RoundInput): Promise<RoundReport> {
      return sendRound(input, false);
    },

    /**
     * The cut-over: pause the VM, ship the last round (exact: the paused VM's memory and still
     * disk), have the destination rebuild, verify and resume it. The source VM stays paused.
     */
    async handoffCutOver(input: RoundInput & { verify?: 'digests' | 'full' }): Promise<{ report: RoundReport; received: ReceivedVm; pausedMs: number; verified?: VmFingerprint }> {
      const rec = await records.read(input.instanceId);
      let t0 = performance.now();
      const report = await sendRound(input, true, (at) => (t0 = at));
      let verified: VmFingerprint | undefined;
      if (input.verify === 'full') {
        const p = handoffPaths(deps.dataDir, input.ticket.handoffId);
        verified = await withHeartbeats(fingerprintVm(hv, rec.domain, await hv.diskTop(rec.domain), p.source), () => ({ stage: 'fingerprint the paused VM' }));
      }
      const peer = new HandoffPeer(input.destinationApiUrl);
      let received: ReceivedVm;
      try {
        received = await withHeartbeats(peer.complete(input.ticket, rec.appPort, verified), () => ({ stage: 'destination resumes the VM' }));
      } catch (e) {
        // The answer may be lost after the destination resumed the VM: ask before giving up.
        const st = await peer.status(input.ticket).catch(() => undefined);
        if (st?.phase === 'resumed' && st.result) received = st.result;
        else throw e;
      }
      return { report, received, pausedMs: Math.round(performance.now() - t0), ...(verified ? { verified } : {}) };
    },

    /** Before the cut-over completed: the source VM runs again, the destination forgets the handoff. */
    /**
     * The destination host lacks the VM's base: export its package (kept for the next handoff),
     * upload it to the receiver (resumable), and have the destination import it.
     */
    async handoffSendBase(input: { instanceId: string; ticket: HandoffTicket; destinationApiUrl: string }): Promise<BaseSent> {
      const rec = await records.read(input.instanceId);
      const file = handoffPaths(deps.dataDir, input.ticket.handoffId).exportedBase(rec.baseId);
      let exportMs = 0;
      if (!fs.existsSync(file)) {
        const t0 = performance.now();
        await fs.promises.mkdir(path.dirname(file), { recursive: true });
        await exportBase(storeRoot, rec.baseId, file, { onProgress: (done, total) => heartbeatOrCancel({ stage: 'export the base package', bytesDone: done, bytesTotal: total }) });
        exportMs = Math.round(performance.now() - t0);
      }
      const signal = cancellationSignal();
      const up = await uploadBase(input.ticket, file, {
        onProgress: (sent, total) => heartbeat({ stage: 'send the base package', bytesDone: sent, bytesTotal: total }),
        ...(signal ? { signal } : {}),
      });
      const imported = await withHeartbeats(new HandoffPeer(input.destinationApiUrl).baseReady(input.ticket), () => ({ stage: 'the destination imports the base' }));
      log.info({ handoffId: input.ticket.handoffId, baseId: rec.baseId, bytes: up.bytes, uploadMs: up.ms, importMs: imported.importMs }, 'base package sent to the destination');
      return { baseId: rec.baseId, bytes: up.bytes, sent: up.sent, exportMs, uploadMs: up.ms, importMs: imported.importMs };
    },

    async handoffResumeSource(input: { instanceId: string; ticket?: HandoffTicket; destinationApiUrl?: string; reason: string }): Promise<{ resumed: boolean; destinationAborted: boolean }> {
      const rec = await records.read(input.instanceId);
      let resumed = false;
      if ((await hv.state(rec.domain)) === 'paused') {
        await hv.resume(rec.domain);
        resumed = true;
      }
      let destinationAborted = false;
      if (input.ticket && input.destinationApiUrl) {
        try {
          await new HandoffPeer(input.destinationApiUrl).abort(input.ticket, input.reason);
          destinationAborted = true;
        } catch (e) {
          // The destination removes what it made on its own when it hears nothing (idle timeout).
          log.warn({ err: isCloudletError(e) ? e.message : String(e), handoffId: input.ticket.handoffId }, 'could not abort the handoff at the destination');
        }
        await fs.promises.rm(handoffPaths(deps.dataDir, input.ticket.handoffId).dir, { recursive: true, force: true });
      }
      log.info({ instanceId: input.instanceId, resumed, destinationAborted, reason: input.reason }, 'handoff abandoned; the source VM serves');
      return { resumed, destinationAborted };
    },

    /** After the destination confirmed: the source VM and its files go. */
    async handoffRemoveSource(input: { instanceId: string; handoffId: string }): Promise<{ removed: boolean }> {
      const domain = await records.domainOf(input.instanceId);
      await hv.destroy(domain);
      await hv.undefine(domain);
      // A VM started early (a pool entry's): its entry's path in the pool and its socket go too.
      await releaseClaimIn({ hostId: deps.hostId, dataDir: deps.dataDir, hypervisor: hv }, records.dir(input.instanceId));
      await releaseAdmission(deps.dataDir, input.instanceId);
      await fs.promises.rm(records.dir(input.instanceId), { recursive: true, force: true });
      await fs.promises.rm(handoffPaths(deps.dataDir, input.handoffId).dir, { recursive: true, force: true });
      return { removed: true };
    },
  };
}

export type HandoffSourceActivities = ReturnType<typeof createHandoffSourceActivities>;
