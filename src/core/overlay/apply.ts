/**
 * Overlay application (the synthesis core): fetch blobs in order, verify each one's sha256,
 * decompress several at once on the thread pool while applying earlier ones in order, write the
 * disk as a qcow2 over the base disk and the changed memory chunks into a sparse patch over the
 * base memory image (the base is not copied), rebuild the save file from base + patch in one pass,
 * verify every digest, then rename into place. On any error the temporary files go away.
 */
import { hash as oneShotHash, randomBytes } from 'node:crypto';
import { closeSync, openSync } from 'node:fs';
import { rename, rm } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { xd3_decode_memory } from 'xdelta3-wasm';
import { CloudletError, isCloudletError } from '../errors';
import { xdelta, preadFully } from './create';
import { CHUNK, ChangedDigest, HEADER_SIZE, Kind, MAX_RUN, RECORD_HEADER_SIZE, Target, ZERO_CHUNK, dataAreaLength, decodeHeader, decodeMeta, type BlobRef, type OverlayMeta } from './format';
import { readAhead } from '../read-ahead';
import { xzDecompress } from './lzma';
import { PatchedMemoryImage } from './patched-image';
import { Qcow2Writer } from './qcow2-writer';
import { openOverlaySource, type OverlaySource, type SourceOptions } from './source';
import { tooLarge, type FetchPolicy } from '../fetch/policy';
import type { BaseFiles, JoinSnapshot, OnProgress, SaveFileTee } from './types';

export async function readMetaFrom(src: OverlaySource): Promise<{ meta: OverlayMeta; dataStart: number }> {
  const header = decodeHeader(await src.read(0, HEADER_SIZE), src.name);
  if (src.maxBytes !== undefined && HEADER_SIZE + header.metaLength > src.maxBytes) throw tooLarge('overlay', src.name, HEADER_SIZE + header.metaLength, src.maxBytes, 'CLOUDLET_MAX_OVERLAY_BYTES');
  const meta = decodeMeta(await src.read(HEADER_SIZE, header.metaLength), header, src.name);
  const dataStart = HEADER_SIZE + header.metaLength;
  // The reader never reads past what the meta declares, so this bounds the whole download.
  if (src.maxBytes !== undefined && dataStart + dataAreaLength(meta) > src.maxBytes) throw tooLarge('overlay', src.name, dataStart + dataAreaLength(meta), src.maxBytes, 'CLOUDLET_MAX_OVERLAY_BYTES');
  return { meta, dataStart };
}

export async function readOverlayMeta(pathOrUrl: string, opts: SourceOptions = {}): Promise<OverlayMeta> {
  const src = await openOverlaySource(pathOrUrl, opts);
  try {
    return (await readMetaFrom(src)).meta;
  } finally {
    await src.close();
  }
}

export interface ApplyToPartsInput {
  /** The base's files and sizes (chunks are read by position; baseFilesOf gives them for an opened base). */
  base: BaseFiles;
  overlay: string;
  outDiskPath: string;
  outSavePath: string;
  join: JoinSnapshot;
  concurrency?: number;
  onProgress?: OnProgress;
  /** Aborting it stops the download at once; the apply fails with its reason and cleans up. */
  signal?: AbortSignal;
  /** The host's fetch policy (absent: the CLI on its own machine, no checks). */
  policy?: FetchPolicy;
  /** Directories of this host's own that a local overlay path may also be under. */
  extraDirs?: readonly string[];
  /**
   * Called once the meta is read and checked, before any segment: may return a consumer of the
   * save file as it is rebuilt (early start: a VM that loads it as it arrives). It gets the file
   * in order (less the pages it holds already, SaveFileTee.prefilled); the file's digests are
   * checked only when the apply returns, so the consumer must not run what it got before that.
   */
  onMeta?: (meta: OverlayMeta) => Promise<SaveFileTee | undefined>;
}

function corrupt(segment: number, msg: string, cause?: unknown): CloudletError {
  return new CloudletError('CORRUPT', `overlay segment ${segment} is corrupt: ${msg}`, {
    fix: 'fetch the overlay again or rebuild it',
    details: { part: `segment ${segment}`, segment },
    cause,
  });
}

