/**
 * The destination side of a handoff: a working memory image (a copy of the base's) and a sparse
 * disk delta with a state byte per chunk, to which rounds are applied in order; then the last
 * round's skeleton and the memory image rebuild the save file (checked against the source's
 * sha256), and the disk delta becomes a qcow2 over the base disk. Every step persists what it did,
 * so a restarted worker carries on where it stopped.
 */
import { execFile } from 'node:child_process';
import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { mkdir, open, readFile, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { createHash } from 'node:crypto';
import { CloudletError } from '../errors';
import { buildChunkIndex, type ChunkIndex } from '../chunk';
import { CHUNK, Kind, Target, ZERO_CHUNK, ZERO_CHUNK_SHA256 } from '../overlay/format';
import { Qcow2Writer } from '../overlay/qcow2-writer';
import { joinSnapshot } from '../snapshot';
import { readRoundBlob, readRoundMeta, recordsOf, stateDigest, type FinalPart, type PreparePart, type RoundMeta } from './round';
import { digestsOf, readFully } from './source';

const execFileP = promisify(execFile);

export interface DestinationBase {
  id: string;
  diskPath: string;
  memImagePath: string;
  memIndex: ChunkIndex;
  diskIndex: ChunkIndex;
}

/** Per disk chunk: where its content is. */
const enum ChunkState {
  Base = 0,
  Data = 1,
  Zero = 2,
}

interface Progress {
  lastRound: number;
  final?: FinalPart & { round: number };
}

export interface AppliedRound {
  round: number;
  stats: RoundMeta['stats'];
  final: boolean;
  ms: number;
  /** A live round's description of the VM, to start it ahead of the cut-over (round.ts PreparePart). */
  prepare?: PreparePart;
}

/** A VM started ahead of the cut-over: its RAM file receives the pages of `[offset, offset + length)` of the memory image too. */
export interface RamMirror {
  path: string;
  offset: number;
  length: number;
}

export class HandoffDestination {
  private constructor(
    readonly dir: string,
    private readonly base: DestinationBase,
    private progress: Progress,
  ) {}

  /** The working memory image (the base's, with the rounds applied so far). */
  get memPath(): string {
    return path.join(this.dir, 'mem.img');
  }
  private get deltaPath(): string {
    return path.join(this.dir, 'disk.delta');
  }

  /** Prepares (or reopens) the working files in `dir` from the base. */
  static async open(dir: string, base: DestinationBase): Promise<HandoffDestination> {
    await mkdir(dir, { recursive: true });
    const progressFile = path.join(dir, 'progress.json');
    try {
      const p = JSON.parse(await readFile(progressFile, 'utf8')) as Progress;
      return new HandoffDestination(dir, base, p);
    } catch {
      // new
    }
    const memTmp = path.join(dir, 'mem.img.tmp');
    await execFileP('cp', ['--sparse=always', '--reflink=auto', base.memImagePath, memTmp]);
    await rename(memTmp, path.join(dir, 'mem.img'));
    const fd = openSync(path.join(dir, 'disk.delta'), 'w');
    ftruncateSync(fd, base.diskIndex.byteLength);
    closeSync(fd);
    await writeFile(path.join(dir, 'disk.state'), Buffer.alloc(base.diskIndex.chunkCount));
    // One sha256 per memory page as written (starts as the base's): the check of a shared-RAM cut-over.
    await writeFile(path.join(dir, 'mem.digests'), digestsOf(base.memIndex));
    const d = new HandoffDestination(dir, base, { lastRound: 0 });
    await d.saveProgress();
    return d;
  }

  get lastRound(): number {
    return this.progress.lastRound;
  }

  get finalRound(): number | undefined {
    return this.progress.final?.round;
  }

  private async saveProgress(): Promise<void> {
    const tmp = path.join(this.dir, 'progress.json.tmp');
    await writeFile(tmp, JSON.stringify(this.progress));
    await rename(tmp, path.join(this.dir, 'progress.json'));
  }

  /**
   * Applies round `file` (rounds count from 1 and apply in order; a round already applied is
   * skipped, so a retried apply is harmless).
   */
  async applyRound(file: string, expect: { handoffId: string; round: number }, ram?: RamMirror): Promise<AppliedRound> {
    const t0 = performance.now();
    const fh = await open(file, 'r');
    try {
      const meta = await readRoundMeta(fh, file);
      if (meta.handoffId !== expect.handoffId || meta.round !== expect.round || meta.baseId !== this.base.id) {
        throw new CloudletError('CORRUPT', `round file ${file} is round ${meta.round} of handoff ${meta.handoffId} on base ${meta.baseId.slice(0, 12)}…, expected round ${expect.round} of ${expect.handoffId} on ${this.base.id.slice(0, 12)}…`, {
          fix: 'the source resends the round: retry the handoff',
        });
      }
      const done = { round: meta.round, stats: meta.stats, final: meta.final !== undefined, ...(meta.prepare ? { prepare: meta.prepare } : {}) };
      if (meta.round <= this.progress.lastRound) return { ...done, ms: 0 };
      if (meta.round !== this.progress.lastRound + 1) {
        throw new CloudletError('CONFLICT', `round ${meta.round} arrived before round ${this.progress.lastRound + 1}`, { fix: 'send the rounds in order' });
      }
      const states = await readFile(path.join(this.dir, 'disk.state'));
      const memDigests = await readFile(path.join(this.dir, 'mem.digests')).catch(() => undefined);
      const mem = openSync(this.memPath, 'r+');
      const mirror = ram ? openSync(ram.path, 'r+') : -1;
      const delta = openSync(this.deltaPath, 'r+');
      const baseMem = openSync(this.base.memImagePath, 'r');
      const baseDisk = openSync(this.base.diskPath, 'r');
      try {
        const page = Buffer.alloc(CHUNK);
        for (const seg of meta.segments) {
          const raw = await readRoundBlob(fh, file, meta, seg);
          for (const r of recordsOf(raw, file)) {
            const limit = r.target === Target.Memory ? this.base.memIndex.chunkCount : this.base.diskIndex.chunkCount;
            if (r.chunk + r.count > limit) throw new CloudletError('CORRUPT', `round ${meta.round} writes chunks ${r.chunk}+${r.count} past the end (${limit})`, { fix: 'retry the handoff' });
            if (r.src !== undefined) {
              const srcLimit = r.kind === Kind.BaseMem ? this.base.memIndex.chunkCount : this.base.diskIndex.chunkCount;
              if (r.src + r.count > srcLimit) throw new CloudletError('CORRUPT', `round ${meta.round} copies base chunks ${r.src}+${r.count} past the end (${srcLimit})`, { fix: 'retry the handoff' });
            }
            for (let k = 0; k < r.count; k++) {
              const c = r.chunk + k;
              // Disk chunks equal to the base disk at their own place read through to the base.
              if (r.target === Target.Disk && r.kind === Kind.BaseDisk && r.src === r.chunk) {
                states[c] = ChunkState.Base;
                continue;
              }
              if (r.target === Target.Disk && r.kind === Kind.Zero) {
                states[c] = ChunkState.Zero;
                continue;
              }
              let content: Buffer = ZERO_CHUNK;
              if (r.kind === Kind.Raw && r.data) content = r.data.subarray(k * CHUNK, (k + 1) * CHUNK);
              else if (r.kind === Kind.BaseMem) content = readPage(baseMem, page, (r.src ?? 0) + k);
              else if (r.kind === Kind.BaseDisk) content = readPage(baseDisk, page, (r.src ?? 0) + k);
              if (r.target === Target.Memory) {
                writeAll(mem, content, c * CHUNK);
                if (ram && c * CHUNK >= ram.offset && c * CHUNK < ram.offset + ram.length) writeAll(mirror, content.subarray(0, Math.min(CHUNK, ram.offset + ram.length - c * CHUNK)), c * CHUNK - ram.offset);
                if (memDigests) pageDigest(r.kind, content, r.src === undefined ? undefined : r.src + k, this.base).copy(memDigests, c * 32);
              } else {
                writeAll(delta, content, c * CHUNK);
                states[c] = ChunkState.Data;
              }
            }
          }
        }
      } finally {
        closeSync(mem);
        if (mirror >= 0) closeSync(mirror);
        closeSync(delta);
        closeSync(baseMem);
        closeSync(baseDisk);
      }
      const tmp = path.join(this.dir, 'disk.state.tmp');
      await writeFile(tmp, states);
      await rename(tmp, path.join(this.dir, 'disk.state'));
      if (memDigests) {
        await writeFile(path.join(this.dir, 'mem.digests.tmp'), memDigests);
        await rename(path.join(this.dir, 'mem.digests.tmp'), path.join(this.dir, 'mem.digests'));
      }
      if (meta.final) {
        const skeleton = await readRoundBlob(fh, file, meta, meta.final.skeleton);
        await writeFile(path.join(this.dir, 'skeleton'), skeleton);
        this.progress.final = { ...meta.final, round: meta.round };
      }
      this.progress.lastRound = meta.round;
      await this.saveProgress();
      return { ...done, ms: Math.round(performance.now() - t0) };
    } finally {
      await fh.close();
    }
  }

  /**
   * After the last round: rebuilds the VM's save file and disk (a qcow2 over the base disk) and
   * checks both against the source's digests. DIGEST_MISMATCH when they differ.
   */
  /**
   * `inPlaceDisk`: a VM started ahead of the cut-over holds `diskPath` open (inactive, re-read when
   * its migration completes): the disk is rewritten into that same file, not renamed over it.
   */
  async finish(out: { diskPath: string; savePath: string; ramPath?: string; inPlaceDisk?: boolean }): Promise<{ final: FinalPart; ms: { join: number; disk: number; verify: number; verifyMemory?: number } }> {
    const final = this.progress.final;
    if (!final) throw new CloudletError('CONFLICT', 'the last round has not been applied yet', { fix: 'send the final round first' });
    const t0 = performance.now();
    // Shared RAM: the save file holds the device state only; the block's pages are checked by
    // their digests, hashed on worker threads while this thread rebuilds the save file and disk.
    const memCheck = final.sharedRam ? this.memoryState().catch((e: unknown) => e as Error) : undefined;
    const skeleton = await readFile(path.join(this.dir, 'skeleton'));
    const saveTmp = `${out.savePath}.tmp`;
    const joined = await joinSnapshot(skeleton, this.memPath, saveTmp);
    if (joined.sha256 !== final.saveFileSha256 || joined.size !== final.saveFileSize) {
      await memCheck;
      await rm(saveTmp, { force: true });
      throw new CloudletError('DIGEST_MISMATCH', `the rebuilt memory snapshot (${joined.size} bytes, sha256 ${joined.sha256.slice(0, 12)}…) differs from the paused source's (${final.saveFileSize} bytes, ${final.saveFileSha256.slice(0, 12)}…)`, {
        fix: 'the source keeps running; retry the handoff',
      });
    }
    const t1 = performance.now();
    const states = await readFile(path.join(this.dir, 'disk.state'));
    const diskTmp = out.inPlaceDisk ? out.diskPath : `${out.diskPath}.tmp`;
    if (!out.inPlaceDisk) await rm(diskTmp, { force: true });
    const writer = new Qcow2Writer(diskTmp, final.diskVirtualSize, path.resolve(this.base.diskPath), 'raw', { overwrite: out.inPlaceDisk === true });
    const digests = Buffer.alloc(states.length * 32);
    const delta = openSync(this.deltaPath, 'r');
    try {
      const buf = Buffer.alloc(CHUNK);
      for (let c = 0; c < states.length; c++) {
        const s = states[c];
        if (s === ChunkState.Data) {
          readFully(delta, buf, CHUNK, c * CHUNK);
          writer.writeChunks(c, buf);
          createHash('sha256').update(buf).digest().copy(digests, c * 32);
        } else if (s === ChunkState.Zero) {
          writer.writeZero(c, 1);
          ZERO_CHUNK_SHA256.copy(digests, c * 32);
        } else {
          this.base.diskIndex.digestAt(c).copy(digests, c * 32);
        }
      }
      writer.finish();
    } catch (e) {
      writer.abort();
      await memCheck;
      throw e;
    } finally {
      closeSync(delta);
    }
    const t2 = performance.now();
    let verifyMemory: number | undefined;
    if (memCheck) {
      const m = await memCheck;
      if (m instanceof Error) {
        await rm(diskTmp, { force: true });
        await rm(saveTmp, { force: true });
        throw m;
      }
      verifyMemory = m.ms;
      if (m.sha256 !== final.memStateSha256) {
        await rm(diskTmp, { force: true });
        await rm(saveTmp, { force: true });
        throw new CloudletError('DIGEST_MISMATCH', `the rebuilt memory's page digests (${m.sha256.slice(0, 12)}…) differ from the paused source's (${final.memStateSha256.slice(0, 12)}…)`, {
          fix: 'the source keeps running; retry the handoff',
        });
      }
    }
    const diskState = stateDigest(digests);
    if (diskState !== final.diskStateSha256) {
      await rm(diskTmp, { force: true });
      await rm(saveTmp, { force: true });
      throw new CloudletError('DIGEST_MISMATCH', `the rebuilt disk's chunk digests (${diskState.slice(0, 12)}…) differ from the paused source's (${final.diskStateSha256.slice(0, 12)}…)`, {
        fix: 'the source keeps running; retry the handoff',
      });
    }
    if (!out.inPlaceDisk) await rename(diskTmp, out.diskPath);
    await rename(saveTmp, out.savePath);
    if (final.sharedRam) await rename(this.memPath, out.ramPath ?? path.join(path.dirname(out.savePath), 'memory.ram'));
    return { final, ms: { join: Math.round(t1 - t0), disk: Math.round(t2 - t1), verify: Math.round(performance.now() - t2), ...(verifyMemory !== undefined ? { verifyMemory } : {}) } };
  }

  /**
   * stateDigest over the memory image's page digests: those kept as each page was written, else
   * (a handoff begun before they were kept) the image hashed anew; and how long it took.
   */
  private async memoryState(): Promise<{ sha256: string; ms: number }> {
    const t0 = performance.now();
    const kept = await readFile(path.join(this.dir, 'mem.digests')).catch(() => undefined);
    const digests = kept?.length === this.base.memIndex.chunkCount * 32 ? kept : digestsOf(await buildChunkIndex(this.memPath, { holes: 'skip' }));
    return { sha256: stateDigest(digests), ms: Math.round(performance.now() - t0) };
  }

  /** Removes the working files. */
  async remove(): Promise<void> {
    await rm(this.dir, { recursive: true, force: true });
  }
}

/** The sha256 of a memory page a record wrote: a base page's from the base's index, else hashed. */
function pageDigest(kind: Kind, content: Buffer, src: number | undefined, base: DestinationBase): Buffer {
  if (kind === Kind.Zero) return ZERO_CHUNK_SHA256;
  if (kind === Kind.BaseMem && src !== undefined) return base.memIndex.digestAt(src);
  if (kind === Kind.BaseDisk && src !== undefined) return base.diskIndex.digestAt(src);
  return createHash('sha256').update(content).digest();
}

function readPage(fd: number, buf: Buffer, chunk: number): Buffer {
  return buf.subarray(0, readFully(fd, buf, CHUNK, chunk * CHUNK));
}

function writeAll(fd: number, data: Buffer, pos: number): void {
  let done = 0;
  while (done < data.length) done += writeSync(fd, data, done, data.length - done, pos + done);
}
