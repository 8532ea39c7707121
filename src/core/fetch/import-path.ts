/**
 * Local overlay and package files under a fetch policy: only files under the import directories,
 * after every symbolic link on the way is resolved (a link inside a directory that points out of
 * it is refused), and no larger than the limit for their kind.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { CloudletError } from '../errors';
import { refused, tooLarge, type FetchPolicy } from './policy';
import { checkUrl } from './guarded-fetch';

function inside(dir: string, file: string): boolean {
  const rel = path.relative(dir, file);
  return rel !== '' && !rel.startsWith('..') && !path.isAbsolute(rel);
}

function importDirsFix(policy: FetchPolicy): string {
  return `put the file under an import directory (${policy.importDirs.join(', ') || 'none configured'}; CLOUDLET_IMPORT_DIRS)`;
}

/** An absolute path, lexically under one of `dirs` (no file system access). */
function screenPath(what: string, file: string, dirs: readonly string[], fix: string): void {
  if (!path.isAbsolute(file)) throw refused(what, file, 'a local source must be an absolute path', 'give an http(s) URL or an absolute path under an import directory');
  if (!dirs.some((d) => inside(path.resolve(d), path.resolve(file)))) throw refused(what, file, 'it is not under an import directory', fix);
}

/**
 * The real path of `file` when the policy allows reading it; `extraDirs` are directories this host
 * writes itself (its deployments' fetched overlays). Throws SOURCE_REFUSED, NOT_FOUND or SOURCE_TOO_LARGE.
 */
export async function resolveImportPath(what: string, file: string, policy: FetchPolicy, opts: { maxBytes: number; limitSetting: string; extraDirs?: readonly string[] }): Promise<string> {
  const dirs = [...policy.importDirs, ...(opts.extraDirs ?? [])];
  const fix = importDirsFix(policy);
  // A quick refusal for what is plainly outside, before touching the file system.
  screenPath(what, file, dirs, fix);
  let real: string;
  try {
    real = await fs.realpath(file);
  } catch (e) {
    throw new CloudletError('NOT_FOUND', `${what} ${file} does not exist: ${(e as Error).message}`, { fix: 'check the path', cause: e });
  }
  const realDirs = await Promise.all(dirs.map((d) => fs.realpath(d).catch(() => path.resolve(d))));
  if (!realDirs.some((d) => inside(d, real))) throw refused(what, file, `it resolves to ${real}, outside the import directories (a link leads out)`, fix);
  const st = await fs.stat(real);
  if (!st.isFile()) throw refused(what, file, 'it is not a regular file', 'give the path of the file itself');
  if (st.size > opts.maxBytes) throw tooLarge(what, file, st.size, opts.maxBytes, opts.limitSetting);
  return real;
}

/**
 * What can be refused on the face of a source, without resolving a name or touching a file (the
 * API, before it starts an operation): another scheme, credentials, an address literal off the
 * allow-list, a path outside the import directories. The host checks again, fully, when it fetches.
 */
export function screenSource(what: string, source: string, policy: FetchPolicy): void {
  if (/^[a-z][a-z0-9+.-]*:/i.test(source)) {
    checkUrl(what, source, policy);
    return;
  }
  screenPath(what, source, policy.importDirs, `${importDirsFix(policy)}, or serve it over http(s)`);
}
