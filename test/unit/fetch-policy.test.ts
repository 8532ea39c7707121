/**
 * The fetch policy (docs/security.md): address classes and the allow-list, fetches checked at
 * connect time and after every redirect, timeouts, and local paths confined to import directories.
 * The HTTP servers are real ones on loopback addresses.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AllowList, classifyAddress, DEFAULT_LIMITS, type FetchPolicy } from '../../src/core/fetch/policy';
import { guardedFetch } from '../../src/core/fetch/guarded-fetch';
import { resolveImportPath } from '../../src/core/fetch/import-path';
import { loadConfig } from '../../src/config';
import { isCloudletError } from '../../src/core/errors';

function policy(entries: string[], limits: Partial<FetchPolicy['limits']> = {}, importDirs: string[] = []): FetchPolicy {
  return { allow: new AllowList(entries), importDirs, limits: { ...DEFAULT_LIMITS, ...limits } };
}

async function codeOf(p: Promise<unknown>): Promise<string> {
  const e = await p.then(() => undefined, (err: unknown) => err);
  if (e === undefined) return 'resolved';
  return isCloudletError(e) ? e.code : `not a CloudletError: ${String(e)}`;
}

describe('address classes', () => {
  it.each([
    ['127.0.0.1', 'loopback'],
    ['127.9.9.9', 'loopback'],
    ['::1', 'loopback'],
    ['::ffff:127.0.0.1', 'loopback'],
    ['::ffff:7f00:1', 'loopback'],
    ['10.1.2.3', 'private'],
    ['172.20.0.1', 'private'],
    ['192.168.1.1', 'private'],
    ['100.64.0.1', 'private'],
    ['fd12::1', 'private'],
    ['169.254.169.254', 'link-local'],
    ['fe80::1', 'link-local'],
    ['0.0.0.0', 'unspecified'],
    ['::', 'unspecified'],
    ['224.0.0.1', 'multicast'],
    ['255.255.255.255', 'reserved'],
    ['8.8.8.8', 'public'],
    ['2606:4700::1111', 'public'],
    ['::7f00:1', 'reserved'],
    ['::ffff:0:a9fe:a9fe', 'reserved'],
    ['64:ff9b::a9fe:a9fe', 'reserved'],
    ['2002:7f00:1::1', 'reserved'],
    ['fec0::1', 'private'],
    ['3fff::1', 'public'],
    ['4000::1', 'reserved'],
  ])('%s is %s', (address, cls) => {
    expect(classifyAddress(address)).toBe(cls);
  });
});

describe('allow-list', () => {
  it('refuses everything but what is listed; "public" admits globally routed addresses only', () => {
    const list = new AllowList(['127.0.0.1', '10.20.0.0/16', 'public']);
    expect(list.refusal('127.0.0.1')).toBeUndefined();
    expect(list.refusal('::ffff:127.0.0.1')).toBeUndefined();
    expect(list.refusal('127.0.0.2')).toMatch(/loopback address and not on the allow-list/);
    expect(list.refusal('10.20.3.4')).toBeUndefined();
    expect(list.refusal('10.21.0.1')).toMatch(/private/);
    expect(list.refusal('169.254.169.254')).toMatch(/link-local/);
    expect(list.refusal('8.8.8.8')).toBeUndefined();
    expect(new AllowList(['127.0.0.1']).refusal('8.8.8.8')).toMatch(/not on the allow-list/);
  });

  it('admits a listed name whatever it resolves to, except link-local, unspecified and multicast addresses', () => {
    const list = new AllowList(['overlays.example.org', '*.cloudlets.example.net']);
    expect(list.refusal('10.0.0.5', 'overlays.example.org')).toBeUndefined();
    expect(list.refusal('10.0.0.5', 'a.b.cloudlets.example.net')).toBeUndefined();
    expect(list.refusal('10.0.0.5', 'cloudlets.example.net.evil.org')).toMatch(/private/);
    expect(list.refusal('169.254.169.254', 'overlays.example.org')).toMatch(/link-local/);
    expect(list.refusal('10.0.0.5')).toMatch(/private/);
  });

  it('names a bad entry and how to fix it', () => {
    for (const bad of ['10.0.0.0/33', '10.0.0.0/x', 'http://x', 'a b', '1.2.3']) {
      expect(() => new AllowList([bad])).toThrow(/CLOUDLET_FETCH_ALLOW/);
    }
  });

  it('is configured from the environment with loopback and the neighbour hosts by default', () => {
    const c = loadConfig({ CLOUDLET_NEIGHBOUR_HOSTS: 'peer.example.org' });
    expect(c.fetch.allow.entries).toEqual(['127.0.0.1', 'peer.example.org']);
    expect(c.fetch.importDirs).toEqual([path.join(c.varDir, 'imports'), path.join(c.varDir, 'cache')]);
    const d = loadConfig({ CLOUDLET_FETCH_ALLOW: 'public,10.0.0.0/8', CLOUDLET_IMPORT_DIRS: '/srv/a, /srv/b', CLOUDLET_MAX_OVERLAY_BYTES: '1000', CLOUDLET_FETCH_TIMEOUT_S: '2.5' });
    expect(d.fetch.allow.refusal('10.1.1.1')).toBeUndefined();
    expect(d.fetch.importDirs).toEqual(['/srv/a', '/srv/b']);
    expect(d.fetch.limits.maxOverlayBytes).toBe(1000);
    expect(d.fetch.limits.headersTimeoutMs).toBe(2500);
    expect(() => loadConfig({ CLOUDLET_FETCH_ALLOW: '300.1.1.1/8' })).toThrow(/CLOUDLET_FETCH_ALLOW/);
    expect(() => loadConfig({ CLOUDLET_MAX_OVERLAY_BYTES: '-1' })).toThrow(/CLOUDLET_MAX_OVERLAY_BYTES/);
  });
});

describe('guarded fetch (real servers on loopback)', () => {
  const servers: http.Server[] = [];
  const hits = new Map<string, number>();
  let main = '';
  let other = '';

  async function serve(host: string, name: string, handler: http.RequestListener): Promise<string> {
    const s = http.createServer((req, res) => {
      hits.set(name, (hits.get(name) ?? 0) + 1);
      handler(req, res);
    });
    servers.push(s);
    await new Promise<void>((resolve) => s.listen(0, host, resolve));
    return `http://${host}:${(s.address() as AddressInfo).port}`;
  }

  beforeAll(async () => {
    other = await serve('127.0.0.2', 'other', (_req, res) => res.end('secret'));
    main = await serve('127.0.0.1', 'main', (req, res) => {
      const u = new URL(req.url ?? '/', 'http://x');
      if (u.pathname === '/ok') return res.end('overlay bytes');
      if (u.pathname === '/to-other') return res.writeHead(302, { location: `${other}/x` }).end();
      if (u.pathname === '/to-ok') return res.writeHead(301, { location: '/ok' }).end();
      if (u.pathname === '/loop') return res.writeHead(302, { location: '/loop' }).end();
      if (u.pathname === '/to-file') return res.writeHead(302, { location: 'file:///etc/passwd' }).end();
      if (u.pathname === '/silent') return; // never answers
      res.writeHead(404).end();
    });
  });

  afterAll(async () => {
    for (const s of servers) s.closeAllConnections();
    await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  });

  it('fetches from an allowed address and follows an allowed redirect', async () => {
    const p = policy(['127.0.0.1']);
    expect(await (await guardedFetch('overlay', `${main}/ok`, p)).text()).toBe('overlay bytes');
    expect(await (await guardedFetch('overlay', `${main}/to-ok`, p)).text()).toBe('overlay bytes');
  });

  it('refuses an address that is not listed, before any connection', async () => {
    const before = hits.get('other') ?? 0;
    expect(await codeOf(guardedFetch('overlay', `${other}/x`, policy(['127.0.0.1'])))).toBe('SOURCE_REFUSED');
    expect(await codeOf(guardedFetch('overlay', `${main}/ok`, policy(['10.0.0.0/8', 'public'])))).toBe('SOURCE_REFUSED');
    expect(hits.get('other') ?? 0).toBe(before);
  });

  it('checks the addresses a name resolves to where it connects (localhost is loopback)', async () => {
    const port = new URL(main).port;
    expect(await (await guardedFetch('overlay', `http://localhost:${port}/ok`, policy(['127.0.0.1']))).text()).toBe('overlay bytes');
    const err = await guardedFetch('overlay', `http://localhost:${port}/ok`, policy(['public'])).catch((e: unknown) => e);
    expect(isCloudletError(err) && err.code).toBe('SOURCE_REFUSED');
    expect(String(err)).toMatch(/localhost resolves to .*loopback/);
  });

  it('checks every redirect: to a refused address, to another scheme, and too many', async () => {
    const before = hits.get('other') ?? 0;
    expect(await codeOf(guardedFetch('overlay', `${main}/to-other`, policy(['127.0.0.1'])))).toBe('SOURCE_REFUSED');
    expect(hits.get('other') ?? 0).toBe(before);
    expect(await codeOf(guardedFetch('overlay', `${main}/to-file`, policy(['127.0.0.1'])))).toBe('SOURCE_REFUSED');
    const loop = await guardedFetch('overlay', `${main}/loop`, policy(['127.0.0.1'], { maxRedirects: 3 })).catch((e: unknown) => e);
    expect(String(loop)).toMatch(/redirects more than 3 times/);
  });

  it('refuses URLs with credentials or other schemes', async () => {
    expect(await codeOf(guardedFetch('overlay', `http://u:p@127.0.0.1:${new URL(main).port}/ok`, policy(['127.0.0.1'])))).toBe('SOURCE_REFUSED');
    expect(await codeOf(guardedFetch('overlay', 'ftp://127.0.0.1/x', policy(['127.0.0.1'])))).toBe('SOURCE_REFUSED');
    expect(await codeOf(guardedFetch('overlay', 'not a url', policy(['127.0.0.1'])))).toBe('BAD_INPUT');
  });

  it('gives up on a server that does not answer within the headers timeout', async () => {
    const err = await guardedFetch('overlay', `${main}/silent`, policy(['127.0.0.1'], { headersTimeoutMs: 300 })).catch((e: unknown) => e);
    expect(isCloudletError(err) && err.code).toBe('TIMEOUT');
    expect(String(err)).toMatch(/did not answer within 300 ms/);
  });
});

describe('local sources', () => {
  let root: string;
  let imports: string;
  beforeAll(() => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'fetch-policy-'));
    imports = path.join(root, 'imports');
    fs.mkdirSync(path.join(imports, 'sub'), { recursive: true });
    fs.writeFileSync(path.join(imports, 'sub', 'a.overlay'), 'x'.repeat(100));
    fs.writeFileSync(path.join(root, 'outside.overlay'), 'y');
    fs.symlinkSync(path.join(root, 'outside.overlay'), path.join(imports, 'link-out.overlay'));
    fs.symlinkSync(path.join(imports, 'sub', 'a.overlay'), path.join(imports, 'link-in.overlay'));
  });
  afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

  const check = (file: string, maxBytes = 1000): Promise<string> => resolveImportPath('overlay', file, policy([], {}, [imports]), { maxBytes, limitSetting: 'CLOUDLET_MAX_OVERLAY_BYTES' });

  it('reads files under an import directory, through links that stay inside', async () => {
    expect(await check(path.join(imports, 'sub', 'a.overlay'))).toBe(fs.realpathSync(path.join(imports, 'sub', 'a.overlay')));
    expect(await check(path.join(imports, 'link-in.overlay'))).toBe(fs.realpathSync(path.join(imports, 'sub', 'a.overlay')));
  });

  it('refuses paths outside, links out, "..", relative paths, directories and files past the limit', async () => {
    expect(await codeOf(check(path.join(root, 'outside.overlay')))).toBe('SOURCE_REFUSED');
    expect(await codeOf(check(path.join(imports, 'link-out.overlay')))).toBe('SOURCE_REFUSED');
    expect(await codeOf(check(`${imports}/sub/../../outside.overlay`))).toBe('SOURCE_REFUSED');
    expect(await codeOf(check('imports/sub/a.overlay'))).toBe('SOURCE_REFUSED');
    expect(await codeOf(check(path.join(imports, 'sub')))).toBe('SOURCE_REFUSED');
    expect(await codeOf(check('/etc/passwd'))).toBe('SOURCE_REFUSED');
    expect(await codeOf(check(path.join(imports, 'missing.overlay')))).toBe('NOT_FOUND');
    expect(await codeOf(check(path.join(imports, 'sub', 'a.overlay'), 99))).toBe('SOURCE_TOO_LARGE');
  });
});
