/**
 * The snapshot codec on REAL libvirt save files of the test guest (QEMU 7.2 under libvirt), at two
 * RAM sizes. Each size gets two saves of the same running guest: boot → ready line → `virsh save`
 * (a.sav) → `virsh restore` → `virsh save` (b.sav). Saves are cached under var/test-cache/snapshot/,
 * keyed by the guest manifest's inputsDigest, the RAM size and the domain XML below.
 */
import { execFile as execFileCb } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync } from 'node:fs';
import { copyFile, mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import pino from 'pino';
import { buildChunkIndex } from '../../src/core/chunk';
import { joinSnapshot, readSaveHeader, rewriteSaveHeaderXml, splitSnapshot, type SnapshotLayout, type SplitStats } from '../../src/core/snapshot';

const execFile = promisify(execFileCb);
const ROOT = resolve(__dirname, '../..');
const GUEST = join(ROOT, 'var/guest');
const CACHE = join(ROOT, 'var/test-cache/snapshot');
const WORK = join(ROOT, 'var/test-cache/snapshot-work');
const URI = 'qemu:///system';
const SIZES = [128, 256] as const;
const XML_VERSION = 1; // bump when domainXml() changes: it is part of the cache key

interface Manifest {
  kernel: string;
  initrd: string;
  disk: string;
  cmdline: string;
  inputsDigest: string;
  readyLine: string;
}

const virsh = async (...args: string[]): Promise<string> => (await execFile('virsh', ['-c', URI, ...args], { timeout: 120_000 })).stdout;

function domainXml(m: Manifest, name: string, memMiB: number, disk: string, serial: string): string {
  return `<domain type='qemu'>
  <name>${name}</name>
  <memory unit='MiB'>${memMiB}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${join(GUEST, m.kernel)}</kernel><initrd>${join(GUEST, m.initrd)}</initrd>
    <cmdline>${m.cmdline}</cmdline></os>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${disk}'/><target dev='vda' bus='virtio'/></disk>
    <interface type='user'><model type='virtio'/></interface>
    <serial type='file'><source path='${serial}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>`;
}

async function waitFor<T>(what: string, deadlineMs: number, probe: () => Promise<T | undefined>): Promise<T> {
  const end = Date.now() + deadlineMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out after ${deadlineMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** Two saves of one running guest with `memMiB` of RAM (cached). */
async function ensureSaves(m: Manifest, memMiB: number): Promise<{ a: string; b: string }> {
  const dir = join(CACHE, `${m.inputsDigest.slice(0, 16)}-${memMiB}m-x${XML_VERSION}`);
  const a = join(dir, 'a.sav');
  const b = join(dir, 'b.sav');
  if (existsSync(a) && existsSync(b)) return { a, b };
  const work = join(WORK, `${memMiB}m-${process.pid}`);
  await rm(work, { recursive: true, force: true });
  await mkdir(work, { recursive: true });
  const disk = join(work, 'disk.qcow2');
  const serial = join(work, 'serial.log');
  await execFile('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', join(GUEST, m.disk), '-F', 'raw', disk]);
  const name = `sc-it-${memMiB}m-${process.pid}`;
  const xmlPath = join(work, 'domain.xml');
  await writeFile(xmlPath, domainXml(m, name, memMiB, disk, serial));
  try {
    await virsh('create', xmlPath);
    await waitFor(`${m.readyLine} on ${serial}`, 180_000, async () => ((await readFile(serial, 'utf8').catch(() => '')).includes(m.readyLine) ? true : undefined));
    await virsh('save', name, join(work, 'a.sav'));
    await virsh('restore', join(work, 'a.sav'));
    await waitFor(`${name} running`, 60_000, async () => ((await virsh('domstate', name)).trim() === 'running' ? true : undefined));
    await virsh('save', name, join(work, 'b.sav'));
  } finally {
    await virsh('destroy', name).catch(() => undefined);
  }
  await mkdir(CACHE, { recursive: true });
  await rm(dir, { recursive: true, force: true });
  await rename(work, dir);
  // Saves of older guest builds are dead weight (~50 MB each): keep only the current build's.
  for (const old of await readdir(CACHE)) if (!old.startsWith(m.inputsDigest.slice(0, 16))) await rm(join(CACHE, old), { recursive: true, force: true });
  return { a, b };
}

async function sha256File(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 8 << 20 })) h.update(chunk as Buffer);
  return h.digest('hex');
}

