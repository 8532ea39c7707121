/**
 * The hypervisor adapter against the real libvirtd (infra/libvirt.sh) and the test guest
 * (infra/guest/build.sh): boot from a qcow2 layer, forward a port, change the application's
 * in-memory state, save, restore with a new disk path and serial file, replug the NIC with a new
 * MAC, forward again, and find the same boot and state. Plus the failures callers rely on.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { z } from 'zod';
import { CloudletError } from '../../src/core/errors';
import { createQcow2Overlay, editDomainXml, LibvirtHypervisor, parseDomainXml, serialSize, virtTypeVerdict } from '../../src/hypervisor';
import type { DomainSpec } from '../../src/hypervisor';

const ROOT = path.resolve(__dirname, '..', '..');
const GUEST = path.join(ROOT, 'var', 'guest');
const run = promisify(execFile);

const ManifestSchema = z.object({
  kernel: z.string(),
  initrd: z.string(),
  disk: z.string(),
  cmdline: z.string(),
  readyLine: z.string(),
  netUpLine: z.string(),
  appPort: z.number().int(),
  defaultMemoryMiB: z.number().int(),
});
const StateSchema = z.object({ token: z.string(), disk: z.string(), counter: z.number().int(), bootId: z.string().min(8) });

const NAME = 'hv-it';
let hv: LibvirtHypervisor;
let dir: string;
let manifest: z.infer<typeof ManifestSchema>;

function spec(overrides: Partial<DomainSpec> = {}): DomainSpec {
  return {
    name: NAME,
    memoryMiB: manifest.defaultMemoryMiB,
    vcpus: 1,
    kernel: path.join(GUEST, manifest.kernel),
    initrd: path.join(GUEST, manifest.initrd),
    cmdline: manifest.cmdline,
    disk: { path: path.join(dir, 'a.qcow2'), format: 'qcow2' },
    nic: { mac: '52:54:00:c1:00:01' },
    serialPath: path.join(dir, 'serial-a.log'),
    ...overrides,
  };
}

/** GET on the forwarded port until the guest answers (slirp needs a moment after a forward/replug). */
async function getState(port: number, query: string, timeoutMs = 30000): Promise<z.infer<typeof StateSchema>> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const res = await fetch(`http://127.0.0.1:${port}${query}`, { signal: AbortSignal.timeout(3000) });
      if (res.ok) return StateSchema.parse(await res.json());
      last = new Error(`HTTP ${res.status}`);
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`the guest app did not answer on 127.0.0.1:${port}${query} within ${timeoutMs} ms: ${String(last)}`);
}

async function cleanup(): Promise<void> {
  for (const name of [NAME, `${NAME}-nokernel`, `${NAME}-renamed`]) {
    await hv.destroy(name);
    await hv.undefine(name);
  }
}

beforeAll(async () => {
  await run('bash', [path.join(ROOT, 'infra', 'libvirt.sh'), 'start'], { cwd: ROOT, timeout: 600_000 });
  await run('bash', [path.join(ROOT, 'infra', 'guest', 'build.sh')], { cwd: ROOT, timeout: 600_000, maxBuffer: 16 << 20 });
  manifest = ManifestSchema.parse(JSON.parse(fs.readFileSync(path.join(GUEST, 'manifest.json'), 'utf8')));
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hv-it-'));
  hv = new LibvirtHypervisor();
  await cleanup();
}, 900_000);

