/**
 * Host activities of the cloudlet operations: import a base, resume it as an instance, snapshot
 * an instance into an overlay and publish it, synthesize an instance from an overlay URL,
 * terminate. Each is idempotent and heartbeats on long work; failures that a retry cannot fix
 * are typed CloudletErrors (made non-retryable at the boundary, see ./failures).
 */
import { phaseSpans, step } from '../common/tracing';
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { CloudletError, isCloudletError } from '../core/errors';
import { importBase, openBase, openBaseFiles, readBaseManifest } from '../core/base';
import { applyOverlay, createOverlay, readOverlayMeta, type OverlayMeta } from '../core/overlay';
import { readSaveHeader, rewriteSaveHeaderXml } from '../core/snapshot';
import { Store } from '../core/store';
import type { Hypervisor } from '../hypervisor/types';
import { createQcow2Overlay } from '../hypervisor/disk';
import { editDomainXml } from '../hypervisor/domain-xml';
import { GuestAppClient } from '../guest/app-client';
import { cancellationSignal, heartbeat, heartbeatOrCancel, withHeartbeats } from './heartbeat';
import { APP_PORT_DEFAULT, instanceRecords, type InstanceRecord } from './instance-records';
import type { VmFingerprint } from './vm-fingerprint';
import type { Fingerprint } from '../client/handoff-peer';
import type { FetchPolicy } from '../core/fetch/policy';
import { domainMemoryBytes, releaseAdmission } from './admission';
import { POOL_LOADED, releaseClaimIn } from './pool-entries';
import { poolEarlyStart } from './pool-early-start';
import { createInstanceRestore } from './instance-restore';

export type { InstanceRecord };

export interface CloudletActivityDeps {
  hostId: string;
  dataDir: string;
  hypervisor: Hypervisor;
  /** Base URL under which this host publishes its store's overlays (see workers/publisher). */
  publicUrl: () => string;
  log: Logger;
  /** What overlays and base packages may come from (docs/security.md). */
  fetchPolicy: FetchPolicy;
}

const progress = (stage: string) => (done: number, total: number) => heartbeatOrCancel({ stage, bytesDone: done, bytesTotal: total });

/** What served an instance's early start, for a synthesis's result: the warm pool's VM (named), or one it started. */
function earlyStartOf(rec: InstanceRecord): { poolEntry?: string; earlyStart?: 'pool' | 'own' } {
  if (rec.poolEntry === undefined) return {};
  return rec.startedOwn ? { earlyStart: 'own' } : { poolEntry: rec.poolEntry, earlyStart: 'pool' };
}

