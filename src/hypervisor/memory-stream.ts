/**
 * The memory half of a handoff: QEMU's migration stream of a running or paused domain, sent by
 * QMP `migrate` to a unix socket this process listens on (in a private temporary directory:
 * `exec:` URIs kill QEMU here, libvirt runs it with `-sandbox spawn=deny`) and written behind a
 * libvirt save header, so the file is a save file `virsh restore` and splitSnapshot accept.
 * QEMU and libvirt are reached only through the QmpSend the adapter passes in.
 */
import fs from 'node:fs';
import { mkdtemp, open, rename, rm, unlink } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import type pino from 'pino';
import { CloudletError } from '../core/errors';
import { asArray, buildXml, parseXml, type XmlNode } from './domain-xml';
import { QmpError, type QmpBatch, type QmpCommand, type QmpSend } from './qmp';
import type { StreamMemoryResult } from './types';

/** max-bandwidth for the stream (bytes/s): no rate limit (libvirt's default is 128 MiB/s). */
export const UNLIMITED_BANDWIDTH = Number.MAX_SAFE_INTEGER;
const DEFAULT_TIMEOUT_MS = 10 * 60_000;
/** How often query-migrate is asked while the stream flows (each ask is one virsh process). */
const POLL_MS = 500;
const PROGRESS_EVERY = 8 * 1024 * 1024;
const QEVM = Buffer.from('QEVM', 'latin1');

/** What query-migrate says (the fields we use). */
export interface MigrateStatus {
  status: string;
  errorDesc?: string;
  downtimeMs?: number;
  transferred?: number;
}

export function parseMigrateStatus(ret: unknown): MigrateStatus {
  const r = (ret ?? {}) as { status?: unknown; 'error-desc'?: unknown; downtime?: unknown; ram?: { transferred?: unknown } };
  const out: MigrateStatus = { status: typeof r.status === 'string' ? r.status : 'none' };
  if (typeof r['error-desc'] === 'string') out.errorDesc = r['error-desc'];
  if (typeof r.downtime === 'number') out.downtimeMs = r.downtime;
  if (typeof r.ram?.transferred === 'number') out.transferred = r.ram.transferred;
  return out;
}

/**
 * The save cookie libvirt writes (`<cookie><cpu>…</cpu></cookie>`): the CPU definition QEMU
 * actually runs, taken from the live domain XML. libvirt's restore starts QEMU with exactly this
 * CPU. Undefined when the live XML has no `<cpu>`.
 */
export function saveCookieXml(liveXml: string, what = 'live domain XML'): string | undefined {
  const doc = parseXml(liveXml, what);
  const domain = asArray<XmlNode>(doc['domain'])[0];
  const cpu = asArray<XmlNode>(domain?.['cpu'])[0];
  return cpu === undefined ? undefined : buildXml({ cookie: { cpu } });
}

interface Receiver {
  socketPath: string;
  /** Resolves with the stream's byte count once QEMU closed the connection and the file is flushed. */
  done: Promise<number>;
  connected(): boolean;
  /** Settled state of `done` without awaiting it. */
  settled(): { ok: boolean; error?: unknown } | undefined;
  close(): Promise<void>;
}

/** Listens on a fresh unix socket; writes `header` then everything the first connection sends to `file`. */
async function receive(file: string, header: Buffer, onBytes: (streamBytes: number) => void): Promise<Receiver> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-mig-')); // mode 0700
  const socketPath = path.join(dir, 'stream.sock');
  const out = fs.createWriteStream(file);
  out.write(header);
  let conn: net.Socket | undefined;
  let state: { ok: boolean; error?: unknown } | undefined;
  let resolveDone!: (n: number) => void;
  let rejectDone!: (e: unknown) => void;
  const done = new Promise<number>((res, rej) => {
    resolveDone = res;
    rejectDone = rej;
  });
  done.then(() => (state = { ok: true }), (error: unknown) => (state = { ok: false, error }));
  out.on('error', (e) => rejectDone(e));
  const server = net.createServer((sock) => {
    if (conn) {
      sock.destroy();
      return;
    }
    conn = sock;
    server.close();
    let n = 0;
    sock.on('data', (d: Buffer) => {
      n += d.length;
      onBytes(n);
    });
    pipeline(sock, out).then(() => resolveDone(n), rejectDone);
  });
  try {
    await new Promise<void>((res, rej) => {
      server.once('error', rej);
      server.listen(socketPath, () => res());
    });
  } catch (e) {
    out.destroy();
    await rm(dir, { recursive: true, force: true });
    throw new CloudletError('HYPERVISOR', `cannot listen on unix socket ${socketPath} for the migration stream: ${(e as Error).message}`, { fix: `check that ${os.tmpdir()} is writable`, cause: e });
  }
  return {
    socketPath,
    done,
    connected: () => conn !== undefined,
    settled: () => state,
    close: async () => {
      server.close();
      conn?.destroy();
      if (!out.closed) {
        out.destroy();
        await new Promise<void>((r) => out.once('close', () => r()));
      }
      await rm(dir, { recursive: true, force: true });
    },
  };
}