function checkBase(meta: OverlayMeta, base: BaseFiles, where: string): void {
  const problems: string[] = [];
  if (meta.base.id !== base.id) problems.push(`it was made from base ${meta.base.id}, not ${base.id}`);
  if (meta.base.diskSize !== base.diskSize) problems.push(`base disk size ${meta.base.diskSize} ≠ ${base.diskSize}`);
  if (meta.base.memImageSize !== base.memImageSize) problems.push(`base memory image size ${meta.base.memImageSize} ≠ ${base.memImageSize}`);
  if (problems.length > 0) {
    throw new CloudletError('WRONG_BASE', `overlay ${where} does not apply to base ${base.id}: ${problems.join('; ')}`, {
      fix: `import base ${meta.base.id} on this host, or use an overlay made from base ${base.id}`,
      details: { expectedBaseId: meta.base.id, baseId: base.id },
    });
  }
}

/** Applies decoded segments in order. */
class Applier {
  private readonly next = [0, 0];

  /** Set by the first disk record after memory records: the memory image is complete. */
  private memorySealed = false;

  /** Memory chunks below this one are final (records come in increasing chunk order). */
  get memoryDone(): number {
    return this.memorySealed ? Number.POSITIVE_INFINITY : (this.next[Target.Memory] ?? 0);
  }
  readonly digests = { [Target.Disk]: new ChangedDigest(), [Target.Memory]: new ChangedDigest() };
  private readonly chunks: [number, number];
  private readonly baseDiskFd: number;
  private readonly baseMemFd: number;

  constructor(
    private readonly meta: OverlayMeta,
    private readonly base: BaseFiles,
    private readonly disk: Qcow2Writer,
    private readonly mem: PatchedMemoryImage,
  ) {
    this.chunks = [Math.ceil(meta.launch.disk.virtualSize / CHUNK), Math.ceil(meta.launch.memory.imageSize / CHUNK)];
    this.baseDiskFd = openSync(base.diskPath, 'r');
    this.baseMemFd = openSync(base.memImagePath, 'r');
  }

  close(): void {
    closeSync(this.baseDiskFd);
    closeSync(this.baseMemFd);
  }

  private readBase(target: Target, chunk: number, count: number): Buffer {
    const [fd, size, p] = target === Target.Disk ? [this.baseDiskFd, this.base.diskSize, this.base.diskPath] : [this.baseMemFd, this.base.memImageSize, this.base.memImagePath];
    const out = Buffer.alloc(count * CHUNK);
    const start = chunk * CHUNK;
    const len = Math.max(0, Math.min(out.length, size - start));
    preadFully(fd, out, 0, len, start, p);
    return out;
  }

  private write(target: Target, chunk: number, data: Buffer): void {
    const n = data.length / CHUNK;
    for (let i = 0; i < n; i++) this.digests[target].add(chunk + i, data.subarray(i * CHUNK, (i + 1) * CHUNK));
    if (target === Target.Disk) {
      this.disk.writeChunks(chunk, data);
    } else {
      this.mem.writeChunks(chunk, data);
    }
  }

