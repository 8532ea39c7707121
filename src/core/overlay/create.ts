/**
 * Overlay creation: read only what changed (the qcow2 top layer of the launch disk; memory chunks
 * whose digest differs from the base at the same place), classify each changed chunk (zero, base
 * memory, base disk, earlier chunk of this overlay, xdelta3 delta, raw), pack records into
 * segments of a few MiB and compress each with LZMA on the thread pool.
 */
import { hash as oneShotHash, randomBytes } from 'node:crypto';
import { closeSync, openSync, readSync } from 'node:fs';
import { open, realpath, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { availableParallelism } from 'node:os';
import { init as xdInit, xd3_encode_memory, xd3_smatch_cfg } from 'xdelta3-wasm';
import { CloudletError } from '../errors';
import {
  CHUNK,
  ChangedDigest,
  HEADER_SIZE,
  KIND_NAMES,
  Kind,
  MAX_RUN,
  OVERLAY_FORMAT_VERSION,
  Target,
  ZERO_CHUNK_SHA256,
  encodeHeader,
  encodeRecordHeader,
  isZero,
  writeU48,
  type BlobRef,
  type OverlayMeta,
  type SegmentRef,
} from './format';
import { xzCompress } from './lzma';
import { imageInfo, imageMap, type MapEntry } from './qemu-img';
import type { BaseRef, CreateOverlayOptions, LaunchMemory, OnProgress } from './types';

const READ_BLOCK_CHUNKS = 256; // 1 MiB reads

let xdReady: Promise<void> | undefined;
export function xdelta(): Promise<void> {
  xdReady ??= xdInit();
  return xdReady;
}

interface Pending {
  kind: Kind;
  target: Target;
  chunk: number;
  count: number;
  src: number;
  payload: Buffer[];
}

/** Packs records into segments and compresses them in order with bounded parallelism. */
class SegmentPacker {
  private parts: Buffer[] = [];
  private bytes = 0;
  private records = 0;
  private chunks = 0;
  private readonly inflight: Array<{ raw: Buffer; records: number; chunks: number; job: Promise<Buffer> }> = [];
  readonly segments: SegmentRef[] = [];

  constructor(
    private readonly level: number,
    private readonly segmentSize: number,
    private readonly concurrency: number,
    private readonly sink: BlobSink,
  ) {}

  async add(parts: Buffer[], chunks: number): Promise<void> {
    for (const p of parts) {
      this.parts.push(p);
      this.bytes += p.length;
    }
    this.records += 1;
    this.chunks += chunks;
    if (this.bytes >= this.segmentSize) await this.seal();
  }

  private async seal(): Promise<void> {
    if (this.bytes === 0) return;
    const raw = Buffer.concat(this.parts, this.bytes);
    const job = xzCompress(raw, this.level);
    job.catch(() => undefined);
    this.inflight.push({ raw, records: this.records, chunks: this.chunks, job });
    this.parts = [];
    this.bytes = 0;
    this.records = 0;
    this.chunks = 0;
    while (this.inflight.length >= this.concurrency) await this.drainOne();
  }

  private async drainOne(): Promise<void> {
    const first = this.inflight.shift();
    if (!first) return;
    const compressed = await first.job;
    const ref = await this.sink.put(compressed, first.raw.length);
    this.segments.push({ ...ref, records: first.records, chunks: first.chunks });
  }

  async finish(): Promise<void> {
    await this.seal();
    while (this.inflight.length > 0) await this.drainOne();
  }
}

/** Appends blobs to the temporary data-area file. */
class BlobSink {
  offset = 0;
  private constructor(private readonly fh: Awaited<ReturnType<typeof open>>) {}
  static async open(path: string): Promise<BlobSink> {
    return new BlobSink(await open(path, 'wx'));
  }
  async put(compressed: Buffer, rawLength: number): Promise<BlobRef> {
    const ref: BlobRef = { offset: this.offset, length: compressed.length, rawLength, sha256: oneShotHash('sha256', compressed, 'hex') };
    await this.fh.write(compressed, 0, compressed.length, this.offset);
    this.offset += compressed.length;
    return ref;
  }
  async close(): Promise<void> {
    await this.fh.close();
  }
}

/** Reads 4 KiB chunks of a file by number (zero past its end). */
class ChunkReader {
  private readonly fd: number;
  constructor(
    readonly path: string,
    readonly size: number,
  ) {
    this.fd = openSync(path, 'r');
  }
  read(chunk: number, count: number, out: Buffer = Buffer.alloc(count * CHUNK)): Buffer {
    out.fill(0, 0, count * CHUNK);
    const start = chunk * CHUNK;
    const len = Math.max(0, Math.min(count * CHUNK, this.size - start));
    preadFully(this.fd, out, 0, len, start, this.path);
    return out;
  }
  readBytes(out: Buffer, at: number, len: number, pos: number): void {
    preadFully(this.fd, out, at, len, pos, this.path);
  }
  close(): void {
    closeSync(this.fd);
  }
}

export function preadFully(fd: number, buf: Buffer, at: number, len: number, pos: number, what: string): void {
  let done = 0;
  while (done < len) {
    const n = readSync(fd, buf, at + done, len - done, pos + done);
    if (n === 0) throw new CloudletError('CORRUPT', `${what} is shorter than expected (read at ${pos + done})`, { fix: 'check the file; it may be truncated' });
    done += n;
  }
}

/** Classifies chunks and emits run-length records. */
class Encoder {
  private pending: Pending | undefined;
  private readonly self = new Map<string, { target: Target; chunk: number }>();
  readonly stats: Record<string, number> = {};
  readonly digests = { [Target.Disk]: new ChangedDigest(), [Target.Memory]: new ChangedDigest() };

  constructor(
    private readonly base: BaseRef,
    private readonly baseDisk: ChunkReader,
    private readonly baseMem: ChunkReader,
    private readonly delta: boolean,
    private readonly packer: SegmentPacker,
  ) {}

  /** `content` is exactly 4096 bytes; chunks of a target must come in ascending order. */
  async put(target: Target, chunk: number, content: Buffer, digest: Buffer): Promise<void> {
    this.digests[target].add(chunk, content);
    let kind: Kind;
    let src = 0;
    let payload: Buffer | undefined;
    const inMem = () => this.base.memIndex.findByDigest(digest);
    const inDisk = () => this.base.diskIndex.findByDigest(digest);
    let found: number | undefined;
    if (isZero(content)) kind = Kind.Zero;
    else if (target === Target.Memory && (found = inMem()) !== undefined) [kind, src] = [Kind.BaseMem, found];
    else if ((found = inDisk()) !== undefined) [kind, src] = [Kind.BaseDisk, found];
    else if (target === Target.Disk && (found = inMem()) !== undefined) [kind, src] = [Kind.BaseMem, found];
    else {
      const key = digest.toString('latin1');
      const prev = this.self.get(key);
      if (prev) [kind, src] = [prev.target === Target.Disk ? Kind.SelfDisk : Kind.SelfMem, prev.chunk];
      else {
        this.self.set(key, { target, chunk });
        kind = Kind.Raw;
        payload = content;
        if (this.delta) {
          const d = this.deltaAgainstBase(target, chunk, content);
          if (d) [kind, payload] = [Kind.Delta, d];
        }
      }
    }
    this.stats[KIND_NAMES[kind]] = (this.stats[KIND_NAMES[kind]] ?? 0) + 1;
    await this.emit(kind, target, chunk, src, payload);
  }

  private deltaAgainstBase(target: Target, chunk: number, content: Buffer): Buffer | undefined {
    const reader = target === Target.Disk ? this.baseDisk : this.baseMem;
    if (chunk * CHUNK >= reader.size) return undefined;
    const source = reader.read(chunk, 1);
    if (isZero(source)) return undefined;
    const r = xd3_encode_memory(content, source, CHUNK - 8, xd3_smatch_cfg.DEFAULT);
    if (r.ret !== 0 || r.output.length === 0 || r.output.length >= CHUNK - 8) return undefined;
    const out = Buffer.alloc(4 + r.output.length);
    out.writeUInt32LE(r.output.length, 0);
    Buffer.from(r.output.buffer, r.output.byteOffset, r.output.length).copy(out, 4);
    return out;
  }

  private async emit(kind: Kind, target: Target, chunk: number, src: number, payload: Buffer | undefined): Promise<void> {
    const p = this.pending;
    if (
      p &&
      p.kind === kind &&
      p.target === target &&
      kind !== Kind.Delta &&
      p.chunk + p.count === chunk &&
      p.count < MAX_RUN &&
      (kind === Kind.Zero || kind === Kind.Raw || p.src + p.count === src)
    ) {
      p.count += 1;
      if (payload) p.payload.push(payload);
      return;
    }
    await this.flush();
    this.pending = { kind, target, chunk, count: 1, src, payload: payload ? [payload] : [] };
  }

  async flush(): Promise<void> {
    const p = this.pending;
    if (!p) return;
    this.pending = undefined;
    const parts = [encodeRecordHeader(p.kind, p.target, p.chunk, p.count)];
    if (p.kind === Kind.BaseDisk || p.kind === Kind.BaseMem || p.kind === Kind.SelfDisk || p.kind === Kind.SelfMem) {
      const s = Buffer.alloc(6);
      writeU48(s, p.src, 0);
      parts.push(s);
    }
    parts.push(...p.payload);
    await this.packer.add(parts, p.count);
  }
}

/** The chunk ranges that the qcow2 top layer touches, merged, ascending. */
export function touchedChunkRanges(entries: MapEntry[]): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const e of entries) {
    if (e.depth !== 0 || e.length === 0) continue;
    const a = Math.floor(e.start / CHUNK);
    const b = Math.ceil((e.start + e.length) / CHUNK);
    const last = out[out.length - 1];
    if (last && last[1] >= a) last[1] = Math.max(last[1], b);
    else out.push([a, b]);
  }
  return out;
}

