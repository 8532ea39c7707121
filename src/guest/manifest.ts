/**
 * The test guest built by infra/guest/build.sh into var/guest/: its manifest, parsed with zod.
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
  appPort: number;
  defaultMemoryMiB: number;
}

const FIX = 'build the test guest with `bash infra/guest/build.sh` (or run `npm run setup`)';

export function loadGuestImage(dir: string): GuestImage {
  const manifestPath = path.join(dir, 'manifest.json');
  let raw: unknown;
  try {
    raw = JSON.parse(fs.readFileSync(manifestPath, 'utf8'));
  } catch (cause) {
    throw new CloudletError('NOT_FOUND', `the test guest image is missing or unreadable: ${manifestPath}`, { fix: FIX, cause });
  }
  const parsed = ManifestSchema.safeParse(raw);
  if (!parsed.success) {
    throw new CloudletError('CORRUPT', `the test guest manifest ${manifestPath} is invalid: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`, { fix: FIX });
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
  };
  for (const f of [image.kernelPath, image.initrdPath, image.diskPath]) {
    if (!fs.existsSync(f)) throw new CloudletError('NOT_FOUND', `the test guest file ${f} is missing`, { fix: FIX });
  }
  return image;
}