  /**
   * Applies a segment, record by record, yielding after each: a caller can give the event loop
   * a turn now and then (the download it shares the thread with keeps reading).
   */
  *steps(seg: number, buf: Buffer): Generator<void> {
    let pos = 0;
    const need = (n: number, what: string): void => {
      if (pos + n > buf.length) throw corrupt(seg, `record at byte ${pos} needs ${n} bytes of ${what}, only ${buf.length - pos} left`);
    };
    while (pos < buf.length) {
      need(RECORD_HEADER_SIZE, 'record header');
      const op = buf[pos] ?? 0;
      const kind = op & 0x0f;
      const target = op >> 4;
      const chunk = buf.readUIntLE(pos + 1, 6);
      const count = buf.readUInt32LE(pos + 7);
      const at = pos;
      pos += RECORD_HEADER_SIZE;
      if (target !== Target.Disk && target !== Target.Memory) throw corrupt(seg, `record at byte ${at} has unknown target ${target}`);
      if (kind > Kind.Delta) throw corrupt(seg, `record at byte ${at} has unknown kind ${kind}`);
      if (count < 1 || count > MAX_RUN || (kind === Kind.Delta && count !== 1)) throw corrupt(seg, `record at byte ${at} has bad count ${count}`);
      const limit = this.chunks[target] ?? 0;
      if (chunk < (this.next[target] ?? 0) || chunk + count > limit) {
        throw corrupt(seg, `record at byte ${at} writes ${target === Target.Disk ? 'disk' : 'memory'} chunks ${chunk}+${count}, out of order or outside 0..${limit}`);
      }
      if (target === Target.Memory && this.memorySealed) {
        throw corrupt(seg, `record at byte ${at} writes memory after disk records that followed memory records (the targets come one after the other)`);
      }
      if (target === Target.Disk && (this.next[Target.Memory] ?? 0) > 0) this.memorySealed = true;
      this.next[target] = chunk + count;
      let data: Buffer;
      switch (kind as Kind) {
        case Kind.Zero:
          for (let i = 0; i < count; i++) this.digests[target].add(chunk + i, ZERO_CHUNK);
          if (target === Target.Disk) this.disk.writeZero(chunk, count);
          else this.mem.zeroChunks(chunk, count);
          yield;
          continue;
        case Kind.Raw:
          need(count * CHUNK, 'raw data');
          data = buf.subarray(pos, pos + count * CHUNK);
          pos += count * CHUNK;
          break;
        case Kind.BaseMem:
        case Kind.BaseDisk:
        case Kind.SelfDisk:
        case Kind.SelfMem: {
          need(6, 'source chunk');
          const src = buf.readUIntLE(pos, 6);
          pos += 6;
          data = this.source(seg, at, kind as Kind, src, count);
          break;
        }
        case Kind.Delta: {
          need(4, 'delta length');
          const len = buf.readUInt32LE(pos);
          pos += 4;
          if (len === 0 || len >= CHUNK) throw corrupt(seg, `record at byte ${at} has delta length ${len}`);
          need(len, 'delta');
          const delta = buf.subarray(pos, pos + len);
          pos += len;
          const r = xd3_decode_memory(delta, this.readBase(target, chunk, 1), CHUNK);
          if (r.ret !== 0 || r.output.length !== CHUNK) throw corrupt(seg, `record at byte ${at}: xdelta3 delta does not decode to one chunk (${r.str})`);
          data = Buffer.from(r.output.buffer, r.output.byteOffset, CHUNK);
          break;
        }
        default:
          throw corrupt(seg, `record at byte ${at} has unknown kind ${kind}`);
      }
      this.write(target, chunk, data);
      yield;
    }
  }

  private source(seg: number, at: number, kind: Kind, src: number, count: number): Buffer {
    switch (kind) {
      case Kind.BaseMem:
      case Kind.BaseDisk: {
        const t = kind === Kind.BaseMem ? Target.Memory : Target.Disk;
        const baseChunks = Math.ceil((t === Target.Memory ? this.base.memImageSize : this.base.diskSize) / CHUNK);
        if (src + count > baseChunks) throw corrupt(seg, `record at byte ${at} copies base chunks ${src}+${count}, beyond the base's ${baseChunks}`);
        return this.readBase(t, src, count);
      }
      case Kind.SelfDisk: {
        const out = Buffer.alloc(count * CHUNK);
        for (let i = 0; i < count; i++) {
          if (!this.disk.has(src + i)) throw corrupt(seg, `record at byte ${at} copies disk chunk ${src + i}, which the overlay has not written`);
          this.disk.readChunk(src + i, out.subarray(i * CHUNK, (i + 1) * CHUNK));
        }
        return out;
      }
      default: {
        if (src + count > (this.next[Target.Memory] ?? 0)) {
          throw corrupt(seg, `record at byte ${at} copies memory chunks ${src}+${count}, which the overlay has not written yet`);
        }
        const out = Buffer.alloc(count * CHUNK);
        this.mem.readChunksSync(src, out);
        return out;
      }
    }
  }
}

/** The longest the apply holds the thread before the event loop gets a turn (the download's reads). */
const SLICE_MS = 8;

/** Runs a segment's steps, giving the event loop a turn every SLICE_MS. */
async function applyInSlices(steps: Generator<void>): Promise<void> {
  let sliceStart = performance.now();
  for (const _ of steps) {
    if (performance.now() - sliceStart >= SLICE_MS) {
      await new Promise<void>((r) => setImmediate(r));
      sliceStart = performance.now();
    }
  }
}

/** How far the download may run ahead of the blobs applied (compressed bytes held in memory). */
const READ_AHEAD_BYTES = 64 * 1024 * 1024;

/**
 * Yields the blobs of the data area in order, each checked against its sha256. `onLastByte` is
 * called when the download has received its last byte (which, reading ahead, can be before the
 * blobs are taken).
 */
