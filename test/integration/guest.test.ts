/**
 * The test guest (infra/guest/build.sh, docs/test-guest.md) under plain QEMU with TCG: no libvirt.
 * Builds (or finds cached) var/guest, boots it, talks to its stateful application through a user-mode
 * network forward, runs a recipe through /cgi-bin/exec, then replugs the NIC through QMP (device_del,
 * netdev_add with a new forward, device_add with a new MAC) and checks the same in-memory state
 * answers on the new forward. Also boots at 128 and 512 MiB.
 */
import { execFile, spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { z } from 'zod';
import { pollUntil } from '../helpers/poll';

const ROOT = path.resolve(__dirname, '..', '..');
const GUEST_DIR = path.join(ROOT, 'var', 'guest');
const BUILD_SCRIPT = path.join(ROOT, 'infra', 'guest', 'build.sh');
const INITIAL_MESSAGE = fs.readFileSync(path.join(ROOT, 'infra', 'guest', 'disk', 'app', 'message.txt'), 'utf8');

const FileSchema = z.object({ sha256: z.string().regex(/^[0-9a-f]{64}$/), size: z.number().int().positive() });
const ManifestSchema = z.object({
  format: z.literal(1),
  kernel: z.string(),
  initrd: z.string(),
  disk: z.string(),
  diskFormat: z.literal('raw'),
  cmdline: z.string(),
  inputsDigest: z.string().regex(/^[0-9a-f]{64}$/),
  kernelVersion: z.string(),
  readyLine: z.string(),
  netUpLine: z.string(),
  appPort: z.number().int(),
  defaultMemoryMiB: z.number().int(),
  files: z.record(z.string(), FileSchema),
});
type Manifest = z.infer<typeof ManifestSchema>;

const StateSchema = z.object({ token: z.string(), disk: z.string(), counter: z.number().int(), bootId: z.string().min(8) });
type GuestState = z.infer<typeof StateSchema>;
const ExecSchema = z.object({ exitCode: z.number().int(), output: z.string() });

const run = promisify(execFile);

async function buildGuest(): Promise<{ manifest: Manifest; log: string; seconds: number }> {
  const started = Date.now();
  const { stderr } = await run('bash', [BUILD_SCRIPT], { cwd: ROOT, timeout: 600_000, maxBuffer: 16 << 20 });
  const manifest = ManifestSchema.parse(JSON.parse(fs.readFileSync(path.join(GUEST_DIR, 'manifest.json'), 'utf8')));
  return { manifest, log: stderr, seconds: (Date.now() - started) / 1000 };
}

function sha256File(file: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (address && typeof address === 'object' ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}

/** Calls `attempt` until it returns a value (not undefined) or throws no more, until the deadline. */

async function httpGet(port: number, urlPath: string): Promise<{ status: number; body: string }> {
  const res = await fetch(`http://127.0.0.1:${port}${urlPath}`, { signal: AbortSignal.timeout(10_000) });
  return { status: res.status, body: await res.text() };
}

async function getState(port: number): Promise<GuestState> {
  const { status, body } = await httpGet(port, '/cgi-bin/state');
  expect(status).toBe(200);
  return StateSchema.parse(JSON.parse(body));
}

/** A minimal QMP client: one command at a time, events kept for waitEvent. */
class Qmp {
  private buffer = '';
  private readonly events: Array<{ event: string; data: Record<string, unknown> }> = [];
  private readonly listeners: Array<() => void> = [];
  private pending: { resolve: (v: unknown) => void; reject: (e: Error) => void } | undefined;

  private constructor(private readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      this.buffer += chunk;
      let nl: number;
      while ((nl = this.buffer.indexOf('\n')) >= 0) {
        const line = this.buffer.slice(0, nl).trim();
        this.buffer = this.buffer.slice(nl + 1);
        if (line) this.onMessage(z.record(z.string(), z.unknown()).parse(JSON.parse(line)));
      }
    });
  }

  static async connect(socketPath: string, timeoutMs: number): Promise<Qmp> {
    const socket = await pollUntil(`QMP socket ${socketPath}`, timeoutMs, () =>
      new Promise<net.Socket>((resolve, reject) => {
        const s = net.createConnection(socketPath, () => resolve(s));
        s.once('error', reject);
      }),
    );
    const qmp = new Qmp(socket);
    await qmp.execute('qmp_capabilities');
    return qmp;
  }

  private onMessage(msg: Record<string, unknown>): void {
    if (typeof msg.event === 'string') {
      this.events.push({ event: msg.event, data: z.record(z.string(), z.unknown()).catch({}).parse(msg.data) });
      for (const l of this.listeners.splice(0)) l();
    } else if ('return' in msg || 'error' in msg) {
      const p = this.pending;
      this.pending = undefined;
      if ('error' in msg) p?.reject(new Error(`QMP error: ${JSON.stringify(msg.error)}`));
      else p?.resolve(msg.return);
    }
  }

  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    if (this.pending) throw new Error('one QMP command at a time');
    return new Promise((resolve, reject) => {
      this.pending = { resolve, reject };
      this.socket.write(`${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`);
    });
  }

  /** A human monitor command (e.g. netdev_add, hostfwd_add); throws when it prints an error. */
  async hmp(commandLine: string): Promise<string> {
    const out = z.string().parse(await this.execute('human-monitor-command', { 'command-line': commandLine }));
    if (out.trim()) throw new Error(`monitor command "${commandLine}" failed: ${out.trim()}`);
    return out;
  }

  async waitEvent(event: string, match: (data: Record<string, unknown>) => boolean, timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.events.some((e) => e.event === event && match(e.data))) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`QMP event ${event} did not come within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.listeners.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  close(): void {
    this.socket.destroy();
  }
}

interface BootedGuest {
  qemu: ChildProcess;
  qmp: Qmp;
  serialPath: string;
  hostPort: number;
  bootId: string;
  readySeconds: number;
  guestUptimeSeconds: number;
  serial(): string;
  kill(): Promise<void>;
}

async function bootGuest(manifest: Manifest, workDir: string, memoryMiB: number): Promise<BootedGuest> {
  const serialPath = path.join(workDir, `serial-${memoryMiB}.log`);
  const qmpPath = path.join(workDir, `qmp-${memoryMiB}.sock`);
  const hostPort = await freePort();
  const args = [
    '-accel', 'tcg', '-m', String(memoryMiB), '-smp', '1', '-nodefaults', '-no-user-config',
    '-kernel', path.join(GUEST_DIR, manifest.kernel),
    '-initrd', path.join(GUEST_DIR, manifest.initrd),
    '-append', manifest.cmdline,
    // snapshot=on: writes go to a temporary overlay, the built disk stays pristine.
    '-drive', `file=${path.join(GUEST_DIR, manifest.disk)},if=virtio,format=raw,snapshot=on`,
    '-netdev', `user,id=n0,hostfwd=tcp:127.0.0.1:${hostPort}-:${manifest.appPort}`,
    '-device', 'virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:7e:00:01',
    '-serial', `file:${serialPath}`,
    '-display', 'none', '-monitor', 'none',
    '-qmp', `unix:${qmpPath},server=on,wait=off`,
  ];
  const started = Date.now();
  const qemu = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  qemu.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => qemu.once('exit', () => resolve()));
  const serial = (): string => (fs.existsSync(serialPath) ? fs.readFileSync(serialPath, 'utf8') : '');
  const kill = async (): Promise<void> => {
    if (qemu.exitCode !== null || qemu.signalCode !== null) return;
    qemu.kill('SIGTERM');
    const t = setTimeout(() => qemu.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(t);
  };
  try {
    const readyRe = new RegExp(`^${manifest.readyLine} bootId=(\\S+)\\s*$`, 'm');
    const bootId = await pollUntil(`ready line "${manifest.readyLine}" on the serial console`, 90_000, async () => {
      if (qemu.exitCode !== null) throw new Error(`QEMU exited with ${qemu.exitCode}: ${stderr}`);
      return readyRe.exec(serial())?.[1];
    });
    const readySeconds = (Date.now() - started) / 1000;
    // The guest logs its own uptime at ready (independent of the host's load).
    const guestUptimeSeconds = Number(
      await pollUntil('guest uptime line', 10_000, async () => /ready after ([0-9.]+) s of guest uptime/.exec(serial())?.[1]),
    );
    const qmp = await Qmp.connect(qmpPath, 10_000);
    return { qemu, qmp, serialPath, hostPort, bootId, readySeconds, guestUptimeSeconds, serial, kill };
  } catch (e) {
    await kill();
    throw new Error(`${e instanceof Error ? e.message : String(e)}\nserial console:\n${serial()}\nQEMU stderr:\n${stderr}`);
  }
}

let manifest: Manifest;
let workDir: string;

beforeAll(async () => {
  const first = await buildGuest();
  manifest = first.manifest;
  workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tg-'));
  console.log(`test guest build: ${first.seconds.toFixed(1)} s (${/up to date/.test(first.log) ? 'cached' : 'built'})`);
}, 600_000);

afterAll(() => {
  if (workDir) fs.rmSync(workDir, { recursive: true, force: true });
});

describe('test guest build', () => {
  it('produces the files its manifest describes', () => {
    for (const name of [manifest.kernel, manifest.initrd, manifest.disk]) {
      const recorded = manifest.files[name];
      expect(recorded).toBeDefined();
      const file = path.join(GUEST_DIR, name);
      expect(fs.statSync(file).size).toBe(recorded?.size);
      expect(sha256File(file)).toBe(recorded?.sha256);
    }
    expect(manifest.cmdline).toContain('console=ttyS0');
    expect(manifest.cmdline).toContain('nokaslr init_on_free=1');
  });

  it('is cached: a second run rebuilds nothing', async () => {
    const again = await buildGuest();
    expect(again.log).toMatch(/up to date/);
    expect(again.manifest).toEqual(manifest);
  }, 600_000);
});

describe('test guest under plain QEMU (TCG, 256 MiB)', () => {
  let guest: BootedGuest;
  let customized: GuestState;

  beforeAll(async () => {
    guest = await bootGuest(manifest, workDir, manifest.defaultMemoryMiB);
    console.log(`boot to ready line at ${manifest.defaultMemoryMiB} MiB: ${guest.readySeconds.toFixed(2)} s (guest uptime ${guest.guestUptimeSeconds} s)`);
  }, 120_000);

  afterAll(async () => {
    guest?.qmp.close();
    await guest?.kill();
  });

  it('answers with its boot id, the disk message and a counter that increments', async () => {
    const a = await getState(guest.hostPort);
    const b = await getState(guest.hostPort);
    expect(a.bootId).toBe(guest.bootId);
    expect(a.token).toBe('');
    expect(a.disk).toBe(INITIAL_MESSAGE.replace(/\n+$/, ''));
    expect(b.counter).toBe(a.counter + 1);
    expect(b.bootId).toBe(a.bootId);
  });

  it('is customized by /cgi-bin/set: token in memory, message on the disk', async () => {
    const token = `tok-${crypto.randomBytes(6).toString('hex')}`;
    const message = `launch VM "${token}"\nsecond line & more`;
    const before = await getState(guest.hostPort);
    const q = new URLSearchParams({ token, message });
    const { status, body } = await httpGet(guest.hostPort, `/cgi-bin/set?${q.toString()}`);
    expect(status).toBe(200);
    customized = StateSchema.parse(JSON.parse(body));
    expect(customized).toEqual({ token, disk: message, counter: before.counter + 1, bootId: guest.bootId });
    const after = await getState(guest.hostPort);
    expect(after).toEqual({ ...customized, counter: customized.counter + 1 });
    // The message really is in the file on the disk.
    const res = await fetch(`http://127.0.0.1:${guest.hostPort}/cgi-bin/exec`, {
      method: 'POST',
      body: 'cat /data/app/message.txt; grep -c " /data ext4 " /proc/mounts',
      signal: AbortSignal.timeout(10_000),
    });
    expect(ExecSchema.parse(await res.json())).toEqual({ exitCode: 0, output: `${message}1\n` });
  });

  it('rejects a /cgi-bin/set without parameters', async () => {
    const { status, body } = await httpGet(guest.hostPort, '/cgi-bin/set');
    expect(status).toBe(400);
    expect(body).toMatch(/token/);
  });

  it('runs a recipe posted to /cgi-bin/exec and returns its output and exit code', async () => {
    const recipe = [
      'set -e',
      'mkdir -p /data/recipe && echo installed > /data/recipe/marker',
      'echo "to stdout: $(cat /data/recipe/marker)"',
      'echo "to stderr" >&2',
      'exit 7',
    ].join('\n');
    const res = await fetch(`http://127.0.0.1:${guest.hostPort}/cgi-bin/exec`, {
      method: 'POST',
      body: recipe,
      signal: AbortSignal.timeout(30_000),
    });
    expect(res.status).toBe(200);
    const result = ExecSchema.parse(await res.json());
    expect(result).toEqual({ exitCode: 7, output: 'to stdout: installed\nto stderr\n' });
  });

  it('kills a recipe that outlives its ?timeout', async () => {
    const started = Date.now();
    const res = await fetch(`http://127.0.0.1:${guest.hostPort}/cgi-bin/exec?timeout=1`, {
      method: 'POST',
      body: 'echo started; sleep 30; echo not reached',
      signal: AbortSignal.timeout(30_000),
    });
    expect(ExecSchema.parse(await res.json())).toEqual({ exitCode: 143, output: 'started\n' });
    expect(Date.now() - started).toBeLessThan(20_000);
  }, 40_000);

  it('keeps its memory state across a NIC replug with a new MAC and a new forward', async () => {
    const newPort = await freePort();
    const newMac = '52:54:00:7e:00:02';
    const started = Date.now();
    await guest.qmp.execute('device_del', { id: 'nic0' });
    await guest.qmp.waitEvent('DEVICE_DELETED', (d) => d.device === 'nic0', 30_000);
    await guest.qmp.execute('netdev_del', { id: 'n0' });
    await guest.qmp.hmp(`netdev_add user,id=n1,hostfwd=tcp:127.0.0.1:${newPort}-:${manifest.appPort}`);
    await guest.qmp.execute('device_add', { driver: 'virtio-net-pci', id: 'nic1', netdev: 'n1', mac: newMac });
    const state = await pollUntil('the application on the new forward', 30_000, () => getState(newPort));
    console.log(`NIC replug to first answer: ${((Date.now() - started) / 1000).toFixed(2)} s`);
    expect(state.bootId).toBe(guest.bootId);
    expect(state.token).toBe(customized.token);
    expect(state.disk).toBe(customized.disk);
    expect(state.counter).toBeGreaterThan(customized.counter);
    expect(guest.serial()).toContain(`${manifest.netUpLine} iface=`);
    expect(guest.serial()).toMatch(new RegExp(`${manifest.netUpLine} iface=\\S+ mac=${newMac} bootId=${guest.bootId}`));
    // The old forward is gone with its netdev.
    await expect(httpGet(guest.hostPort, '/cgi-bin/state')).rejects.toThrow();
  }, 90_000);
});

describe.each([128, 512])('test guest under plain QEMU at %i MiB', (memoryMiB) => {
  it('boots to the ready line and serves its state', async () => {
    const guest = await bootGuest(manifest, workDir, memoryMiB);
    try {
      console.log(`boot to ready line at ${memoryMiB} MiB: ${guest.readySeconds.toFixed(2)} s (guest uptime ${guest.guestUptimeSeconds} s)`);
      const state = await getState(guest.hostPort);
      expect(state.bootId).toBe(guest.bootId);
      const total = ExecSchema.parse(
        await (await fetch(`http://127.0.0.1:${guest.hostPort}/cgi-bin/exec`, {
          method: 'POST',
          body: "awk '/^MemTotal:/ { print $2 }' /proc/meminfo",
          signal: AbortSignal.timeout(10_000),
        })).json(),
      );
      const kib = Number(total.output.trim());
      expect(kib).toBeGreaterThan((memoryMiB - 48) * 1024);
      expect(kib).toBeLessThanOrEqual(memoryMiB * 1024);
    } finally {
      guest.qmp.close();
      await guest.kill();
    }
  }, 120_000);
});