/** Composes guest-visible bytes [from, to) of the launch disk from the qcow2 map. */
class LaunchDiskReader {
  private readonly fd: number;
  private idx = 0;
  constructor(
    private readonly qcowPath: string,
    private readonly entries: MapEntry[],
    private readonly baseDisk: ChunkReader,
    private readonly virtualSize: number,
  ) {
    this.fd = openSync(qcowPath, 'r');
    for (const e of entries) {
      if (e.depth === 0 && e.data && (e.compressed || e.offset === undefined)) {
        throw new CloudletError('BAD_INPUT', `launch disk ${qcowPath} has compressed or unmapped data at guest offset ${e.start}`, {
          fix: 'write the launch disk as an uncompressed qcow2 (qemu-img convert -O qcow2 without -c)',
        });
      }
    }
  }

  /** Fill `out` with guest bytes starting at `from` (ranges must be requested in ascending order). */
  read(from: number, out: Buffer): void {
    out.fill(0);
    const to = Math.min(from + out.length, this.virtualSize);
    while (this.idx > 0 && (this.entries[this.idx]?.start ?? 0) > from) this.idx -= 1;
    for (let i = this.idx; i < this.entries.length; i++) {
      const e = this.entries[i];
      if (!e) break;
      const eEnd = e.start + e.length;
      if (eEnd <= from) {
        this.idx = i + 1;
        continue;
      }
      if (e.start >= to) break;
      const a = Math.max(from, e.start);
      const b = Math.min(to, eEnd);
      if (e.depth === 0) {
        if (e.data && e.offset !== undefined) preadFully(this.fd, out, a - from, b - a, e.offset + (a - e.start), this.qcowPath);
        // zero or not data: stays zero
      } else if (e.data && e.present !== false && a < this.baseDisk.size) {
        // Raw backing: guest offset = file offset.
        this.baseDisk.readBytes(out, a - from, Math.min(b, this.baseDisk.size) - a, a);
      }
    }
  }

