/**
 * A handoff round file: what the source ships to the destination in one round. Records use the
 * overlay's record encoding (src/core/overlay/format.ts: zero, raw, "same as the base chunk at
 * this place"); they are cut into segments of a few MiB, each compressed on its own (zstd or xz at
 * the level the policy chose, or stored), and a JSON trailer describes the segments, so the file can be
 * written in one pass and read back segment by segment. Layout: docs/handoff.md.
 *
 *   segment 0 | segment 1 | ... | [skeleton] | meta JSON | u32 LE meta length | "CLDHOFF1"
 */
import { createHash } from 'node:crypto';
import { open, type FileHandle } from 'node:fs/promises';
import { z } from 'zod';
import { CloudletError } from '../errors';
import { xzCompress, xzDecompress } from '../overlay/lzma';
import { zstdCompress, zstdDecompress } from '../zstd';
import { CHUNK, encodeRecordHeader, Kind, RECORD_HEADER_SIZE, Target } from '../overlay/format';

export const ROUND_MAGIC = Buffer.from('CLDHOFF1', 'latin1');
const TRAILER = 4 + ROUND_MAGIC.length;
const MAX_META = 16 * 1024 * 1024;
const SEGMENT_INPUT = 4 * 1024 * 1024;

const hex64 = z.string().regex(/^[0-9a-f]{64}$/);
const uint = z.number().int().nonnegative();

export const CompressionSchema = z.union([
  z.object({ codec: z.literal('none') }),
  z.object({ codec: z.literal('xz'), level: z.number().int().min(0).max(9) }),
  z.object({ codec: z.literal('zstd'), level: z.number().int().min(1).max(19) }),
]);
export type Compression = z.infer<typeof CompressionSchema>;

const BlobSchema = z.object({ offset: uint, length: uint, rawLength: uint, sha256: hex64 });
export type RoundBlob = z.infer<typeof BlobSchema>;

export const RoundStatsSchema = z.object({
  memPages: uint,
  memZero: uint,
  memBase: uint,
  memRaw: uint,
  diskChunks: uint,
  diskZero: uint,
  diskBase: uint,
  diskRaw: uint,
});
export type RoundStats = z.infer<typeof RoundStatsSchema>;

const SharedRamSchema = z.object({ block: z.string().min(1), offset: uint, length: uint });

/** What only the last round carries: how to rebuild the save file, and digests to verify. */
export const FinalPartSchema = z.object({
  skeleton: BlobSchema,
  domainXml: z.string(),
  cpuModel: z.string().optional(),
  memImageSize: uint,
  /**
   * The RAM block the source's stream left out (x-ignore-shared): the destination loads it from
   * its memory image (offset, length) into the VM's shared RAM file, and verifies it by
   * memStateSha256 (the save file's digest does not cover it).
   */
  sharedRam: SharedRamSchema.optional(),
  saveFileSize: uint,
  saveFileSha256: hex64,
  /** sha256 over the source's digests of every memory page / disk chunk (see stateDigest). */
  memStateSha256: hex64,
  diskStateSha256: hex64,
  diskVirtualSize: uint,
});
export type FinalPart = z.infer<typeof FinalPartSchema>;

/**
 * What a live round of a VM with shared RAM tells the destination so that it can start the VM's
 * QEMU ahead of the cut-over (waiting for the device state) and fill its RAM file while the
 * source still runs: the domain XML and where the RAM block is in the memory image.
 */
export const PreparePartSchema = z.object({ domainXml: z.string().min(1), sharedRam: SharedRamSchema });
export type PreparePart = z.infer<typeof PreparePartSchema>;

export const RoundMetaSchema = z.object({
  handoffId: z.string().min(1),
  round: uint,
  baseId: z.string().min(1),
  prepare: PreparePartSchema.optional(),
  compression: CompressionSchema,
  segments: z.array(BlobSchema.extend({ records: uint })),
  stats: RoundStatsSchema,
  final: FinalPartSchema.optional(),
});
export type RoundMeta = z.infer<typeof RoundMetaSchema>;

export function emptyStats(): RoundStats {
  return { memPages: 0, memZero: 0, memBase: 0, memRaw: 0, diskChunks: 0, diskZero: 0, diskBase: 0, diskRaw: 0 };
}

function compress(data: Buffer, c: Compression): Promise<Buffer> {
  if (c.codec === 'none') return Promise.resolve(data);
  return c.codec === 'zstd' ? zstdCompress(data, c.level) : xzCompress(data, c.level);
}

/**
 * Writes a round file. `add*` calls append records; segments are compressed in the background
 * (at most `concurrency` at once) and written in order.
 */
