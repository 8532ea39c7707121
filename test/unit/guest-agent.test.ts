/**
 * Running commands in a guest through qemu-guest-agent, on a fake agent: an AgentSend that records
 * every command and answers as qemu-guest-agent does (guest-file-open → a handle, guest-exec →
 * {pid}, guest-exec-status → {exited:false} a few times, then the exit code and base64 output).
 * No libvirt, no VM. The wrapper script guestExec hands to the guest is also run here, on the
 * host's own sh and coreutils `timeout`, to check what it does and not only what it says.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { CloudletError } from '../../src/core/errors';
import { guestExec, guestWriteFile, type AgentSend } from '../../src/hypervisor/guest-agent';

const run = promisify(execFile);

type Command = Parameters<AgentSend>[0];

interface GuestFile {
  path: string;
  mode: unknown;
  chunks: Buffer[];
  closed: boolean;
}

interface FakeAgentOptions {
  /** How many guest-exec-status polls answer {exited:false} before the exit (Infinity: never exits). */
  runningPolls?: number;
  exitcode?: number;
  signal?: number;
  stdout?: string | Buffer;
  stderr?: string | Buffer;
  /** Replace the answer to one command (wrong shapes), or throw from it. */
  answer?: (command: Command) => unknown;
  /** The n-th guest-file-write (0-based) fails like a guest with a full disk. */
  failWriteAt?: number;
}

function fakeAgent(options: FakeAgentOptions = {}) {
  const sent: Command[] = [];
  const files = new Map<number, GuestFile>();
  const opened: GuestFile[] = [];
  let nextHandle = 1000;
  let writes = 0;
  let polls = 0;
  const b64 = (v: string | Buffer | undefined): string | undefined => (v === undefined ? undefined : Buffer.from(v).toString('base64'));
  const send: AgentSend = async (command) => {
    sent.push(JSON.parse(JSON.stringify(command)) as Command);
    const override = options.answer?.(command);
    if (override !== undefined) return override;
    const args = command.arguments ?? {};
    switch (command.execute) {
      case 'guest-file-open': {
        const f: GuestFile = { path: String(args.path), mode: args.mode, chunks: [], closed: false };
        const handle = nextHandle++;
        files.set(handle, f);
        opened.push(f);
        return handle;
      }
      case 'guest-file-write': {
        const f = files.get(args.handle as number);
        if (!f || f.closed) throw new Error(`write to unknown or closed handle ${String(args.handle)}`);
        if (writes++ === options.failWriteAt) throw new CloudletError('HYPERVISOR', 'guest-file-write failed: No space left on device');
        const buf = Buffer.from(String(args['buf-b64']), 'base64');
        f.chunks.push(buf);
        return { count: buf.length, eof: false };
      }
      case 'guest-file-close': {
        const f = files.get(args.handle as number);
        if (!f || f.closed) throw new Error(`close of unknown or closed handle ${String(args.handle)}`);
        f.closed = true;
        return {};
      }
      case 'guest-exec':
        return { pid: 4242 };
      case 'guest-exec-status': {
        if (args.pid !== 4242) throw new Error(`status of unknown pid ${String(args.pid)}`);
        if (polls++ < (options.runningPolls ?? 2)) return { exited: false };
        return {
          exited: true,
          ...(options.signal !== undefined ? { signal: options.signal } : { exitcode: options.exitcode ?? 0 }),
          ...(options.stdout !== undefined ? { 'out-data': b64(options.stdout) } : {}),
          ...(options.stderr !== undefined ? { 'err-data': b64(options.stderr) } : {}),
        };
      }
      default:
        throw new Error(`unexpected agent command ${command.execute}`);
    }
  };
  return { send, sent, opened, get polls() { return polls; } };
}

/** The shell script guestExec ran in the guest (guest-exec of /bin/sh -c SCRIPT). */
function wrapperOf(sent: Command[]): string {
  const exec = sent.filter((c) => c.execute === 'guest-exec');
  expect(exec).toHaveLength(1);
  const args = exec[0]?.arguments ?? {};
  expect(args.path).toBe('/bin/sh');
  expect(args['capture-output']).toBe(true);
  const arg = args.arg as string[];
  expect(arg[0]).toBe('-c');
  return String(arg[1]);
}

async function caught(p: Promise<unknown>): Promise<CloudletError> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(CloudletError);
  return e as CloudletError;
}