  close(): void {
    closeSync(this.fd);
  }
}

/** sha256 of a 4 KiB chunk; all-zero chunks (common) skip hashing. */
function chunkDigestFast(content: Buffer): Buffer {
  return isZero(content) ? ZERO_CHUNK_SHA256 : oneShotHash('sha256', content, 'buffer');
}

function baseChunkEqual(ix: BaseRef['diskIndex'], chunk: number, digest: Buffer, content: Buffer): boolean {
  return chunk < ix.chunkCount ? ix.equalAt(chunk, digest) : isZero(content);
}

/**
 * The chunks the top layer leaves out are taken to be the base's: the backing file must be the
 * base disk. Same path: fine. Another path (a copy): same size and a sample of chunks must match
 * the base's index, else WRONG_BASE.
 */
async function checkBacking(launchDisk: string, backing: string, base: BaseRef): Promise<void> {
  const abs = path.resolve(path.dirname(launchDisk), backing);
  const [a, b] = await Promise.all([realpath(abs).catch(() => abs), realpath(base.diskPath).catch(() => base.diskPath)]);
  if (a === b) return;
  const fail = (why: string): CloudletError =>
    new CloudletError('WRONG_BASE', `launch disk ${launchDisk} is backed by ${abs}, which is not base ${base.id}'s disk (${why})`, {
      fix: `make the launch disk a qcow2 over ${base.diskPath} (qemu-img rebase -u -b <base disk> -F raw, if the content is the same)`,
    });
  const size = await stat(abs).then((s) => s.size, () => -1);
  if (size !== base.diskIndex.byteLength) throw fail(size < 0 ? 'it does not exist' : `size ${size} ≠ ${base.diskIndex.byteLength}`);
  const reader = new ChunkReader(abs, size);
  try {
    const n = base.diskIndex.chunkCount;
    const samples = Math.min(n, 256);
    for (let k = 0; k < samples; k++) {
      const i = Math.floor((k * n) / samples);
      if (!base.diskIndex.equalAt(i, chunkDigestFast(reader.read(i, 1)))) throw fail(`chunk ${i} differs`);
    }
  } finally {
    reader.close();
  }
}

