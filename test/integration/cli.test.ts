/**
 * The CLI end to end, in process (runCli with captured output), on real files:
 *   a base VM booted under libvirt and saved -> `base create` -> a launch VM resumed from it
 *   (qcow2 over the base disk), customized through its application, saved -> `overlay create` ->
 *   `base export` / `base import` into a second store -> `synthesize` reproduces the launch VM's
 *   memory snapshot byte for byte and its disk contents (qemu-img compare) -> `synthesize --resume`
 *   brings it back under libvirt and the application answers with the customized state.
 * Plus: typed errors with exit status 1 and JSON errors, and silence on stderr in pipes.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { z } from 'zod';
import { runCli } from '../../src/cli/main';
import { createLogger } from '../../src/common/logger';
import { LibvirtHypervisor, editDomainXml } from '../../src/hypervisor';
import { sha256File } from '../../src/core/store/files';
import { pollUntil } from '../helpers/poll';
import { Capture } from '../helpers/capture';

const run = promisify(execFile);
const ROOT = path.resolve(__dirname, '..', '..');
const GUEST = path.join(ROOT, 'var', 'guest');
const URI = 'qemu:///system';
const virsh = (...args: string[]) => run('virsh', ['-c', URI, ...args], { timeout: 120_000 });
const StateSchema = z.object({ token: z.string(), disk: z.string(), counter: z.number().int(), bootId: z.string() });

async function getState(port: number, pathAndQuery = '/cgi-bin/state'): Promise<z.infer<typeof StateSchema>> {
  const res = await fetch(`http://127.0.0.1:${port}${pathAndQuery}`, { signal: AbortSignal.timeout(5000) });
  if (res.status !== 200) throw new Error(`HTTP ${res.status}`);
  return StateSchema.parse(await res.json());
}

/** Run the CLI; returns exit status, stdout, stderr. */
async function cli(...argv: string[]): Promise<{ code: number; out: string; err: string }> {
  const stdout = new Capture();
  const stderr = new Capture();
  const code = await runCli(argv, { stdout, stderr, env: { ...process.env, CLOUDLET_STORE: '' } });
  return { code, out: stdout.text, err: stderr.text };
}

async function cliJson<T = Record<string, unknown>>(...argv: string[]): Promise<T> {
  const r = await cli('--json', ...argv);
  if (r.code !== 0) throw new Error(`cloudlet ${argv.join(' ')} exited ${r.code}: ${r.err}`);
  return JSON.parse(r.out) as T;
}

let dir: string;
let domain: string;
let storeA: string;
let storeB: string;
let baseId: string;
let launchDisk: string;
let launchSave: string;
let overlayFile: string;
let customized: z.infer<typeof StateSchema>;
const hv = new LibvirtHypervisor({ logger: createLogger('cli-test', 'warn') });

beforeAll(async () => {
  await run('bash', [path.join(ROOT, 'infra', 'guest', 'build.sh')], { cwd: ROOT, timeout: 600_000, maxBuffer: 16 << 20 });
  await run('bash', [path.join(ROOT, 'infra', 'libvirt.sh'), 'start'], { cwd: ROOT, timeout: 300_000 });
  const guest = JSON.parse(await fsp.readFile(path.join(GUEST, 'manifest.json'), 'utf8')) as { cmdline: string; readyLine: string };
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bp-cli-'));
  storeA = path.join(dir, 'storeA');
  storeB = path.join(dir, 'storeB');
  domain = `bp-cli-${randomBytes(4).toString('hex')}`;
  const disk = path.join(dir, 'base.raw');
  const serial = path.join(dir, 'base-serial.log');
  await fsp.copyFile(path.join(GUEST, 'disk.raw'), disk);
  const mac = `52:54:00:b1:${randomBytes(2).toString('hex').replace(/(..)(..)/, '$1:$2')}`;
  const xml = `<domain type='qemu'><name>${domain}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>${GUEST}/vmlinuz</kernel><initrd>${GUEST}/initrd.img</initrd><cmdline>${guest.cmdline}</cmdline></os>
  <cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='${disk}'/><target dev='vda' bus='virtio'/></disk>
    <interface type='user'><mac address='${mac}'/><model type='virtio'/></interface>
    <serial type='file'><source path='${serial}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices></domain>`;
  await fsp.writeFile(path.join(dir, 'domain.xml'), xml);
  await virsh('create', path.join(dir, 'domain.xml'));
  await pollUntil('the guest ready line', 120_000, async () => ((await fsp.readFile(serial, 'utf8').catch(() => '')).includes(guest.readyLine) ? true : undefined));
  await virsh('save', domain, path.join(dir, 'base.sav'));
}, 300_000);

