/**
 * Debian packages for the guest: which names a recipe may give, the shell lines that point the
 * guest's apt at the host's repository only and clean up after it, the refusal of a bad name
 * before apt runs, and the HTTP server of the repository (127.0.0.1 only, files of its directory
 * only). Nothing here runs apt or reaches a mirror.
 */
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { parseRecipe } from '../../src/activities/recipes';
import { CloudletError } from '../../src/core/errors';
import { aptInstallScript, DEBIAN_PACKAGE, HOST_FROM_GUEST, preparePackageRepo, servePackageRepo } from '../../src/guest/package-repo';

describe('DEBIAN_PACKAGE', () => {
  it.each([
    'python3-flask',
    'tesseract-ocr-eng',
    'libstdc++6',
    'g++',
    'foo=1.2-3',
    'foo=1:2.36-9+deb12u4~bpo1',
    'foo/bookworm-backports',
    'pocketsphinx-en-us',
    '0ad',
    'xz-utils',
  ])('accepts %j', (name) => {
    expect(DEBIAN_PACKAGE.test(name)).toBe(true);
  });

  it.each([
    '',
    'a', // Debian policy: at least two characters
    'Flask',
    'Python3-flask',
    '-o',
    '.hidden',
    '+x',
    'foo bar',
    'foo\tbar',
    'foo\n',
    'foo\nrm -rf /',
    'foo;rm',
    'foo&&id',
    'foo|sh',
    'foo`id`',
    'foo$(id)',
    'foo$HOME',
    'foo>x',
    'foo<x',
    "foo'",
    'foo"',
    'foo*',
    'foo?',
    'foo_bar',
    'foo=1.0 bar',
    'foo=1;id',
    'foo=',
    'foo/',
    'foo/../../etc',
    'foo/Bookworm',
    'foo=1.0/bookworm',
  ])('rejects %j', (name) => {
    expect(DEBIAN_PACKAGE.test(name)).toBe(false);
  });
});