/**
 * Independent reference walk of the RAM sections (whole file in memory; fine for a test): checks
 * every page record against the memory image at imageOffset(block) + address.
 */
function checkPagesAgainstImage(save: Buffer, image: Buffer, layout: SnapshotLayout): { pages: number; zeros: number } {
  let p = 92 + save.readUInt32LE(20);
  expect(save.toString('latin1', p, p + 4)).toBe('QEVM');
  p += 8;
  expect(save[p]).toBe(0x07); // configuration: be32 length + machine type
  p += 5 + save.readUInt32BE(p + 1);
  const offsetOf = new Map(layout.blocks.map((b) => [b.name, b.imageOffset]));
  let block = '';
  let pages = 0;
  let zeros = 0;
  for (let ended = false; !ended; ) {
    const type = save[p] as number;
    if (type === 0x01) p += 1 + 4 + 1 + (save[p + 5] as number) + 8;
    else if (type === 0x02 || type === 0x03) p += 5;
    else throw new Error(`unexpected section type ${type} at ${p}`);
    ended = type === 0x03;
    for (;;) {
      const hi = save.readUInt32BE(p);
      const lo = save.readUInt32BE(p + 4);
      const flags = lo & 0xfff;
      const addr = hi * 2 ** 32 + lo - flags;
      p += 8;
      if (flags & 0x10) break; // EOS
      if (flags & 0x04) {
        // MEM_SIZE: the block list
        for (let left = addr; left > 0; ) {
          const len = save[p] as number;
          left -= Number(save.readBigUInt64BE(p + 1 + len));
          p += 1 + len + 8;
        }
        continue;
      }
      if (!(flags & 0x20)) {
        const len = save[p] as number;
        block = save.toString('latin1', p + 1, p + 1 + len);
        p += 1 + len;
      }
      const at = (offsetOf.get(block) as number) + addr;
      if (flags & 0x02) {
        const fill = save[p] as number;
        if (!image.subarray(at, at + 4096).equals(Buffer.alloc(4096, fill))) throw new Error(`zero page ${block}@${addr} differs in the image`);
        p += 1;
        zeros++;
      } else {
        expect(flags & ~0x20).toBe(0x08);
        if (save.compare(image, at, at + 4096, p, p + 4096) !== 0) throw new Error(`page ${block}@${addr} differs in the image`);
        p += 4096;
        pages++;
      }
    }
    expect(save[p]).toBe(0x7e); // section footer
    p += 5;
  }
  return { pages, zeros };
}

const log = pino({ level: 'silent' });
let manifest: Manifest;
const saves = new Map<number, { a: string; b: string }>();

beforeAll(async () => {
  await execFile('bash', [join(ROOT, 'infra/guest/build.sh')], { cwd: ROOT, maxBuffer: 64 << 20 });
  await execFile('bash', [join(ROOT, 'infra/libvirt.sh'), 'start'], { cwd: ROOT, maxBuffer: 64 << 20 });
  manifest = JSON.parse(await readFile(join(GUEST, 'manifest.json'), 'utf8')) as Manifest;
  for (const mem of SIZES) saves.set(mem, await ensureSaves(manifest, mem));
}, 900_000);

