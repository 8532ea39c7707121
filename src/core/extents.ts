/**
 * Where a file holds data: its data extents as the file system reports them (lseek SEEK_DATA /
 * SEEK_HOLE), so a reader can skip the holes, which read as zeros without being stored.
 *
 * Node's fs has no lseek with SEEK_DATA. `qemu-img map -f raw` (qemu-utils, which the overlay
 * engine needs anyway) walks a raw file with exactly those two calls and prints its data and zero
 * extents as JSON, ~40 ms for a 16 GiB file of 4,000 extents. It is handed our own open file
 * (/dev/fd/3 in the child), so it maps the very file we read even if its path changes meanwhile.
 */
import { spawn } from 'node:child_process';
import type { Logger } from 'pino';
import { z } from 'zod';
import { createLogger } from '../common/logger';
import { CloudletError } from './errors';

/** Bytes [start, end) of a file. */
export interface Extent {
  readonly start: number;
  readonly end: number;
}

const MapEntrySchema = z.object({
  start: z.number().int().nonnegative(),
  length: z.number().int().nonnegative(),
  /** Reads as zeros (a hole, for a raw file). */
  zero: z.boolean(),
  data: z.boolean(),
});

/** qemu-img rounds a file's length up to 512-byte sectors: the map may end that much past EOF. */
const SECTOR = 512;
const MAP_TIMEOUT_MS = 120_000;

/**
 * The extents of the open file `fd` (`size` bytes) that may hold something other than zeros, in
 * order, merged, within [0, size). Every byte outside them reads as zero. `what` names the file in
 * errors. Throws a CloudletError if qemu-img is missing, fails, or prints a map that does not
 * cover the file exactly; callers that can read everything instead should do so.
 */
export async function dataExtents(fd: number, size: number, what: string): Promise<Extent[]> {
  if (size === 0) return [];
  const stdout = await runQemuImgMap(fd, what);
  let raw: unknown;
  try {
    raw = JSON.parse(stdout);
  } catch (e) {
    throw new CloudletError('BAD_INPUT', `qemu-img map of ${what} printed something other than JSON`, { cause: e, fix: 'check the qemu-utils installation' });
  }
  const parsed = z.array(MapEntrySchema).safeParse(raw);
  if (!parsed.success) throw new CloudletError('BAD_INPUT', `unexpected qemu-img map output for ${what}: ${parsed.error.message}`, { fix: 'check the qemu-utils installation' });
  return dataExtentsOfMap(parsed.data, size, what);
}

let extentsLog: Logger | undefined;

/**
 * `dataExtents`, or the whole file with a warning when they cannot be found: for readers that get
 * the same result by reading everything, only slower.
 */
export async function dataExtentsOrWhole(fd: number, size: number, what: string): Promise<Extent[]> {
  try {
    return await dataExtents(fd, size, what);
  } catch (e) {
    extentsLog ??= createLogger('cloudlet').child({ module: 'extents' });
    extentsLog.warn({ file: what, err: (e as Error).message }, 'cannot find the holes of the file: reading all of it (same result, slower)');
    return size === 0 ? [] : [{ start: 0, end: size }];
  }
}

/** Data extents of a parsed `qemu-img map` (exported for tests); checks that it covers [0, size). */
export function dataExtentsOfMap(entries: readonly z.infer<typeof MapEntrySchema>[], size: number, what: string): Extent[] {
  const out: Extent[] = [];
  let at = 0;
  for (const e of entries) {
    if (e.start !== at) throw badMap(what, `an entry starts at ${e.start}, expected ${at}`);
    at = e.start + e.length;
    if (e.zero || e.length === 0) continue;
    const start = e.start;
    const end = Math.min(at, size);
    if (start >= end) continue;
    const last = out[out.length - 1];
    if (last && last.end === start) out[out.length - 1] = { start: last.start, end };
    else out.push({ start, end });
  }
  if (at < size || at >= size + SECTOR) throw badMap(what, `the map ends at byte ${at}, the file has ${size}`);
  return out;
}

function badMap(what: string, why: string): CloudletError {
  return new CloudletError('BAD_INPUT', `qemu-img map of ${what} does not describe the file: ${why}`, { fix: 'do not modify a file while it is read; check the qemu-utils installation' });
}

function runQemuImgMap(fd: number, what: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('qemu-img', ['map', '--output=json', '-U', '-f', 'raw', '/dev/fd/3'], {
      stdio: ['ignore', 'pipe', 'pipe', fd],
      env: process.env,
      timeout: MAP_TIMEOUT_MS,
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout?.on('data', (d: Buffer) => out.push(d));
    child.stderr?.on('data', (d: Buffer) => err.push(d));
    child.on('error', (e: NodeJS.ErrnoException) => {
      reject(
        new CloudletError('BAD_INPUT', `cannot run qemu-img to find the holes of ${what}: ${e.message}`, {
          cause: e,
          fix: e.code === 'ENOENT' ? 'install qemu-utils (infra/setup.sh does)' : 'check the qemu-utils installation',
        }),
      );
    });
    child.on('close', (code, signal) => {
      if (code === 0) {
        resolve(Buffer.concat(out).toString('utf8'));
        return;
      }
      const why = Buffer.concat(err).toString('utf8').trim().split('\n').slice(0, 3).join(' ');
      reject(new CloudletError('BAD_INPUT', `qemu-img map of ${what} failed (${signal ?? `exit ${code}`}): ${why}`, { fix: 'check the qemu-utils installation' }));
    });
  });
}
