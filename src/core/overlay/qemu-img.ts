/** `qemu-img info` / `qemu-img map` of the launch disk, parsed with zod. */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { z } from 'zod';
import { CloudletError } from '../errors';

const run = promisify(execFile);

const InfoSchema = z.object({
  format: z.string(),
  'virtual-size': z.number().int().nonnegative(),
  'backing-filename': z.string().optional(),
  'full-backing-filename': z.string().optional(),
  'backing-filename-format': z.string().optional(),
  encrypted: z.boolean().optional(),
});
export type ImageInfo = z.infer<typeof InfoSchema>;

const MapEntrySchema = z.object({
  start: z.number().int().nonnegative(),
  length: z.number().int().nonnegative(),
  depth: z.number().int().nonnegative(),
  present: z.boolean().optional(),
  zero: z.boolean(),
  data: z.boolean(),
  compressed: z.boolean().optional(),
  offset: z.number().int().nonnegative().optional(),
});
export type MapEntry = z.infer<typeof MapEntrySchema>;

async function qemuImg(args: string[], what: string): Promise<unknown> {
  try {
    const { stdout } = await run('qemu-img', args, { maxBuffer: 1 << 30 });
    return JSON.parse(stdout);
  } catch (e) {
    throw new CloudletError('BAD_INPUT', `qemu-img cannot read ${what}: ${(e as Error).message.split('\n').slice(0, 3).join(' ')}`, {
      cause: e,
      fix: 'pass a readable qcow2 image whose backing file exists (is qemu-utils installed?)',
    });
  }
}

export async function imageInfo(path: string): Promise<ImageInfo> {
  const parsed = InfoSchema.safeParse(await qemuImg(['info', '--output=json', '-U', path], path));
  if (!parsed.success) throw new CloudletError('BAD_INPUT', `unexpected qemu-img info output for ${path}: ${parsed.error.message}`);
  return parsed.data;
}

export async function imageMap(path: string, format = 'qcow2'): Promise<MapEntry[]> {
  const parsed = z.array(MapEntrySchema).safeParse(await qemuImg(['map', '--output=json', '-U', '-f', format, path], path));
  if (!parsed.success) throw new CloudletError('BAD_INPUT', `unexpected qemu-img map output for ${path}: ${parsed.error.message}`);
  return parsed.data;
}
