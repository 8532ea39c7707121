/**
 * The operations the CLI performs, behind one interface. `LocalBackend` calls the core directly on
 * this host's store (no libvirt, no Temporal needed for file operations). A remote mode (`--api URL`,
 * talking to the cloudlet HTTP API) is another implementation of this interface, selected in
 * `selectBackend`; the commands do not change.
 */
import type { BaseManifest, BaseSummary, ImportResult, VerifyReport } from '../core/base';
import type { OnProgress } from '../core/progress';
import type { OverlayRecord } from '../core/store';

export interface BaseDetails {
  manifest: BaseManifest;
  dir: string;
  files: Record<string, { path: string; size: number }>;
}

export interface OverlayCreateRequest {
  baseId: string;
  launchDiskPath: string;
  launchSavePath: string;
  /** Write here; when absent the overlay goes into the store under its digest. */
  outPath?: string;
  lzmaLevel?: number;
  delta?: boolean;
  segmentSize?: number;
}

export interface OverlayCreateResult {
  path: string;
  size: number;
  sha256: string;
  baseId: string;
  seconds: number;
  meta: unknown;
}

export interface SynthesizeRequest {
  overlay: string;
  /** Defaults to the base the overlay names. */
  baseId?: string;
  outDir: string;
  concurrency?: number;
  /**
   * Resume the result under libvirt (the domain keeps the name saved in the snapshot: libvirt
   * refuses a restore under another name). The serial console goes to `<outDir>/serial.log`.
   */
  resume?: { forwardGuestPort?: number };
}

export interface ResumeResult {
  domain: string;
  restoreMs: number;
  serialPath: string;
  /** 127.0.0.1:<hostPort> reaches the guest port asked for with forwardGuestPort. */
  forward?: { hostAddress: string; hostPort: number; guestPort: number };
}

export interface SynthesizeResult {
  baseId: string;
  diskPath: string;
  savePath: string;
  seconds: number;
  timings: Record<string, number>;
  meta: unknown;
  resumed?: ResumeResult & { seconds: number };
}

export interface Backend {
  createBase(input: { diskPath: string; savePath: string }, onProgress: OnProgress): Promise<BaseManifest>;
  importBase(packageFile: string, onProgress: OnProgress): Promise<ImportResult>;
  exportBase(baseId: string, outFile: string, onProgress: OnProgress): Promise<BaseManifest>;
  listBases(): Promise<BaseSummary[]>;
  baseInfo(baseId: string): Promise<BaseDetails>;
  removeBase(baseId: string): Promise<void>;
  verifyBase(baseId: string, onProgress: OnProgress): Promise<VerifyReport>;
  createOverlay(req: OverlayCreateRequest, onProgress: OnProgress): Promise<OverlayCreateResult>;
  overlayInfo(pathOrUrl: string): Promise<unknown>;
  listOverlays(): Promise<OverlayRecord[]>;
  synthesize(req: SynthesizeRequest, onProgress: OnProgress): Promise<SynthesizeResult>;
}
