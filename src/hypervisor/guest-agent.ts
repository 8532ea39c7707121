/**
 * Running commands in a guest through qemu-guest-agent (QGA) over its virtio-serial channel: no
 * network port, no credentials in the guest. The agent's JSON protocol is carried by a `send`
 * function (libvirt's `virsh qemu-agent-command` in ./libvirt.ts), so this module is pure logic:
 * files are written in chunks (guest-file-open/write/close: one agent message stays small),
 * programs are started with guest-exec and polled with guest-exec-status.
 */
import { randomUUID } from 'node:crypto';
import { z } from 'zod';
import { CloudletError } from '../core/errors';
import type { GuestExecOptions, GuestExecResult } from './types';

/** Sends one agent command (`{"execute": …, "arguments": …}`) and returns its `return` value. */
export type AgentSend = (command: { execute: string; arguments?: Record<string, unknown> }) => Promise<unknown>;

/** Bytes per guest-file-write (base64 makes it 4/3 larger; a command line must stay well under 128 KiB). */
const WRITE_CHUNK = 48 * 1024;
/** Status polls back off from 50 ms to 1 s: each one wakes the agent, which costs the guest CPU under emulation. */
const POLL_FIRST_MS = 50;
const POLL_MAX_MS = 1000;
/** Exit status of coreutils `timeout` when it killed the command; reported as 143 (SIGTERM), as the test guest does. */
const TIMEOUT_STATUS = 124;

const ExecStarted = z.object({ pid: z.number().int() });
const ExecStatus = z.object({
  exited: z.boolean(),
  exitcode: z.number().int().optional(),
  signal: z.number().int().optional(),
  'out-data': z.string().optional(),
  'err-data': z.string().optional(),
  'out-truncated': z.boolean().optional(),
  'err-truncated': z.boolean().optional(),
});
const FileHandle = z.number().int();

function parseReply<T>(schema: z.ZodType<T>, value: unknown, what: string): T {
  const r = schema.safeParse(value);
  if (!r.success) {
    throw new CloudletError('HYPERVISOR', `qemu-guest-agent gave an unexpected answer to ${what}: ${JSON.stringify(value).slice(0, 300)}`, {
      fix: 'check the guest runs qemu-guest-agent (Debian package qemu-guest-agent) and the domain has the org.qemu.guest_agent.0 channel',
    });
  }
  return r.data;
}

/** Writes `data` to `guestPath` (created or truncated, mode from the guest's umask). */
export async function guestWriteFile(send: AgentSend, guestPath: string, data: Buffer): Promise<void> {
  const handle = parseReply(FileHandle, await send({ execute: 'guest-file-open', arguments: { path: guestPath, mode: 'w' } }), `guest-file-open ${guestPath}`);
  try {
    for (let off = 0; off < data.length; off += WRITE_CHUNK) {
      const chunk = data.subarray(off, off + WRITE_CHUNK);
      await send({ execute: 'guest-file-write', arguments: { handle, 'buf-b64': chunk.toString('base64') } });
    }
  } catch (e) {
    // The write's failure is the one to report; closing is best effort then.
    await send({ execute: 'guest-file-close', arguments: { handle } }).catch(() => undefined);
    throw e;
  }
  await send({ execute: 'guest-file-close', arguments: { handle } });
}

const shQuote = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;

/**
 * Runs a program in the guest and waits for it. The program runs under `timeout` inside the guest
 * (killed with SIGTERM after options.timeoutMs: exit code 143); standard input, when given, comes
 * from a file written first. The host also gives up 30 s after the guest's own timeout (TIMEOUT).
 */
export async function guestExec(send: AgentSend, domain: string, options: GuestExecOptions): Promise<GuestExecResult> {
  const t0 = Date.now();
  const seconds = Math.max(1, Math.ceil(options.timeoutMs / 1000));
  const argv = [options.path, ...(options.args ?? [])].map(shQuote).join(' ');
  let inputFile: string | undefined;
  if (options.input !== undefined) {
    inputFile = `/run/cloudlet-exec-${randomUUID()}.in`;
    await guestWriteFile(send, inputFile, Buffer.isBuffer(options.input) ? options.input : Buffer.from(options.input, 'utf8'));
  }
  const redirect = inputFile ? ` < ${shQuote(inputFile)}` : ' < /dev/null';
  const wrapper = [
    `timeout -s TERM ${seconds} ${argv}${redirect}`,
    'rc=$?',
    ...(inputFile ? [`rm -f ${shQuote(inputFile)}`] : []),
    `[ "$rc" = ${TIMEOUT_STATUS} ] && rc=143`,
    'exit "$rc"',
  ].join('\n');
  const started = parseReply(
    ExecStarted,
    await send({ execute: 'guest-exec', arguments: { path: '/bin/sh', arg: ['-c', wrapper], 'capture-output': true } }),
    `guest-exec in ${domain}`,
  );
  const deadline = t0 + options.timeoutMs + 30_000;
  for (let pollMs = POLL_FIRST_MS; ; pollMs = Math.min(POLL_MAX_MS, pollMs * 2)) {
    const status = parseReply(ExecStatus, await send({ execute: 'guest-exec-status', arguments: { pid: started.pid } }), `guest-exec-status in ${domain}`);
    if (status.exited) {
      if (status['out-truncated'] || status['err-truncated']) {
        throw new CloudletError('HYPERVISOR', `the output of ${options.path} in the guest of "${domain}" was cut by qemu-guest-agent (it keeps at most 16 MiB)`, {
          fix: 'make the command print less (write large results to a file in the guest instead)',
        });
      }
      const decode = (b64: string | undefined): string => (b64 ? Buffer.from(b64, 'base64').toString('utf8') : '');
      const exitCode = status.exitcode ?? (status.signal !== undefined ? 128 + status.signal : -1);
      return { exitCode, stdout: decode(status['out-data']), stderr: decode(status['err-data']), ms: Date.now() - t0 };
    }
    if (Date.now() > deadline) {
      throw new CloudletError('TIMEOUT', `a command in the guest of "${domain}" (${options.path}) did not end within ${options.timeoutMs} ms and was not killed by the guest`, {
        fix: 'check the guest (serial console, load); the command may be stuck in the kernel',
        details: { domain, pid: started.pid },
      });
    }
    options.onWait?.();
    await new Promise((r) => setTimeout(r, pollMs));
  }
}
