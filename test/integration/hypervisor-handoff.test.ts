/**
 * The hypervisor adapter's handoff primitives against the real libvirtd and the test guest
 * (domain `hv-handoff-it`, 128 MiB): a disk snapshot while the guest runs, a live memory stream
 * that splits and after which `resume` brings the guest back, the exact stream of a paused
 * guest (pmemsave equals its pc.ram block byte for byte), and a restore of that stream whose
 * second stream (of the restored, never resumed domain) has a byte-identical memory image.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import pino from 'pino';
import { readSaveHeader, splitSnapshot, type SnapshotLayout } from '../../src/core/snapshot';
import { GuestAppClient } from '../../src/guest/app-client';
import { loadGuestImage, type GuestImage } from '../../src/guest/manifest';
import { createQcow2Overlay, LibvirtHypervisor, parseDomainXml } from '../../src/hypervisor';
import { ensureInfra, REPO } from '../helpers/infra';

const run = promisify(execFile);
const NAME = 'hv-handoff-it';
const MEMORY_MIB = 128;
const silent = pino({ level: 'silent' });

let hv: LibvirtHypervisor;
let dir: string;
let image: GuestImage;
const f = (name: string): string => path.join(dir, name);

/** Shared by the steps below, in order. */
const ctx: { bootId?: string; token?: string; port?: number; counter?: number; pausedLayout?: SnapshotLayout } = {};

async function cleanup(): Promise<void> {
  await hv.destroy(NAME);
  await hv.undefine(NAME);
}

async function forwardAndState(): Promise<{ port: number; state: Awaited<ReturnType<GuestAppClient['state']>> }> {
  const { hostPort } = await hv.forwardPort(NAME, { guestPort: image.appPort });
  const { state } = await new GuestAppClient(hostPort).waitForState(30_000);
  return { port: hostPort, state };
}

/** Indexes of the 4 KiB pages where a and b differ (a few, for the failure message). */
function differingPages(a: Buffer, b: Buffer, max = 8): number[] {
  const out: number[] = [];
  for (let i = 0; i < Math.max(a.length, b.length) && out.length < max; i += 4096) {
    if (!a.subarray(i, i + 4096).equals(b.subarray(i, i + 4096))) out.push(i / 4096);
  }
  return out;
}

function pcRam(layout: SnapshotLayout): { imageOffset: number; size: number } {
  const block = layout.blocks.find((b) => b.name === 'pc.ram');
  if (!block) throw new Error(`no pc.ram block in ${JSON.stringify(layout.blocks)}`);
  return block;
}

beforeAll(async () => {
  ensureInfra(['libvirt', 'guest']);
  image = loadGuestImage(path.join(REPO, 'var', 'guest'));
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hv-handoff-it-'));
  hv = new LibvirtHypervisor({ logger: silent });
  await cleanup();
}, 900_000);

