/**
 * The receiving half of a memory stream: a domain started paused with `-incoming defer` (a warm
 * pool's VM, or a handoff's VM started ahead) is told by QMP `migrate-incoming` to listen on a
 * unix socket in a private directory; our process connects and writes QEMU's migration stream
 * (a save file less its libvirt header), then asks query-migrate until it is `completed`. The
 * domain ends paused. Two ways to write it:
 * - migrateFromFile: a whole save file at once;
 * - IncomingFeed: the save file part by part while it is being rebuilt (early start), with its
 *   last bytes held back until the caller says the file is verified: QEMU cannot finish loading,
 *   so cannot activate the disks or run the guest, before then.
 * QEMU and libvirt are reached only through the QmpSend the adapter passes in.
 */
import fs from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import type pino from 'pino';
import { CloudletError } from '../core/errors';
import { decodeFixedHeader } from '../core/snapshot/header';
import { LIBVIRT_HEADER_SIZE } from '../core/snapshot/format';
import { parseMigrateStatus, qmpFailure } from './memory-stream';
import { QmpError, type QmpBatch, type QmpCommand, type QmpSend } from './qmp';
import type { SaveFeed } from './types';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface IncomingTarget {
  domain: string;
  qmp: QmpSend;
  qmpBatch?: QmpBatch;
  log: pino.Logger;
  /**
   * false: the stream is a whole one (a plain libvirt save, RAM pages included), loaded into the
   * domain's RAM file as it comes; default true (device state only, x-ignore-shared).
   */
  ignoreShared?: boolean;
  timeoutMs?: number;
}

/**
 * Sets the capability and has QEMU listen on `socketPath` (a fresh path in a private directory)
 * for its incoming stream.
 */
export async function listenIncoming(t: IncomingTarget, socketPath: string): Promise<void> {
  try {
    const setup: QmpCommand[] = [
      { execute: 'migrate-set-capabilities', arguments: { capabilities: [{ capability: 'x-ignore-shared', state: t.ignoreShared ?? true }] } },
      { execute: 'migrate-incoming', arguments: { uri: `unix:${socketPath}` } },
    ];
    if (t.qmpBatch) {
      const failed = (await t.qmpBatch(setup)).find((r) => r instanceof QmpError);
      if (failed) throw failed;
    } else {
      for (const c of setup) await t.qmp(c);
    }
  } catch (e) {
    throw qmpFailure(t.domain, e);
  }
}

/**
 * Connects to the domain's incoming socket: `listening`, where it listens already (listenIncoming
 * ahead of time), or a fresh one it is told to listen on now. The directory returned is removed
 * with the connection.
 */
async function connectIncoming(t: IncomingTarget, listening?: string): Promise<{ sock: net.Socket; remove: string }> {
  const dir = listening ? undefined : await mkdtemp(path.join(os.tmpdir(), 'cloudlet-inc-'));
  const socketPath = listening ?? path.join(dir as string, 'incoming.sock');
  // Once connected, the socket's name is no longer needed: the private directory, or the file.
  const remove = dir ?? socketPath;
  try {
    if (!listening) await listenIncoming(t, socketPath);
    // QEMU listens once migrate-incoming returned.
    const sock = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.createConnection(socketPath);
      s.once('error', (e) => reject(new CloudletError('HYPERVISOR', `cannot send the memory stream to domain "${t.domain}" on ${socketPath}: ${e.message}`, { fix: `see /var/log/libvirt/qemu/${t.domain}.log`, cause: e })));
      s.once('connect', () => resolve(s));
    });
    return { sock, remove };
  } catch (e) {
    await rm(remove, { recursive: true, force: true });
    throw e;
  }
}

