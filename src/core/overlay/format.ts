/**
 * The overlay file format, version 1 (docs/overlay-format.md):
 *
 *   header (64 bytes) | meta (JSON, metaLength bytes) | data area: skeleton blob, then segments
 *
 * Header: magic "CLDOVRLY", u32 LE format version, u32 LE flags (0), u64 LE metaLength,
 * sha256(meta) (32 bytes), 8 reserved zero bytes. Every blob in the data area is addressed by
 * (offset from the start of the data area, length) in the meta, carries the sha256 of its
 * compressed bytes and is an independent .xz stream, so a reader can fetch any blob with one HTTP
 * Range request and decompress blobs in parallel.
 *
 * A decompressed segment is a run of records (see `encodeRecordHeader`), each naming a target
 * (disk or memory image), a first chunk, a chunk count and where the content comes from.
 */
import { createHash } from 'node:crypto';
import { z } from 'zod';
import { CloudletError } from '../errors';

export const CHUNK = 4096;
export const OVERLAY_MAGIC = Buffer.from('CLDOVRLY', 'latin1');
export const OVERLAY_FORMAT_VERSION = 1;
export const HEADER_SIZE = 64;
/** Upper bound on the meta, so a corrupt length cannot make a reader allocate gigabytes. */
export const MAX_META_LENGTH = 64 * 1024 * 1024;
/** Upper bound on a blob's decompressed size (segments are a few MiB; skeletons are small). */
export const MAX_BLOB_RAW_LENGTH = 512 * 1024 * 1024;
/**
 * Upper bound on the segments of one overlay (at the default 4 MiB a segment, 256 GiB of changes).
 * Records need no count of their own: each writes chunks after the previous one of its target,
 * so a segment's records are bounded by the target's chunks (a record out of order is corrupt).
 */
export const MAX_SEGMENTS = 65536;

export enum Target {
  Disk = 0,
  Memory = 1,
}

/** How the content of a run of chunks is obtained. */
export enum Kind {
  /** All zero bytes; no payload. */
  Zero = 0,
  /** `count` × 4096 raw bytes follow. */
  Raw = 1,
  /** Same as `count` chunks of the base memory image starting at chunk `src` (u48 LE payload). */
  BaseMem = 2,
  /** Same as `count` chunks of the base disk starting at chunk `src`. */
  BaseDisk = 3,
  /** Same as chunks of the launch disk written earlier in this overlay. */
  SelfDisk = 4,
  /** Same as chunks of the launch memory image written earlier in this overlay. */
  SelfMem = 5,
  /** count = 1; u32 LE length then an xdelta3 delta against the base chunk at the same place. */
  Delta = 6,
}

export const KIND_NAMES: Record<Kind, string> = {
  [Kind.Zero]: 'zero',
  [Kind.Raw]: 'raw',
  [Kind.BaseMem]: 'baseMem',
  [Kind.BaseDisk]: 'baseDisk',
  [Kind.SelfDisk]: 'selfDisk',
  [Kind.SelfMem]: 'selfMem',
  [Kind.Delta]: 'delta',
};

/** op (u8: kind | target << 4), first chunk (u48 LE), count (u32 LE). */
export const RECORD_HEADER_SIZE = 11;
export const MAX_RUN = 1024;

const hex64 = z.string().regex(/^[0-9a-f]{64}$/);
const uint = z.number().int().nonnegative();

export const BlobRefSchema = z.object({
  offset: uint,
  length: uint,
  rawLength: uint,
  sha256: hex64,
});
export type BlobRef = z.infer<typeof BlobRefSchema>;

export const SegmentRefSchema = BlobRefSchema.extend({ records: uint, chunks: uint });
export type SegmentRef = z.infer<typeof SegmentRefSchema>;

