/**
 * The receiving end of handoff rounds with the source's uploader: a connection broken half-way
 * through a round is resumed from the byte the host has (the file arrives whole and exact), and
 * the receiver refuses missing, forged, foreign and used tickets without writing anything. The
 * base package a destination host lacks arrives the same way, beside the rounds.
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import fastify, { type FastifyInstance } from 'fastify';
import { registerHandoffReceiver } from '../../src/workers/handoff-receiver';
import { issueTicket } from '../../src/core/handoff/ticket';
import { handoffPaths } from '../../src/core/handoff/paths';
import { uploadBase, uploadRound, type HandoffTicket } from '../../src/client/handoff-peer';

const secret = randomBytes(32);
let dir: string;
let app: FastifyInstance;
let port: number;

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'receiver-'));
  app = fastify({ logger: false });
  registerHandoffReceiver(app, { hostId: 'west-1', dataDir: dir, secret });
  await app.listen({ host: '127.0.0.1', port: 0 });
  port = (app.server.address() as net.AddressInfo).port;
});
afterEach(async () => {
  await app.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

function ticketFor(hid: string, host = 'west-1', exp = Date.now() + 60_000): string {
  return issueTicket(secret, { hid, host, inst: 'vm-1', exp });
}

function receiving(hid: string): void {
  const p = handoffPaths(dir, hid);
  fs.mkdirSync(p.incoming, { recursive: true });
  fs.writeFileSync(p.receiving, '{}');
}

/** A TCP relay to the receiver that cuts the first connection after `cutAfter` bytes from the client. */
async function flakyRelay(cutAfter: number): Promise<{ port: number; close(): void }> {
  let first = true;
  const server = net.createServer((client) => {
    const upstream = net.connect(port, '127.0.0.1');
    const cut = first;
    first = false;
    let seen = 0;
    client.on('data', (d: Buffer) => {
      seen += d.length;
      if (cut && seen > cutAfter) {
        client.destroy();
        upstream.destroy();
        return;
      }
      upstream.write(d);
    });
    upstream.on('data', (d) => client.write(d));
    client.on('error', () => upstream.destroy());
    upstream.on('error', () => client.destroy());
    client.on('close', () => upstream.destroy());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { port: (server.address() as net.AddressInfo).port, close: () => server.close() };
}

test('an upload broken half-way resumes from the byte the host has; the round arrives exact', async () => {
  const hid = 'ho-resume-1';
  receiving(hid);
  const file = path.join(dir, 'round');
  const data = randomBytes(3 * 1024 * 1024);
  fs.writeFileSync(file, data);
  const relay = await flakyRelay(1024 * 1024);
  try {
    const t: HandoffTicket = { handoffId: hid, ticket: ticketFor(hid), hostId: 'west-1', instanceId: 'vm-1', receiverUrl: `http://127.0.0.1:${relay.port}/handoffs/${hid}`, expiresAt: '' };
    const r = await uploadRound(t, 1, file);
    expect(r.attempts).toBeGreaterThan(1);
    expect(r.bytes).toBe(data.length);
    // What the second attempt sent is less than the whole file: it carried on from the host's offset.
    expect(r.sent).toBeLessThan(2 * data.length);
    const got = fs.readFileSync(handoffPaths(dir, hid).incomingRound(1));
    expect(createHash('sha256').update(got).digest('hex')).toBe(createHash('sha256').update(data).digest('hex'));
  } finally {
    relay.close();
  }
});

test('missing, forged, foreign, expired and used tickets are refused and nothing is written', async () => {
  const hid = 'ho-refuse-1';
  receiving(hid);
  const put = (auth: string | undefined, h = hid) =>
    fetch(`http://127.0.0.1:${port}/handoffs/${h}/rounds/1`, {
      method: 'PUT',
      headers: { ...(auth ? { authorization: `Bearer ${auth}` } : {}), 'content-type': 'application/octet-stream', 'upload-offset': '0' },
      body: Buffer.alloc(100, 1),
    });
  expect((await put(undefined)).status).toBe(401);
  const good = ticketFor(hid);
  expect((await put(`${good.split('.')[0]}.${Buffer.alloc(32).toString('base64url')}`)).status).toBe(401);
  expect((await put(ticketFor(hid, 'west-1', Date.now() - 1))).status).toBe(401);
  expect((await put(ticketFor(hid, 'west-2'))).status).toBe(403);
  expect((await put(ticketFor('ho-other'), hid)).status).toBe(403);
  expect(fs.existsSync(handoffPaths(dir, hid).incomingRound(1))).toBe(false);
  // A wrong offset is a conflict that says where to carry on.
  const off = await fetch(`http://127.0.0.1:${port}/handoffs/${hid}/rounds/1`, { method: 'PUT', headers: { authorization: `Bearer ${good}`, 'content-type': 'application/octet-stream', 'upload-offset': '5' }, body: Buffer.alloc(10) });
  expect(off.status).toBe(409);
  expect(off.headers.get('upload-offset')).toBe('0');
  // The good ticket works while receiving; once the handoff ended (marker gone) it is used up.
  expect((await put(good)).status).toBe(200);
  fs.rmSync(handoffPaths(dir, hid).receiving);
  const used = await fetch(`http://127.0.0.1:${port}/handoffs/${hid}/rounds/2`, { method: 'PUT', headers: { authorization: `Bearer ${good}`, 'content-type': 'application/octet-stream', 'upload-offset': '0' }, body: Buffer.alloc(10) });
  expect(used.status).toBe(403);
  expect(fs.existsSync(handoffPaths(dir, hid).incomingRound(2))).toBe(false);
});

test('a base package goes to its own place, resumably, under the same ticket rules', async () => {
  const hid = 'ho-base-1';
  receiving(hid);
  const file = path.join(dir, 'base.pkg');
  const data = randomBytes(2 * 1024 * 1024 + 17);
  fs.writeFileSync(file, data);
  const relay = await flakyRelay(512 * 1024);
  try {
    const t: HandoffTicket = { handoffId: hid, ticket: ticketFor(hid), hostId: 'west-1', instanceId: 'vm-1', receiverUrl: `http://127.0.0.1:${relay.port}/handoffs/${hid}`, expiresAt: '', needsBase: true };
    const r = await uploadBase(t, file);
    expect(r.attempts).toBeGreaterThan(1);
    expect(fs.readFileSync(handoffPaths(dir, hid).incomingBase).equals(data)).toBe(true);
    expect(fs.existsSync(handoffPaths(dir, hid).incomingRound(1))).toBe(false);
    // Another handoff's ticket cannot write it; a round path without a number is not a base.
    const foreign = await fetch(`http://127.0.0.1:${port}/handoffs/${hid}/base`, { method: 'HEAD', headers: { authorization: `Bearer ${ticketFor('ho-other')}` } });
    expect(foreign.status).toBe(403);
    const head = await fetch(`http://127.0.0.1:${port}/handoffs/${hid}/base`, { method: 'HEAD', headers: { authorization: `Bearer ${t.ticket}` } });
    expect(head.headers.get('upload-offset')).toBe(String(data.length));
  } finally {
    relay.close();
  }
});
