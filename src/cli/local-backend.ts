/**
 * The standalone backend: the core, on this host's store. File operations need neither libvirt
 * nor Temporal; only `synthesize --resume` touches the hypervisor (loaded on demand).
 */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import type { BaseManifest, BaseSummary, ImportResult, VerifyReport } from '../core/base';
import { createBase, exportBase, importBase, listBases, openStoredBase, removeBase, verifyBase } from '../core/base';
import { CloudletError } from '../core/errors';
import { applyOverlay, baseFilesOf, createOverlay, readOverlayMeta } from '../core/overlay';
import type { OnProgress } from '../core/progress';
import type { OverlayRecord, Store } from '../core/store';
import { BASE_FILES, withStore } from '../core/store';
import type { Backend, BaseDetails, OverlayCreateRequest, OverlayCreateResult, SynthesizeRequest, SynthesizeResult } from './backend';
import type { Resumer } from './resume';

const DIGEST = /^[0-9a-f]{64}$/;

export class LocalBackend implements Backend {
  constructor(
    readonly storeRoot: string,
    private readonly resumer?: Resumer,
  ) {}

  createBase(input: { diskPath: string; savePath: string }, onProgress: OnProgress): Promise<BaseManifest> {
    return createBase({ ...input, storeRoot: this.storeRoot, onProgress });
  }

  importBase(packageFile: string, onProgress: OnProgress): Promise<ImportResult> {
    return importBase(this.storeRoot, packageFile, { onProgress });
  }

  async exportBase(baseId: string, outFile: string, onProgress: OnProgress): Promise<BaseManifest> {
    return exportBase(this.storeRoot, await this.resolveBaseId(baseId), outFile, { onProgress });
  }

  /** Full id from an id or a unique prefix. */
  resolveBaseId(ref: string): Promise<string> {
    return withStore(this.storeRoot, (store) => store.resolveBaseId(ref));
  }

  listBases(): Promise<BaseSummary[]> {
    return listBases(this.storeRoot);
  }

  baseInfo(baseId: string): Promise<BaseDetails> {
    return withStore(this.storeRoot, async (store) => {
      const base = await openStoredBase(store, await store.resolveBaseId(baseId));
      const files: BaseDetails['files'] = {};
      for (const [role, name] of Object.entries(BASE_FILES)) {
        const p = path.join(base.dir, name);
        files[role] = { path: p, size: (await fsp.stat(p)).size };
      }
      return { manifest: base.manifest, dir: base.dir, files };
    });
  }

  async removeBase(baseId: string): Promise<void> {
    return removeBase(this.storeRoot, await this.resolveBaseId(baseId));
  }

  verifyBase(baseId: string, onProgress: OnProgress): Promise<VerifyReport> {
    return verifyBase(this.storeRoot, baseId, { onProgress });
  }

  createOverlay(req: OverlayCreateRequest, onProgress: OnProgress): Promise<OverlayCreateResult> {
    return withStore(this.storeRoot, async (store) => {
      const base = await openStoredBase(store, await store.resolveBaseId(req.baseId));
      const started = performance.now();
      const tmpDir = req.outPath === undefined ? await store.makeTempDir('overlay') : undefined;
      const outPath = req.outPath !== undefined ? path.resolve(req.outPath) : path.join(tmpDir as string, 'new.overlay');
      try {
        const options: { lzmaLevel?: number; delta?: boolean; segmentSize?: number } = {};
        if (req.lzmaLevel !== undefined) options.lzmaLevel = req.lzmaLevel;
        if (req.delta !== undefined) options.delta = req.delta;
        if (req.segmentSize !== undefined) options.segmentSize = req.segmentSize;
        const meta = await createOverlay({
          base,
          launchDiskPath: path.resolve(req.launchDiskPath),
          launchSavePath: path.resolve(req.launchSavePath),
          outPath,
          options,
          onProgress: (d: number, t: number, stage?: string) => onProgress(d, t, stage ?? 'create overlay'),
        });
        const seconds = (performance.now() - started) / 1000;
        const rec = await store.addOverlay(outPath, { meta, baseId: base.id, move: tmpDir !== undefined });
        return {
          path: tmpDir !== undefined ? store.overlayPath(rec.digest) : outPath,
          size: rec.size,
          sha256: rec.digest,
          baseId: base.id,
          seconds,
          meta,
        };
      } finally {
        if (tmpDir !== undefined) await fsp.rm(tmpDir, { recursive: true, force: true });
      }
    });
  }