export const OverlayMetaSchema = z.object({
  formatVersion: z.literal(OVERLAY_FORMAT_VERSION),
  chunkSize: z.literal(CHUNK),
  createdAt: z.string(),
  base: z.object({
    id: z.string().min(1),
    diskSize: uint,
    memImageSize: uint,
  }),
  launch: z.object({
    domainXml: z.string(),
    cpuModel: z.string().optional(),
    disk: z.object({
      virtualSize: uint,
      changedChunks: uint,
      /** sha256 over (u64 LE chunk number, 4096 bytes) of every chunk that differs from the base, ascending. */
      changedSha256: hex64,
    }),
    memory: z.object({
      mode: z.enum(['parsed', 'opaque']),
      imageSize: uint,
      changedChunks: uint,
      changedSha256: hex64,
      saveFileSize: uint,
      saveFileSha256: hex64,
      skeleton: BlobRefSchema,
    }),
  }),
  options: z.object({ lzmaLevel: z.number().int().min(0).max(9), delta: z.boolean(), segmentSize: uint }),
  stats: z.record(z.string(), uint),
  segments: z.array(SegmentRefSchema).max(MAX_SEGMENTS),
});
export type OverlayMeta = z.infer<typeof OverlayMetaSchema>;

export function encodeHeader(metaJson: Buffer): Buffer {
  const h = Buffer.alloc(HEADER_SIZE);
  OVERLAY_MAGIC.copy(h, 0);
  h.writeUInt32LE(OVERLAY_FORMAT_VERSION, 8);
  h.writeUInt32LE(0, 12);
  h.writeBigUInt64LE(BigInt(metaJson.length), 16);
  createHash('sha256').update(metaJson).digest().copy(h, 24);
  return h;
}

export interface ParsedHeader {
  version: number;
  metaLength: number;
  metaSha256: Buffer;
}

export function decodeHeader(h: Buffer, where: string): ParsedHeader {
  if (h.length < HEADER_SIZE) {
    throw new CloudletError('CORRUPT', `overlay ${where} is truncated: ${h.length} bytes, shorter than its ${HEADER_SIZE}-byte header`, {
      fix: 'fetch or rebuild the overlay',
      details: { where, part: 'header' },
    });
  }
  if (!h.subarray(0, 8).equals(OVERLAY_MAGIC)) {
    throw new CloudletError('CORRUPT', `${where} is not a cloudlet overlay (bad magic in header)`, {
      fix: 'pass an overlay made by `cloudlet overlay create`',
      details: { where, part: 'header.magic' },
    });
  }
  const version = h.readUInt32LE(8);
  if (version !== OVERLAY_FORMAT_VERSION) {
    throw new CloudletError('UNSUPPORTED_VERSION', `overlay ${where} has format version ${version}; this build reads version ${OVERLAY_FORMAT_VERSION}`, {
      fix: 'rebuild the overlay with this version of cloudlet, or upgrade cloudlet',
      details: { where, part: 'header.version', version },
    });
  }
  const flags = h.readUInt32LE(12);
  const metaLength = h.readBigUInt64LE(16);
  const reserved = h.subarray(56, 64);
  if (flags !== 0 || metaLength === 0n || metaLength > BigInt(MAX_META_LENGTH) || reserved.some((b) => b !== 0)) {
    throw new CloudletError('CORRUPT', `overlay ${where} has a corrupt header (flags ${flags}, meta length ${metaLength})`, {
      fix: 'fetch or rebuild the overlay',
      details: { where, part: 'header' },
    });
  }
  return { version, metaLength: Number(metaLength), metaSha256: Buffer.from(h.subarray(24, 56)) };
}