describe('guestWriteFile', () => {
  it('writes in chunks of at most 48 KiB, base64 in buf-b64, then closes the handle', async () => {
    const agent = fakeAgent();
    const data = Buffer.alloc(48 * 1024 * 2 + 1000);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (i >> 9)) & 0xff;
    await guestWriteFile(agent.send, '/run/x.bin', data);
    expect(agent.sent.map((c) => c.execute)).toEqual(['guest-file-open', 'guest-file-write', 'guest-file-write', 'guest-file-write', 'guest-file-close']);
    expect(agent.sent[0]?.arguments).toEqual({ path: '/run/x.bin', mode: 'w' });
    const writes = agent.sent.filter((c) => c.execute === 'guest-file-write');
    const sizes = writes.map((c) => Buffer.from(String(c.arguments?.['buf-b64']), 'base64').length);
    expect(sizes).toEqual([49152, 49152, 1000]);
    for (const w of writes) {
      expect(w.arguments?.handle).toBe(1000);
      expect(String(w.arguments?.['buf-b64'])).toMatch(/^[A-Za-z0-9+/]*={0,2}$/);
    }
    expect(agent.sent[4]?.arguments).toEqual({ handle: 1000 });
    expect(agent.opened).toHaveLength(1);
    expect(agent.opened[0]?.closed).toBe(true);
    expect(Buffer.concat(agent.opened[0]?.chunks ?? []).equals(data)).toBe(true);
  });

  it('writes exactly 48 KiB in one write and an empty file with none', async () => {
    const one = fakeAgent();
    await guestWriteFile(one.send, '/run/a', Buffer.alloc(48 * 1024, 1));
    expect(one.sent.map((c) => c.execute)).toEqual(['guest-file-open', 'guest-file-write', 'guest-file-close']);
    const empty = fakeAgent();
    await guestWriteFile(empty.send, '/run/b', Buffer.alloc(0));
    expect(empty.sent.map((c) => c.execute)).toEqual(['guest-file-open', 'guest-file-close']);
    expect(empty.opened[0]?.closed).toBe(true);
  });

  it('closes the handle when a write fails, and passes the write error on', async () => {
    const agent = fakeAgent({ failWriteAt: 1 });
    const err = await caught(guestWriteFile(agent.send, '/run/x', Buffer.alloc(48 * 1024 * 3)));
    expect(err.message).toMatch(/No space left on device/);
    expect(agent.sent.map((c) => c.execute)).toEqual(['guest-file-open', 'guest-file-write', 'guest-file-write', 'guest-file-close']);
    expect(agent.opened[0]?.closed).toBe(true);
  });

  it('gives HYPERVISOR when guest-file-open answers something that is not a handle (and writes nothing)', async () => {
    const agent = fakeAgent({ answer: (c) => (c.execute === 'guest-file-open' ? { handle: 'x' } : undefined) });
    const err = await caught(guestWriteFile(agent.send, '/run/x', Buffer.from('hello')));
    expect(err.code).toBe('HYPERVISOR');
    expect(err.message).toMatch(/unexpected answer to guest-file-open \/run\/x/);
    expect(agent.sent.map((c) => c.execute)).toEqual(['guest-file-open']);
  });
});