  overlayInfo(pathOrUrl: string): Promise<unknown> {
    return withStore(this.storeRoot, async (store) => readOverlayMeta(await resolveOverlay(store, pathOrUrl)));
  }

  listOverlays(): Promise<OverlayRecord[]> {
    return withStore(this.storeRoot, async (store) => store.catalog.listOverlays());
  }

  synthesize(req: SynthesizeRequest, onProgress: OnProgress): Promise<SynthesizeResult> {
    return withStore(this.storeRoot, async (store) => {
      const overlay = await resolveOverlay(store, req.overlay);
      const started = performance.now();
      const baseId = req.baseId !== undefined ? await store.resolveBaseId(req.baseId) : (await readOverlayMeta(overlay)).base.id;
      const base = await openStoredBase(store, baseId);
      const outDir = path.resolve(req.outDir);
      const createdDir = await fsp.mkdir(outDir, { recursive: true });
      try {
        return await this.synthesizeInto(overlay, base, outDir, req, onProgress, started);
      } catch (e) {
        // Leave no empty directory of ours behind (the engine already removed its temp files).
        if (createdDir !== undefined) await fsp.rmdir(outDir).catch(() => undefined);
        throw e;
      }
    });
  }

  private async synthesizeInto(
    overlay: string,
    base: Awaited<ReturnType<typeof openStoredBase>>,
    outDir: string,
    req: SynthesizeRequest,
    onProgress: OnProgress,
    started: number,
  ): Promise<SynthesizeResult> {
    const diskPath = path.join(outDir, 'disk.qcow2');
    const savePath = path.join(outDir, 'memory.sav');
    for (const p of [diskPath, savePath]) {
      if (await fsp.stat(p).then(() => true, () => false)) {
        throw new CloudletError('CONFLICT', `${p} already exists`, { fix: 'choose another --out directory or remove the old files' });
      }
    }
    const input: Parameters<typeof applyOverlay>[0] = {
      base: baseFilesOf(base),
      overlay,
      outDiskPath: diskPath,
      outSavePath: savePath,
      onProgress: (d: number, t: number, stage?: string) => onProgress(d, t, stage ?? 'synthesize'),
    };
    if (req.concurrency !== undefined) input.concurrency = req.concurrency;
    const { meta, timings } = await applyOverlay(input);
    const result: SynthesizeResult = { baseId: base.id, diskPath, savePath, seconds: (performance.now() - started) / 1000, timings, meta };
    if (req.resume) {
      if (!this.resumer) {
        throw new CloudletError('BAD_INPUT', 'this CLI was started without a hypervisor adapter, so it cannot resume the VM', { fix: 'run synthesize without --resume' });
      }
      const t0 = performance.now();
      const resumeInput: Parameters<Resumer>[0] = { diskPath, savePath, serialPath: path.join(outDir, 'serial.log'), cpuModel: meta.launch.cpuModel };
      if (req.resume.forwardGuestPort !== undefined) resumeInput.forwardGuestPort = req.resume.forwardGuestPort;
      const resumed = await this.resumer(resumeInput);
      result.resumed = { ...resumed, seconds: (performance.now() - t0) / 1000 };
    }
    return result;
  }
}

/** An overlay argument: an http(s) URL, a digest of an overlay in the store, or a file path. */
async function resolveOverlay(store: Store, arg: string): Promise<string> {
  if (/^https?:\/\//i.test(arg)) return arg;
  if (DIGEST.test(arg) && (await fsp.stat(store.overlayPath(arg)).then(() => true, () => false))) return store.overlayPath(arg);
  const p = path.resolve(arg);
  if (!(await fsp.stat(p).then((s) => s.isFile(), () => false))) {
    throw new CloudletError('NOT_FOUND', `overlay ${arg} is neither a file, an http(s) URL nor an overlay digest in the store ${store.root}`, {
      fix: 'check the path or URL',
    });
  }
  return p;
}