afterAll(async () => {
  if (domain) await virsh('destroy', domain).catch(() => undefined);
  await hv.close();
  if (dir) await fsp.rm(dir, { recursive: true, force: true });
});

test('base create registers the saved VM; list and info show it', async () => {
  const created = await cliJson<{ baseId: string }>('--store', storeA, 'base', 'create', '--disk', path.join(dir, 'base.raw'), '--memory', path.join(dir, 'base.sav'));
  baseId = created.baseId;
  expect(baseId).toMatch(/^[0-9a-f]{64}$/);
  const list = await cliJson<Array<{ baseId: string; cpuModel: string }>>('--store', storeA, 'base', 'list');
  expect(list.map((b) => [b.baseId, b.cpuModel])).toEqual([[baseId, 'qemu64']]);
  const info = await cliJson<{ manifest: { memory: { mode: string } }; files: Record<string, { size: number }> }>('--store', storeA, 'base', 'info', baseId);
  expect(info.manifest.memory.mode).toBe('parsed');
  expect(info.files.disk?.size).toBe((await fsp.stat(path.join(dir, 'base.raw'))).size);
  // Text output in a pipe: a result on stdout, no progress on stderr.
  const text = await cli('--store', storeA, 'base', 'list');
  expect(text.code).toBe(0);
  expect(text.out).toContain(baseId);
  expect(text.err).toBe('');
}, 120_000);

test('a launch VM resumed from the base and customized becomes an overlay', async () => {
  // "Resume base": a qcow2 over the stored base disk, restored from the base's save file.
  const baseDir = path.join(storeA, 'bases', baseId);
  launchDisk = path.join(dir, 'launch.qcow2');
  launchSave = path.join(dir, 'launch.sav');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', path.join(baseDir, 'disk.raw'), '-F', 'raw', launchDisk]);
  const saved = await hv.saveFileXml(path.join(baseDir, 'memory.sav'));
  const xml = editDomainXml(saved, { diskPath: launchDisk, diskFormat: 'qcow2', serialPath: path.join(dir, 'launch-serial.log') });
  await hv.restore(path.join(baseDir, 'memory.sav'), { xml });
  const fwd = await hv.forwardPort(domain, { guestPort: 8080 });
  const token = `tok-${randomBytes(6).toString('hex')}`;
  const q = new URLSearchParams({ token, message: `customized by ${domain}` });
  customized = await pollUntil('the application to take the customization', 60_000, () => getState(fwd.hostPort, `/cgi-bin/set?${q.toString()}`));
  expect(customized.token).toBe(token);
  await hv.save(domain, launchSave);

  overlayFile = path.join(dir, 'launch.overlay');
  const r = await cliJson<{ path: string; sha256: string; size: number; baseId: string }>(
    '--store', storeA, 'overlay', 'create', '--base', baseId, '--disk', launchDisk, '--memory', launchSave, '-o', overlayFile, '--no-delta',
  );
  expect(r.path).toBe(overlayFile);
  expect(r.baseId).toBe(baseId);
  expect(r.sha256).toBe((await sha256File(overlayFile)).sha256);
  expect(r.size).toBeLessThan((await fsp.stat(launchSave)).size / 4);
  const meta = await cliJson<{ base: { id: string }; launch: { memory: { saveFileSha256: string } } }>('overlay', 'info', overlayFile);
  expect(meta.base.id).toBe(baseId);
  expect(meta.launch.memory.saveFileSha256).toBe((await sha256File(launchSave)).sha256);
  const listed = await cliJson<Array<{ digest: string }>>('--store', storeA, 'overlay', 'list');
  expect(listed.map((o) => o.digest)).toEqual([r.sha256]);
}, 300_000);

test('without -o the overlay goes into the store under its digest, and synthesize takes the digest', async () => {
  const r = await cliJson<{ path: string; sha256: string }>('--store', storeA, 'overlay', 'create', '--base', baseId.slice(0, 12), '--disk', launchDisk, '--memory', launchSave, '--lzma-level', '1');
  expect(r.path).toBe(path.join(storeA, 'overlays', `${r.sha256}.overlay`));
  expect((await sha256File(r.path)).sha256).toBe(r.sha256);
  const out = path.join(dir, 'synth-by-digest');
  const s = await cliJson<{ savePath: string }>('--store', storeA, 'synthesize', r.sha256, '--out', out);
  expect((await sha256File(s.savePath)).sha256).toBe((await sha256File(launchSave)).sha256);
  expect(await fsp.readdir(path.join(storeA, 'tmp'))).toEqual([]);
}, 300_000);