describe('aptInstallScript', () => {
  const script = aptInstallScript(['python3-flask', 'libstdc++6'], 41234);
  const lines = script.split('\n');
  const list = '/etc/apt/sources.list.d/cloudlet-recipe.list';

  it('points apt at the served repository only', () => {
    expect(HOST_FROM_GUEST).toBe('10.0.2.2');
    expect(lines).toContain(`echo 'deb [trusted=yes] http://10.0.2.2:41234/ ./' > ${list}`);
    // The only URL in the script is the host's.
    expect(script.match(/[a-z]+:\/\/[^\s'/]+/g)).toEqual(['http://10.0.2.2:41234']);
    const aptLines = lines.filter((l) => /apt-get /.test(l));
    expect(aptLines).toHaveLength(2);
    for (const l of aptLines) {
      expect(l).toContain(`-o Dir::Etc::SourceList=${list}`);
      expect(l).toContain('-o Dir::Etc::SourceParts=-');
    }
  });

  it('updates, then installs the packages without recommends, non-interactively', () => {
    const update = lines.findIndex((l) => /apt-get .* update\b/.test(l));
    const install = lines.findIndex((l) => /apt-get .* install /.test(l));
    expect(update).toBeGreaterThan(lines.findIndex((l) => l.startsWith('echo \'deb ')));
    expect(install).toBeGreaterThan(update);
    expect(lines[install]).toMatch(/^DEBIAN_FRONTEND=noninteractive apt-get /);
    expect(lines[install]).toMatch(/ install -y --no-install-recommends python3-flask libstdc\+\+6 \|\| exit 93$/);
  });

  it('exits 91 without a network route, 92 when update fails, 93 when install fails', () => {
    const route = lines.find((l) => l.includes('ip route'));
    expect(route).toMatch(/until ip route \| grep -q "\^default"/);
    expect(route).toContain('exit 91');
    expect(lines.find((l) => / update\b/.test(l))).toMatch(/ update \|\| exit 92$/);
    expect(lines.find((l) => / install /.test(l))).toMatch(/\|\| exit 93$/);
    expect(script.match(/exit 9\d/g)).toEqual(['exit 91', 'exit 92', 'exit 93']);
  });

  it('removes the source line, the package lists and the downloaded .debs after installing', () => {
    const install = lines.findIndex((l) => / install /.test(l));
    const cleanup = lines.slice(install + 1).join('\n');
    expect(cleanup).toContain(`rm -f ${list}`);
    expect(cleanup).toContain('rm -rf /var/lib/apt/lists/*');
    expect(cleanup).toContain('/var/cache/apt/archives/*.deb');
    expect(cleanup).toContain('/var/cache/apt/*.bin');
    expect(lines[lines.length - 1]).toBe("echo 'cloudlet-recipe: installed python3-flask libstdc++6'");
  });

  // The served repository is flat ("./") and has no Release file, so apt in the guest knows no
  // release of its packages: `apt-get install foo/bookworm-backports` fails there with "Release
  // 'bookworm-backports' for 'foo' was not found" (checked with apt 2.6 on a flat repository), and
  // the recipe with exit 93. The host already resolved the release; the guest must ask for the name.
  it('asks the guest\'s apt for a package given as name/release by its name (the flat repository has no releases)', () => {
    const install = aptInstallScript(['foo/bookworm-backports', 'bar=1.2-3'], 41234)
      .split('\n')
      .find((l) => / install /.test(l));
    expect(install).not.toContain('/bookworm-backports');
    expect(install).toMatch(/ --no-install-recommends foo(=\S+)? bar=1\.2-3 \|\| exit 93$/);
  });

  it('runs in a POSIX shell: sh -n finds no syntax error', async () => {
    const { execFileSync } = await import('node:child_process');
    expect(() => execFileSync('/bin/sh', ['-n', '-c', script])).not.toThrow();
  });
});

describe('preparePackageRepo', () => {
  let tmp: string;
  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'cloudlet-pkgrepo-'));
  });
  afterEach(() => {
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  it.each([['bad name; rm -rf /'], ['Flask'], ['$(reboot)'], ['']])('rejects %j with BAD_INPUT before running anything', async (bad) => {
    const cacheRoot = path.join(tmp, 'cache');
    const log = jest.fn();
    const err = await preparePackageRepo({ guestStatus: 'Package: base-files\nStatus: install ok installed\n', packages: ['python3-flask', bad], cacheRoot, log }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(CloudletError);
    expect((err as CloudletError).code).toBe('BAD_INPUT');
    expect((err as CloudletError).message).toContain(`"${bad}" is not a Debian package name`);
    expect((err as CloudletError).retryable).toBe(false);
    // Nothing made on the host, nothing logged (apt would log "resolving …" first).
    expect(fs.existsSync(cacheRoot)).toBe(false);
    expect(log).not.toHaveBeenCalled();
  });
});

describe('servePackageRepo', () => {
  let tmp: string;
  let repoDir: string;
  let served: { port: number; close(): Promise<void> } | undefined;

  beforeEach(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'cloudlet-serve-'));
    repoDir = path.join(tmp, 'repo');
    fs.mkdirSync(repoDir);
    fs.writeFileSync(path.join(tmp, 'secret.txt'), 'host secret');
    fs.writeFileSync(path.join(repoDir, '.hidden'), 'dot file');
    fs.writeFileSync(path.join(repoDir, 'Packages'), 'Package: hello\nFilename: ./hello_2.10-3_amd64.deb\n');
    fs.writeFileSync(path.join(repoDir, 'hello_2.10-3_amd64.deb'), Buffer.from([0x21, 0x3c, 0x61, 0x72, 0x63, 0x68, 0x3e, 0x0a, 0, 1, 2, 255]));
  });
  afterEach(async () => {
    await served?.close();
    served = undefined;
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  /** A GET with the path sent as it is (fetch would resolve "..", a guest's apt or an attacker need not). */
  function rawGet(port: number, rawPath: string): Promise<{ status: number; body: string }> {
    return new Promise((resolve, reject) => {
      const req = http.request({ host: '127.0.0.1', port, path: rawPath, method: 'GET' }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') }));
        res.on('error', reject);
      });
      req.on('error', reject);
      req.end();
    });
  }

  it('serves the files of the directory on 127.0.0.1', async () => {
    served = await servePackageRepo(repoDir);
    expect(served.port).toBeGreaterThan(0);
    const res = await fetch(`http://127.0.0.1:${served.port}/hello_2.10-3_amd64.deb`);
    expect(res.status).toBe(200);
    expect(Buffer.from(await res.arrayBuffer()).equals(fs.readFileSync(path.join(repoDir, 'hello_2.10-3_amd64.deb')))).toBe(true);
    const pkgs = await fetch(`http://127.0.0.1:${served.port}/Packages`);
    expect(pkgs.status).toBe(200);
    expect(await pkgs.text()).toContain('Package: hello');
    // apt asks for files that a flat repository without a Release file does not have.
    expect((await fetch(`http://127.0.0.1:${served.port}/Release`)).status).toBe(404);
  });

  it('listens on the loopback address only', async () => {
    served = await servePackageRepo(repoDir);
    // The kernel's table of listening TCP sockets (no connection to any other address is made).
    const listening = (file: string): string[] => {
      if (!fs.existsSync(file)) return [];
      return fs
        .readFileSync(file, 'utf8')
        .split('\n')
        .slice(1)
        .map((l) => l.trim().split(/\s+/))
        .filter((f) => f[3] === '0A' && parseInt(f[1]?.split(':')[1] ?? '', 16) === served?.port)
        .map((f) => f[1]?.split(':')[0] ?? '');
    };
    expect(listening('/proc/net/tcp')).toEqual(['0100007F']); // 127.0.0.1, little-endian hex
    expect(listening('/proc/net/tcp6')).toEqual([]);
  });

  it('refuses dot files, paths outside the directory and listings', async () => {
    served = await servePackageRepo(repoDir);
    const { port } = served;
    for (const p of ['/.hidden', '/../secret.txt', '/%2e%2e/secret.txt', '/..%2fsecret.txt', '/%2e%2e%2fsecret.txt', '//../secret.txt', '/']) {
      const r = await rawGet(port, p);
      expect([p, r.status]).toEqual([p, 403]);
      expect(r.body).not.toContain('host secret');
      expect(r.body).not.toContain('dot file');
      expect(r.body).not.toContain('hello_2.10-3_amd64.deb');
    }
    // The refusal is the server's: the file itself is there and readable.
    expect((await rawGet(port, '/Packages')).status).toBe(200);
  });

  it('answers GET only', async () => {
    served = await servePackageRepo(repoDir);
    const res = await fetch(`http://127.0.0.1:${served.port}/Packages`, { method: 'PUT', body: 'x' });
    expect(res.status).toBeGreaterThanOrEqual(400);
    expect(fs.readFileSync(path.join(repoDir, 'Packages'), 'utf8')).toContain('Package: hello');
  });

  it('stops listening when closed', async () => {
    const s = await servePackageRepo(repoDir);
    await s.close();
    await expect(fetch(`http://127.0.0.1:${s.port}/Packages`)).rejects.toThrow();
  });
});

describe('parseRecipe and package names', () => {
  const recipe = { recipeId: 'shop', hostId: 'local', baseId: 'a'.repeat(64), command: 'true' };

  it('accepts Debian package names', () => {
    expect(parseRecipe({ ...recipe, packages: ['python3-flask', 'libstdc++6', 'foo=1.2-3'] }).packages).toEqual(['python3-flask', 'libstdc++6', 'foo=1.2-3']);
    expect(parseRecipe(recipe).packages).toEqual([]);
  });

  it('rejects a package name with shell in it with BAD_INPUT naming packages.0', () => {
    let err: unknown;
    try {
      parseRecipe({ ...recipe, packages: ['bad name; rm -rf /'] });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(CloudletError);
    const e = err as CloudletError;
    expect(e.code).toBe('BAD_INPUT');
    expect(e.message).toContain('packages.0');
    expect(e.details.issues).toEqual([expect.objectContaining({ path: ['packages', '0'] })]);
  });

  it('names the index of the bad one among good ones', () => {
    expect(() => parseRecipe({ ...recipe, packages: ['python3-flask', 'ok-name', 'Bad'] })).toThrow(/packages\.2: a Debian package name/);
  });
});
