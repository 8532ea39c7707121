/**
 * Early start without libvirt: the join hands every part of the rebuilt save file to a tee, in
 * order (also when the hashing thread runs), and IncomingFeed streams a save file into a scripted
 * QMP peer that plays a QEMU waiting with `-incoming defer` (it listens where migrate-incoming
 * says). Checked: QEMU gets exactly the stream after libvirt's header, never its last bytes before
 * `complete`, and a peer that fails makes `complete` throw while `write` never does.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { joinSnapshot, splitSnapshot } from '../../src/core/snapshot';
import { encodeSaveHeader } from '../../src/core/snapshot/header';
import { IncomingFeed } from '../../src/hypervisor/incoming-stream';
import { QmpError, type QmpCommand, type QmpSend } from '../../src/hypervisor/qmp';
import { craftSaveFile, type CraftRecord } from '../fixtures/snapshot/craft';

const log = pino({ level: 'silent' });
let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'incoming-feed-unit-'));
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
const seq = (block: string, count: number): CraftRecord[] => Array.from({ length: count }, (_, i) => ({ block, page: i, kind: i % 7 === 0 ? 'zero' : 'page' }));

describe('joinSnapshot tee', () => {
  test.each([
    ['small (hashed inline)', 64],
    ['large (hashed on a thread, several 8 MiB parts)', 9000],
  ])('%s: the tee gets the whole file, in order, even when it is slow', async (_name, pages) => {
    const crafted = craftSaveFile({ blocks: [{ name: 'pc.ram', size: pages * 4096 }], parts: [seq('pc.ram', pages)] });
    const save = path.join(dir, `tee-${pages}.sav`);
    fs.writeFileSync(save, crafted.file);
    const layout = await splitSnapshot(save, path.join(dir, `tee-${pages}.img`), { logger: log });
    const parts: Buffer[] = [];
    let calls = 0;
    const joined = await joinSnapshot(layout.skeleton, path.join(dir, `tee-${pages}.img`), path.join(dir, `tee-${pages}.out`), {
      tee: async (part) => {
        calls += 1;
        // Later parts answer sooner: order must come from the join, not from timing.
        await new Promise((r) => setTimeout(r, calls % 2 === 1 ? 15 : 1));
        parts.push(Buffer.from(part));
      },
    });
    const teed = Buffer.concat(parts);
    expect(teed.length).toBe(crafted.file.length);
    expect(sha(teed)).toBe(sha(crafted.file));
    expect(joined.sha256).toBe(sha(crafted.file));
    if (pages > 1000) expect(calls).toBeGreaterThan(2);
  });
});

/** A QEMU stand-in: listens where migrate-incoming says, keeps what it reads, completes when the sender ends. */
function waitingQemu(opts: { refuse?: string; dieAfter?: number } = {}): { qmp: QmpSend; calls: QmpCommand[]; received: () => Buffer; ended: () => boolean; close: () => void } {
  const calls: QmpCommand[] = [];
  const chunks: Buffer[] = [];
  let bytes = 0;
  let ended = false;
  let server: net.Server | undefined;
  return {
    calls,
    received: () => Buffer.concat(chunks),
    ended: () => ended,
    close: () => server?.close(),
    qmp: async (command) => {
      calls.push(command);
      if (command.execute === opts.refuse) throw new QmpError(command.execute, 'GenericError', 'refused by the test');
      if (command.execute === 'migrate-incoming') {
        const sock = String(command.arguments?.['uri']).replace(/^unix:/, '');
        expect(fs.statSync(path.dirname(sock)).mode & 0o077).toBe(0); // private directory
        server = net.createServer((c) => {
          c.on('data', (d: Buffer) => {
            chunks.push(d);
            bytes += d.length;
            if (opts.dieAfter !== undefined && bytes > opts.dieAfter) c.destroy();
          });
          c.on('end', () => (ended = true));
        });
        await new Promise<void>((r) => server?.listen(sock, r));
        return {};
      }
      if (command.execute === 'query-migrate') return ended ? { status: 'completed' } : opts.dieAfter !== undefined ? { status: 'failed', 'error-desc': 'the test killed it' } : { status: 'active' };
      return {};
    },
  };
}

const file = (): { save: Buffer; stream: Buffer } => {
  const header = encodeSaveHeader("<domain type='qemu'><name>feed</name></domain>");
  const stream = Buffer.alloc(3 * 1024 * 1024 + 123);
  for (let i = 0; i < stream.length; i += 4096) stream.writeUInt32BE(i, i);
  stream.write('QEVM', 0, 'latin1');
  return { save: Buffer.concat([header, stream]), stream };
};

/** Writes `save` in parts of `size` bytes, the first one cut inside libvirt's fixed header. */
async function feedAll(feed: IncomingFeed, save: Buffer, size: number): Promise<void> {
  await feed.write(save.subarray(0, 50));
  for (let at = 50; at < save.length; at += size) await feed.write(save.subarray(at, Math.min(save.length, at + size)));
}

describe('IncomingFeed', () => {
  test('QEMU gets the stream after the libvirt header, all but its last 64 KiB until complete', async () => {
    const q = waitingQemu();
    const { save, stream } = file();
    const feed = new IncomingFeed({ domain: 'feed-unit', qmp: q.qmp, log, ignoreShared: false });
    await feedAll(feed, save, 1_000_003);
    await new Promise((r) => setTimeout(r, 50)); // let the socket deliver what was sent
    expect(q.received().length).toBe(stream.length - 64 * 1024);
    expect(q.ended()).toBe(false);
    const done = await feed.complete();
    expect(done.bytes).toBe(stream.length);
    expect(sha(q.received())).toBe(sha(stream));
    const asked = q.calls.map((c) => c.execute);
    expect(asked.slice(0, 2)).toEqual(['migrate-set-capabilities', 'migrate-incoming']);
    expect(new Set(asked.slice(2))).toEqual(new Set(['query-migrate']));
    expect(q.calls[0]?.arguments).toEqual({ capabilities: [{ capability: 'x-ignore-shared', state: false }] });
    q.close();
  });

  test('a QEMU that refuses to listen or dies half-way: write never throws, complete says why', async () => {
    const refused = waitingQemu({ refuse: 'migrate-incoming' });
    const { save } = file();
    const a = new IncomingFeed({ domain: 'feed-refused', qmp: refused.qmp, log, ignoreShared: false });
    await expect(feedAll(a, save, 512 * 1024)).resolves.toBeUndefined();
    await expect(a.complete()).rejects.toMatchObject({ code: 'HYPERVISOR', message: expect.stringContaining('feed-refused') });

    const dying = waitingQemu({ dieAfter: 1024 * 1024 });
    const b = new IncomingFeed({ domain: 'feed-dying', qmp: dying.qmp, log, ignoreShared: false });
    await expect(feedAll(b, save, 256 * 1024)).resolves.toBeUndefined();
    await expect(b.complete()).rejects.toMatchObject({ code: 'HYPERVISOR' });
    dying.close();
  });

  test('a file that is not a libvirt save is refused before QEMU gets a byte', async () => {
    const q = waitingQemu();
    const feed = new IncomingFeed({ domain: 'feed-bad', qmp: q.qmp, log, ignoreShared: false });
    await feed.write(Buffer.alloc(200 * 1024, 7));
    await expect(feed.complete()).rejects.toMatchObject({ code: 'CORRUPT' });
    expect(q.received().length).toBe(0);
    q.close();
  });
});