test('export + import into a second store, then synthesize reproduces the launch VM exactly', async () => {
  const pkg = path.join(dir, 'base.cbp');
  expect((await cliJson<{ baseId: string }>('--store', storeA, 'base', 'export', baseId, '-o', pkg)).baseId).toBe(baseId);
  const imported = await cliJson<{ baseId: string; alreadyPresent: boolean }>('--store', storeB, 'base', 'import', pkg);
  expect(imported).toMatchObject({ baseId, alreadyPresent: false });
  const out = path.join(dir, 'synth');
  const r = await cliJson<{ baseId: string; diskPath: string; savePath: string }>('--store', storeB, 'synthesize', overlayFile, '--out', out);
  expect(r.baseId).toBe(baseId);
  expect((await sha256File(r.savePath)).sha256).toBe((await sha256File(launchSave)).sha256);
  const cmp = await run('qemu-img', ['compare', launchDisk, r.diskPath]);
  expect(cmp.stdout).toMatch(/Images are identical/);
  // The synthesized disk is a qcow2 over the second store's base disk.
  const info = JSON.parse((await run('qemu-img', ['info', '--output=json', r.diskPath])).stdout) as { format: string; 'backing-filename'?: string };
  expect(info.format).toBe('qcow2');
  expect(info['backing-filename']).toBe(path.join(storeB, 'bases', baseId, 'disk.raw'));
}, 300_000);

test('synthesize --resume brings the VM back with the state set at customization time', async () => {
  const out = path.join(dir, 'resumed');
  const r = await cliJson<{ resumed: { domain: string; forward: { hostPort: number } } }>('--store', storeB, 'synthesize', overlayFile, '--out', out, '--resume', '--forward', '8080');
  expect(r.resumed.domain).toBe(domain);
  const state = await pollUntil('the resumed application', 60_000, () => getState(r.resumed.forward.hostPort));
  expect(state.token).toBe(customized.token);
  expect(state.disk).toBe(customized.disk);
  expect(state.bootId).toBe(customized.bootId);
  expect(state.counter).toBeGreaterThan(customized.counter);
  await virsh('destroy', domain);
}, 300_000);

test('failures are typed, exit 1, and say what went wrong (also as JSON)', async () => {
  const missing = await cli('--store', storeB, 'base', 'info', 'f'.repeat(64));
  expect(missing.code).toBe(1);
  expect(missing.err).toMatch(/^cloudlet: NOT_FOUND: base f{64} is not in the store/);
  expect(missing.err).not.toMatch(/\n\s+at /); // no stack trace without --debug

  const bad = await fsp.readFile(overlayFile);
  const at = Math.floor(bad.length * 0.75);
  bad[at] = (bad[at] ?? 0) ^ 0xff;
  const badFile = path.join(dir, 'bad.overlay');
  await fsp.writeFile(badFile, bad);
  const out = path.join(dir, 'bad-out');
  const r = await cli('--json', '--store', storeB, 'synthesize', badFile, '--out', out);
  expect(r.code).toBe(1);
  const e = (JSON.parse(r.out) as { error: { code: string; message: string } }).error;
  expect(['CORRUPT', 'DIGEST_MISMATCH']).toContain(e.code);
  await expect(fsp.stat(out)).rejects.toThrow(); // nothing left, not even the directory

  // An overlay applied to another base (same memory, other disk) is WRONG_BASE.
  const otherDisk = path.join(dir, 'other.raw');
  await fsp.writeFile(otherDisk, randomBytes(1 << 20));
  const other = await cliJson<{ baseId: string }>('--store', storeB, 'base', 'create', '--disk', otherDisk, '--memory', path.join(dir, 'base.sav'));
  const wrongOut = path.join(dir, 'wrong-out');
  const wrong = await cli('--store', storeB, 'synthesize', overlayFile, '--base', other.baseId, '--out', wrongOut);
  expect(wrong.code).toBe(1);
  expect(wrong.err).toMatch(/^cloudlet: WRONG_BASE: /);
  await expect(fsp.stat(wrongOut)).rejects.toThrow();

  const usage = await cli('synthesize');
  expect(usage.code).toBe(2);
  expect(usage.err).toMatch(/missing required argument/);
}, 120_000);