export function decodeMeta(metaBytes: Buffer, header: ParsedHeader, where: string): OverlayMeta {
  if (metaBytes.length !== header.metaLength) {
    throw new CloudletError('CORRUPT', `overlay ${where} is truncated inside its meta (${metaBytes.length} of ${header.metaLength} bytes)`, {
      fix: 'fetch or rebuild the overlay',
      details: { where, part: 'meta' },
    });
  }
  const digest = createHash('sha256').update(metaBytes).digest();
  if (!digest.equals(header.metaSha256)) {
    throw new CloudletError('DIGEST_MISMATCH', `overlay ${where}: the meta does not match the sha256 recorded in the header`, {
      fix: 'fetch or rebuild the overlay',
      details: { where, part: 'meta', expected: header.metaSha256.toString('hex'), actual: digest.toString('hex') },
    });
  }
  let json: unknown;
  try {
    json = JSON.parse(metaBytes.toString('utf8'));
  } catch (e) {
    throw new CloudletError('CORRUPT', `overlay ${where}: the meta is not valid JSON`, { cause: e, details: { where, part: 'meta' } });
  }
  const version = (json as { formatVersion?: unknown } | null)?.formatVersion;
  if (typeof version === 'number' && version !== OVERLAY_FORMAT_VERSION) {
    throw new CloudletError('UNSUPPORTED_VERSION', `overlay ${where}: meta format version ${version} is not ${OVERLAY_FORMAT_VERSION}`, {
      fix: 'rebuild the overlay with this version of cloudlet',
      details: { where, part: 'meta.formatVersion' },
    });
  }
  const parsed = OverlayMetaSchema.safeParse(json);
  if (!parsed.success) {
    throw new CloudletError('CORRUPT', `overlay ${where}: the meta does not follow format ${OVERLAY_FORMAT_VERSION}: ${parsed.error.issues[0]?.path.join('.')}: ${parsed.error.issues[0]?.message}`, {
      fix: 'rebuild the overlay',
      details: { where, part: 'meta' },
    });
  }
  checkLayout(parsed.data, where);
  return parsed.data;
}

/** Blobs must be contiguous, in order, starting at 0: the data area has no holes or overlaps. */
function checkLayout(meta: OverlayMeta, where: string): void {
  let expected = 0;
  const blobs: Array<[string, BlobRef]> = [['skeleton', meta.launch.memory.skeleton], ...meta.segments.map((s, i): [string, BlobRef] => [`segment ${i}`, s])];
  for (const [name, b] of blobs) {
    if (b.rawLength > MAX_BLOB_RAW_LENGTH) {
      throw new CloudletError('CORRUPT', `overlay ${where}: ${name} claims ${b.rawLength} bytes decompressed, more than the ${MAX_BLOB_RAW_LENGTH} a blob may hold`, {
        fix: 'rebuild the overlay',
        details: { where, part: `meta.${name}` },
      });
    }
    if (b.offset !== expected || b.length === 0) {
      throw new CloudletError('CORRUPT', `overlay ${where}: ${name} is at offset ${b.offset} (length ${b.length}), expected offset ${expected}`, {
        fix: 'rebuild the overlay',
        details: { where, part: `meta.${name}` },
      });
    }
    expected += b.length;
  }
}

export function dataAreaLength(meta: OverlayMeta): number {
  const last = meta.segments[meta.segments.length - 1] ?? meta.launch.memory.skeleton;
  return last.offset + last.length;
}

export function writeU48(buf: Buffer, value: number, at: number): void {
  buf.writeUIntLE(value, at, 6);
}

export function encodeRecordHeader(kind: Kind, target: Target, chunk: number, count: number): Buffer {
  const b = Buffer.alloc(RECORD_HEADER_SIZE);
  b[0] = kind | (target << 4);
  writeU48(b, chunk, 1);
  b.writeUInt32LE(count, 7);
  return b;
}

/** sha256 of one all-zero chunk. */
export const ZERO_CHUNK = Buffer.alloc(CHUNK);
export const ZERO_CHUNK_SHA256 = createHash('sha256').update(ZERO_CHUNK).digest();

export function isZero(b: Buffer): boolean {
  for (let at = 0; at < b.length; at += CHUNK) {
    const part = b.subarray(at, Math.min(b.length, at + CHUNK));
    if (!part.equals(part.length === CHUNK ? ZERO_CHUNK : ZERO_CHUNK.subarray(0, part.length))) return false;
  }
  return true;
}

/** Running digest over the chunks that differ from the base, in ascending chunk order. */
export class ChangedDigest {
  private readonly h = createHash('sha256');
  private readonly num = Buffer.alloc(8);
  count = 0;
  add(chunk: number, content: Buffer): void {
    this.num.writeBigUInt64LE(BigInt(chunk));
    this.h.update(this.num);
    this.h.update(content);
    this.count += 1;
  }
  hex(): string {
    return this.h.digest('hex');
  }
}