describe('guestExec', () => {
  it('runs the program under timeout -s TERM with /dev/null as input, polls until it exits, and decodes its output', async () => {
    const agent = fakeAgent({ runningPolls: 3, exitcode: 0, stdout: 'héllo\nworld\n', stderr: Buffer.from('warn: ünïcode\n') });
    const onWait = jest.fn();
    const r = await guestExec(agent.send, 'dom1', { path: '/usr/bin/printf', args: ['%s', "it's a $HOME"], timeoutMs: 2500, onWait });
    expect(r).toMatchObject({ exitCode: 0, stdout: 'héllo\nworld\n', stderr: 'warn: ünïcode\n' });
    expect(r.ms).toBeGreaterThanOrEqual(0);
    // No file is written without input; one exec, then status polls until it exited.
    expect(agent.sent.map((c) => c.execute)).toEqual(['guest-exec', 'guest-exec-status', 'guest-exec-status', 'guest-exec-status', 'guest-exec-status']);
    for (const c of agent.sent.slice(1)) expect(c.arguments).toEqual({ pid: 4242 });
    expect(onWait).toHaveBeenCalledTimes(3);
    const script = wrapperOf(agent.sent);
    // ceil(2500 ms) = 3 s; every word single-quoted, a quote inside escaped the POSIX way.
    expect(script.split('\n')[0]).toBe(`timeout -s TERM 3 '/usr/bin/printf' '%s' 'it'\\''s a $HOME' < /dev/null`);
    expect(script).toContain('[ "$rc" = 124 ] && rc=143');
    expect(script).not.toContain('rm -f');
    expect(script).not.toMatch(/\/run\//);
  });

  it('rounds the guest timeout up to whole seconds, at least 1', async () => {
    const a = fakeAgent({ runningPolls: 0 });
    await guestExec(a.send, 'd', { path: '/bin/true', timeoutMs: 10, onWait: () => undefined });
    expect(wrapperOf(a.sent)).toMatch(/^timeout -s TERM 1 '\/bin\/true' < \/dev\/null\n/);
    const b = fakeAgent({ runningPolls: 0 });
    await guestExec(b.send, 'd', { path: '/bin/true', timeoutMs: 60_001 });
    expect(wrapperOf(b.sent)).toMatch(/^timeout -s TERM 61 /);
  });

  it('writes the input first to a file under /run, reads it as standard input, and removes it after', async () => {
    const agent = fakeAgent({ runningPolls: 1, exitcode: 0, stdout: 'ok' });
    const input = 'line one\n'.repeat(10_000); // 90,000 bytes: two writes
    const r = await guestExec(agent.send, 'dom1', { path: '/bin/sh', args: ['-s'], input, timeoutMs: 5000 });
    expect(r.stdout).toBe('ok');
    expect(agent.sent.map((c) => c.execute)).toEqual(['guest-file-open', 'guest-file-write', 'guest-file-write', 'guest-file-close', 'guest-exec', 'guest-exec-status', 'guest-exec-status']);
    const file = agent.opened[0];
    expect(file?.path).toMatch(/^\/run\/[^/\s']+$/);
    expect(file?.mode).toBe('w');
    expect(file?.closed).toBe(true);
    expect(Buffer.concat(file?.chunks ?? []).toString('utf8')).toBe(input);
    const script = wrapperOf(agent.sent);
    expect(script.split('\n')[0]).toBe(`timeout -s TERM 5 '/bin/sh' '-s' < '${file?.path}'`);
    expect(script).not.toContain('/dev/null');
    expect(script).toContain(`rm -f '${file?.path}'`);
    // The file goes after the command ran, before the script exits.
    const lines = script.split('\n');
    expect(lines.indexOf('rc=$?')).toBeLessThan(lines.indexOf(`rm -f '${file?.path}'`));
    expect(lines[lines.length - 1]).toBe('exit "$rc"');
  });

  it('takes a Buffer input byte for byte', async () => {
    const agent = fakeAgent({ runningPolls: 0 });
    const input = Buffer.from([0, 255, 10, 13, 0x80, 0x7f]);
    await guestExec(agent.send, 'd', { path: '/bin/cat', input, timeoutMs: 1000 });
    expect(Buffer.concat(agent.opened[0]?.chunks ?? []).equals(input)).toBe(true);
  });

  it('reports the exit code, and 128 + signal for a process killed by a signal', async () => {
    const a = fakeAgent({ runningPolls: 0, exitcode: 3, stderr: 'boom' });
    await expect(guestExec(a.send, 'd', { path: '/bin/false', timeoutMs: 1000 })).resolves.toMatchObject({ exitCode: 3, stdout: '', stderr: 'boom' });
    const b = fakeAgent({ runningPolls: 0, signal: 9 });
    await expect(guestExec(b.send, 'd', { path: '/bin/false', timeoutMs: 1000 })).resolves.toMatchObject({ exitCode: 137, stdout: '', stderr: '' });
  });

  it('gives HYPERVISOR when guest-exec answers without a pid', async () => {
    const agent = fakeAgent({ answer: (c) => (c.execute === 'guest-exec' ? { error: 'no such file' } : undefined) });
    const err = await caught(guestExec(agent.send, 'dom1', { path: '/bin/true', timeoutMs: 1000 }));
    expect(err.code).toBe('HYPERVISOR');
    expect(err.message).toContain('guest-exec in dom1');
    expect(err.message).toContain('no such file');
    expect(err.fix).toMatch(/qemu-guest-agent/);
    expect(agent.sent.map((c) => c.execute)).toEqual(['guest-exec']);
  });

  it('gives HYPERVISOR when guest-exec-status answers in the wrong shape', async () => {
    for (const bad of [null, 'done', { exited: 'yes' }, { exited: true, exitcode: 1.5 }, { exited: true, 'out-data': 42 }]) {
      const agent = fakeAgent({ answer: (c) => (c.execute === 'guest-exec-status' ? bad : undefined) });
      const err = await caught(guestExec(agent.send, 'dom1', { path: '/bin/true', timeoutMs: 1000 }));
      expect(err.code).toBe('HYPERVISOR');
      expect(err.message).toContain('guest-exec-status in dom1');
    }
  });

  it('passes on the error of the agent transport itself', async () => {
    const agent = fakeAgent({
      answer: (c) => {
        if (c.execute === 'guest-exec-status') throw new CloudletError('HYPERVISOR_UNAVAILABLE', 'virsh: agent not responding');
        return undefined;
      },
    });
    const err = await caught(guestExec(agent.send, 'dom1', { path: '/bin/true', timeoutMs: 1000 }));
    expect(err.code).toBe('HYPERVISOR_UNAVAILABLE');
  });

  describe('with fake timers', () => {
    beforeEach(() => {
      jest.useFakeTimers({ now: new Date('2026-01-01T00:00:00Z') });
    });
    afterEach(() => {
      jest.useRealTimers();
    });

    it('gives TIMEOUT when the command never exits, 30 s after the guest timeout, polling with back-off', async () => {
      const agent = fakeAgent({ runningPolls: Infinity });
      const onWait = jest.fn();
      const t0 = Date.now();
      let settledAt: number | undefined;
      const p = guestExec(agent.send, 'stuck', { path: '/bin/sleep', args: ['infinity'], timeoutMs: 2000, onWait });
      const outcome = p.then(
        () => {
          throw new Error('expected a TIMEOUT');
        },
        (e: unknown) => {
          settledAt = Date.now();
          return e;
        },
      );
      // Not yet given up just before timeoutMs + 30 s.
      await jest.advanceTimersByTimeAsync(31_000);
      expect(settledAt).toBeUndefined();
      await jest.advanceTimersByTimeAsync(5_000);
      const err = (await outcome) as CloudletError;
      expect(err).toBeInstanceOf(CloudletError);
      expect(err.code).toBe('TIMEOUT');
      expect(err.message).toContain('"stuck"');
      expect(err.message).toContain('/bin/sleep');
      expect(err.details).toEqual({ domain: 'stuck', pid: 4242 });
      // Given up at the first poll after t0 + 32 s (polls are at most 1 s apart).
      expect((settledAt ?? 0) - t0).toBeGreaterThan(32_000);
      expect((settledAt ?? 0) - t0).toBeLessThanOrEqual(33_000);
      // Back-off 50, 100, 200, 400, 800, then 1000 ms: ~36 polls in 32 s, not hundreds.
      expect(agent.polls).toBeGreaterThanOrEqual(30);
      expect(agent.polls).toBeLessThanOrEqual(40);
      expect(onWait).toHaveBeenCalledTimes(agent.polls - 1);
    });

    it('does not give up on a command that exits after the guest timeout but before the host deadline', async () => {
      // 20 polls take 50+100+200+400+800+15*1000 ms ≈ 16.5 s > timeoutMs (1 s), < 31 s.
      const agent = fakeAgent({ runningPolls: 20, exitcode: 143 });
      const p = guestExec(agent.send, 'slow', { path: '/bin/sleep', args: ['60'], timeoutMs: 1000 });
      await jest.advanceTimersByTimeAsync(20_000);
      await expect(p).resolves.toMatchObject({ exitCode: 143 });
      expect(agent.polls).toBe(21);
    });
  });
});

describe('guestExec wrapper script, run by the host sh', () => {
  /** The script guestExec sends for these options (the fake agent answers at once). */
  async function scriptFor(path: string, args: string[], timeoutMs: number): Promise<string> {
    const agent = fakeAgent({ runningPolls: 0 });
    await guestExec(agent.send, 'd', { path, args, timeoutMs });
    return wrapperOf(agent.sent);
  }

  async function exitOf(script: string): Promise<{ code: number; stdout: string }> {
    try {
      const { stdout } = await run('/bin/sh', ['-c', script], { timeout: 20_000 });
      return { code: 0, stdout };
    } catch (e) {
      const err = e as { code?: unknown; stdout?: string };
      if (typeof err.code !== 'number') throw e;
      return { code: err.code, stdout: err.stdout ?? '' };
    }
  }

  it('keeps the exit code of the program and passes its arguments unchanged', async () => {
    const r = await exitOf(await scriptFor('/bin/sh', ['-c', `printf '%s|' "$0" "$1"; exit 7`, "a b'c", '$(echo no)'], 10_000));
    expect(r).toEqual({ code: 7, stdout: "a b'c|$(echo no)|" });
  });

  it('reads /dev/null as standard input when none is given', async () => {
    const r = await exitOf(await scriptFor('/bin/sh', ['-c', 'wc -c'], 10_000));
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toBe('0');
  });

  it('reports a program that timeout killed (124) as 143', async () => {
    const t0 = Date.now();
    const r = await exitOf(await scriptFor('/bin/sleep', ['10'], 1000));
    expect(r.code).toBe(143);
    expect(Date.now() - t0).toBeLessThan(8000);
    expect((await exitOf(await scriptFor('/bin/sh', ['-c', 'exit 124'], 10_000))).code).toBe(143);
  });
});