async function* blobs(src: OverlaySource, dataStart: number, refs: Array<[string, BlobRef]>, onLastByte: () => void): AsyncIterable<Buffer> {
  const total = refs.reduce((s, [, r]) => s + r.length, 0);
  let pending: Buffer[] = [];
  let have = 0;
  let i = 0;
  const take = function* (): Generator<Buffer> {
    for (;;) {
      const entry = refs[i];
      if (!entry || have < entry[1].length) return;
      const all = pending.length === 1 ? (pending[0] as Buffer) : Buffer.concat(pending, have);
      const blob = all.subarray(0, entry[1].length);
      const rest = all.subarray(entry[1].length);
      pending = rest.length > 0 ? [rest] : [];
      have = rest.length;
      const digest = oneShotHash('sha256', blob, 'hex');
      if (digest !== entry[1].sha256) {
        throw new CloudletError('DIGEST_MISMATCH', `overlay ${src.name}: ${entry[0]} does not match its sha256 (expected ${entry[1].sha256}, got ${digest})`, {
          fix: 'fetch the overlay again or rebuild it',
          details: { part: entry[0], expected: entry[1].sha256, actual: digest },
        });
      }
      i += 1;
      yield blob;
    }
  };
  // The download runs ahead of decompression and applying (up to READ_AHEAD_BYTES), so a moment
  // of CPU contention does not pause the socket and leave the link idle.
  // A consumer that stops early (a bad blob, an error applying) stops the download at once.
  const stop = new AbortController();
  async function* download(): AsyncGenerator<Buffer> {
    yield* src.stream(dataStart, total, stop.signal);
    onLastByte();
  }
  for await (const piece of readAhead(download(), READ_AHEAD_BYTES, () => stop.abort())) {
    pending.push(piece);
    have += piece.length;
    yield* take();
  }
  yield* take();
}