export interface CreateFromPartsInput {
  base: BaseRef;
  launchDiskPath: string;
  memory: LaunchMemory;
  outPath: string;
  options?: CreateOverlayOptions;
  onProgress?: OnProgress;
}

/** Create an overlay from the launch disk and the launch memory already split by the codec. */
export async function createOverlayFromParts(input: CreateFromPartsInput): Promise<OverlayMeta> {
  const { base, memory, outPath } = input;
  const level = input.options?.lzmaLevel ?? 6;
  const useDelta = input.options?.delta ?? true;
  const segmentSize = input.options?.segmentSize ?? 4 * 1024 * 1024;
  const concurrency = input.options?.concurrency ?? availableParallelism();
  if (!Number.isInteger(level) || level < 0 || level > 9) throw new CloudletError('BAD_INPUT', `lzmaLevel must be 0..9, got ${level}`);
  if (!Number.isInteger(segmentSize) || segmentSize < CHUNK || segmentSize > 256 * 1024 * 1024) {
    throw new CloudletError('BAD_INPUT', `segmentSize must be between 4 KiB and 256 MiB, got ${segmentSize}`);
  }
  if (useDelta) await xdelta();

  const info = await imageInfo(input.launchDiskPath);
  if (info.format !== 'qcow2') {
    throw new CloudletError('BAD_INPUT', `launch disk ${input.launchDiskPath} is ${info.format}, expected a qcow2 over the base disk`, {
      fix: 'resume the base with a qcow2 overlay disk (qemu-img create -f qcow2 -b <base disk> -F raw)',
    });
  }
  if (!info['backing-filename']) {
    throw new CloudletError('BAD_INPUT', `launch disk ${input.launchDiskPath} has no backing file; only changes over the base disk can be encoded`, {
      fix: 'resume the base with a qcow2 overlay disk (qemu-img create -f qcow2 -b <base disk> -F raw)',
    });
  }
  await checkBacking(input.launchDiskPath, info['full-backing-filename'] ?? info['backing-filename'], base);
  const entries = await imageMap(input.launchDiskPath);
  const memStat = await stat(memory.memImagePath);

  const tag = `${process.pid}-${randomBytes(4).toString('hex')}`;
  const dataTmp = `${outPath}.data-${tag}.tmp`;
  const outTmp = `${outPath}.${tag}.tmp`;
  const baseDisk = new ChunkReader(base.diskPath, base.diskIndex.byteLength);
  const baseMem = new ChunkReader(base.memImagePath, base.memIndex.byteLength);
  let diskReader: LaunchDiskReader | undefined;
  const sink = await BlobSink.open(dataTmp);
  try {
    const skeletonBlob = await sink.put(await xzCompress(memory.skeleton, level), memory.skeleton.length);
    const packer = new SegmentPacker(level, segmentSize, concurrency, sink);
    const enc = new Encoder(base, baseDisk, baseMem, useDelta, packer);

    // Disk: only the chunks the top layer touches (encoded after the memory).
    diskReader = new LaunchDiskReader(input.launchDiskPath, entries, baseDisk, info['virtual-size']);
    const ranges = touchedChunkRanges(entries);
    const diskWork = ranges.reduce((s, [a, b]) => s + (b - a) * CHUNK, 0);
    const total = diskWork + memStat.size;
    let done = 0;
    const block = Buffer.alloc(READ_BLOCK_CHUNKS * CHUNK);
    // Memory first, so that applying can rebuild the save file while the disk segments still stream.
    // Memory: every chunk of the launch memory image, compared with the base at the same place.
    const memFh = await open(memory.memImagePath, 'r');
    try {
      const memBlock = Buffer.alloc(1024 * CHUNK);
      for (let pos = 0; pos < memStat.size; pos += memBlock.length) {
        const len = Math.min(memBlock.length, memStat.size - pos);
        const buf = memBlock.subarray(0, Math.ceil(len / CHUNK) * CHUNK);
        buf.fill(0);
        let got = 0;
        while (got < len) {
          const { bytesRead } = await memFh.read(buf, got, len - got, pos + got);
          if (bytesRead === 0) throw new CloudletError('CORRUPT', `memory image ${memory.memImagePath} shrank while being read`);
          got += bytesRead;
        }
        const first = pos / CHUNK;
        for (let i = 0; i < buf.length / CHUNK; i++) {
          const content = buf.subarray(i * CHUNK, (i + 1) * CHUNK);
          const d = chunkDigestFast(content);
          if (baseChunkEqual(base.memIndex, first + i, d, content)) continue;
          await enc.put(Target.Memory, first + i, Buffer.from(content), d);
        }
        done += len;
        input.onProgress?.(done, total);
      }
    } finally {
      await memFh.close();
    }
    // Disk: only the chunks the top layer touches.
    for (const [a, b] of ranges) {
      for (let c = a; c < b; c += READ_BLOCK_CHUNKS) {
        const n = Math.min(READ_BLOCK_CHUNKS, b - c);
        const buf = block.subarray(0, n * CHUNK);
        diskReader.read(c * CHUNK, buf);
        for (let i = 0; i < n; i++) {
          const content = buf.subarray(i * CHUNK, (i + 1) * CHUNK);
          const d = chunkDigestFast(content);
          if (baseChunkEqual(base.diskIndex, c + i, d, content)) continue;
          await enc.put(Target.Disk, c + i, Buffer.from(content), d);
        }
        done += n * CHUNK;
        input.onProgress?.(done, total);
      }
    }

    await enc.flush();
    await packer.finish();
    await sink.close();

    const meta: OverlayMeta = {
      formatVersion: OVERLAY_FORMAT_VERSION,
      chunkSize: CHUNK,
      createdAt: new Date().toISOString(),
      base: { id: base.id, diskSize: base.diskIndex.byteLength, memImageSize: base.memIndex.byteLength },
      launch: {
        domainXml: memory.domainXml,
        ...(memory.cpuModel !== undefined ? { cpuModel: memory.cpuModel } : {}),
        disk: { virtualSize: info['virtual-size'], changedChunks: enc.digests[Target.Disk].count, changedSha256: enc.digests[Target.Disk].hex() },
        memory: {
          mode: memory.mode,
          imageSize: memStat.size,
          changedChunks: enc.digests[Target.Memory].count,
          changedSha256: enc.digests[Target.Memory].hex(),
          saveFileSize: memory.saveFileSize,
          saveFileSha256: memory.saveFileSha256,
          skeleton: skeletonBlob,
        },
      },
      options: { lzmaLevel: level, delta: useDelta, segmentSize },
      stats: enc.stats,
      segments: packer.segments,
    };
    const metaJson = Buffer.from(JSON.stringify(meta), 'utf8');
    const out = await open(outTmp, 'wx');
    try {
      await out.write(encodeHeader(metaJson), 0, HEADER_SIZE, 0);
      await out.write(metaJson, 0, metaJson.length, HEADER_SIZE);
      const data = await open(dataTmp, 'r');
      try {
        const buf = Buffer.alloc(4 << 20);
        let pos = 0;
        for (;;) {
          const { bytesRead } = await data.read(buf, 0, buf.length, pos);
          if (bytesRead === 0) break;
          await out.write(buf, 0, bytesRead, HEADER_SIZE + metaJson.length + pos);
          pos += bytesRead;
        }
      } finally {
        await data.close();
      }
      await out.sync();
    } finally {
      await out.close();
    }
    await rename(outTmp, outPath);
    return meta;
  } catch (e) {
    await sink.close().catch(() => undefined);
    await rm(outTmp, { force: true });
    throw e;
  } finally {
    diskReader?.close();
    baseDisk.close();
    baseMem.close();
    await rm(dataTmp, { force: true });
  }
}

