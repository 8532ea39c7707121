/**
 * The source side of a handoff: what the destination holds, as one sha256 per memory page and
 * per disk chunk (it starts as the base's chunk indexes), and the round builder that ships what
 * differs from it. A round never trusts the hypervisor's dirty tracking: every page of the
 * round's memory stream and every chunk of the frozen disk layers is compared with what the
 * destination holds, so the last round, taken from the paused VM, makes the destination exact.
 */
import { createHash } from 'node:crypto';
import { closeSync, openSync, readSync } from 'node:fs';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { CloudletError } from '../errors';
import { buildChunkIndex, type ChunkIndex } from '../chunk';
import { CHUNK, MAX_RUN, Target, ZERO_CHUNK, ZERO_CHUNK_SHA256 } from '../overlay/format';
import { imageMap } from '../overlay/qemu-img';
import { splitSnapshot } from '../snapshot';
import { RoundWriter, stateDigest, type Compression, type RoundMeta } from './round';

export interface HandoffBase {
  id: string;
  memIndex: ChunkIndex;
  diskIndex: ChunkIndex;
}

export interface BuildRoundInput {
  round: number;
  /** A libvirt save file of the VM (a live stream, or the paused VM's for the last round). */
  memorySave: string;
  /** Disk layers frozen since the previous round, oldest first (qcow2, each over the one before). */
  diskLayers: string[];
  outPath: string;
  /** A setting, or a chooser given the round's first MiB of records (see RoundWriter.create). */
  compression: Compression | ((sample: Buffer) => Promise<Compression>);
  /** The last round: carries the skeleton and digests, so the destination can rebuild and verify. */
  final?: boolean;
  /**
   * The guest's RAM block that is a shared file, left out of `memorySave` (an x-ignore-shared
   * stream): its pages are read from `path` instead (a live round reads it while the VM runs; the
   * last round, paused, is exact).
   */
  sharedRam?: {
    block: string;
    path: string;
    /** The file's page digests when the caller started hashing it already (e.g. while the stream was captured). */
    index?: Promise<ChunkIndex>;
  };
  onProgress?(done: number, total: number, stage: string): void;
}

export interface BuiltRound {
  meta: RoundMeta;
  /** The first MiB of record payload, to measure compression settings on. */
  sample: Buffer;
  bytes: number;
  /** Bytes of record payload before compression. */
  rawBytes: number;
  /** split: the stream into an image; hashMemory: its pages (and the shared RAM file's); memory/disk: comparing and adding records; finish: the last segments and the trailer. */
  ms: { split: number; hashMemory: number; memory: number; disk: number; finish: number; total: number };
}

/** Where the shared RAM block sits in the memory image (chunks) and its file. */
interface SharedRegion {
  path: string;
  index?: Promise<ChunkIndex>;
  firstChunk: number;
  chunks: number;
  size: number;
}

export function digestsOf(ix: ChunkIndex): Buffer {
  const out = Buffer.alloc(ix.chunkCount * 32);
  for (let i = 0; i < ix.chunkCount; i++) ix.digestAt(i).copy(out, i * 32);
  return out;
}


type ChunkKind = 'zero' | 'raw' | 'mem' | 'disk';

/** Collects consecutive chunks of one kind (and, for base copies, consecutive sources) into records. */
class RunBuilder {
  private kind: ChunkKind | undefined;
  private start = 0;
  private src = 0;
  private count = 0;
  private data: Buffer[] = [];
  constructor(
    private readonly w: RoundWriter,
    private readonly target: Target,
  ) {}

  /** `src`: for 'mem' / 'disk', the base chunk the content equals. */
  async add(kind: ChunkKind, chunk: number, content?: Buffer, src = 0): Promise<void> {
    const continues = this.kind === kind && this.start + this.count === chunk && this.count < MAX_RUN && (kind === 'zero' || kind === 'raw' || this.src + this.count === src);
    if (!continues) await this.flush();
    if (this.count === 0) {
      this.kind = kind;
      this.start = chunk;
      this.src = src;
    }
    this.count += 1;
    if (kind === 'raw' && content) this.data.push(Buffer.from(content));
  }

  async flush(): Promise<void> {
    if (this.count === 0 || !this.kind) return;
    if (this.kind === 'zero') await this.w.zero(this.target, this.start, this.count);
    else if (this.kind === 'raw') await this.w.raw(this.target, this.start, Buffer.concat(this.data));
    else await this.w.base(this.target, this.start, this.count, this.kind, this.src);
    this.count = 0;
    this.data = [];
    this.kind = undefined;
  }
}

