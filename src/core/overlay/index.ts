/**
 * VM overlays: create one from a launch VM (a qcow2 over the base disk + a libvirt save file) and
 * apply one to a base to rebuild the launch VM's files. Format: docs/overlay-format.md.
 */
import { randomBytes } from 'node:crypto';
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { joinSnapshot, splitSnapshot } from '../snapshot';
import { applyOverlayToParts } from './apply';
import { createOverlayFromParts } from './create';
import type { OverlayMeta } from './format';
import type { BaseFiles, BaseRef, CreateOverlayOptions, OnProgress, SaveFileTee } from './types';
import type { FetchPolicy } from '../fetch/policy';

export { readOverlayMeta, applyOverlayToParts } from './apply';
export { createOverlayFromParts } from './create';
export { OVERLAY_FORMAT_VERSION, type OverlayMeta, type SegmentRef, type BlobRef } from './format';
export type { BaseFiles, BaseRef, CreateOverlayOptions, LaunchMemory, JoinSnapshot, SaveFileTee } from './types';
export { baseFilesOf } from './types';

export interface CreateOverlayInput {
  base: BaseRef;
  /** qcow2 whose backing file is base.diskPath. */
  launchDiskPath: string;
  /** libvirt save file of the launch VM. */
  launchSavePath: string;
  outPath: string;
  options?: CreateOverlayOptions;
  /** Bytes examined so far (split memory snapshot, then disk + memory encoding). */
  onProgress?: (done: number, total: number, stage?: string) => void;
}

export async function createOverlay(input: CreateOverlayInput): Promise<OverlayMeta> {
  const memImagePath = path.join(path.dirname(path.resolve(input.outPath)), `.launch-memimg-${process.pid}-${randomBytes(4).toString('hex')}.tmp`);
  try {
    const layout = await splitSnapshot(input.launchSavePath, memImagePath, {
      onProgress: (d: number, t: number) => input.onProgress?.(d, t, 'split memory snapshot'),
    });
    return await createOverlayFromParts({
      base: input.base,
      launchDiskPath: input.launchDiskPath,
      memory: {
        memImagePath,
        skeleton: layout.skeleton,
        mode: layout.mode,
        domainXml: layout.domainXml,
        cpuModel: layout.cpuModel,
        saveFileSize: layout.saveFileSize,
        saveFileSha256: layout.saveFileSha256,
      },
      outPath: input.outPath,
      ...(input.options ? { options: input.options } : {}),
      onProgress: (d, t) => input.onProgress?.(d, t, 'encode overlay'),
    });
  } finally {
    await rm(memImagePath, { force: true });
  }
}

export interface ApplyOverlayInput {
  /** The base's files and sizes: openBaseFiles (no chunk indexes to load), or baseFilesOf(an opened base). */
  base: BaseFiles;
  /** File path or http(s) URL. */
  overlay: string;
  /** Written as a qcow2 over base.diskPath. */
  outDiskPath: string;
  outSavePath: string;
  concurrency?: number;
  onProgress?: OnProgress;
  /** Stops the download (and so the apply) at once; the apply then removes what it wrote. */
  signal?: AbortSignal;
  /** The host's fetch policy (core/fetch); absent: no checks (the CLI on its own machine). */
  policy?: FetchPolicy;
  /** Directories of this host's own that a local overlay path may also be under. */
  extraDirs?: readonly string[];
  /** A consumer of the save file as it is rebuilt (see ApplyToPartsInput.onMeta). */
  onMeta?: (meta: OverlayMeta) => Promise<SaveFileTee | undefined>;
}

export function applyOverlay(input: ApplyOverlayInput): Promise<{ meta: OverlayMeta; timings: Record<string, number> }> {
  return applyOverlayToParts({ ...input, join: joinSnapshot });
}
