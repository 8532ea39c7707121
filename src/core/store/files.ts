/**
 * File primitives of the content-addressed store: hashing, durable writes (temp name, fsync,
 * rename, fsync of the directory) and containment checks, so a crash never leaves a file under its
 * final name that is not complete.
 */
import { createHash, randomBytes } from 'node:crypto';
import { constants as fsConstants, promises as fsp } from 'node:fs';
import path from 'node:path';
import { CloudletError } from '../errors';
import type { OnProgress } from '../progress';

/** Large sequential reads: hashing runs near SHA-256 speed. */
export const IO_BLOCK = 4 * 1024 * 1024;

export const SHA256_HEX = /^[0-9a-f]{64}$/;

/** Streaming sha256 of a whole file (hex). */
export async function sha256File(file: string, onProgress?: OnProgress): Promise<{ sha256: string; size: number }> {
  const fh = await openOrThrow(file, 'r');
  try {
    const size = (await fh.stat()).size;
    const hash = createHash('sha256');
    const buf = Buffer.allocUnsafe(IO_BLOCK);
    let pos = 0;
    for (;;) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
      if (bytesRead === 0) break;
      hash.update(buf.subarray(0, bytesRead));
      pos += bytesRead;
      onProgress?.(pos, size);
    }
    return { sha256: hash.digest('hex'), size: pos };
  } finally {
    await fh.close();
  }
}

export async function openOrThrow(file: string, flags: string): Promise<fsp.FileHandle> {
  try {
    return await fsp.open(file, flags);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') {
      throw new CloudletError('NOT_FOUND', `file ${file} does not exist`, { fix: 'check the path', cause: e });
    }
    if (code === 'EISDIR') throw new CloudletError('BAD_INPUT', `${file} is a directory, not a file`, { fix: 'pass a file', cause: e });
    throw e;
  }
}

/** A fresh temporary name next to `target` (same file system, so rename is atomic). */
export function tempNameFor(target: string): string {
  return path.join(path.dirname(target), `.tmp-${path.basename(target)}-${randomBytes(6).toString('hex')}`);
}

/** fsync a directory, so a rename inside it is durable. */
export async function fsyncDir(dir: string): Promise<void> {
  const fh = await fsp.open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Write `data` to `target` atomically and durably. */
export async function writeFileAtomic(target: string, data: string | Buffer): Promise<void> {
  const tmp = tempNameFor(target);
  try {
    const fh = await fsp.open(tmp, 'wx');
    try {
      await fh.writeFile(data);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, target);
  } catch (e) {
    await fsp.rm(tmp, { force: true });
    throw e;
  }
  await fsyncDir(path.dirname(target));
}

/**
 * Copy `source` to `target` atomically and durably and return the sha256 of what was stored; when
 * `expectSha256` is given the copy is kept only if it matches. The copy itself is done by the
 * kernel (copy_file_range); the digest is taken from the copy, so it describes the stored bytes
 * even if the source changes meanwhile.
 */
export async function copyFileAtomic(
  source: string,
  target: string,
  opts: { expectSha256?: string; onProgress?: OnProgress } = {},
): Promise<{ sha256: string; size: number }> {
  await (await openOrThrow(source, 'r')).close();
  const tmp = tempNameFor(target);
  try {
    await fsp.copyFile(source, tmp, fsConstants.COPYFILE_EXCL);
    const digest = await sha256File(tmp, opts.onProgress);
    if (opts.expectSha256 !== undefined && digest.sha256 !== opts.expectSha256) {
      throw new CloudletError('DIGEST_MISMATCH', `${source} has sha256 ${digest.sha256}, expected ${opts.expectSha256}`, {
        fix: 'the file changed while it was copied or is not the one recorded; fetch it again',
        details: { file: source, sha256: digest.sha256, expected: opts.expectSha256 },
      });
    }
    await fsyncFile(tmp);
    await fsp.rename(tmp, target);
    await fsyncDir(path.dirname(target));
    return digest;
  } catch (e) {
    await fsp.rm(tmp, { force: true });
    throw e;
  }
}

/** Write every byte of `buf` (FileHandle.write may write less than asked). */
export async function writeAll(fh: fsp.FileHandle, buf: Buffer): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const { bytesWritten } = await fh.write(buf, off, buf.length - off);
    off += bytesWritten;
  }
}

/** Resolve `rel` under `root`, refusing anything that escapes it (.., absolute paths, NUL). */
export function resolveInside(root: string, rel: string): string {
  const base = path.resolve(root);
  if (rel.length === 0 || rel.includes('\0') || path.isAbsolute(rel)) {
    throw new CloudletError('BAD_INPUT', `path "${rel}" is not a relative path inside ${base}`, {
      fix: 'the input names a file outside the store; it is malformed or malicious and was rejected',
    });
  }
  const full = path.resolve(base, rel);
  if (full === base || !full.startsWith(base + path.sep)) {
    throw new CloudletError('BAD_INPUT', `path "${rel}" escapes ${base}`, {
      fix: 'the input names a file outside the store; it is malformed or malicious and was rejected',
    });
  }
  return full;
}

export async function exists(p: string): Promise<boolean> {
  try {
    await fsp.access(p);
    return true;
  } catch {
    return false;
  }
}

/** Write `data` to a new file and fsync it (the caller renames its directory into place). */
export async function writeFileSynced(file: string, data: string | Buffer): Promise<void> {
  const fh = await fsp.open(file, 'wx');
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** fsync a file written by someone else's code. */
export async function fsyncFile(file: string): Promise<void> {
  const fh = await fsp.open(file, 'r+');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