export class HandoffSource {
  private constructor(
    private readonly dir: string,
    readonly handoffId: string,
    private readonly base: HandoffBase,
    /** What the destination holds once every committed round is applied. */
    private mem: Buffer,
    private disk: Buffer,
  ) {}

  /** Opens the handoff's state in `dir`, or starts it from the base (the destination holds the base). */
  static async open(dir: string, handoffId: string, base: HandoffBase): Promise<HandoffSource> {
    await mkdir(dir, { recursive: true });
    const load = async (name: string, ix: ChunkIndex): Promise<Buffer> => {
      try {
        const b = await readFile(path.join(dir, name));
        if (b.length === ix.chunkCount * 32) return b;
      } catch {
        // first round
      }
      return digestsOf(ix);
    };
    return new HandoffSource(dir, handoffId, base, await load('mem.digests', base.memIndex), await load('disk.digests', base.diskIndex));
  }

  /** Builds the base's digest lookup tables now (they are built on first use otherwise). */
  warm(): void {
    this.base.memIndex.findByDigest(ZERO_CHUNK_SHA256);
    this.base.diskIndex.findByDigest(ZERO_CHUNK_SHA256);
  }

  /**
   * Keeps what the destination will hold once it applies the rounds built so far, beside the
   * committed state (two phases: a round the destination applied but the source did not commit,
   * e.g. when the worker died in between, is committed by the next attempt).
   */
  async stagePending(): Promise<void> {
    for (const [name, b] of [['mem.digests', this.mem], ['disk.digests', this.disk]] as const) {
      const tmp = path.join(this.dir, `${name}.pending.tmp`);
      await writeFile(tmp, b);
      await rename(tmp, path.join(this.dir, `${name}.pending`));
    }
  }

  /** The destination applied the staged rounds: their digests become the reference. */
  async commitPending(): Promise<void> {
    for (const name of ['mem.digests', 'disk.digests']) {
      const pending = path.join(this.dir, `${name}.pending`);
      try {
        await rename(pending, path.join(this.dir, name));
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      }
    }
  }

  /** stagePending + commitPending (when the destination is known to apply what was built). */
  async commit(): Promise<void> {
    await this.stagePending();
    await this.commitPending();
  }

  /** Forgets uncommitted rounds (a round whose upload failed is rebuilt from the committed state). */
  static async reset(dir: string): Promise<void> {
    await rm(dir, { recursive: true, force: true });
  }

