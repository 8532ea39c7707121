/**
 * The base manifest: what a base VM is made of, in a package file and as `manifest.json` in the
 * store. The base id is defined here (docs/base-package.md):
 *
 *   baseId = sha256(utf8("cloudlet-base 1\ndisk.raw <size> <sha256>\nmemory.sav <size> <sha256>\n"))
 *
 * i.e. it depends only on the content of the raw disk and of the libvirt save file (everything
 * else - indexes, memory image, skeleton - is derived from those two), so the same base created
 * or imported on any host has the same id.
 */
import { createHash } from 'node:crypto';
import { z } from 'zod';
import { CloudletError } from '../errors';

export const PACKAGE_FORMAT_VERSION = 1;

/** Package members, in package order. Nothing else may appear in a package. */
export const MEMBER_NAMES = ['disk.raw', 'memory.sav', 'disk.idx', 'memory.idx'] as const;
export type MemberName = (typeof MEMBER_NAMES)[number];

const hex64 = z.string().regex(/^[0-9a-f]{64}$/, 'a sha256 in lower-case hex');
const size = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);

export const MemberSchema = z.object({
  name: z.enum(MEMBER_NAMES),
  size,
  sha256: hex64,
});
export type Member = z.infer<typeof MemberSchema>;

export const BaseManifestSchema = z
  .object({
    format: z.literal('cloudlet-base'),
    formatVersion: z.literal(PACKAGE_FORMAT_VERSION),
    baseId: hex64,
    chunkSize: z.literal(4096),
    disk: z.object({ size, sha256: hex64, chunkCount: size }),
    memory: z.object({
      /** The libvirt save file. */
      saveFileSize: size,
      saveFileSha256: hex64,
      /** The flat memory image splitSnapshot makes of it (what memory.idx indexes). */
      imageSize: size,
      chunkCount: size,
      /** 'opaque' when the QEMU stream version was unknown and the image is the save file itself. */
      mode: z.enum(['parsed', 'opaque']),
      blocks: z.array(z.object({ name: z.string(), size, imageOffset: size })),
    }),
    domainXml: z.string(),
    cpuModel: z.string().optional(),
    members: z.array(MemberSchema).length(MEMBER_NAMES.length),
  })
  .superRefine((m, ctx) => {
    MEMBER_NAMES.forEach((name, i) => {
      if (m.members[i]?.name !== name) ctx.addIssue({ code: 'custom', path: ['members', i, 'name'], message: `member ${i} must be ${name}` });
    });
    const disk = m.members[0];
    const mem = m.members[1];
    if (disk && (disk.size !== m.disk.size || disk.sha256 !== m.disk.sha256)) {
      ctx.addIssue({ code: 'custom', path: ['disk'], message: 'disk does not match member disk.raw' });
    }
    if (mem && (mem.size !== m.memory.saveFileSize || mem.sha256 !== m.memory.saveFileSha256)) {
      ctx.addIssue({ code: 'custom', path: ['memory'], message: 'memory does not match member memory.sav' });
    }
  });
export type BaseManifest = z.infer<typeof BaseManifestSchema>;

/** The base id of a disk and a save file (see the module comment). */
export function computeBaseId(disk: { size: number; sha256: string }, save: { size: number; sha256: string }): string {
  const text = `cloudlet-base ${PACKAGE_FORMAT_VERSION}\ndisk.raw ${disk.size} ${disk.sha256}\nmemory.sav ${save.size} ${save.sha256}\n`;
  return createHash('sha256').update(text, 'utf8').digest('hex');
}

/** JSON with object keys sorted at every level: the same manifest always has the same bytes. */
export function canonicalJson(value: unknown): string {
  return JSON.stringify(sortKeys(value));
}

function sortKeys(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(sortKeys);
  if (v !== null && typeof v === 'object') {
    const out: Record<string, unknown> = {};
    for (const k of Object.keys(v).sort()) {
      const x = (v as Record<string, unknown>)[k];
      if (x !== undefined) out[k] = sortKeys(x);
    }
    return out;
  }
  return v;
}

/**
 * Parse and check a manifest (from a package or the store). Member names that would leave the
 * store are BAD_INPUT; any other malformation is CORRUPT; so is a base id that does not match the
 * content digests.
 */
export function parseManifest(raw: unknown, what: string): BaseManifest {
  if (raw !== null && typeof raw === 'object') {
    const r = raw as Record<string, unknown>;
    if (typeof r.formatVersion === 'number' && r.formatVersion !== PACKAGE_FORMAT_VERSION) {
      throw new CloudletError('UNSUPPORTED_VERSION', `${what} has manifest format version ${r.formatVersion}; this cloudlet reads version ${PACKAGE_FORMAT_VERSION}`, {
        fix: 'use a cloudlet release that knows this version, or export the base again with this one',
      });
    }
    if (Array.isArray(r.members)) {
      for (const m of r.members as unknown[]) {
        const name = (m as { name?: unknown } | null)?.name;
        if (typeof name === 'string' && (name.includes('/') || name.includes('\\') || name.includes('\0') || name.startsWith('.'))) {
          throw new CloudletError('BAD_INPUT', `${what} names a member "${name}" that would escape the store`, {
            fix: 'the package is malformed or malicious; do not use it',
            details: { member: name },
          });
        }
      }
    }
  }
  const parsed = BaseManifestSchema.safeParse(raw);
  if (!parsed.success) {
    const problems = parsed.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ');
    throw new CloudletError('CORRUPT', `${what} has an invalid manifest (${problems})`, {
      fix: 'the package or store entry is damaged; export the base again',
    });
  }
  const m = parsed.data;
  const id = computeBaseId(m.disk, { size: m.memory.saveFileSize, sha256: m.memory.saveFileSha256 });
  if (id !== m.baseId) {
    throw new CloudletError('CORRUPT', `${what} claims base id ${m.baseId} but its content digests define ${id}`, {
      fix: 'the manifest was altered; export the base again',
    });
  }
  return m;
}