export class RoundWriter {
  private fh: FileHandle | undefined;
  private offset = 0;
  private parts: Buffer[] = [];
  private partBytes = 0;
  private partRecords = 0;
  private readonly segments: RoundMeta['segments'] = [];
  private readonly pending: Array<Promise<{ raw: Buffer; packed: Buffer; records: number }>> = [];
  readonly stats = emptyStats();
  /** The first MiB of the first segment's raw records (to measure compression settings on). */
  sample: Buffer = Buffer.alloc(0);

  private chooser: ((sample: Buffer) => Promise<Compression>) | undefined;

  private constructor(
    private readonly path: string,
    private compression: Compression,
    private readonly concurrency: number,
  ) {}

  /** The compression the round uses (known once the first segment is cut). */
  get chosenCompression(): Compression {
    return this.compression;
  }

  /**
   * `compression`: a setting, or a chooser that gets the first segment's raw records (before any
   * is compressed) and picks the setting for the whole round.
   */
  static async create(path: string, compression: Compression | ((sample: Buffer) => Promise<Compression>), concurrency = 2): Promise<RoundWriter> {
    const w = new RoundWriter(path, typeof compression === 'function' ? { codec: 'none' } : compression, concurrency);
    if (typeof compression === 'function') w.chooser = compression;
    w.fh = await open(path, 'w');
    return w;
  }

  /** A run of chunks whose content is all zero. */
  async zero(target: Target, chunk: number, count: number): Promise<void> {
    await this.record(encodeRecordHeader(Kind.Zero, target, chunk, count), []);
  }

  /** A run of chunks equal to `count` chunks of the base's memory image or disk from chunk `src`. */
  async base(target: Target, chunk: number, count: number, from: 'mem' | 'disk', src: number): Promise<void> {
    const at = Buffer.alloc(6);
    at.writeUIntLE(src, 0, 6);
    await this.record(encodeRecordHeader(from === 'disk' ? Kind.BaseDisk : Kind.BaseMem, target, chunk, count), [at]);
  }

  /** `data.length / 4096` chunks of new content. */
  async raw(target: Target, chunk: number, data: Buffer): Promise<void> {
    await this.record(encodeRecordHeader(Kind.Raw, target, chunk, data.length / CHUNK), [Buffer.from(data)]);
  }

  private async record(header: Buffer, payload: Buffer[]): Promise<void> {
    this.parts.push(header, ...payload);
    this.partBytes += header.length + payload.reduce((s, b) => s + b.length, 0);
    this.partRecords += 1;
    if (this.partBytes >= SEGMENT_INPUT) await this.cut();
  }

  private async cut(): Promise<void> {
    if (this.partRecords === 0) return;
    const raw = Buffer.concat(this.parts);
    if (this.sample.length === 0) this.sample = Buffer.from(raw.subarray(0, 1024 * 1024));
    if (this.chooser) {
      this.compression = await this.chooser(this.sample);
      this.chooser = undefined;
    }
    const records = this.partRecords;
    this.parts = [];
    this.partBytes = 0;
    this.partRecords = 0;
    this.pending.push(compress(raw, this.compression).then((packed) => ({ raw, packed, records })));
    while (this.pending.length >= this.concurrency) await this.flushOne();
  }

  private async flushOne(): Promise<void> {
    const next = this.pending.shift();
    if (!next) return;
    const { raw, packed, records } = await next;
    const ref = await this.writeBlob(packed, raw);
    this.segments.push({ ...ref, records });
  }

  private async writeBlob(packed: Buffer, raw: Buffer): Promise<RoundBlob> {
    const fh = this.fh;
    if (!fh) throw new Error('round writer is closed');
    await fh.write(packed, 0, packed.length, this.offset);
    const ref = { offset: this.offset, length: packed.length, rawLength: raw.length, sha256: createHash('sha256').update(raw).digest('hex') };
    this.offset += packed.length;
    return ref;
  }

  /** Writes the remaining segments, the skeleton (final round) and the trailer; returns the meta and the file's size. */
  async finish(head: { handoffId: string; round: number; baseId: string; prepare?: PreparePart }, final?: Omit<FinalPart, 'skeleton'> & { skeleton: Buffer }): Promise<{ meta: RoundMeta; bytes: number }> {
    await this.cut();
    while (this.pending.length > 0) await this.flushOne();
    const meta: RoundMeta = { ...head, compression: this.compression, segments: this.segments, stats: this.stats };
    if (final) {
      const { skeleton, ...rest } = final;
      const packed = await compress(skeleton, this.compression);
      meta.final = { ...rest, skeleton: await this.writeBlob(packed, skeleton) };
    }
    const json = Buffer.from(JSON.stringify(meta), 'utf8');
    const trailer = Buffer.alloc(TRAILER);
    trailer.writeUInt32LE(json.length, 0);
    ROUND_MAGIC.copy(trailer, 4);
    const fh = this.fh;
    if (!fh) throw new Error('round writer is closed');
    await fh.write(Buffer.concat([json, trailer]), 0, json.length + TRAILER, this.offset);
    this.offset += json.length + TRAILER;
    await fh.sync();
    await fh.close();
    this.fh = undefined;
    return { meta, bytes: this.offset };
  }

