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
import { decodeSkeleton } from '../../src/core/snapshot/skeleton';
import { craftSaveFile, pageData, type CraftRecord, type CraftSpec } from '../fixtures/snapshot/craft';

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

describe('joinSnapshot tee to a receiver whose RAM holds the base', () => {
  /** Launch and base differ in a few pages of pc.ram; pc.bios runs sit between pc.ram runs. */
  const spec = (changed: Set<number>, seed: number): CraftSpec => {
    const ram = (from: number, count: number): CraftRecord[] =>
      Array.from({ length: count }, (_, i) => from + i).map((p) => (p % 9 === 0 ? { block: 'pc.ram', page: p, kind: 'zero' as const } : { block: 'pc.ram', page: p, kind: 'page' as const, data: pageData('pc.ram', p, changed.has(p) ? seed : 0) }));
    return {
      blocks: [{ name: 'pc.ram', size: 96 * 4096 }, { name: 'pc.bios', size: 4 * 4096 }],
      parts: [[...ram(0, 40), ...seq('pc.bios', 4)], [...ram(40, 56)]],
      devices: [{ name: 'cpu', data: Buffer.from('device state') }],
    };
  };

  test('only pages that differ go; loaded over the base they give the launch memory exactly', async () => {
    const changedPages = new Set([1, 2, 41, 55, 95]); // none a ZERO record (every 9th page)
    const baseSave = path.join(dir, 'pre-base.sav');
    const launchSave = path.join(dir, 'pre-launch.sav');
    fs.writeFileSync(baseSave, craftSaveFile(spec(new Set(), 0)).file);
    const launch = craftSaveFile(spec(changedPages, 7)).file;
    fs.writeFileSync(launchSave, launch);
    const baseLayout = await splitSnapshot(baseSave, path.join(dir, 'pre-base.img'), { logger: log });
    const launchLayout = await splitSnapshot(launchSave, path.join(dir, 'pre-launch.img'), { logger: log });
    const baseImg = fs.readFileSync(path.join(dir, 'pre-base.img'));
    const launchImg = fs.readFileSync(path.join(dir, 'pre-launch.img'));
    const ramBlock = baseLayout.blocks.find((b) => b.name === 'pc.ram');
    if (!ramBlock) throw new Error('no pc.ram');
    const parts: Buffer[] = [];
    const joined = await joinSnapshot(launchLayout.skeleton, path.join(dir, 'pre-launch.img'), path.join(dir, 'pre-launch.out'), {
      tee: async (part) => {
        parts.push(Buffer.from(part));
      },
      prefilled: {
        block: 'pc.ram',
        imageOffset: ramBlock.imageOffset,
        size: ramBlock.size,
        // What a patched memory image says: the page is the base's.
        isBase: (off) => baseImg.subarray(off, off + 4096).equals(launchImg.subarray(off, off + 4096)),
      },
    });
    // The save file itself is still the launch VM's, byte for byte.
    expect(joined.sha256).toBe(sha(launch));
    expect(fs.readFileSync(path.join(dir, 'pre-launch.out')).equals(launch)).toBe(true);
    expect(joined.teeDropped).toBe(96 - changedPages.size);
    // A stream QEMU accepts: split it (every record must name a block it knows), then load it
    // over the base's pc.ram, as the receiver would.
    const reduced = Buffer.concat(parts);
    expect(reduced.length).toBeLessThan(launch.length / 4);
    fs.writeFileSync(path.join(dir, 'pre-reduced.sav'), reduced);
    const red = await splitSnapshot(path.join(dir, 'pre-reduced.sav'), path.join(dir, 'pre-reduced.img'), { logger: log });
    const redImg = fs.readFileSync(path.join(dir, 'pre-reduced.img'));
    const redRam = red.blocks.find((b) => b.name === 'pc.ram');
    const redBios = red.blocks.find((b) => b.name === 'pc.bios');
    if (!redRam || !redBios) throw new Error('blocks missing');
    const ram = Buffer.from(baseImg.subarray(ramBlock.imageOffset, ramBlock.imageOffset + ramBlock.size));
    const sent = new Set<number>();
    for (const op of decodeSkeleton(red.skeleton).ops) {
      if (op.op !== 'run' || red.blocks[op.block]?.name !== 'pc.ram') continue;
      for (let i = 0; i < op.count; i++) {
        const page = op.firstPage + i;
        sent.add(page);
        redImg.copy(ram, page * 4096, redRam.imageOffset + page * 4096, redRam.imageOffset + (page + 1) * 4096);
      }
    }
    expect([...sent].sort((a, b) => a - b)).toEqual([...changedPages].sort((a, b) => a - b));
    expect(ram.equals(launchImg.subarray(ramBlock.imageOffset, ramBlock.imageOffset + ramBlock.size))).toBe(true);
    // pc.bios is not prefilled: all of it went, under its own name.
    const bios = launchLayout.blocks.find((b) => b.name === 'pc.bios');
    expect(bios && redImg.subarray(redBios.imageOffset, redBios.imageOffset + redBios.size).equals(launchImg.subarray(bios.imageOffset, bios.imageOffset + bios.size))).toBe(true);
  });

  test('a save that sent a page twice: nothing is left out (the earlier copy is a literal)', async () => {
    const twice: CraftSpec = { ...spec(new Set([3]), 7) };
    twice.parts = [...twice.parts, [{ block: 'pc.ram', page: 3, kind: 'page', data: pageData('pc.ram', 3, 0) }]];
    const launch = craftSaveFile(twice).file;
    fs.writeFileSync(path.join(dir, 'twice.sav'), launch);
    const layout = await splitSnapshot(path.join(dir, 'twice.sav'), path.join(dir, 'twice.img'), { logger: log });
    expect(decodeSkeleton(layout.skeleton).header.resentRecords).toBe(1);
    const parts: Buffer[] = [];
    const joined = await joinSnapshot(layout.skeleton, path.join(dir, 'twice.img'), path.join(dir, 'twice.out'), {
      tee: async (part) => {
        parts.push(Buffer.from(part));
      },
      prefilled: { block: 'pc.ram', imageOffset: 0, size: 96 * 4096, isBase: () => true },
    });
    expect(joined.teeDropped).toBe(0);
    // The same records (a record after a literal may name its block where the file did not):
    // loaded, it is the launch memory.
    fs.writeFileSync(path.join(dir, 'twice-teed.sav'), Buffer.concat(parts));
    await splitSnapshot(path.join(dir, 'twice-teed.sav'), path.join(dir, 'twice-teed.img'), { logger: log });
    expect(fs.readFileSync(path.join(dir, 'twice-teed.img')).equals(fs.readFileSync(path.join(dir, 'twice.img')))).toBe(true);
  });

  test('a receiver whose block is laid out elsewhere gets every page', async () => {
    const launch = craftSaveFile(spec(new Set([3]), 7)).file;
    fs.writeFileSync(path.join(dir, 'pre2.sav'), launch);
    const layout = await splitSnapshot(path.join(dir, 'pre2.sav'), path.join(dir, 'pre2.img'), { logger: log });
    const parts: Buffer[] = [];
    const joined = await joinSnapshot(layout.skeleton, path.join(dir, 'pre2.img'), path.join(dir, 'pre2.out'), {
      tee: async (part) => {
        parts.push(Buffer.from(part));
      },
      prefilled: { block: 'pc.ram', imageOffset: 4096, size: 96 * 4096, isBase: () => true },
    });
    expect(joined.teeDropped).toBe(0);
    expect(Buffer.concat(parts).equals(launch)).toBe(true);
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

  test('the file\'s last part (device state, end marker) is held back whole, whatever its size', async () => {
    const q = waitingQemu();
    const { save, stream } = file();
    const cut = save.length - 300 * 1024;
    const feed = new IncomingFeed({ domain: 'feed-last', qmp: q.qmp, log, ignoreShared: false });
    await feedAll(feed, save.subarray(0, cut), 1_000_003);
    await feed.write(save.subarray(cut), { last: true });
    await new Promise((r) => setTimeout(r, 50));
    expect(q.received().length).toBe(stream.length - 300 * 1024 - 64 * 1024);
    await feed.complete();
    expect(sha(q.received())).toBe(sha(stream));
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