/** Asks query-migrate until the incoming migration completed (or failed, or timed out). */
async function waitIncomingCompleted(t: IncomingTarget): Promise<void> {
  const timeoutMs = t.timeoutMs ?? 60_000;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const status = parseMigrateStatus(await t.qmp({ execute: 'query-migrate' }).catch((e: unknown) => { throw qmpFailure(t.domain, e); }));
    if (status.status === 'completed') return;
    if (status.status === 'failed' || status.status === 'cancelled') {
      throw new CloudletError('HYPERVISOR', `domain "${t.domain}" did not take the stream: its incoming migration ${status.status} (${status.errorDesc ?? 'QEMU gave no reason'})`, {
        fix: `see /var/log/libvirt/qemu/${t.domain}.log; the stream must come from the same QEMU machine type${t.ignoreShared === false ? '' : ' with x-ignore-shared'}`,
        details: { domain: t.domain, status: status.status, errorDesc: status.errorDesc },
      });
    }
    if (Date.now() > deadline) {
      throw new CloudletError('TIMEOUT', `domain "${t.domain}" did not complete its incoming migration within ${timeoutMs} ms (status ${status.status})`, { fix: `see /var/log/libvirt/qemu/${t.domain}.log` });
    }
    await sleep(10);
  }
}

export interface MigrateFromFileInput extends IncomingTarget {
  /** A domain started paused with `-incoming defer` whose shared RAM already holds the guest's memory. */
  domain: string;
  /** A save file of an x-ignore-shared stream (libvirt header, then QEMU's stream from `streamOffset`). */
  file: string;
  streamOffset: number;
}

/** Feeds a save file's stream to a domain waiting with `-incoming defer`; the domain ends paused. */
export async function migrateFromFile(input: MigrateFromFileInput): Promise<{ ms: number; bytes: number }> {
  const t0 = performance.now();
  let bytes = 0;
  const { sock, remove } = await connectIncoming(input);
  try {
    const src = fs.createReadStream(input.file, { start: input.streamOffset });
    src.on('data', (d) => (bytes += d.length));
    await pipeline(src, sock);
    await waitIncomingCompleted(input);
    const ms = Math.round(performance.now() - t0);
    input.log.info({ domain: input.domain, bytes, ms }, 'device state loaded');
    return { ms, bytes };
  } finally {
    sock.destroy();
    await rm(remove, { recursive: true, force: true });
  }
}

/** How long a part may wait for QEMU to read it before the feed gives up on the domain. */
const WRITE_TIMEOUT_MS = 60_000;
/** How long `complete` waits for QEMU to close the socket before it asks query-migrate anyway. */
const CLOSE_WAIT_MS = 500;

/** Bytes held back from QEMU until `complete`: with any byte missing, QEMU cannot finish loading. */
const HOLD_BYTES = 64 * 1024;

/**
 * A save file streamed into a waiting domain while it is being written (early start). `write`
 * never rejects: a domain that fails (its QEMU died, the socket broke) stops taking parts, and
 * `complete` then throws why, so the caller restores the save another way.
 */
export class IncomingFeed implements SaveFeed {
  private readonly connecting: Promise<{ sock: net.Socket; remove: string }>;
  private failure: CloudletError | undefined;
  /** The start of the file until the libvirt header is complete (its length says where QEMU's stream starts). */
  private head: Buffer | undefined = Buffer.alloc(0);
  private skip = 0;
  private held: Buffer = Buffer.alloc(0);
  private sent = 0;
  private readonly t0 = performance.now();

  /** `listening`: the socket the domain listens on already (see listenIncoming); else it is told to listen now. */
  constructor(private readonly target: IncomingTarget & { ignoreShared: false }, listening?: string) {
    this.connecting = connectIncoming(target, listening);
    this.connecting.then(
      ({ sock }) => sock.on('error', (e) => this.fail(e)),
      (e: unknown) => this.fail(e),
    );
  }

  private fail(e: unknown): void {
    this.failure ??= e instanceof CloudletError ? e : new CloudletError('HYPERVISOR', `the memory stream into domain "${this.target.domain}" broke: ${(e as Error).message ?? String(e)}`, { fix: `see /var/log/libvirt/qemu/${this.target.domain}.log`, cause: e });
  }

