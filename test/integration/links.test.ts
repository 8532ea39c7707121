/**
 * Emulated edge links (src/links, docs/links.md) for real: network namespaces, a veth pair with
 * tbf on both ends, and the relays that add the delay, in front of a local HTTP server. Checks
 * the measured rate and round trip of the wifi38 profile, that data arrives intact both ways, that
 * nothing is addressed in the root namespace, and that close() and removeStaleLinks() leave
 * nothing behind. Needs root and iproute2; no libvirt or Temporal.
 */
import { execFile as execFileCb } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFile, stat, writeFile } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import { CloudletError } from '../../src/core/errors';
import { LINKS_DIR, openLink, removeStaleLinks, type Link } from '../../src/links';
import { startProbeServer } from '../../src/links/measure';
import { pollUntil } from '../helpers/poll';

const execFile = promisify(execFileCb);
const ip = async (...args: string[]): Promise<string> => (await execFile('ip', args)).stdout;

const BIG = Buffer.alloc(8 * 1024 * 1024);
for (let i = 0; i < BIG.length; i += 4) BIG.writeUInt32LE((i * 2654435761) >>> 0, i);
const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

let server: http.Server;
let port: number;
const opened: Link[] = [];

interface Fetched {
  ms: number;
  body: Buffer;
}

function get(url: string, agent?: http.Agent): Promise<Fetched> {
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    http
      .get(url, { agent }, (res) => {
        const parts: Buffer[] = [];
        res.on('data', (d: Buffer) => parts.push(d));
        res.on('end', () => resolve({ ms: performance.now() - t0, body: Buffer.concat(parts) }));
        res.on('error', reject);
      })
      .on('error', reject);
  });
}