export function createInstanceActivities(deps: CloudletActivityDeps) {
  const { hypervisor: hv, log } = deps;
  const storeRoot = path.join(deps.dataDir, 'store');
  const records = instanceRecords(deps.hostId, deps.dataDir);
  // A deployment's overlay, fetched under the policy into the host's own directory, is read from there.
  const overlaySourceOptions = { policy: deps.fetchPolicy, extraDirs: [path.join(deps.dataDir, 'deployments')] };
  const domainName = records.domainName;
  /**
   * A check that names its host (a local activity runs on whichever worker runs the workflow task)
   * refuses to answer for another host.
   */
  const onThisHost = (input: { hostId?: string }): void => {
    if (input.hostId !== undefined && input.hostId !== deps.hostId) {
      throw new CloudletError('BAD_INPUT', `a check of host ${input.hostId} ran on host ${deps.hostId}: the workflow was started with onHostQueue on another queue than ${input.hostId}'s`, {
        fix: `start it on the host's own task queue (hostTaskQueue('${input.hostId}')), or without onHostQueue`,
        details: { hostId: input.hostId, ranOn: deps.hostId },
      });
    }
  };

  const instanceDir = records.dir;
  const releaseClaim = (dir: string): Promise<void> => releaseClaimIn({ hostId: deps.hostId, dataDir: deps.dataDir, hypervisor: hv }, dir);
  const readRecord = records.read;
  const writeRecord = records.write;

  const restoreAsInstance = createInstanceRestore({ hypervisor: hv, log, records });

  const activities = {
    async importBasePackage(input: { source: string }): Promise<{ baseId: string; alreadyPresent: boolean; diskBytes: number; memoryBytes: number; cpuModel?: string }> {
      // A path on this host or an http(s) URL (downloaded into the store's temp area).
      // A handoff's source uploads the package into this host's own handoffs directory.
      // Heartbeats go on while a download waits on its server, so a cancel reaches the activity
      // (and aborts the download) within seconds; a server that stops sending is the fetch's
      // idle timeout's to end (CLOUDLET_FETCH_IDLE_TIMEOUT_S).
      const signal = cancellationSignal();
      let last: { stage: string; bytesDone?: number; bytesTotal?: number } = { stage: 'import' };
      const onProgress = (done: number, total: number): void => {
        last = { stage: 'import', bytesDone: done, bytesTotal: total };
        heartbeatOrCancel(last);
      };
      const r = await withHeartbeats(importBase(storeRoot, input.source, { onProgress, policy: deps.fetchPolicy, extraDirs: [path.join(deps.dataDir, 'handoffs')], ...(signal ? { signal } : {}) }), () => last);
      const m = r.manifest;
      log.info({ baseId: m.baseId, alreadyPresent: r.alreadyPresent }, 'base imported');
      return { baseId: m.baseId, alreadyPresent: r.alreadyPresent, diskBytes: m.disk.size, memoryBytes: m.memory.saveFileSize, ...(m.cpuModel ? { cpuModel: m.cpuModel } : {}) };
    },

    /** Early, before any transfer: the CPU model the VM was saved with must be usable here. */
    async checkCpuModel(input: { cpuModel?: string; hostId?: string }): Promise<{ virtType: string; cpuModel: string }> {
      onThisHost(input);
      const virtType = await hv.virtType();
      const cpuModel = input.cpuModel ?? 'qemu64';
      await hv.checkCpuModel(cpuModel, virtType);
      return { virtType, cpuModel };
    },

    async describeOverlay(input: { overlayUrl: string }): Promise<{ baseId: string; cpuModel?: string; segments: number; bytes: number; memoryBytes: number }> {
      const meta = await readOverlayMeta(input.overlayUrl, overlaySourceOptions);
      const bytes = meta.segments.reduce((n, s) => n + s.length, 0);
      return { baseId: meta.base.id, ...(meta.launch.cpuModel ? { cpuModel: meta.launch.cpuModel } : {}), segments: meta.segments.length, bytes, memoryBytes: domainMemoryBytes(meta.launch.domainXml) };
    },

    async checkBasePresent(input: { baseId: string; hostId?: string }): Promise<{ cpuModel?: string; memoryBytes: number }> {
      onThisHost(input);
      try {
        // The manifest only: the apply step opens the whole base (indexes included) and checks it.
        const manifest = await readBaseManifest(storeRoot, input.baseId);
        // The guest memory a VM resumed from it is given (admission counts it).
        const memoryBytes = domainMemoryBytes(manifest.domainXml);
        return manifest.cpuModel ? { cpuModel: manifest.cpuModel, memoryBytes } : { memoryBytes };
      } catch (e) {
        if (isCloudletError(e) && e.code === 'NOT_FOUND') {
          throw new CloudletError('WRONG_BASE', `host ${deps.hostId} does not have base ${input.baseId}`, {
            fix: `import the base package on host ${deps.hostId} first (POST /v1/bases or cloudlet base import)`,
            details: { baseId: input.baseId, hostId: deps.hostId },
          });
        }
        throw e;
      }
    },

    /**
     * Everything synthesis checks before any transfer, in one step: what the overlay needs (its
     * meta, a few KB by Range), that its CPU model is usable here, and that its base is on this host.
     */
    async preflightSynthesis(input: { overlayUrl: string; hostId?: string }): Promise<{ baseId: string; cpuModel: string; virtType: string; memoryBytes: number; timings: Record<string, number>; ranMs: number }> {
      const timings: Record<string, number> = {};
      onThisHost(input);
      const began = Date.now();
      let t0 = began;
      const overlay = await activities.describeOverlay(input);
      timings['inspect overlayMs'] = Date.now() - t0;
      t0 = Date.now();
      const cpu = await activities.checkCpuModel(overlay.cpuModel ? { cpuModel: overlay.cpuModel } : {});
      timings['verify CPU modelMs'] = Date.now() - t0;
      t0 = Date.now();
      await activities.checkBasePresent({ baseId: overlay.baseId });
      timings['check baseMs'] = Date.now() - t0;
      // Its own run time: when it runs as a local activity, the history has no start/complete events.
      return { baseId: overlay.baseId, cpuModel: cpu.cpuModel, virtType: cpu.virtType, memoryBytes: overlay.memoryBytes, timings, ranMs: Date.now() - began };
    },

    /** A new instance from a base: a qcow2 over the base disk and the base's memory, resumed. */
    async resumeBaseInstance(input: { instanceId: string; baseId: string; appPort?: number }): Promise<InstanceRecord & { restoreMs: number }> {
      const dir = instanceDir(input.instanceId);
      const base = await openBase(storeRoot, input.baseId);
      await fs.promises.mkdir(dir, { recursive: true });
      const rec: InstanceRecord = fs.existsSync(path.join(dir, 'instance.json'))
        ? await readRecord(input.instanceId)
        : { instanceId: input.instanceId, hostId: deps.hostId, domain: domainName(input.instanceId), baseId: input.baseId, appPort: input.appPort ?? APP_PORT_DEFAULT, createdAt: new Date().toISOString() };
      await writeRecord(rec);
      const diskPath = path.join(dir, 'disk.qcow2');
      const savePath = path.join(dir, 'memory.sav');
      const state = await hv.state(rec.domain);
      // Done by an earlier attempt when it runs with its port forwarded. Otherwise an earlier
      // attempt was cut off (its worker killed): its VM may have run and written to its disk, so
      // it goes, and the disk and memory start again from the base.
      if (state !== 'running' || rec.hostPort === undefined) {
        if (state !== 'absent') {
          log.warn({ instanceId: input.instanceId, domain: rec.domain, state }, 'an earlier attempt of this resume was cut off: starting again from the base');
          await hv.destroy(rec.domain);
          await hv.undefine(rec.domain);
        }
        await createQcow2Overlay(diskPath, base.diskPath, 'raw');
        await withHeartbeats(fs.promises.copyFile(base.savePath, savePath), () => ({ stage: 'copy base memory' }));
      }
      const r = await restoreAsInstance(rec, savePath, diskPath);
      return { ...(await readRecord(input.instanceId)), restoreMs: r.restoreMs };
    },

    /** Save the instance's memory (the VM stops) and build its overlay against its base; publish it. */
    async createInstanceOverlay(input: { instanceId: string; keepInstance: boolean; lzmaLevel?: number; delta?: boolean }): Promise<{ overlayId: string; url: string; bytes: number; baseId: string; createMs: number }> {
      const rec = await readRecord(input.instanceId);
      const dir = instanceDir(input.instanceId);
      const launchSave = path.join(dir, 'launch.sav');
      const diskPath = path.join(dir, 'disk.qcow2');
      const state = await hv.state(rec.domain);
      if (state === 'running' || state === 'paused') {
        await hv.save(rec.domain, `${launchSave}.partial`);
        // A VM a warm pool served was started to preallocate its RAM: its overlay's VMs need not.
        const saved = await readSaveHeader(`${launchSave}.partial`);
        if (/<allocation\b/.test(saved.domainXml)) await rewriteSaveHeaderXml(`${launchSave}.partial`, editDomainXml(saved.domainXml, { preallocate: false }, `domain XML of ${launchSave}`));
        await fs.promises.rename(`${launchSave}.partial`, launchSave);
      } else if (!fs.existsSync(launchSave) && fs.existsSync(`${launchSave}.partial`)) {
        // An earlier attempt's worker died while libvirt saved the VM: libvirt finished the save
        // (it stops a domain only once its memory is saved), the rename was all that was left.
        log.warn({ instanceId: input.instanceId, domain: rec.domain, state }, 'taking the memory an earlier, cut-off attempt saved');
        await fs.promises.rename(`${launchSave}.partial`, launchSave);
      } else if (!fs.existsSync(launchSave)) {
        throw new CloudletError('CONFLICT', `instance ${input.instanceId} is ${state} and has no saved memory to build an overlay from`, { fix: 'resume it first' });
      }
      const base = await openBase(storeRoot, rec.baseId);
      const store = await Store.open(storeRoot);
      try {
        const tmpDir = await store.makeTempDir('overlay-');
        const out = path.join(tmpDir, 'overlay');
        const t0 = Date.now();
        const meta = await createOverlay({
          base,
          launchDiskPath: diskPath,
          launchSavePath: launchSave,
          outPath: out,
          options: { ...(input.lzmaLevel !== undefined ? { lzmaLevel: input.lzmaLevel } : {}), ...(input.delta !== undefined ? { delta: input.delta } : {}) },
          onProgress: (d, t, stage) => heartbeatOrCancel({ stage: stage ?? 'create overlay', bytesDone: d, bytesTotal: t }),
        });
        const createMs = Date.now() - t0;
        const added = await store.addOverlay(out, { meta, baseId: rec.baseId, move: true });
        await fs.promises.rm(tmpDir, { recursive: true, force: true });
        if (input.keepInstance) {
          // Resume the instance from the snapshot just taken (its copy keeps the launch state).
          const again = path.join(dir, 'memory.sav');
          await fs.promises.copyFile(launchSave, again);
          rec.hostPort = undefined;
          await restoreAsInstance(rec, again, diskPath);
        }
        const url = `${deps.publicUrl()}/overlays/${added.digest}.overlay`;
        log.info({ instanceId: input.instanceId, overlayId: added.digest, bytes: added.size, createMs }, 'overlay created');
        return { overlayId: added.digest, url, bytes: added.size, baseId: rec.baseId, createMs };
      } finally {
        store.close();
      }
    },

    /** Fetch, decompress and apply an overlay to the local base: the launch VM's disk and memory. */
    /**
     * Early start (docs/warm-pool.md): the save file streams into a VM while the apply rebuilds
     * it; the VM is a ready one of this host's warm pool when one fits, else one the synthesis
     * starts for itself. `warmPool`: false restores the save file once it is whole, as before.
     */
    async synthesizeInstanceFiles(input: { instanceId: string; overlayUrl: string; baseId: string; appPort?: number; warmPool?: boolean }): Promise<{ timings: Record<string, number>; fetchedBytes?: number; poolEntry?: string; earlyStart?: 'pool' | 'own' }> {
      const dir = instanceDir(input.instanceId);
      if (fs.existsSync(path.join(dir, 'synthesized'))) {
        // Done by an earlier attempt.
        const done = await readRecord(input.instanceId);
        return { timings: {}, ...earlyStartOf(done) };
      }
      // An earlier attempt that died half-way (e.g. its worker was killed) may have left partial
      // files, and a pool VM it took: start from an empty directory.
      await releaseClaim(dir);
      await fs.promises.rm(dir, { recursive: true, force: true });
      await fs.promises.mkdir(dir, { recursive: true });
      const rec: InstanceRecord = { instanceId: input.instanceId, hostId: deps.hostId, domain: domainName(input.instanceId), baseId: input.baseId, appPort: input.appPort ?? APP_PORT_DEFAULT, createdAt: new Date().toISOString() };
      const diskPath = path.join(dir, 'disk.qcow2');
      const savePath = path.join(dir, 'memory.sav');
      const base = await openBaseFiles(storeRoot, input.baseId);
      // Heartbeats also between blobs (a slow or stalled download is not a dead worker), and a
      // cancellation they bring back stops the download at once.
      let last = { stage: 'apply overlay', bytesDone: 0, bytesTotal: 0 };
      const onProgress = progress('apply overlay');
      const signal = cancellationSignal();
      // Early start: a VM (the warm pool's, else one started now) loads the save file while the apply rebuilds it.
      const early = input.warmPool === false ? undefined : poolEarlyStart(deps, { instanceId: input.instanceId, baseId: input.baseId, instanceDir: dir, appPort: rec.appPort, startOwn: true });
      const applyStart = Date.now();
      let r: Awaited<ReturnType<typeof applyOverlay>>;
      try {
        await early?.beforeMeta();
        r = await step('fetch, decompress and apply overlay', () => withHeartbeats(
          applyOverlay({
            base,
            overlay: input.overlayUrl,
            outDiskPath: diskPath,
            outSavePath: savePath,
            onProgress: (done, total) => {
              last = { stage: 'apply overlay', bytesDone: done, bytesTotal: total };
              onProgress(done, total);
            },
            ...(signal ? { signal } : {}),
            ...(early ? { onMeta: (meta: OverlayMeta) => early.onMeta(meta) } : {}),
            ...overlaySourceOptions,
          }),
          () => last,
        ), { 'cloudlet.overlay_url': input.overlayUrl });
      } catch (e) {
        await early?.abort();
        throw e;
      }
      // The apply's own phases, one after another (fetch, decompression and apply are pipelined in "stream").
      const tm = r.timings;
      phaseSpans(applyStart, (['meta', 'prepare', 'stream', 'finishDisk', 'joinAfterStream', 'rename'] as const).filter((k) => tm[k] !== undefined).map((k) => [`apply: ${k}`, tm[k] ?? 0]), { 'cloudlet.decompress_wait_ms': tm.decompressWait ?? 0, 'cloudlet.apply_segments_ms': tm.applySegments ?? 0 });
      if (r.meta.base.id !== input.baseId) {
        throw new CloudletError('WRONG_BASE', `overlay ${input.overlayUrl} was made for base ${r.meta.base.id}, not ${input.baseId}`);
      }
      const loaded = await early?.finish();
      if (loaded) {
        rec.domain = loaded.entry.domain;
        rec.poolEntry = loaded.entry.entryId;
        if (loaded.startedOwn) rec.startedOwn = true;
        Object.assign(r.timings, loaded.timings);
      }
      await writeRecord(rec);
      await fs.promises.writeFile(path.join(dir, 'synthesized'), '');
      return { timings: r.timings, fetchedBytes: r.meta.segments.reduce((n, seg) => n + seg.length, 0), ...earlyStartOf(rec) };
    },

    /** Resume the synthesized VM (restore, replug its NIC, forward its app port); optionally wait for its app. */
    /** `verify`: restore paused and check the VM's fingerprint (handoff with full verification) before it runs. */
    async resumeInstance(input: { instanceId: string; waitForApp?: boolean; appTimeoutMs?: number; verify?: Fingerprint; keepNic?: boolean }): Promise<{ restoreMs: number; replugMs: number; hostPort: number; timings: Record<string, number>; verified?: VmFingerprint; answeredAt?: number }> {
      const rec = await readRecord(input.instanceId);
      const dir = instanceDir(input.instanceId);
      let t0 = Date.now();
      const r = await restoreAsInstance(rec, path.join(dir, 'memory.sav'), path.join(dir, 'disk.qcow2'), input.verify, input.keepNic);
      const timings: Record<string, number> = { [r.replugged ? 'resume and replug NICMs' : 'resumeMs']: Date.now() - t0 };
      if (rec.poolEntry !== undefined && r.incoming === undefined && fs.existsSync(path.join(dir, POOL_LOADED))) {
        timings[rec.startedOwn ? 'resume the started VMMs' : 'resume the warm pool VMMs'] = r.restoreMs;
      } else if (r.incoming) {
        // No start and fill here: the VM was started ahead of the cut-over, during the live rounds.
        if (r.incoming.startMs !== undefined) timings['start QEMU for the device stateMs'] = r.incoming.startMs;
        if (r.incoming.fillMs !== undefined) timings['fill shared RAMMs'] = r.incoming.fillMs;
        timings['load device stateMs'] = r.incoming.incomingMs;
      }
      if (input.waitForApp) {
        // In the same step: one workflow task less between "resumed" and "answers".
        t0 = Date.now();
        // The test guest's own application (8080) has a state to read; any other answers HTTP.
        const app = new GuestAppClient(r.hostPort);
        const beat = (): void => heartbeat({ stage: 'wait for app' });
        await step('wait for app', async () => {
          if (rec.appPort === APP_PORT_DEFAULT) await app.waitForState(input.appTimeoutMs ?? 60_000, beat);
          else await app.waitForHttp('/', input.appTimeoutMs ?? 60_000, beat);
        }, { 'cloudlet.app_port': rec.appPort });
        timings['wait for appMs'] = Date.now() - t0;
        // When the application first answered (ms since the epoch): benchmarks measure a
        // handoff's downtime against the last answer of the source.
        return { ...r, timings, answeredAt: Date.now() };
      }
      return { ...r, timings };
    },

    async waitForApp(input: { instanceId: string; timeoutMs?: number }): Promise<{ waitedMs: number; state: unknown }> {
      const rec = await readRecord(input.instanceId);
      if (rec.hostPort === undefined) throw new CloudletError('CONFLICT', `instance ${input.instanceId} has no forwarded port yet`, { fix: 'resume it first' });
      const app = new GuestAppClient(rec.hostPort);
      return app.waitForState(input.timeoutMs ?? 60_000, () => heartbeat({ stage: 'wait for app' }));
    },

    async getInstance(input: { instanceId: string }): Promise<InstanceRecord & { state: string }> {
      const rec = await readRecord(input.instanceId);
      return { ...rec, state: await hv.state(rec.domain) };
    },

    /** Stop the VM and remove its files; a no-op for an instance that is already gone. */
    async terminateInstance(input: { instanceId: string }): Promise<{ existed: boolean }> {
      const dir = instanceDir(input.instanceId);
      const domain = await records.domainOf(input.instanceId);
      const existed = fs.existsSync(dir) || (await hv.state(domain)) !== 'absent';
      await hv.destroy(domain);
      await hv.undefine(domain);
      // A pool-served VM's synthesis cut off before its record: the claim names its domain.
      await releaseClaim(dir);
      await releaseAdmission(deps.dataDir, input.instanceId);
      await fs.promises.rm(dir, { recursive: true, force: true });
      return { existed };
    },
  };
  return activities;
}

export type InstanceActivities = ReturnType<typeof createInstanceActivities>;