export interface MigrateToFileInput {
  domain: string;
  /** Absolute path of the save file; written as `<outPath>.tmp`, renamed when complete. */
  outPath: string;
  /** The libvirt save header (encodeSaveHeader). */
  header: Buffer;
  qmp: QmpSend;
  /** Sends the set-up and the migrate command in one go when given (one virsh process instead of three). */
  qmpBatch?: QmpBatch;
  wasRunning: boolean;
  onProgress?(bytes: number): void;
  timeoutMs?: number;
  /** Leave shared RAM (a file-backed `share=on` block) out of the stream: QEMU's x-ignore-shared. */
  ignoreShared?: boolean;
  log: pino.Logger;
}

export function qmpFailure(domain: string, e: unknown): CloudletError {
  if (e instanceof CloudletError) return e;
  if (e instanceof QmpError) {
    if (/paused due to previous migration/i.test(e.desc)) {
      return new CloudletError('CONFLICT', `QEMU refuses to stream the memory of domain "${domain}" again: it is paused after a completed memory stream (runstate postmigrate, disks released) and QEMU 7.2 cannot migrate it twice`, {
        fix: 'use the stream already written, or resume the domain first (the guest then runs on, so a new stream is no longer the same state)',
        details: { domain, qmp: e.execute, desc: e.desc },
        cause: e,
      });
    }
    if (/migration process in progress|migration is currently running|already in progress/i.test(e.desc)) {
      return new CloudletError('CONFLICT', `domain "${domain}" is already migrating (${e.desc})`, {
        fix: 'wait for the other stream or save to end, or cancel it (virsh qemu-monitor-command DOM \'{"execute":"migrate_cancel"}\')',
        details: { domain, qmp: e.execute, desc: e.desc },
        cause: e,
      });
    }
    return new CloudletError('HYPERVISOR', `QEMU of domain "${domain}" refused ${e.execute}: ${e.desc}`, {
      fix: `see /var/log/libvirt/qemu/${domain}.log`,
      details: { domain, qmp: e.execute, desc: e.desc },
      cause: e,
    });
  }
  return new CloudletError('HYPERVISOR', `streaming the memory of domain "${domain}" failed: ${(e as Error).message ?? String(e)}`, { cause: e });
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Waits until `p` settles or `ms` passed, whichever is first (no timer left behind). */
async function settleWithin(p: Promise<unknown>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([p.then(() => undefined, () => undefined), new Promise<void>((r) => (timer = setTimeout(r, ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** Runs one QMP migration of the domain into `outPath` (see the module comment). */
export async function migrateToFile(input: MigrateToFileInput): Promise<StreamMemoryResult> {
  const { domain, outPath, header, qmp, log } = input;
  const t0 = performance.now();
  const tmp = `${outPath}.tmp`;
  const timeoutMs = input.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  let reported = 0;
  const rx = await receive(tmp, header, (n) => {
    if (input.onProgress && n - reported >= PROGRESS_EVERY) {
      reported = n;
      input.onProgress(header.length + n);
    }
  });
  let migrating = false;
  let ok = false;
  let downtimeMs: number | undefined;
  try {
    try {
      // x-ignore-shared only when asked (it drops shared RAM from the stream), no bandwidth limit.
      // (Two virsh processes at once: libvirt serializes the monitor commands, the process start-ups overlap.)
      const setup: QmpCommand[] = [
        { execute: 'migrate-set-capabilities', arguments: { capabilities: [{ capability: 'x-ignore-shared', state: input.ignoreShared === true }] } },
        { execute: 'migrate-set-parameters', arguments: { 'max-bandwidth': UNLIMITED_BANDWIDTH } },
      ];
      const migrate: QmpCommand = { execute: 'migrate', arguments: { uri: `unix:${rx.socketPath}` } };
      if (input.qmpBatch) {
        const replies = await input.qmpBatch([...setup, migrate]);
        migrating = !(replies[2] instanceof QmpError);
        const failed = replies.find((r) => r instanceof QmpError);
        if (failed) throw failed;
      } else {
        await Promise.all(setup.map((c) => qmp(c)));
        await qmp(migrate);
        migrating = true;
      }
    } catch (e) {
      throw qmpFailure(domain, e);
    }
    const deadline = Date.now() + timeoutMs;
    let endedAt: number | undefined;
    for (;;) {
      if (!rx.settled()) await settleWithin(rx.done, POLL_MS);
      const got = rx.settled();
      if (got && endedAt === undefined) endedAt = Date.now();
      const status = parseMigrateStatus(await qmp({ execute: 'query-migrate' }).catch((e: unknown) => { throw qmpFailure(domain, e); }));
      if (status.status === 'failed' || status.status === 'cancelled') {
        migrating = false;
        throw new CloudletError('HYPERVISOR', `QEMU's migration stream of domain "${domain}" ${status.status}: ${status.errorDesc ?? 'QEMU gave no reason'}`, {
          fix: `see /var/log/libvirt/qemu/${domain}.log; check free space for ${outPath}`,
          details: { domain, status: status.status, errorDesc: status.errorDesc },
        });
      }
      if (got && !got.ok) {
        throw new CloudletError('HYPERVISOR', `writing the memory stream of domain "${domain}" to ${tmp} failed: ${(got.error as Error).message ?? String(got.error)}`, {
          fix: `check free space and permissions of ${path.dirname(outPath)}`,
          cause: got.error,
        });
      }
      if (status.status === 'completed') {
        migrating = false;
        if (got) {
          downtimeMs = status.downtimeMs;
          break;
        }
        // QEMU marks the migration completed, then closes the connection from a bottom half.
        await settleWithin(rx.done, 10_000);
        if (!rx.settled()) throw new CloudletError('HYPERVISOR', `QEMU completed the migration of domain "${domain}" but did not close the stream socket within 10 s`, { fix: `see /var/log/libvirt/qemu/${domain}.log` });
        continue;
      }
      if (endedAt !== undefined) {
        if (Date.now() - endedAt > 30_000) {
          throw new CloudletError('HYPERVISOR', `QEMU closed the migration stream of domain "${domain}" but its migration stayed "${status.status}" for 30 s`, { fix: `see /var/log/libvirt/qemu/${domain}.log` });
        }
        await sleep(20);
        continue;
      }
      if (Date.now() > deadline) {
        throw new CloudletError('TIMEOUT', `the memory stream of domain "${domain}" did not complete within ${timeoutMs} ms (QEMU status ${status.status}, ${status.transferred ?? '?'} bytes sent)`, {
          fix: 'check the load on this host and the QEMU log; a guest dirtying memory faster than it can be sent never converges (pause it first)',
          details: { domain, status: status.status },
        });
      }
    }
    const streamBytes = await rx.done;
    const size = header.length + streamBytes;
    const fh = await open(tmp, 'r');
    try {
      const magic = Buffer.alloc(4);
      await fh.read(magic, 0, 4, header.length);
      if (!magic.equals(QEVM)) {
        throw new CloudletError('CORRUPT', `the migration stream of domain "${domain}" does not start with QEVM (${streamBytes} bytes received)`, { fix: `see /var/log/libvirt/qemu/${domain}.log` });
      }
    } finally {
      await fh.close();
    }
    await rename(tmp, outPath);
    ok = true;
    input.onProgress?.(size);
    const result: StreamMemoryResult = { bytes: size, ms: Math.round(performance.now() - t0), wasRunning: input.wasRunning };
    if (downtimeMs !== undefined) result.downtimeMs = downtimeMs;
    log.info({ domain, file: outPath, ...result }, 'memory streamed');
    return result;
  } finally {
    if (migrating) await qmp({ execute: 'migrate_cancel' }).catch(() => undefined);
    // A later regular save (virsh save) must carry the shared RAM again.
    if (input.ignoreShared) await qmp({ execute: 'migrate-set-capabilities', arguments: { capabilities: [{ capability: 'x-ignore-shared', state: false }] } }).catch(() => undefined);
    await rx.close();
    if (!ok) await unlink(tmp).catch(() => undefined);
  }
}