afterAll(async () => {
  if (hv) {
    await cleanup();
    await hv.close();
  }
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('a guest under libvirt', () => {
  it('detects the virt type (qemu here: /dev/kvm exists but KVM guests hang)', async () => {
    const t = await hv.virtType();
    const verdict = await virtTypeVerdict();
    expect(verdict.virtType).toBe(t);
    if (process.env.CLOUDLET_VIRT_TYPE) expect(verdict.reason).toBe(`CLOUDLET_VIRT_TYPE=${t}`);
    else if (t === 'kvm') expect(verdict.reason).toMatch(/reached long mode/);
    else expect(verdict.reason).toMatch(/\/dev\/kvm|under TCG/);
    const usable = await hv.usableCpuModels(t);
    expect(usable).toContain('qemu64');
  });

  it('boots, saves, restores on a new disk, replugs the NIC and keeps its state', async () => {
    const base = path.join(dir, 'base.raw');
    fs.copyFileSync(path.join(GUEST, manifest.disk), base);
    await createQcow2Overlay(path.join(dir, 'a.qcow2'), base, 'raw');

    await hv.defineDomain(spec());
    expect(await hv.state(NAME)).toBe('shut off');
    await hv.start(NAME);
    const ready = await hv.waitForSerialLine(path.join(dir, 'serial-a.log'), new RegExp(`^${manifest.readyLine} bootId=`), 90_000);
    const bootId = /bootId=(\S+)/.exec(ready)?.[1];
    expect(bootId).toBeTruthy();
    expect(await hv.state(NAME)).toBe('running');

    const fwd = await hv.forwardPort(NAME, { guestPort: manifest.appPort });
    expect(fwd.hostAddress).toBe('127.0.0.1');
    const token = `tok-${process.pid}-${Date.now()}`;
    const set = await getState(fwd.hostPort, `/cgi-bin/set?token=${token}&message=hello-${process.pid}`);
    expect(set).toMatchObject({ token, disk: `hello-${process.pid}`, bootId });

    const saveFile = path.join(dir, 'memory.save');
    const saved = await hv.save(NAME, saveFile);
    expect(saved.ms).toBeGreaterThan(0);
    expect(await hv.state(NAME)).toBe('shut off');
    expect(parseDomainXml(await hv.saveFileXml(saveFile)).disks[0]?.path).toBe(path.join(dir, 'a.qcow2'));

    // The instance's disk moves: copy the layer, restore on the copy, drop the original.
    fs.copyFileSync(path.join(dir, 'a.qcow2'), path.join(dir, 'b.qcow2'));
    fs.rmSync(path.join(dir, 'a.qcow2'));
    const serialB = path.join(dir, 'serial-b.log');
    const restored = await hv.restore(saveFile, { diskPath: path.join(dir, 'b.qcow2'), serialPath: serialB });
    expect(restored.name).toBe(NAME);
    expect(await hv.state(NAME)).toBe('running');
    const liveXml = await hv.domainXml(NAME);
    const live = parseDomainXml(liveXml);
    expect(live.virtType).toBe(await hv.virtType());
    // The guest keeps the machine and the CPU model it was saved with.
    expect(liveXml).toMatch(/machine='pc-q35-/);
    expect(live.cpuModel).toBe(parseDomainXml(await hv.saveFileXml(saveFile)).cpuModel);
    expect(live.cpuModel).toBe('qemu64');
    expect(live.disks[0]?.path).toBe(path.join(dir, 'b.qcow2'));
    expect(live.serialPaths).toEqual([serialB]);
    expect(live.interfaces.map((i) => i.mac)).toEqual(['52:54:00:c1:00:01']);
    // A second restore while it runs: CONFLICT, and the running VM is untouched.
    await expect(hv.restore(saveFile, { diskPath: path.join(dir, 'b.qcow2'), serialPath: serialB })).rejects.toMatchObject({ code: 'CONFLICT' });
    expect(await hv.state(NAME)).toBe('running');

    const from = await serialSize(serialB);
    const replug = await hv.replugNic(NAME, { mac: '52:54:00:c1:00:02' });
    expect(replug).toMatchObject({ oldMac: '52:54:00:c1:00:01', newMac: '52:54:00:c1:00:02' });
    expect(replug.detachMs).toBeGreaterThan(0);
    expect(replug.attachMs).toBeGreaterThan(0);
    const after = parseDomainXml(await hv.domainXml(NAME));
    expect(after.interfaces.map((i) => [i.type, i.mac, i.model])).toEqual([['user', '52:54:00:c1:00:02', 'virtio']]);
    // The guest configures the new NIC and says so on its console.
    await hv.waitForSerialLine(serialB, new RegExp(`^${manifest.netUpLine} .*mac=52:54:00:c1:00:02 bootId=${bootId}`), 20_000, from);

    const fwd2 = await hv.forwardPort(NAME, { guestPort: manifest.appPort });
    const state = await getState(fwd2.hostPort, '/cgi-bin/state');
    expect(state).toMatchObject({ token, disk: `hello-${process.pid}`, bootId });
    expect(state.counter).toBeGreaterThan(set.counter);
  });

  it('refuses to restore a save file under another name or UUID (libvirt checks both)', async () => {
    await hv.destroy(NAME);
    const saveFile = path.join(dir, 'memory.save');
    const xml = await hv.saveFileXml(saveFile);
    const renamed = editDomainXml(xml, { name: `${NAME}-renamed`, diskPath: path.join(dir, 'b.qcow2') });
    await expect(hv.restore(saveFile, { xml: renamed })).rejects.toThrow(/Target domain name '.*-renamed' does not match source/);
    const reuuid = editDomainXml(xml, { uuid: '6c6f7564-0000-4000-8000-000000000001', diskPath: path.join(dir, 'b.qcow2') });
    await expect(hv.restore(saveFile, { xml: reuuid })).rejects.toThrow(/Target domain uuid .* does not match source/);
    expect(await hv.state(`${NAME}-renamed`)).toBe('absent');
  });
});

describe('clear errors', () => {
  it('a CPU model that is not usable: CPU_MODEL_UNUSABLE, non-retryable, naming what is missing', async () => {
    const t = await hv.virtType();
    const err = (await hv.checkCpuModel('Haswell', t).catch((e: unknown) => e)) as CloudletError;
    if (t === 'qemu') {
      expect(err).toBeInstanceOf(CloudletError);
      expect(err.code).toBe('CPU_MODEL_UNUSABLE');
      expect(err.retryable).toBe(false);
      expect(err.message).toMatch(/CPU model "Haswell" is not usable with virt type qemu/);
      expect(err.message).toMatch(/Fix: use a usable model such as qemu64/);
      expect(err.details.missingFeatures).toEqual(expect.arrayContaining([expect.any(String)]));
    }
    await expect(hv.checkCpuModel('NoSuchCpu', t)).rejects.toMatchObject({ code: 'CPU_MODEL_UNUSABLE' });
    await expect(hv.checkCpuModel('qemu64', t)).resolves.toBeUndefined();
  });

  it('an unknown domain: NOT_FOUND naming it', async () => {
    await expect(hv.start('hv-it-no-such-domain')).rejects.toMatchObject({
      code: 'NOT_FOUND',
      message: expect.stringMatching(/domain "hv-it-no-such-domain" is not defined on qemu:\/\/\/system/),
    });
    await expect(hv.forwardPort('hv-it-no-such-domain', { guestPort: 80 })).rejects.toMatchObject({ code: 'NOT_FOUND' });
    expect(await hv.state('hv-it-no-such-domain')).toBe('absent');
  });

  it('a missing kernel: NOT_FOUND naming the path and the fix', async () => {
    const missing = path.join(dir, 'no-vmlinuz');
    await expect(hv.defineDomain(spec({ name: `${NAME}-nokernel`, kernel: missing }))).rejects.toMatchObject({
      code: 'NOT_FOUND',
      message: expect.stringContaining(`kernel of domain "${NAME}-nokernel" ${missing} does not exist. Fix: build the guest (bash infra/guest/build.sh)`),
    });
    await expect(hv.restore(path.join(dir, 'no-such.save'))).rejects.toMatchObject({ code: 'NOT_FOUND', message: expect.stringContaining('no-such.save') });
  });

  it('libvirtd not reachable: HYPERVISOR_UNAVAILABLE with the command that starts it', async () => {
    const off = new LibvirtHypervisor({ uri: `qemu+unix:///system?socket=${path.join(dir, 'no-such.sock')}` });
    await expect(off.state('hv-it')).rejects.toMatchObject({
      code: 'HYPERVISOR_UNAVAILABLE',
      message: expect.stringContaining('bash infra/libvirt.sh start'),
    });
    await off.close();
  });
});
