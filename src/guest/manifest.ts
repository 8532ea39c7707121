/**
 * The guests the project builds from Debian packages, as their manifests describe them (parsed
 * with zod): the busybox test guest (infra/guest/build.sh, var/guest/) and the Debian 12 guest of
 * the realistic base VM (infra/debian/build.sh, var/debian/).
 */
import fs from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { CloudletError } from '../core/errors';

const ManifestSchema = z.object({
  format: z.literal(1),
  kernel: z.string(),
  initrd: z.string(),
  disk: z.string(),
  diskFormat: z.enum(['raw', 'qcow2']),
  cmdline: z.string(),
  inputsDigest: z.string(),
  readyLine: z.string(),
  appPort: z.number().int(),
  defaultMemoryMiB: z.number().int().positive(),
  /** "debian" for the Debian guest; the test guest's manifest has no kind. */
  kind: z.enum(['test', 'debian']).default('test'),
  /** The guest runs qemu-guest-agent (the domain needs its channel). */
  guestAgent: z.boolean().default(false),
});

export interface GuestImage {
  dir: string;
  kernelPath: string;
  initrdPath: string;
  diskPath: string;
  diskFormat: 'raw' | 'qcow2';
  cmdline: string;
  inputsDigest: string;
  /** e.g. /CLOUDLET-GUEST-READY bootId=(\S+)/ */
  readyPattern: RegExp;
  /** The guest's own application port (the test guest's 8080); 0 when it has none. */
  appPort: number;
  defaultMemoryMiB: number;
  kind: 'test' | 'debian';
  guestAgent: boolean;
}

const BUILDERS = { test: 'infra/guest/build.sh', debian: 'infra/debian/build.sh' } as const;

export function loadGuestImage(dir: string, kind: 'test' | 'debian' = 'test'): GuestImage {
  const FIX = `build the ${kind === 'test' ? 'test' : 'Debian'} guest with \`bash ${BUILDERS[kind]}\` (or run \`npm run setup\`)`;
  const manifestPath = path.join(dir, 'manifest.json');
  let raw: unknown;
  try {
    raw = JSON.parse(fs.readFileSync(manifestPath, 'utf8'));
  } catch (cause) {
    throw new CloudletError('NOT_FOUND', `the ${kind} guest image is missing or unreadable: ${manifestPath}`, { fix: FIX, cause });
  }
  const parsed = ManifestSchema.safeParse(raw);
  if (!parsed.success) {
    throw new CloudletError('CORRUPT', `the ${kind} guest manifest ${manifestPath} is invalid: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`, { fix: FIX });
  }
  const m = parsed.data;
  const image: GuestImage = {
    dir,
    kernelPath: path.join(dir, m.kernel),
    initrdPath: path.join(dir, m.initrd),
    diskPath: path.join(dir, m.disk),
    diskFormat: m.diskFormat,
    cmdline: m.cmdline,
    inputsDigest: m.inputsDigest,
    readyPattern: new RegExp(`${m.readyLine.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} bootId=(\\S+)`),
    appPort: m.appPort,
    defaultMemoryMiB: m.defaultMemoryMiB,
    kind: m.kind,
    guestAgent: m.guestAgent,
  };
  if (m.kind !== kind) {
    throw new CloudletError('BAD_INPUT', `${manifestPath} describes the ${m.kind} guest, not the ${kind} guest`, { fix: FIX });
  }
  for (const f of [image.kernelPath, image.initrdPath, image.diskPath]) {
    if (!fs.existsSync(f)) throw new CloudletError('NOT_FOUND', `the ${kind} guest file ${f} is missing`, { fix: FIX });
  }
  return image;
}
