import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CloudletError } from '../../src/core/errors';
import { neighbourRegistryFile, neighbourView, parseNeighbourUrl, SqliteNeighbourRegistry, type Neighbour } from '../../src/core/mobility/registry';

let dir: string;
let file: string;
const open: SqliteNeighbourRegistry[] = [];
const registry = (f = file): SqliteNeighbourRegistry => {
  const r = new SqliteNeighbourRegistry(f);
  open.push(r);
  return r;
};

const TOKEN = 'west-token-0123456789abcdef';
const T = (s: string): Date => new Date(`2030-01-01T00:${s}Z`);

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cloudlet-neighbours-'));
  file = path.join(dir, 'clusters', 'east', 'neighbours.sqlite');
});

afterEach(async () => {
  for (const r of open.splice(0)) await r.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

async function codeOf(p: Promise<unknown> | (() => unknown)): Promise<string> {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    expect(e).toBeInstanceOf(CloudletError);
    return (e as CloudletError).code;
  }
  throw new Error('expected a CloudletError, nothing was thrown');
}

describe('SqliteNeighbourRegistry', () => {
  test('add, list, get, token, remove', async () => {
    const r = registry();
    const added = await r.add({ name: 'west', apiUrl: 'https://west.example.org', token: TOKEN }, T('00:00'));
    expect(added).toEqual({ name: 'west', apiUrl: 'https://west.example.org', addedAt: '2030-01-01T00:00:00.000Z' });
    await r.add({ name: 'north-2', apiUrl: 'http://10.0.0.2:8080', token: 'north-token-0123456789' }, T('01:00'));

    const listed = await r.list();
    expect(listed.map((n) => n.name)).toEqual(['north-2', 'west']);
    expect(listed[1]).toEqual(added);
    // The token is never part of a listing.
    expect(JSON.stringify(listed)).not.toContain(TOKEN);
    expect(await r.get('west')).toEqual(added);
    expect(await r.get('south')).toBeUndefined();
    expect(await r.token('west')).toBe(TOKEN);
    expect(await r.token('south')).toBeUndefined();

    expect(await r.remove('west')).toBe(true);
    expect(await r.remove('west')).toBe(false);
    expect(await r.get('west')).toBeUndefined();
    expect(await r.token('west')).toBeUndefined();
    expect((await r.list()).map((n) => n.name)).toEqual(['north-2']);
  });

  test('a second neighbour of the same name is a CONFLICT and the first is kept', async () => {
    const r = registry();
    await r.add({ name: 'west', apiUrl: 'https://west.example.org', token: TOKEN });
    expect(await codeOf(r.add({ name: 'west', apiUrl: 'https://evil.example.org', token: 'other-token-0123456789' }))).toBe('CONFLICT');
    expect((await r.get('west'))?.apiUrl).toBe('https://west.example.org');
    expect(await r.token('west')).toBe(TOKEN);
  });

  test.each(['West', '-west', 'west-', 'we_st', 'we.st', '', 'a'.repeat(64), 'west\n'])('name %j is BAD_INPUT', async (name) => {
    const r = registry();
    expect(await codeOf(r.add({ name, apiUrl: 'https://west.example.org', token: TOKEN }))).toBe('BAD_INPUT');
    expect(await r.list()).toEqual([]);
  });

  test('names that are DNS labels are accepted', async () => {
    const r = registry();
    for (const name of ['a', '0', 'west-2', 'a'.repeat(63)]) await r.add({ name, apiUrl: 'https://x.example.org', token: TOKEN });
    expect(await r.list()).toHaveLength(4);
  });

  test('record keeps the last success and the last failure; a success clears the failure', async () => {
    const r = registry();
    await r.add({ name: 'west', apiUrl: 'https://west.example.org', token: TOKEN }, T('00:00'));
    await r.record('west', { ok: true, rttMs: 12.5, servingHosts: 3, at: T('01:00') });
    expect(await r.get('west')).toEqual({ name: 'west', apiUrl: 'https://west.example.org', addedAt: T('00:00').toISOString(), rtt: { ms: 12.5, measuredAt: T('01:00').toISOString(), servingHosts: 3 } });

    await r.record('west', { ok: false, error: 'connect ECONNREFUSED', at: T('02:00') });
    const failed = await r.get('west');
    // The last good measurement stays, next to the failure.
    expect(failed?.rtt).toEqual({ ms: 12.5, measuredAt: T('01:00').toISOString(), servingHosts: 3 });
    expect(failed?.lastError).toEqual({ message: 'connect ECONNREFUSED', at: T('02:00').toISOString() });

    await r.record('west', { ok: true, rttMs: 9, servingHosts: 0, at: T('03:00') });
    const back = await r.get('west');
    expect(back?.lastError).toBeUndefined();
    expect(back?.rtt).toEqual({ ms: 9, measuredAt: T('03:00').toISOString(), servingHosts: 0 });
  });

  test('a long error message is cut to 500 characters; recording an unknown name adds nothing', async () => {
    const r = registry();
    await r.add({ name: 'west', apiUrl: 'https://west.example.org', token: TOKEN });
    await r.record('west', { ok: false, error: 'e'.repeat(2000), at: T('00:00') });
    expect((await r.get('west'))?.lastError?.message).toHaveLength(500);
    await r.record('ghost', { ok: true, rttMs: 1, servingHosts: 1, at: T('00:00') });
    expect((await r.list()).map((n) => n.name)).toEqual(['west']);
  });

  test('the registry file is readable by its owner only', async () => {
    const r = registry();
    await r.add({ name: 'west', apiUrl: 'https://west.example.org', token: TOKEN });
    expect(fs.statSync(file).mode & 0o777).toBe(0o600);
  });

  test('no file of the registry that holds a token is readable by group or others (WAL and SHM included)', async () => {
    const r = registry();
    await r.add({ name: 'west', apiUrl: 'https://west.example.org', token: TOKEN });
    const holders = fs.readdirSync(path.dirname(file)).filter((n) => fs.readFileSync(path.join(path.dirname(file), n)).includes(TOKEN));
    // WAL mode: the token is written to the -wal file first.
    expect(holders.length).toBeGreaterThan(0);
    const modes = fs.readdirSync(path.dirname(file)).map((n) => [n, (fs.statSync(path.join(path.dirname(file), n)).mode & 0o777).toString(8)]);
    expect(modes.filter(([, m]) => m !== '600')).toEqual([]);
  });

  test('two registry objects on the same file see each other\'s writes', async () => {
    const a = registry();
    const b = registry();
    await a.add({ name: 'west', apiUrl: 'https://west.example.org', token: TOKEN });
    expect((await b.list()).map((n) => n.name)).toEqual(['west']);
    expect(await b.token('west')).toBe(TOKEN);
    await b.record('west', { ok: true, rttMs: 7, servingHosts: 2, at: T('05:00') });
    expect((await a.get('west'))?.rtt?.ms).toBe(7);
    // The name is taken for both.
    expect(await codeOf(b.add({ name: 'west', apiUrl: 'https://w2.example.org', token: TOKEN }))).toBe('CONFLICT');
    expect(await a.remove('west')).toBe(true);
    expect(await b.get('west')).toBeUndefined();
  });

  test('a registry reopened on the same file finds what was written', async () => {
    const a = new SqliteNeighbourRegistry(file);
    await a.add({ name: 'west', apiUrl: 'https://west.example.org', token: TOKEN });
    await a.close();
    const b = registry();
    expect(await b.token('west')).toBe(TOKEN);
  });

  test('a registry that cannot be created is SERVICE_UNAVAILABLE', async () => {
    const notADir = path.join(dir, 'plain-file');
    fs.writeFileSync(notADir, 'x');
    expect(await codeOf(() => new SqliteNeighbourRegistry(path.join(notADir, 'neighbours.sqlite')))).toBe('SERVICE_UNAVAILABLE');
  });

  test('neighbourRegistryFile is per cluster (namespace) under the var directory', () => {
    expect(neighbourRegistryFile('/var/lib/cloudlet', 'east')).toBe('/var/lib/cloudlet/clusters/east/neighbours.sqlite');
  });
});

describe('neighbourView', () => {
  const base: Neighbour = { name: 'west', apiUrl: 'https://west.example.org', addedAt: '2030-01-01T00:00:00.000Z' };
  const at = (iso: string): number => Date.parse(iso);
  const ok = { ms: 10, measuredAt: '2030-01-01T00:10:00.000Z', servingHosts: 2 };
  const STALE = 120_000;

  test('unmeasured: never measured, never failed', () => {
    expect(neighbourView(base, at('2030-01-01T01:00:00Z'), STALE)).toEqual({ ...base, status: 'unmeasured' });
  });

  test('fresh up to staleAfterMs after the measurement, stale after', () => {
    const n = { ...base, rtt: ok };
    expect(neighbourView(n, at('2030-01-01T00:10:00Z'), STALE).status).toBe('fresh');
    expect(neighbourView(n, at('2030-01-01T00:12:00Z'), STALE).status).toBe('fresh');
    expect(neighbourView(n, at('2030-01-01T00:12:00.001Z'), STALE).status).toBe('stale');
    expect(neighbourView(n, at('2030-01-01T05:00:00Z'), STALE)).toEqual({ ...n, status: 'stale' });
  });

  test('unreachable when the last attempt failed, whatever the age', () => {
    expect(neighbourView({ ...base, lastError: { message: 'timeout', at: '2030-01-01T00:00:30.000Z' } }, at('2030-01-01T00:00:31Z'), STALE).status).toBe('unreachable');
    const later = { ...base, rtt: ok, lastError: { message: 'timeout', at: '2030-01-01T00:10:01.000Z' } };
    expect(neighbourView(later, at('2030-01-01T00:10:02Z'), STALE)).toEqual({ ...later, status: 'unreachable' });
    // A failure at the same instant as the success counts as the later one.
    expect(neighbourView({ ...base, rtt: ok, lastError: { message: 'x', at: ok.measuredAt } }, at('2030-01-01T00:10:00Z'), STALE).status).toBe('unreachable');
  });

  test('a failure older than the last success does not make it unreachable', () => {
    const n = { ...base, rtt: ok, lastError: { message: 'timeout', at: '2030-01-01T00:09:00.000Z' } };
    expect(neighbourView(n, at('2030-01-01T00:10:30Z'), STALE).status).toBe('fresh');
    expect(neighbourView(n, at('2030-01-01T03:00:00Z'), STALE).status).toBe('stale');
  });

  test('statuses from what the registry recorded', async () => {
    const r = registry();
    await r.add({ name: 'a', apiUrl: 'https://a.example.org', token: TOKEN }, T('00:00'));
    await r.add({ name: 'b', apiUrl: 'https://b.example.org', token: TOKEN }, T('00:00'));
    await r.add({ name: 'c', apiUrl: 'https://c.example.org', token: TOKEN }, T('00:00'));
    await r.add({ name: 'd', apiUrl: 'https://d.example.org', token: TOKEN }, T('00:00'));
    await r.record('a', { ok: true, rttMs: 5, servingHosts: 1, at: T('09:30') });
    await r.record('b', { ok: true, rttMs: 5, servingHosts: 1, at: T('01:00') });
    await r.record('c', { ok: true, rttMs: 5, servingHosts: 1, at: T('09:00') });
    await r.record('c', { ok: false, error: 'refused', at: T('09:10') });
    const now = T('10:00').getTime();
    expect((await r.list()).map((n) => [n.name, neighbourView(n, now, 60_000).status])).toEqual([
      ['a', 'fresh'],
      ['b', 'stale'],
      ['c', 'unreachable'],
      ['d', 'unmeasured'],
    ]);
  });
});

describe('parseNeighbourUrl', () => {
  const code = (f: () => unknown): string => {
    try {
      f();
    } catch (e) {
      expect(e).toBeInstanceOf(CloudletError);
      return (e as CloudletError).code;
    }
    return 'accepted';
  };

  test('http and https base URLs are kept, a trailing slash removed', () => {
    expect(parseNeighbourUrl('https://west.example.org:8080/')).toBe('https://west.example.org:8080');
    expect(parseNeighbourUrl('http://10.0.0.2:8080')).toBe('http://10.0.0.2:8080');
    expect(parseNeighbourUrl('https://west.example.org/cloudlet/api//')).toBe('https://west.example.org/cloudlet/api');
    expect(parseNeighbourUrl('HTTPS://West.Example.ORG/')).toBe('https://west.example.org');
    expect(parseNeighbourUrl('http://[fd00::2]:8080/')).toBe('http://[fd00::2]:8080');
  });

  test.each(['ftp://west.example.org', 'file:///etc/passwd', 'javascript:alert(1)', 'ws://west.example.org', 'west.example.org:8080', 'not a url', ''])('%j is BAD_INPUT', (text) => {
    expect(code(() => parseNeighbourUrl(text))).toBe('BAD_INPUT');
  });

  test('credentials in the URL are refused without repeating the password', () => {
    for (const text of ['https://user:s3cret-pass@west.example.org', 'https://user@west.example.org', 'https://:s3cret-pass@west.example.org']) {
      let err: unknown;
      try {
        parseNeighbourUrl(text);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(CloudletError);
      expect((err as CloudletError).code).toBe('BAD_INPUT');
      expect((err as CloudletError).message).toContain('carries credentials');
      expect((err as CloudletError).message).not.toContain('s3cret-pass');
    }
  });

  test('a query or fragment is refused', () => {
    for (const text of ['https://west.example.org/?x=1', 'https://west.example.org/#top', 'https://west.example.org/api?token=abc']) {
      expect([text, code(() => parseNeighbourUrl(text))]).toEqual([text, 'BAD_INPUT']);
    }
  });

  test('with an allow-list, only its hosts and domains are accepted; others are FORBIDDEN', () => {
    const allowed = ['*.example.org', '10.0.0.2', 'fd00::2', 'Peer.Local'];
    for (const ok of ['https://west.example.org', 'https://a.b.example.org:9/', 'http://10.0.0.2:8080', 'http://[fd00::2]:80', 'https://peer.local', 'https://WEST.EXAMPLE.ORG']) {
      expect([ok, code(() => parseNeighbourUrl(ok, allowed))]).toEqual([ok, 'accepted']);
    }
    for (const bad of ['https://example.org', 'https://evilexample.org', 'https://west.example.org.evil.com', 'http://10.0.0.3', 'http://10.0.0.22', 'http://[fd00::3]', 'https://peer.local.evil', 'http://localhost']) {
      expect([bad, code(() => parseNeighbourUrl(bad, allowed))]).toEqual([bad, 'FORBIDDEN']);
    }
  });

  test('an empty allow-list allows any host; the FORBIDDEN error names the list', () => {
    expect(parseNeighbourUrl('http://localhost:8080', [])).toBe('http://localhost:8080');
    let err: unknown;
    try {
      parseNeighbourUrl('https://other.net', ['*.example.org']);
    } catch (e) {
      err = e;
    }
    expect((err as CloudletError).code).toBe('FORBIDDEN');
    expect((err as CloudletError).message).toContain('neighbour host other.net is not allowed here');
    expect((err as CloudletError).fix).toContain('*.example.org');
  });

  test('a URL that is not http(s) is refused before the allow-list is consulted', () => {
    expect(code(() => parseNeighbourUrl('ftp://west.example.org', ['*.example.org']))).toBe('BAD_INPUT');
    expect(code(() => parseNeighbourUrl('https://u:p@other.net', ['*.example.org']))).toBe('BAD_INPUT');
  });
});