export async function applyOverlayToParts(input: ApplyToPartsInput): Promise<{ meta: OverlayMeta; timings: Record<string, number> }> {
  const t0 = performance.now();
  const timings: Record<string, number> = {};
  const mark = (name: string, since: number): number => {
    const now = performance.now();
    timings[name] = Math.round((timings[name] ?? 0) + (now - since));
    return now;
  };
  const concurrency = Math.max(1, input.concurrency ?? availableParallelism());
  const { base } = input;
  const src = await openOverlaySource(input.overlay, { ...(input.signal ? { signal: input.signal } : {}), ...(input.policy ? { policy: input.policy } : {}), ...(input.extraDirs ? { extraDirs: input.extraDirs } : {}) });
  const tag = `${process.pid}-${randomBytes(4).toString('hex')}`;
  const diskTmp = `${input.outDiskPath}.${tag}.tmp`;
  const saveTmp = `${input.outSavePath}.${tag}.tmp`;
  const memTmp = path.join(path.dirname(input.outSavePath), `.memimg-${tag}.tmp`);
  let disk: Qcow2Writer | undefined;
  let mem: PatchedMemoryImage | undefined;
  let joining: Promise<{ size: number; sha256: string }> | undefined;
  let applier: Applier | undefined;
  try {
    const { meta, dataStart } = await readMetaFrom(src);
    checkBase(meta, base, src.name);
    const tee = input.onMeta ? await input.onMeta(meta) : undefined;
    let t = mark('meta', t0);
    const needDelta = (meta.stats['delta'] ?? 0) > 0;
    if (needDelta) await xdelta();

    mem = PatchedMemoryImage.create(base.memImagePath, base.memImageSize, memTmp, meta.launch.memory.imageSize, { growing: true });
    disk = new Qcow2Writer(diskTmp, meta.launch.disk.virtualSize, path.resolve(base.diskPath));
    applier = new Applier(meta, base, disk, mem);
    const patched = mem;
    t = mark('prepare', t);

    const refs: Array<[string, BlobRef]> = [['skeleton', meta.launch.memory.skeleton], ...meta.segments.map((s, i): [string, BlobRef] => [`segment ${i}`, s])];
    const total = dataAreaLength(meta);
    let done = 0;
    let skeleton: Buffer | undefined;
    const inflight: Array<{ index: number; job: Promise<Buffer> }> = [];
    const decode = (index: number, blob: Buffer): Promise<Buffer> => {
      const ref = refs[index]?.[1];
      const name = refs[index]?.[0] ?? `blob ${index}`;
      const job = xzDecompress(blob, ref?.rawLength).then(
        (raw) => {
          if (raw.length !== ref?.rawLength) throw corrupt(index - 1, `${name} decompressed to ${raw.length} bytes, the meta says ${ref?.rawLength}`);
          return raw;
        },
        (e: unknown) => {
          throw isCloudletError(e) ? e : corrupt(index - 1, `${name} is not a valid xz stream: ${(e as Error).message}`, e);
        },
      );
      job.catch(() => undefined);
      return job;
    };
    let waitMs = 0;
    let applyMs = 0;
    const applyOne = async (): Promise<void> => {
      const item = inflight.shift();
      if (!item) return;
      const w0 = performance.now();
      const raw = await item.job;
      waitMs += performance.now() - w0;
      const w1 = performance.now();
      if (item.index === 0) {
        skeleton = raw;
        // The save file is built while the segments are applied: the join reads each part of the
        // memory image once the records before it are applied.
        joining = input.join(raw, patched, saveTmp, tee ? { tee: tee.tee, ...(tee.prefilled ? { prefilled: { ...tee.prefilled, isBase: (offset: number) => offset % CHUNK === 0 && patched.isBaseChunk(offset / CHUNK) } } : {}) } : {});
        joining.catch(() => undefined);
      } else {
        const seg = item.index - 1;
        try {
          if (applier) await applyInSlices(applier.steps(seg, raw));
        } catch (e) {
          throw isCloudletError(e) ? e : corrupt(seg, (e as Error).message, e);
        }
        patched.advance(applier?.memoryDone ?? 0);
      }
      applyMs += performance.now() - w1;
      done += refs[item.index]?.[1].length ?? 0;
      input.onProgress?.(done, total);
    };
    let index = 0;
    for await (const blob of blobs(src, dataStart, refs, () => {
      // From the start to the overlay's last byte received: the rest of "stream" is its tail.
      timings['lastByte'] = Math.round(performance.now() - t0);
    })) {
      inflight.push({ index, job: decode(index, blob) });
      index += 1;
      // Keep `concurrency` decompressions running; apply the oldest once it is done.
      while (inflight.length > concurrency) await applyOne();
    }
    if (index !== refs.length) throw new CloudletError('CORRUPT', `overlay ${src.name} is truncated: ${index} of ${refs.length} blobs present`);
    while (inflight.length > 0) await applyOne();
    patched.complete();
    timings['decompressWait'] = Math.round(waitMs);
    timings['applySegments'] = Math.round(applyMs);
    t = mark('stream', t);

    for (const target of [Target.Disk, Target.Memory]) {
      const expected = target === Target.Disk ? meta.launch.disk : meta.launch.memory;
      const got = applier.digests[target];
      const actual = got.hex();
      if (got.count !== expected.changedChunks || actual !== expected.changedSha256) {
        const what = target === Target.Disk ? 'disk' : 'memory';
        throw new CloudletError('DIGEST_MISMATCH', `overlay ${src.name}: the rebuilt ${what} chunks do not match the digest in the meta (${got.count} chunks, sha256 ${actual}; expected ${expected.changedChunks}, ${expected.changedSha256})`, {
          fix: 'check that the base is intact (re-import it) and fetch the overlay again',
          details: { part: `${what} digest`, expected: expected.changedSha256, actual },
        });
      }
    }
    disk.finish();
    t = mark('finishDisk', t);

    if (!skeleton || !joining) throw new CloudletError('CORRUPT', `overlay ${src.name} has no skeleton`);
    // The patch file is a temporary input of the join only: no fsync.
    const joined = await joining;
    t = mark('joinAfterStream', t);
    if (joined.size !== meta.launch.memory.saveFileSize || joined.sha256 !== meta.launch.memory.saveFileSha256) {
      throw new CloudletError('DIGEST_MISMATCH', `overlay ${src.name}: the rebuilt memory snapshot has sha256 ${joined.sha256} (${joined.size} bytes), the meta says ${meta.launch.memory.saveFileSha256} (${meta.launch.memory.saveFileSize} bytes)`, {
        fix: 'check that the base is intact (re-import it) and fetch the overlay again',
        details: { part: 'memory snapshot digest', expected: meta.launch.memory.saveFileSha256, actual: joined.sha256 },
      });
    }
    await rename(diskTmp, input.outDiskPath);
    await rename(saveTmp, input.outSavePath);
    mark('rename', t);
    timings['total'] = Math.round(performance.now() - t0);
    return { meta, timings };
  } catch (e) {
    mem?.fail(e);
    await joining?.catch(() => undefined);
    disk?.abort();
    await rm(diskTmp, { force: true });
    await rm(saveTmp, { force: true });
    throw e;
  } finally {
    applier?.close();
    await mem?.close();
    await rm(memTmp, { force: true });
    await src.close();
  }
}