afterAll(async () => {
  if (hv) {
    await cleanup();
    await hv.close();
  }
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('handoff primitives on a running test guest', () => {
  it('boots the guest on a qcow2 layer and sets a token in its application', async () => {
    await createQcow2Overlay(f('a.qcow2'), image.diskPath, image.diskFormat);
    await hv.defineDomain({
      name: NAME, memoryMiB: MEMORY_MIB, vcpus: 1,
      kernel: image.kernelPath, initrd: image.initrdPath, cmdline: image.cmdline,
      disk: { path: f('a.qcow2'), format: 'qcow2' },
      nic: { mac: '52:54:00:c1:0a:01' },
      serialPath: f('serial-a.log'),
    });
    await hv.start(NAME);
    const ready = await hv.waitForSerialLine(f('serial-a.log'), image.readyPattern, 90_000);
    ctx.bootId = image.readyPattern.exec(ready)?.[1];
    expect(ctx.bootId).toBeTruthy();
    const { hostPort } = await hv.forwardPort(NAME, { guestPort: image.appPort });
    ctx.port = hostPort;
    ctx.token = `tok-${process.pid}-${Date.now()}`;
    await new GuestAppClient(hostPort).waitForState(30_000);
    const set = await new GuestAppClient(hostPort).set(ctx.token, 'before-handoff');
    expect(set).toMatchObject({ token: ctx.token, bootId: ctx.bootId });
    ctx.counter = set.counter;
  });

  it('snapshotDisk: later writes go to a new top whose backing file is the old top; the guest keeps running', async () => {
    expect(await hv.diskTop(NAME)).toBe(f('a.qcow2'));
    const r = await hv.snapshotDisk(NAME, f('t1.qcow2'));
    expect(r.previousTop).toBe(f('a.qcow2'));
    expect(r.ms).toBeGreaterThan(0);
    expect(fs.existsSync(f('t1.qcow2'))).toBe(true);
    expect(await hv.diskTop(NAME)).toBe(f('t1.qcow2'));
    // -U: QEMU holds the image's write lock.
    const info = JSON.parse((await run('qemu-img', ['info', '-U', '--output', 'json', f('t1.qcow2')])).stdout) as Record<string, unknown>;
    expect(info).toMatchObject({ format: 'qcow2', 'full-backing-filename': f('a.qcow2'), 'backing-filename-format': 'qcow2' });
    expect(await hv.state(NAME)).toBe('running');
    await expect(hv.snapshotDisk(NAME, f('t1.qcow2'))).rejects.toMatchObject({ code: 'CONFLICT', message: expect.stringContaining(f('t1.qcow2')) });
    const after = await new GuestAppClient(ctx.port ?? 0).set(ctx.token ?? '', 'after-disk-snapshot');
    expect(after.bootId).toBe(ctx.bootId);
  });

  it('streamMemory of the running domain: a save file that splits; the domain is paused after it and resume brings it back', async () => {
    const progress: number[] = [];
    const r = await hv.streamMemory(NAME, f('live.save'), { onProgress: (b) => progress.push(b) });
    expect(r.wasRunning).toBe(true);
    expect(r.bytes).toBe(fs.statSync(f('live.save')).size);
    expect(progress[progress.length - 1]).toBe(r.bytes);
    expect(fs.existsSync(f('live.save.tmp'))).toBe(false);
    expect(typeof r.downtimeMs).toBe('number');
    expect(await hv.state(NAME)).toBe('paused');

    const header = await readSaveHeader(f('live.save'));
    expect(header.wasRunning).toBe(true);
    expect(parseDomainXml(header.domainXml).disks[0]?.path).toBe(f('t1.qcow2'));
    expect(header.cookie).toMatch(/^<cookie>[\s\S]*<model[^>]*>qemu64<\/model>/);
    const layout = await splitSnapshot(f('live.save'), f('live.img'), { logger: silent });
    expect(layout.mode).toBe('parsed');
    expect(pcRam(layout).size).toBe(MEMORY_MIB * 1048576);
    expect(layout.cpuModel).toBe('qemu64');
    fs.rmSync(f('live.img'));

    await hv.resume(NAME);
    expect(await hv.state(NAME)).toBe('running');
    const state = await new GuestAppClient(ctx.port ?? 0).waitForState(15_000);
    expect(state.state).toMatchObject({ token: ctx.token, bootId: ctx.bootId });
    expect(state.state.counter).toBeGreaterThan(ctx.counter ?? 0);
  });

  it('streamMemory of the paused domain is exact: its pc.ram block equals pmemsave; QEMU refuses a second stream before a resume', async () => {
    await hv.suspend(NAME);
    const r = await hv.streamMemory(NAME, f('paused.save'));
    expect(r.wasRunning).toBe(false);
    expect(await hv.state(NAME)).toBe('paused');
    await expect(hv.streamMemory(NAME, f('again.save'))).rejects.toMatchObject({ code: 'CONFLICT', message: expect.stringMatching(/paused after a completed memory stream/) });
    expect(fs.existsSync(f('again.save'))).toBe(false);
    expect(fs.existsSync(f('again.save.tmp'))).toBe(false);

    const layout = await splitSnapshot(f('paused.save'), f('paused.img'), { logger: silent });
    expect(layout.mode).toBe('parsed');
    ctx.pausedLayout = layout;
    const ram = pcRam(layout);
    await hv.pmemsave(NAME, f('paused.pmem'), ram.size);
    const pmem = fs.readFileSync(f('paused.pmem'));
    const img = fs.readFileSync(f('paused.img')).subarray(ram.imageOffset, ram.imageOffset + ram.size);
    expect(pmem.length).toBe(ram.size);
    expect(differingPages(pmem, img)).toEqual([]);
    fs.rmSync(f('paused.pmem'));
  });

  it('restore of the paused stream (source destroyed first): the same memory, byte for byte, and the application answers', async () => {
    await hv.destroy(NAME);
    const restored = await hv.restore(f('paused.save'), { serialPath: f('serial-b.log'), paused: true });
    expect(restored.name).toBe(NAME);
    expect(await hv.state(NAME)).toBe('paused');
    expect(await hv.diskTop(NAME)).toBe(f('t1.qcow2'));

    // Not resumed since the restore: a second stream holds the same memory image.
    const r = await hv.streamMemory(NAME, f('restored.save'));
    expect(r.wasRunning).toBe(false);
    const layout = await splitSnapshot(f('restored.save'), f('restored.img'), { logger: silent });
    expect(layout.blocks).toEqual(ctx.pausedLayout?.blocks);
    expect(differingPages(fs.readFileSync(f('restored.img')), fs.readFileSync(f('paused.img')))).toEqual([]);

    await hv.resume(NAME);
    const { state } = await forwardAndState();
    expect(state).toMatchObject({ token: ctx.token, bootId: ctx.bootId, disk: 'after-disk-snapshot' });
  });
});
