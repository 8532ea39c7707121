/**
 * Base packages from a REAL base VM: the test guest booted under libvirt (a minimal domain XML
 * with direct kernel boot, through virsh), saved with `virsh save` once its ready line appears.
 * createBase -> exportBase -> importBase into a second store must give identical files and
 * digests, and the stored skeleton + memory image must rebuild the save file byte for byte.
 * Also: a damaged real package leaves nothing behind, and indexing a 1 GiB disk runs near
 * SHA-256 speed.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { computeBaseId, createBase, exportBase, importBase, openBase, readPackageManifest } from '../../src/core/base';
import type { BaseManifest } from '../../src/core/base';
import { buildChunkIndex } from '../../src/core/chunk';
import { CloudletError } from '../../src/core/errors';
import { joinSnapshot } from '../../src/core/snapshot';
import { sha256File } from '../../src/core/store/files';

const run = promisify(execFile);
const ROOT = path.resolve(__dirname, '..', '..');
const GUEST = path.join(ROOT, 'var', 'guest');
const URI = 'qemu:///system';
const virsh = (...args: string[]) => run('virsh', ['-c', URI, ...args], { timeout: 120_000 });

async function pollUntil(what: string, timeoutMs: number, check: () => Promise<boolean>): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

function domainXml(name: string, disk: string, serial: string, cmdline: string, memoryMiB: number): string {
  return `<domain type='qemu'>
  <name>${name}</name>
  <memory unit='MiB'>${memoryMiB}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>${GUEST}/vmlinuz</kernel><initrd>${GUEST}/initrd.img</initrd><cmdline>${cmdline}</cmdline></os>
  <cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='${disk}'/><target dev='vda' bus='virtio'/></disk>
    <interface type='user'><mac address='52:54:00:b0:${randomBytes(2).toString('hex').replace(/(..)(..)/, '$1:$2')}'/><model type='virtio'/></interface>
    <serial type='file'><source path='${serial}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>`;
}

let dir: string;
let domain: string;
let diskPath: string;
let savePath: string;
let manifest: BaseManifest;

beforeAll(async () => {
  await run('bash', [path.join(ROOT, 'infra', 'guest', 'build.sh')], { cwd: ROOT, timeout: 600_000, maxBuffer: 16 << 20 });
  await run('bash', [path.join(ROOT, 'infra', 'libvirt.sh'), 'start'], { cwd: ROOT, timeout: 300_000 });
  const guest = JSON.parse(await fsp.readFile(path.join(GUEST, 'manifest.json'), 'utf8')) as { cmdline: string; readyLine: string };
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bp-base-'));
  domain = `bp-base-${randomBytes(4).toString('hex')}`;
  diskPath = path.join(dir, 'base.raw');
  savePath = path.join(dir, 'base.sav');
  const serial = path.join(dir, 'serial.log');
  await fsp.copyFile(path.join(GUEST, 'disk.raw'), diskPath);
  const xmlFile = path.join(dir, 'domain.xml');
  await fsp.writeFile(xmlFile, domainXml(domain, diskPath, serial, guest.cmdline, 128));
  await virsh('create', xmlFile);
  await pollUntil(`"${guest.readyLine}" on the serial console of ${domain}`, 120_000, async () =>
    (await fsp.readFile(serial, 'utf8').catch(() => '')).includes(guest.readyLine),
  );
  await virsh('save', domain, savePath);
}, 300_000);

afterAll(async () => {
  if (domain) await virsh('destroy', domain).catch(() => undefined);
  if (dir) await fsp.rm(dir, { recursive: true, force: true });
});

test('createBase indexes a real base VM', async () => {
  const store = path.join(dir, 'storeA');
  manifest = await createBase({ diskPath, savePath, storeRoot: store });
  const disk = await sha256File(diskPath);
  const save = await sha256File(savePath);
  expect(manifest.baseId).toBe(computeBaseId(disk, save));
  expect(manifest.memory.mode).toBe('parsed');
  expect(manifest.memory.blocks.find((b) => b.name === 'pc.ram')).toEqual({ name: 'pc.ram', size: 128 * 1024 * 1024, imageOffset: 0 });
  expect(manifest.domainXml).toContain(`<name>${domain}</name>`);
  expect(manifest.cpuModel).toBe('qemu64');
  const base = await openBase(store, manifest.baseId);
  expect(base.diskIndex.chunkCount).toBe(disk.size / 4096);
  expect(base.memIndex.byteLength).toBe(manifest.memory.imageSize);
}, 120_000);

test('export -> import into a second store gives identical digests; the save file rebuilds byte for byte', async () => {
  const pkg = path.join(dir, 'base.cbp');
  await exportBase(path.join(dir, 'storeA'), manifest.baseId, pkg);
  expect(await readPackageManifest(pkg)).toEqual(manifest);
  const storeB = path.join(dir, 'storeB');
  const r = await importBase(storeB, pkg);
  expect(r).toEqual({ manifest, alreadyPresent: false });
  const a = await openBase(path.join(dir, 'storeA'), manifest.baseId);
  const b = await openBase(storeB, manifest.baseId);
  for (const f of ['disk.raw', 'memory.sav', 'memory.img', 'memory.skeleton', 'disk.idx', 'memory.idx', 'manifest.json']) {
    expect((await sha256File(path.join(b.dir, f))).sha256).toBe((await sha256File(path.join(a.dir, f))).sha256);
  }
  for (let i = 0; i < a.memIndex.chunkCount; i += 97) expect(b.memIndex.equalAt(i, a.memIndex.digestAt(i))).toBe(true);
  const rebuilt = path.join(dir, 'rebuilt.sav');
  const joined = await joinSnapshot(await fsp.readFile(b.skeletonPath), b.memImagePath, rebuilt);
  expect(joined).toEqual({ size: manifest.memory.saveFileSize, sha256: manifest.memory.saveFileSha256 });
  expect((await sha256File(rebuilt)).sha256).toBe((await sha256File(savePath)).sha256);
  expect((await importBase(storeB, pkg)).alreadyPresent).toBe(true);
}, 180_000);

test('a real package with one flipped byte in the memory snapshot is rejected and leaves nothing', async () => {
  const pkg = await fsp.readFile(path.join(dir, 'base.cbp'));
  const at = pkg.indexOf(Buffer.from('QEVM')) + 200_000;
  pkg[at] = (pkg[at] ?? 0) ^ 1;
  const bad = path.join(dir, 'bad.cbp');
  await fsp.writeFile(bad, pkg);
  const storeC = path.join(dir, 'storeC');
  const err = await importBase(storeC, bad).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(CloudletError);
  expect((err as CloudletError).code).toBe('DIGEST_MISMATCH');
  expect((err as Error).message).toContain('memory.sav');
  expect(await fsp.readdir(path.join(storeC, 'bases'))).toEqual([]);
  expect(await fsp.readdir(path.join(storeC, 'tmp'))).toEqual([]);
}, 120_000);

test('indexing a 1 GiB disk runs near SHA-256 speed', async () => {
  const big = path.join(dir, 'big.raw');
  const block = randomBytes(64 << 20);
  block.writeUInt32LE(0, 0);
  const firstChunk = createHash('sha256').update(block.subarray(0, 4096)).digest();
  const fh = await fsp.open(big, 'w');
  for (let i = 0; i < 16; i++) {
    block.writeUInt32LE(i, 0);
    await fh.write(block);
  }
  await fh.close();
  await sha256File(big); // warm the page cache: both measurements read from memory
  let t = performance.now();
  const whole = await sha256File(big);
  const hashMs = performance.now() - t;
  t = performance.now();
  const ix = await buildChunkIndex(big);
  const indexMs = performance.now() - t;
  expect(whole.size).toBe(1 << 30);
  expect(ix.chunkCount).toBe((1 << 30) / 4096);
  expect(ix.digestAt(0)).toEqual(firstChunk);
  console.log(`1 GiB: sha256 of the file ${hashMs.toFixed(0)} ms, chunk index ${indexMs.toFixed(0)} ms (${((1 << 30) / 1e6 / (indexMs / 1000)).toFixed(0)} MB/s)`);
  expect(indexMs).toBeLessThan(2.5 * hashMs);
  await fsp.rm(big);
}, 180_000);