  private async send(data: Buffer): Promise<void> {
    if (data.length === 0 || this.failure) return;
    const { sock } = await this.connecting;
    // A QEMU that lives but stops reading must not hold the apply: its socket goes after a while.
    const timer = setTimeout(() => {
      this.fail(new CloudletError('TIMEOUT', `domain "${this.target.domain}" read nothing of its memory stream for ${WRITE_TIMEOUT_MS / 1000} s`, { fix: `see /var/log/libvirt/qemu/${this.target.domain}.log` }));
      sock.destroy();
    }, WRITE_TIMEOUT_MS);
    await new Promise<void>((resolve) => {
      sock.write(data, (e) => {
        if (e) this.fail(e);
        resolve();
      });
    });
    clearTimeout(timer);
    this.sent += data.length;
  }

  /**
   * The next part of the save file (from its first byte, libvirt header included). `last`: the
   * file's final part (device state, QEMU's end marker, its description): all of it is held back.
   */
  async write(part: Buffer, opts: { last?: boolean } = {}): Promise<void> {
    try {
      if (this.failure) return;
      let data = part;
      if (this.head) {
        // libvirt's header (fixed part, then its XML and cookie) is not QEMU's: skip it.
        const head = Buffer.concat([this.head, part]);
        if (head.length < LIBVIRT_HEADER_SIZE) {
          this.head = head;
          return;
        }
        const raw = decodeFixedHeader(head, `the save file streamed into "${this.target.domain}"`);
        if (raw.compressed !== 0) throw new CloudletError('HYPERVISOR', `the save file streamed into "${this.target.domain}" is compressed (format ${raw.compressed}); only a raw QEMU stream can be loaded as it comes`, { fix: "restore the save file with libvirt instead" });
        this.skip = LIBVIRT_HEADER_SIZE + raw.dataLen;
        this.head = undefined;
        data = head;
      }
      if (this.skip > 0) {
        const n = Math.min(this.skip, data.length);
        this.skip -= n;
        data = data.subarray(n);
      }
      if (opts.last) {
        this.held = Buffer.concat([this.held, data]);
        return;
      }
      // All but the last HOLD_BYTES so far go out; the rest is copied (the part's buffer is reused).
      const all = this.held.length + data.length;
      if (all <= HOLD_BYTES) {
        this.held = Buffer.concat([this.held, data]);
        return;
      }
      const out = all - HOLD_BYTES;
      const fromHeld = Math.min(out, this.held.length);
      await this.send(this.held.subarray(0, fromHeld));
      await this.send(data.subarray(0, out - fromHeld));
      this.held = Buffer.concat([this.held.subarray(fromHeld), data.subarray(out - fromHeld)]);
    } catch (e) {
      this.fail(e);
    }
  }

  /** Sends what was held back and waits until QEMU has loaded the stream (the domain stays paused). */
  async complete(): Promise<{ ms: number; bytes: number; tailMs: number }> {
    const t1 = performance.now();
    try {
      await this.send(this.held);
      this.held = Buffer.alloc(0);
      if (this.failure) throw this.failure;
      const { sock } = await this.connecting;
      // QEMU closes its end once it has loaded the stream (or given up on it): one query then says
      // which. (Waited for a short while only: query-migrate decides.)
      const closed = new Promise<void>((resolve) => {
        if (sock.closed) resolve();
        else sock.once('close', () => resolve());
      });
      sock.end();
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([closed, new Promise<void>((resolve) => (timer = setTimeout(resolve, CLOSE_WAIT_MS)))]);
      clearTimeout(timer);
      await waitIncomingCompleted(this.target);
      const r = { ms: Math.round(performance.now() - this.t0), bytes: this.sent, tailMs: Math.round(performance.now() - t1) };
      this.target.log.info({ domain: this.target.domain, ...r }, 'memory stream loaded');
      return r;
    } catch (e) {
      this.fail(e);
      throw this.failure ?? e;
    } finally {
      await this.close();
    }
  }

  /** Stops feeding (the domain is left waiting, or failed: the caller destroys it). */
  async close(): Promise<void> {
    const c = await this.connecting.catch(() => undefined);
    c?.sock.destroy();
    if (c) await rm(c.remove, { recursive: true, force: true });
  }
}