describe.each(SIZES)('real libvirt save of the test guest with %i MiB', (memMiB) => {
  const out = join(WORK, `out-${memMiB}-${process.pid}`);
  beforeAll(async () => {
    await mkdir(out, { recursive: true });
  });
  afterAll(async () => {
    await rm(out, { recursive: true, force: true });
  });

  test('split → join rebuilds the file byte for byte; the image agrees with every page record', async () => {
    const { a } = saves.get(memMiB) as { a: string };
    let stats: SplitStats | undefined;
    const t0 = performance.now();
    const layout = await splitSnapshot(a, join(out, 'a.img'), { logger: log, onStats: (s) => (stats = s) });
    const t1 = performance.now();
    const joined = await joinSnapshot(layout.skeleton, join(out, 'a.img'), join(out, 'a.joined'));
    const t2 = performance.now();
    const original = await sha256File(a);
    expect(layout.mode).toBe('parsed');
    expect(joined.sha256).toBe(original);
    expect(await sha256File(join(out, 'a.joined'))).toBe(original);
    expect(layout.saveFileSha256).toBe(original);
    expect(joined.size).toBe(layout.saveFileSize);

    expect(layout.blocks[0]).toEqual({ name: 'pc.ram', size: memMiB * 1024 * 1024, imageOffset: 0 });
    const sum = layout.blocks.reduce((s, b) => s + Math.ceil(b.size / 4096) * 4096, 0);
    expect(layout.memImageSize).toBe(sum);
    const image = await readFile(join(out, 'a.img'));
    expect(image.length).toBe(layout.memImageSize);
    const checked = checkPagesAgainstImage(await readFile(a), image, layout);
    expect(checked).toEqual({ pages: stats?.pageRecords, zeros: stats?.zeroRecords });
    expect(checked.pages + checked.zeros).toBeGreaterThanOrEqual((memMiB * 1024 * 1024) / 4096); // every RAM page was sent

    // the device sections QEMU described in its JSON were all found
    expect(stats?.deviceSections).toEqual(expect.arrayContaining(['cpu', 'serial', '0000:00:02.0/virtio-net']));
    expect(stats?.vmdescBytes).toBeGreaterThan(0);
    expect(layout.skeleton.length).toBeLessThan(64 * 1024);
    console.log(
      `${memMiB} MiB guest: save file ${layout.saveFileSize} B, memory image ${layout.memImageSize} B, skeleton ${layout.skeleton.length} B ` +
        `(${stats?.runs} runs, ${stats?.literalBytes} literal bytes before deflate); split ${((layout.saveFileSize / (t1 - t0)) * 1e-3).toFixed(0)} MB/s, join ${((joined.size / (t2 - t1)) * 1e-3).toFixed(0)} MB/s`,
    );
  });

  test('two saves of the same running guest share nearly all memory chunks at the same address', async () => {
    const { a, b } = saves.get(memMiB) as { a: string; b: string };
    const la = await splitSnapshot(a, join(out, 'a2.img'), { logger: log });
    const lb = await splitSnapshot(b, join(out, 'b2.img'), { logger: log });
    expect(lb.blocks).toEqual(la.blocks);
    const [ia, ib] = await Promise.all([buildChunkIndex(join(out, 'a2.img')), buildChunkIndex(join(out, 'b2.img'))]);
    let same = 0;
    for (let i = 0; i < ia.chunkCount; i++) if (ib.equalAt(i, ia.digestAt(i))) same++;
    const share = same / ia.chunkCount;
    console.log(`${memMiB} MiB guest: ${same}/${ia.chunkCount} memory chunks equal at the same address (${(share * 100).toFixed(2)}%)`);
    expect(share).toBeGreaterThan(0.97);
    expect(share).toBeLessThan(1); // the guest did run between the saves
    expect((await joinSnapshot(lb.skeleton, join(out, 'b2.img'), join(out, 'b.joined'))).sha256).toBe(await sha256File(b));
  });

  test('the header: domain XML, CPU cookie, and an in-place XML edit that libvirt reads back', async () => {
    const { a } = saves.get(memMiB) as { a: string };
    const h = await readSaveHeader(a);
    expect(h.version).toBe(2);
    expect(h.wasRunning).toBe(true);
    expect(h.compressed).toBe(0);
    expect(h.domainXml).toMatch(new RegExp(`<name>sc-it-${memMiB}m-\\d+</name>`));
    expect(h.cookie).toMatch(/<cpu/);
    const layout = await splitSnapshot(a, join(out, 'h.img'), { logger: log });
    expect(layout.cpuModel).toBe('qemu64');
    expect(layout.domainXml).toBe(h.domainXml);

    const copy = join(out, 'edited.sav');
    await copyFile(a, copy);
    const marker = `sc-edited-${process.pid}`;
    await rewriteSaveHeaderXml(copy, h.domainXml.replace('</domain>', `  <description>${marker}</description>\n</domain>`));
    expect(await virsh('save-image-dumpxml', copy)).toContain(marker);
    const edited = await readSaveHeader(copy);
    expect(edited.cookie).toBe(h.cookie);
    expect(edited.qemuStreamOffset).toBe(h.qemuStreamOffset);
  });
});
