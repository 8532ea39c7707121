/**
 * Debian packages for a guest that has no internet: the host resolves what the guest lacks
 * (apt on the host, against the guest's own dpkg status file, so only the missing packages and
 * the versions the guest needs are fetched), keeps them as a flat apt repository in a cache
 * directory keyed by what was asked, and serves it over HTTP on 127.0.0.1 while a recipe runs.
 * The guest reaches it at 10.0.2.2 (QEMU user networking's address of the host) and installs
 * with its own apt and dpkg, as a user of the original system installed an application.
 */
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import fastify from 'fastify';
import fastifyStatic from '@fastify/static';
import { CloudletError } from '../core/errors';

const run = promisify(execFile);

/** Debian package names (policy §5.6.1), optionally with =version or /release. */
export const DEBIAN_PACKAGE = /^[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+|\/[a-z-]+)?$/;

export interface PackageRepo {
  dir: string;
  /** Every .deb in the repository (file names). */
  debs: string[];
  bytes: number;
  /** Whether it was already in the cache. */
  cached: boolean;
}

/**
 * The flat repository holding `packages` and every dependency the guest (described by its dpkg
 * status file) does not have yet. An empty list of debs means the guest already has them all.
 */
export async function preparePackageRepo(input: { guestStatus: string; packages: string[]; cacheRoot: string; log?: (msg: string) => void }): Promise<PackageRepo> {
  for (const p of input.packages) {
    if (!DEBIAN_PACKAGE.test(p)) throw new CloudletError('BAD_INPUT', `"${p}" is not a Debian package name`, { fix: 'name packages as apt does, e.g. python3-flask or tesseract-ocr-eng' });
  }
  const packages = [...new Set(input.packages)].sort();
  const key = createHash('sha256').update(JSON.stringify({ v: 1, packages })).update(input.guestStatus).digest('hex').slice(0, 24);
  const dir = path.join(input.cacheRoot, key);
  const done = path.join(dir, 'Packages');
  if (fs.existsSync(done)) {
    const debs = (await fs.promises.readdir(dir)).filter((f) => f.endsWith('.deb'));
    return { dir, debs, bytes: await sizeOf(dir, debs), cached: true };
  }
  const work = `${dir}.partial-${process.pid}`;
  await fs.promises.rm(work, { recursive: true, force: true });
  await fs.promises.mkdir(path.join(work, 'partial'), { recursive: true });
  const status = path.join(work, 'guest-status');
  await fs.promises.writeFile(status, input.guestStatus);
  input.log?.(`resolving ${packages.join(' ')} against the guest's packages with apt on the host`);
  try {
    await run('apt-get', [
      'install', '--download-only', '-y', '-q', '--no-install-recommends',
      '-o', `Dir::State::status=${status}`,
      '-o', `Dir::Cache::archives=${work}`,
      '-o', 'Debug::NoLocking=true',
      '-o', 'APT::Sandbox::User=root',
      ...packages,
    ], { maxBuffer: 16 * 1024 * 1024, env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  } catch (e) {
    await fs.promises.rm(work, { recursive: true, force: true });
    const stderr = String((e as { stderr?: string }).stderr ?? (e as Error).message);
    const unknown = /Unable to locate package (\S+)|Package '?(\S+?)'? has no installation candidate/.exec(stderr);
    throw new CloudletError(unknown ? 'BAD_INPUT' : 'PACKAGES_UNAVAILABLE', `apt on the host could not fetch ${packages.join(' ')} for the guest: ${stderr.trim().split('\n').slice(-3).join(' ')}`, {
      fix: unknown ? `check the package name ${unknown[1] ?? unknown[2]} (apt-cache policy NAME on the host)` : 'run apt-get update on the host and check its apt sources reach the Debian mirror',
      cause: e,
    });
  }
  await fs.promises.rm(path.join(work, 'partial'), { recursive: true, force: true });
  await fs.promises.rm(status, { force: true });
  await fs.promises.rm(path.join(work, 'lock'), { force: true });
  const { stdout } = await run('apt-ftparchive', ['packages', '.'], { cwd: work, maxBuffer: 64 * 1024 * 1024 });
  await fs.promises.writeFile(path.join(work, 'Packages'), stdout);
  await fs.promises.rm(dir, { recursive: true, force: true });
  await fs.promises.rename(work, dir);
  const debs = (await fs.promises.readdir(dir)).filter((f) => f.endsWith('.deb'));
  const bytes = await sizeOf(dir, debs);
  input.log?.(`${debs.length} packages (${(bytes / 1048576).toFixed(1)} MiB) ready in ${dir}`);
  return { dir, debs, bytes, cached: false };
}

async function sizeOf(dir: string, files: string[]): Promise<number> {
  let n = 0;
  for (const f of files) n += (await fs.promises.stat(path.join(dir, f))).size;
  return n;
}

export interface ServedRepo {
  /** The port on 127.0.0.1 (the guest uses http://10.0.2.2:<port>/). */
  port: number;
  close(): Promise<void>;
}

/** Serves a repository directory (GET only, no listing, no dot files) on 127.0.0.1. */
export async function servePackageRepo(dir: string): Promise<ServedRepo> {
  const app = fastify({ logger: false });
  await app.register(fastifyStatic, { root: dir, prefix: '/', index: false, list: false, dotfiles: 'deny' });
  await app.listen({ host: '127.0.0.1', port: 0 });
  const addr = app.server.address();
  const port = typeof addr === 'object' && addr ? addr.port : 0;
  return { port, close: () => app.close() };
}

/** Address of the host as the guest sees it on QEMU user networking. */
export const HOST_FROM_GUEST = '10.0.2.2';

/**
 * Shell lines (POSIX sh) that install `packages` in the guest from the served repository only
 * (the guest's own sources are ignored), then remove every trace of the transfer: the source
 * line, the package lists and the downloaded .debs (they would all be in the overlay).
 */
export function aptInstallScript(packages: string[], port: number): string {
  const list = '/etc/apt/sources.list.d/cloudlet-recipe.list';
  const apt = `apt-get -q -o Dir::Etc::SourceList=${list} -o Dir::Etc::SourceParts=- -o Acquire::Retries=3`;
  return [
    '# packages served by the cloudlet host (docs/workloads.md)',
    'i=0; until ip route | grep -q "^default"; do i=$((i+1)); [ $i -gt 300 ] && { echo "cloudlet-recipe: no network route after 60 s" >&2; exit 91; }; sleep 0.2; done',
    `echo 'deb [trusted=yes] http://${HOST_FROM_GUEST}:${port}/ ./' > ${list}`,
    `${apt} update || exit 92`,
    // The served repository is flat (no releases): ask for name/release by its name (the host
    // already picked that release's version) and keep name=version as it is.
    `DEBIAN_FRONTEND=noninteractive ${apt} install -y --no-install-recommends ${packages.map((p) => p.replace(/\/.*$/, '')).join(' ')} || exit 93`,
    `rm -f ${list}; rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb`,
    `echo 'cloudlet-recipe: installed ${packages.join(' ')}'`,
  ].join('\n');
}
