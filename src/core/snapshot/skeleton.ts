/**
 * The skeleton: everything of a save file that is not a page payload, plus the order of the page
 * records, so the file can be rebuilt byte for byte from the memory image. Format (docs/memory-snapshot.md):
 *
 *   "CLDSKEL\0" | u32le version | u32le json length | JSON header | deflate(op stream)
 *
 * Op stream: 0x01 LIT varint(n) <n bytes> | 0x02 RUN varint(block) varint(firstPage) varint(count)
 * u8(named) <ceil(count/8) bytes: bit i set = record i is a ZERO record> [version 2: varint(k),
 * k x (varint(i) u8(fill)): the ZERO records whose fill byte is not 0] | 0x00 END.
 * A RUN is `count` page records of one block at consecutive page addresses; every record but the
 * first carries RAM_SAVE_FLAG_CONTINUE; the first carries the block name iff `named`. PAGE payloads
 * come from the memory image; ZERO fill bytes from the skeleton (version 1: from the image), so a
 * join never reads the image where the save only has zero pages.
 */
import { deflateRawSync, inflateRawSync } from 'node:zlib';
import { z } from 'zod';
import { CloudletError } from '../errors';

export const SKELETON_MAGIC = Buffer.from('CLDSKEL\0', 'ascii');
export const SKELETON_VERSION = 2;
/** Versions decodeSkeleton reads (1: ZERO fill bytes come from the memory image). */
export const SKELETON_VERSIONS_READ: readonly number[] = [1, 2];

export const OP_END = 0x00;
export const OP_LIT = 0x01;
export const OP_RUN = 0x02;

const BlockSchema = z.object({ name: z.string().min(1).max(255), size: z.number().int().nonnegative(), imageOffset: z.number().int().nonnegative() });

export const SkeletonHeaderSchema = z.object({
  mode: z.enum(['parsed', 'opaque']),
  saveFileSize: z.number().int().nonnegative(),
  saveFileSha256: z.string().regex(/^[0-9a-f]{64}$/),
  memImageSize: z.number().int().nonnegative(),
  pageSize: z.number().int().positive(),
  blocks: z.array(BlockSchema),
  qemuStreamOffset: z.number().int().nonnegative().optional(),
  /**
   * Page records the stream sent again later (the earlier copies are literals). Absent in
   * skeletons made before it was recorded: unknown.
   */
  resentRecords: z.number().int().nonnegative().optional(),
  /** Why the file was kept opaque (opaque mode only). */
  reason: z.string().optional(),
});
export type SkeletonHeader = z.infer<typeof SkeletonHeaderSchema>;

export type SkeletonOp =
  | { op: 'lit'; data: Buffer }
  | {
      op: 'run';
      block: number;
      firstPage: number;
      count: number;
      named: boolean;
      zeroBits: Buffer;
      /** Fill bytes of ZERO records that are not 0, by record index; undefined: read them from the image (version 1). */
      fills: Map<number, number> | undefined;
    };

export function encodeSkeleton(header: SkeletonHeader, ops: readonly SkeletonOp[]): Buffer {
  const json = Buffer.from(JSON.stringify(SkeletonHeaderSchema.parse(header)), 'utf8');
  const parts: Buffer[] = [];
  const small: number[] = [];
  const flushSmall = (): void => {
    if (small.length) parts.push(Buffer.from(small));
    small.length = 0;
  };
  const varint = (v: number): void => {
    while (v >= 0x80) {
      small.push((v % 0x80) | 0x80);
      v = Math.floor(v / 0x80);
    }
    small.push(v);
  };
  for (const o of ops) {
    if (o.op === 'lit') {
      if (o.data.length === 0) continue;
      small.push(OP_LIT);
      varint(o.data.length);
      flushSmall();
      parts.push(o.data);
    } else {
      small.push(OP_RUN);
      varint(o.block);
      varint(o.firstPage);
      varint(o.count);
      small.push(o.named ? 1 : 0);
      flushSmall();
      parts.push(o.zeroBits.subarray(0, Math.ceil(o.count / 8)));
      const fills = [...(o.fills ?? new Map<number, number>())].filter(([, b]) => b !== 0).sort((x, y) => x[0] - y[0]);
      varint(fills.length);
      for (const [i, b] of fills) {
        varint(i);
        small.push(b);
      }
    }
  }
  small.push(OP_END);
  flushSmall();
  const body = deflateRawSync(Buffer.concat(parts), { level: 9 });
  const head = Buffer.alloc(16);
  SKELETON_MAGIC.copy(head, 0);
  head.writeUInt32LE(SKELETON_VERSION, 8);
  head.writeUInt32LE(json.length, 12);
  return Buffer.concat([head, json, body]);
}