  async abort(): Promise<void> {
    await this.fh?.close().catch(() => undefined);
    this.fh = undefined;
  }
}

function corrupt(file: string, what: string): CloudletError {
  return new CloudletError('CORRUPT', `handoff round ${file}: ${what}`, { fix: 'the source resends the round: retry the handoff' });
}

/** Reads a round file's trailer. */
export async function readRoundMeta(fh: FileHandle, file: string): Promise<RoundMeta> {
  const { size } = await fh.stat();
  if (size < TRAILER) throw corrupt(file, `${size} bytes is too short to be a round file`);
  const trailer = Buffer.alloc(TRAILER);
  await fh.read(trailer, 0, TRAILER, size - TRAILER);
  if (!trailer.subarray(4).equals(ROUND_MAGIC)) throw corrupt(file, 'no round trailer (the upload is incomplete or not a round file)');
  const len = trailer.readUInt32LE(0);
  if (len > MAX_META || len > size - TRAILER) throw corrupt(file, `meta length ${len} is impossible`);
  const json = Buffer.alloc(len);
  await fh.read(json, 0, len, size - TRAILER - len);
  const parsed = RoundMetaSchema.safeParse(JSON.parse(json.toString('utf8')));
  if (!parsed.success) throw corrupt(file, `meta does not match the round format: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  return parsed.data;
}

/** Reads, decompresses and checks one blob of a round file. */
export async function readRoundBlob(fh: FileHandle, file: string, meta: RoundMeta, ref: RoundBlob): Promise<Buffer> {
  const packed = Buffer.alloc(ref.length);
  const { bytesRead } = await fh.read(packed, 0, ref.length, ref.offset);
  if (bytesRead !== ref.length) throw corrupt(file, `blob at ${ref.offset} is cut short`);
  const c = meta.compression;
  const raw = c.codec === 'none' ? packed : c.codec === 'zstd' ? await zstdDecompress(packed, ref.rawLength) : await xzDecompress(packed, ref.rawLength);
  if (raw.length !== ref.rawLength || createHash('sha256').update(raw).digest('hex') !== ref.sha256) {
    throw corrupt(file, `blob at ${ref.offset} does not match its sha256`);
  }
  return raw;
}

export interface RoundRecord {
  kind: Kind;
  target: Target;
  chunk: number;
  count: number;
  /** Raw: count × 4096 bytes. */
  data?: Buffer;
  /** BaseMem / BaseDisk: the first base chunk to copy. */
  src?: number;
}

/** The records of one decompressed segment. */
export function* recordsOf(segment: Buffer, file: string): Generator<RoundRecord> {
  let at = 0;
  while (at < segment.length) {
    if (at + RECORD_HEADER_SIZE > segment.length) throw corrupt(file, 'a record header is cut short');
    const op = segment[at] ?? 0;
    const kind = (op & 0x0f) as Kind;
    const target = (op >> 4) as Target;
    const chunk = segment.readUIntLE(at + 1, 6);
    const count = segment.readUInt32LE(at + 7);
    at += RECORD_HEADER_SIZE;
    if (target !== Target.Disk && target !== Target.Memory) throw corrupt(file, `record target ${target} is unknown`);
    if (kind === Kind.Zero) {
      yield { kind, target, chunk, count };
    } else if (kind === Kind.Raw) {
      const len = count * CHUNK;
      if (at + len > segment.length) throw corrupt(file, 'raw record data is cut short');
      yield { kind, target, chunk, count, data: segment.subarray(at, at + len) };
      at += len;
    } else if (kind === Kind.BaseDisk || kind === Kind.BaseMem) {
      if (at + 6 > segment.length) throw corrupt(file, 'a base record is cut short');
      const src = segment.readUIntLE(at, 6);
      at += 6;
      yield { kind, target, chunk, count, src };
    } else {
      throw corrupt(file, `record kind ${kind} is not used in handoff rounds`);
    }
  }
}

/** sha256 over a digest list: what both sides compare to agree on the whole state. */
export function stateDigest(digests: Buffer): string {
  return createHash('sha256').update(digests).digest('hex');
}