function post(url: string, body: Buffer): Promise<Fetched> {
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method: 'POST', headers: { 'content-length': body.length } }, (res) => {
      const parts: Buffer[] = [];
      res.on('data', (d: Buffer) => parts.push(d));
      res.on('end', () => resolve({ ms: performance.now() - t0, body: Buffer.concat(parts) }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

const namespaces = async (): Promise<string[]> => (await ip('netns', 'list')).split('\n').map((l) => l.split(' ')[0] ?? '');

async function open(profile: Parameters<typeof openLink>[0]['profile'], targetPort = port): Promise<Link> {
  const link = await openLink({ profile, target: { host: '127.0.0.1', port: targetPort } });
  opened.push(link);
  return link;
}

beforeAll(async () => {
  server = await startProbeServer(BIG);
  port = (server.address() as AddressInfo).port;
});

afterAll(async () => {
  for (const l of opened) await l.close();
  await new Promise((r) => server.close(r));
});

describe('emulated edge link', () => {
  it('wifi38: 38 Mbit/s and 20 ms RTT between namespaces of its own, then nothing left', async () => {
    const link = await open('wifi38');
    expect(link.host).toBe('127.0.0.1');
    expect(link.url('/small')).toBe(`http://127.0.0.1:${link.port}/small`);

    // Built as documented, and nothing addressed or plugged in the root namespace.
    expect(await namespaces()).toEqual(expect.arrayContaining([link.namespaces.client, link.namespaces.server]));
    for (const ns of [link.namespaces.client, link.namespaces.server]) {
      expect((await execFile('tc', ['-n', ns, 'qdisc', 'show'])).stdout).toMatch(/tbf .*rate 38Mbit burst 32Kb/);
    }
    expect(await ip('-4', 'addr')).not.toMatch(/10\.213\./);
    expect(await ip('link')).not.toMatch(/cl-veth/);

    // Small requests on one kept-alive connection: each pays the round trip, and not much more.
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    const fresh = await get(link.url('/small'), agent);
    expect(fresh.body.toString()).toBe('ok');
    const rtts: number[] = [];
    for (let i = 0; i < 5; i++) rtts.push((await get(link.url('/small'), agent)).ms);
    agent.destroy();
    const best = Math.min(...rtts);
    expect(best).toBeGreaterThanOrEqual(20);
    expect(best).toBeLessThan(20 + 25);
    // A new connection pays one more round trip for its handshake, as over a real link.
    expect(fresh.ms).toBeGreaterThanOrEqual(40);

    // One 8 MiB download: intact, at the profile's rate (tbf passes ~95% of it as TCP payload).
    const down = await get(link.url('/download'));
    expect(sha256(down.body)).toBe(sha256(BIG));
    const mbit = (BIG.length * 8) / (down.ms * 1000);
    expect(mbit).toBeGreaterThan(0.75 * 38);
    expect(mbit).toBeLessThan(1.05 * 38);

    // And 1 MiB the other way, intact and shaped too.
    const upBody = BIG.subarray(0, 1024 * 1024);
    const up = await post(link.url('/upload'), upBody);
    expect(up.body.toString()).toBe(sha256(upBody));
    expect((upBody.length * 8) / (up.ms * 1000)).toBeLessThan(1.05 * 38);

    const stats = await link.stats();
    expect(stats.down.bytes).toBeGreaterThan(BIG.length);
    expect(stats.up.bytes).toBeGreaterThan(upBody.length);

    await link.close();
    await link.close(); // idempotent
    const left = await namespaces();
    expect(left).not.toContain(link.namespaces.client);
    expect(left).not.toContain(link.namespaces.server);
    await expect(stat(path.join(LINKS_DIR, link.id))).rejects.toThrow(/ENOENT/);
    await expect(get(link.url('/small'))).rejects.toThrow(/ECONNREFUSED/);
  }, 30_000);

  it('passes a refused target on as a failed connection and keeps serving', async () => {
    const spare = net.createServer();
    await new Promise<void>((r) => spare.listen(0, '127.0.0.1', r));
    const deadPort = (spare.address() as AddressInfo).port;
    await new Promise((r) => spare.close(r));
    const link = await open({ rateMbit: 100, rttMs: 2 }, deadPort);
    expect(link.profile.name).toBe('custom-100mbit-2ms');
    await expect(get(link.url('/small'))).rejects.toThrow(/socket hang up|ECONNRESET/);
    // The target comes up on that port: the same link reaches it.
    const late = http.createServer((_req, res) => res.end('late'));
    await new Promise<void>((r) => late.listen(deadPort, '127.0.0.1', r));
    try {
      expect((await get(link.url('/'))).body.toString()).toBe('late');
    } finally {
      await link.close();
      await new Promise((r) => late.close(r));
    }
  }, 30_000);

  it('removeStaleLinks() removes a link whose process died, and only that', async () => {
    const live = await open('gbit1');
    const crashed = await open('mbit100');
    // Make `crashed` look like the leftover of a dead run: kill its relays without close(), and
    // name a process that no longer exists as its owner.
    const ownerFile = path.join(LINKS_DIR, crashed.id, 'owner.json');
    const owner = JSON.parse(await readFile(ownerFile, 'utf8')) as { pid: number; relayPid: number };
    const gone = await execFile('sh', ['-c', 'echo $$']);
    await writeFile(ownerFile, JSON.stringify({ ...owner, pid: Number(gone.stdout.trim()) }));
    process.kill(owner.relayPid, 'SIGKILL');
    await pollUntil('the crashed link to stop answering', 10_000, async () => get(crashed.url('/small')).then(() => undefined, () => true));

    const removed = await removeStaleLinks();
    expect(removed).toContain(crashed.id);
    expect(removed).not.toContain(live.id);
    const left = await namespaces();
    expect(left).not.toContain(crashed.namespaces.client);
    expect(left).not.toContain(crashed.namespaces.server);
    expect(left).toContain(live.namespaces.client);
    expect((await get(live.url('/small'))).body.toString()).toBe('ok');
    await crashed.close(); // nothing left to do, and no error
    await live.close();
    expect(await namespaces()).not.toContain(live.namespaces.server);
  }, 30_000);

  it('refuses a second link with the same id', async () => {
    const link = await openLink({ profile: 'gbit1', target: { port }, id: `t${process.pid.toString(36)}` });
    opened.push(link);
    const e = await openLink({ profile: 'gbit1', target: { port }, id: link.id }).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(CloudletError);
    expect((e as CloudletError).code).toBe('CONFLICT');
    await link.close();
  }, 30_000);
});