  async buildRound(input: BuildRoundInput): Promise<BuiltRound> {
    const t0 = performance.now();
    const w = await RoundWriter.create(input.outPath, input.compression);
    const memImg = path.join(this.dir, `round-${input.round}.memimg.tmp`);
    let rawBytes = 0;
    try {
      const tSplit0 = performance.now();
      const layout = await splitSnapshot(input.memorySave, memImg, { onProgress: (d, t) => input.onProgress?.(d, t, 'split memory stream') });
      if (layout.mode !== 'parsed') {
        throw new CloudletError('HYPERVISOR', `the memory stream of round ${input.round} holds records this codec does not parse (opaque mode)`, {
          fix: 'hand off with the machine type and QEMU version the base was made with',
        });
      }
      if (layout.memImageSize !== this.base.memIndex.byteLength) {
        throw new CloudletError('WRONG_BASE', `the VM's memory image is ${layout.memImageSize} bytes, its base ${this.base.id.slice(0, 12)}… has ${this.base.memIndex.byteLength}`, {
          fix: 'hand off only VMs resumed or synthesized from the base the destination holds, with the same memory size',
        });
      }
      let shared: SharedRegion | undefined;
      if (input.sharedRam) {
        const b = layout.blocks.find((x) => x.name === input.sharedRam?.block);
        if (!b) {
          throw new CloudletError('HYPERVISOR', `the memory stream of round ${input.round} has no RAM block ${input.sharedRam.block} (blocks: ${layout.blocks.map((x) => x.name).join(', ')})`, {
            fix: 'hand off only VMs whose RAM is the shared file libvirt names pc.ram',
          });
        }
        if (b.imageOffset % CHUNK !== 0) throw new CloudletError('HYPERVISOR', `RAM block ${b.name} starts at ${b.imageOffset}, not on a page boundary`, { fix: 'hand off without shared RAM' });
        shared = { path: input.sharedRam.path, firstChunk: b.imageOffset / CHUNK, chunks: Math.ceil(b.size / CHUNK), size: b.size, ...(input.sharedRam.index ? { index: input.sharedRam.index } : {}) };
      }
      const tSplit = performance.now();
      const mem = await this.diffMemory(memImg, w, input, shared);
      rawBytes += mem.shipped;
      const tMem = performance.now();
      rawBytes += await this.diffDisk(input.diskLayers, w, input);
      const tDisk = performance.now();
      const sharedRam = shared && input.sharedRam ? { block: input.sharedRam.block, offset: shared.firstChunk * CHUNK, length: shared.size } : undefined;
      const head = {
        handoffId: this.handoffId,
        round: input.round,
        baseId: this.base.id,
        ...(!input.final && sharedRam ? { prepare: { domainXml: layout.domainXml, sharedRam } } : {}),
      };
      const { meta, bytes } = input.final
        ? await w.finish(head, {
            skeleton: layout.skeleton,
            domainXml: layout.domainXml,
            ...(layout.cpuModel !== undefined ? { cpuModel: layout.cpuModel } : {}),
            memImageSize: layout.memImageSize,
            ...(sharedRam ? { sharedRam } : {}),
            saveFileSize: layout.saveFileSize,
            saveFileSha256: layout.saveFileSha256,
            memStateSha256: stateDigest(this.mem),
            diskStateSha256: stateDigest(this.disk),
            diskVirtualSize: this.base.diskIndex.byteLength,
          })
        : await w.finish(head);
      const ms = (a: number, b: number): number => Math.round(b - a);
      return {
        meta,
        bytes,
        rawBytes,
        sample: w.sample,
        ms: { split: ms(tSplit0, tSplit), hashMemory: Math.round(mem.hashMs), memory: ms(tSplit, tMem) - Math.round(mem.hashMs), disk: ms(tMem, tDisk), finish: ms(tDisk, performance.now()), total: ms(t0, performance.now()) },
      };
    } catch (e) {
      await w.abort();
      await rm(input.outPath, { force: true });
      throw e;
    } finally {
      await rm(memImg, { force: true });
    }
  }

  /**
   * Compares every page of the memory image with what the destination holds: the image's page
   * digests come from the chunk indexer (threads, holes skipped), only pages that differ are read.
   * With shared RAM, the pages of that block come from its file (the stream left them out).
   */
  private async diffMemory(memImg: string, w: RoundWriter, input: BuildRoundInput, shared?: SharedRegion): Promise<{ shipped: number; hashMs: number }> {
    const runs = new RunBuilder(w, Target.Memory);
    const t0 = performance.now();
    const ix = await buildChunkIndex(memImg, { holes: 'skip', onProgress: (d, t) => input.onProgress?.(d, t, 'hash memory') });
    const ramIx = shared ? await (shared.index ?? buildChunkIndex(shared.path, { holes: 'skip', onProgress: (d, t) => input.onProgress?.(d, t, 'hash shared RAM') })) : undefined;
    if (shared && ramIx && ramIx.byteLength < shared.size) {
      throw new CloudletError('HYPERVISOR', `the shared RAM file ${shared.path} has ${ramIx.byteLength} bytes, its block ${shared.size}`, { fix: 'hand off without shared RAM' });
    }
    const hashMs = performance.now() - t0;
    const fd = openSync(memImg, 'r');
    const ramFd = shared ? openSync(shared.path, 'r') : -1;
    const page = Buffer.alloc(CHUNK);
    let shipped = 0;
    try {
      for (let i = 0; i < ix.chunkCount; i++) {
        const inRam = shared !== undefined && ramIx !== undefined && i >= shared.firstChunk && i < shared.firstChunk + shared.chunks;
        const src = inRam ? (ramIx as ChunkIndex) : ix;
        const at = inRam ? i - (shared as SharedRegion).firstChunk : i;
        if (src.equalAt(at, this.mem.subarray(i * 32, i * 32 + 32))) continue;
        const d = src.digestAt(at);
        const zero = d.equals(ZERO_CHUNK_SHA256);
        if (!zero) readFully(inRam ? ramFd : fd, page, CHUNK, at * CHUNK);
        // A page of the running VM's RAM file may have changed since it was hashed: hash what was read.
        const digest = zero || !inRam ? d : createHash('sha256').update(page).digest();
        shipped += await this.consider(runs, this.mem, w.stats, 'mem', i, zero ? ZERO_CHUNK : page, digest);
      }
      await runs.flush();
    } finally {
      closeSync(fd);
      if (ramFd >= 0) closeSync(ramFd);
    }
    return { shipped, hashMs };
  }