export interface DecodedSkeleton {
  header: SkeletonHeader;
  ops: SkeletonOp[];
}

export function decodeSkeleton(skeleton: Buffer): DecodedSkeleton {
  const corrupt = (why: string): CloudletError =>
    new CloudletError('CORRUPT', `memory snapshot skeleton is invalid: ${why}`, { fix: 'split the save file again (splitSnapshot) or fetch an intact overlay' });
  if (skeleton.length < 16 || !skeleton.subarray(0, 8).equals(SKELETON_MAGIC)) throw corrupt('bad magic at offset 0 (expected CLDSKEL)');
  const version = skeleton.readUInt32LE(8);
  if (!SKELETON_VERSIONS_READ.includes(version)) {
    throw new CloudletError('UNSUPPORTED_VERSION', `memory snapshot skeleton has version ${version}; this build reads versions ${SKELETON_VERSIONS_READ.join(', ')}`, { fix: 'upgrade cloudlet or rebuild the overlay with this version' });
  }
  const jsonLen = skeleton.readUInt32LE(12);
  if (16 + jsonLen > skeleton.length) throw corrupt(`header JSON of ${jsonLen} bytes runs past the end (truncated)`);
  let header: SkeletonHeader;
  try {
    header = SkeletonHeaderSchema.parse(JSON.parse(skeleton.subarray(16, 16 + jsonLen).toString('utf8')));
  } catch (e) {
    throw corrupt(`header JSON at offset 16: ${(e as Error).message}`);
  }
  let body: Buffer;
  try {
    body = inflateRawSync(skeleton.subarray(16 + jsonLen));
  } catch (e) {
    throw corrupt(`op stream at offset ${16 + jsonLen} does not inflate: ${(e as Error).message}`);
  }
  const ops: SkeletonOp[] = [];
  let p = 0;
  const byte = (): number => {
    if (p >= body.length) throw corrupt(`op stream truncated at body offset ${p}`);
    return body[p++] as number;
  };
  const varint = (): number => {
    let v = 0;
    let mul = 1;
    for (;;) {
      const b = byte();
      v += (b & 0x7f) * mul;
      if (b < 0x80) return v;
      mul *= 0x80;
      if (mul > 2 ** 56) throw corrupt(`varint too long at body offset ${p}`);
    }
  };
  const bytes = (n: number): Buffer => {
    if (p + n > body.length) throw corrupt(`op stream truncated at body offset ${p} (needs ${n} bytes)`);
    const v = body.subarray(p, p + n);
    p += n;
    return v;
  };
  for (;;) {
    const at = p;
    const op = byte();
    if (op === OP_END) break;
    if (op === OP_LIT) ops.push({ op: 'lit', data: bytes(varint()) });
    else if (op === OP_RUN) {
      const block = varint();
      const firstPage = varint();
      const count = varint();
      const named = byte() === 1;
      const zeroBits = bytes(Math.ceil(count / 8));
      let fills: Map<number, number> | undefined;
      if (version >= 2) {
        fills = new Map();
        for (let k = varint(); k > 0; k--) {
          const i = varint();
          const b = byte();
          if (i >= count || !(((zeroBits[i >> 3] as number) >> (i & 7)) & 1)) throw corrupt(`fill byte for record ${i} of the page run at body offset ${at}, which is not a ZERO record`);
          fills.set(i, b);
        }
      }
      const b = header.blocks[block];
      if (!b || count === 0 || (firstPage + count) * header.pageSize > Math.ceil(b.size / header.pageSize) * header.pageSize) {
        throw corrupt(`page run at body offset ${at} (block ${block}, pages ${firstPage}+${count}) is outside the RAM blocks`);
      }
      ops.push({ op: 'run', block, firstPage, count, named, zeroBits, fills });
    } else throw corrupt(`unknown op ${op} at body offset ${at}`);
  }
  if (p !== body.length) throw corrupt(`${body.length - p} trailing bytes after END`);
  return { header, ops };
}