  /** Compares every chunk the frozen layers hold (newest wins) with what the destination holds. */
  private async diffDisk(layers: string[], w: RoundWriter, input: BuildRoundInput): Promise<number> {
    // chunk -> [fd, file offset] of its newest copy, or null when that layer reads it as zero
    const where = new Map<number, [number, number] | null>();
    const fds: number[] = [];
    let shipped = 0;
    try {
      for (const layer of layers) {
        const fd = openSync(layer, 'r');
        fds.push(fd);
        for (const e of await imageMap(layer)) {
          if (e.depth !== 0 || e.length === 0) continue;
          if (e.data && (e.compressed || e.offset === undefined)) {
            throw new CloudletError('HYPERVISOR', `disk layer ${layer} has compressed or unmapped data at ${e.start}`, { fix: 'disk layers must be plain qcow2 written by QEMU' });
          }
          const first = Math.floor(e.start / CHUNK);
          const last = Math.ceil((e.start + e.length) / CHUNK);
          for (let c = first; c < last; c++) where.set(c, e.data && e.offset !== undefined ? [fd, e.offset + (c * CHUNK - e.start)] : null);
        }
      }
      const runs = new RunBuilder(w, Target.Disk);
      const chunks = [...where.keys()].sort((a, b) => a - b);
      const buf = Buffer.alloc(CHUNK);
      let done = 0;
      for (const c of chunks) {
        const loc = where.get(c);
        let content = ZERO_CHUNK;
        if (loc) {
          buf.fill(0);
          readFully(loc[0], buf, CHUNK, loc[1]);
          content = buf;
        }
        shipped += await this.consider(runs, this.disk, w.stats, 'disk', c, content);
        if (++done % 4096 === 0) input.onProgress?.(done, chunks.length, 'compare disk');
      }
      await runs.flush();
    } finally {
      for (const fd of fds) closeSync(fd);
    }
    return shipped;
  }

  /**
   * Adds chunk i to the round unless the destination already holds its content: as zero, as a
   * copy of a base chunk with the same content (at the same place first, else anywhere in the
   * base's memory or disk), or raw. Returns the payload bytes.
   */
  private async consider(runs: RunBuilder, held: Buffer, stats: RoundMeta['stats'], what: 'mem' | 'disk', i: number, content: Buffer, digest?: Buffer): Promise<number> {
    const zero = digest ? digest.equals(ZERO_CHUNK_SHA256) : content.equals(ZERO_CHUNK);
    const d = digest ?? (zero ? ZERO_CHUNK_SHA256 : createHash('sha256').update(content).digest());
    if (held.compare(d, 0, 32, i * 32, i * 32 + 32) === 0) return 0;
    d.copy(held, i * 32);
    const count = (k: 'Zero' | 'Base' | 'Raw'): void => {
      if (what === 'mem') stats[`mem${k}`] += 1;
      else stats[`disk${k}`] += 1;
    };
    if (what === 'mem') stats.memPages += 1;
    else stats.diskChunks += 1;
    if (zero) {
      count('Zero');
      await runs.add('zero', i);
      return 0;
    }
    const same = what === 'mem' ? this.base.memIndex : this.base.diskIndex;
    if (i < same.chunkCount && same.equalAt(i, d)) {
      count('Base');
      await runs.add(what, i, undefined, i);
      return 0;
    }
    const inMem = this.base.memIndex.findByDigest(d);
    const inDisk = inMem === undefined ? this.base.diskIndex.findByDigest(d) : undefined;
    if (inMem !== undefined || inDisk !== undefined) {
      count('Base');
      await runs.add(inMem !== undefined ? 'mem' : 'disk', i, undefined, inMem ?? inDisk ?? 0);
      return 0;
    }
    count('Raw');
    await runs.add('raw', i, content);
    return CHUNK;
  }
}

export function readFully(fd: number, buf: Buffer, len: number, pos: number): number {
  let done = 0;
  while (done < len) {
    const n = readSync(fd, buf, done, len - done, pos + done);
    if (n === 0) break;
    done += n;
  }
  if (done < len) buf.fill(0, done, len);
  return len;
}
