/**
 * What a source cloudlet says to a destination cloudlet during a handoff, over HTTP only (the
 * clusters share no Temporal server): ask its API for a ticket, upload round files to the
 * receiving host (resumable: the upload carries on from the byte the host has), tell the API a
 * round is there, complete or abort. Protocol: docs/handoff.md.
 */
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { z } from 'zod';
import { CloudletError } from '../core/errors';
import { call, failure, json, unreachable } from './peer-http';

export const HandoffTicketSchema = z.object({
  handoffId: z.string(),
  ticket: z.string(),
  hostId: z.string(),
  instanceId: z.string(),
  receiverUrl: z.string().url(),
  expiresAt: z.string(),
  /** The receiving host lacks the VM's base: the source sends its package first (uploadBase, baseReady). */
  needsBase: z.boolean().optional(),
});
export type HandoffTicket = z.infer<typeof HandoffTicketSchema>;

export const AppliedRoundSchema = z.object({ round: z.number().int(), ms: z.number(), stats: z.record(z.string(), z.number()), final: z.boolean() });
export type AppliedRoundInfo = z.infer<typeof AppliedRoundSchema>;

export const FingerprintSchema = z.object({ memorySha256: z.string().regex(/^[0-9a-f]{64}$/), diskSha256: z.string().regex(/^[0-9a-f]{64}$/) });
export type Fingerprint = z.infer<typeof FingerprintSchema>;

export const ReceivedVmSchema = z.object({
  instanceId: z.string(),
  hostId: z.string(),
  appEndpoint: z.string().optional(),
  timings: z.record(z.string(), z.number()),
  /** Present when the source asked for full verification: the destination's fingerprint, equal to the source's. */
  verified: FingerprintSchema.optional(),
  /** When the application first answered at the destination (ms since the epoch). */
  answeredAt: z.number().optional(),
});
export type ReceivedVm = z.infer<typeof ReceivedVmSchema>;

export const BaseImportedSchema = z.object({ baseId: z.string(), alreadyPresent: z.boolean(), importMs: z.number() });
export type BaseImported = z.infer<typeof BaseImportedSchema>;

export const HandoffPhaseSchema = z.enum(['preparing', 'awaiting base', 'importing base', 'receiving', 'finishing', 'resumed', 'failed', 'aborted']);
export const ReceiveStatusSchema = z.object({
  handoffId: z.string(),
  phase: HandoffPhaseSchema,
  applied: z.number().int(),
  result: ReceivedVmSchema.optional(),
  error: z.string().optional(),
});
export type ReceiveStatus = z.infer<typeof ReceiveStatusSchema>;

export interface BeginHandoffRequest {
  instanceId: string;
  baseId: string;
  hostId?: string;
  /** The tenant the VM belongs to at the source: it stays that tenant's at the destination. */
  tenant?: string;
}

/** The destination's API, as the source sees it. */
export class HandoffPeer {
  private readonly base: string;
  constructor(apiUrl: string) {
    this.base = apiUrl.replace(/\/+$/, '');
  }

  /**
   * Asks for a ticket with the destination's API credentials; the destination starts receiving.
   * A destination of an older version refuses the `tenant` field (400 naming it): asked again
   * without it, the VM is received as the tenant of the token used (the admins' for an operator's).
   */
  async begin(token: string, req: BeginHandoffRequest): Promise<HandoffTicket> {
    const ask = (body: BeginHandoffRequest) => call('ask the destination for a handoff ticket', `${this.base}/v1/handoffs`, { method: 'POST', ...json(token, body) }, HandoffTicketSchema);
    try {
      return await ask(req);
    } catch (e) {
      if (req.tenant === undefined || !(e instanceof CloudletError) || e.details.status !== 400 || !/tenant/.test(e.message)) throw e;
      const { tenant: _unknownThere, ...older } = req;
      return ask(older);
    }
  }

  /** The base package is uploaded: the destination imports it and answers when it is ready to receive rounds. */
  baseReady(t: HandoffTicket): Promise<BaseImported> {
    return call('have the destination import the base', `${this.base}/v1/handoffs/${t.handoffId}/base`, { method: 'POST', ...json(t.ticket, {}) }, BaseImportedSchema, 60 * 60_000);
  }

  /** Round `round` is uploaded: the destination applies it and answers when it has. */
  roundReady(t: HandoffTicket, round: number, final: boolean): Promise<AppliedRoundInfo> {
    return call(`have the destination apply round ${round}`, `${this.base}/v1/handoffs/${t.handoffId}/rounds`, { method: 'POST', ...json(t.ticket, { round, final }) }, AppliedRoundSchema, 30 * 60_000);
  }

  /** After the last round: the destination rebuilds, verifies and resumes the VM. */
  /** `verify`: the paused source's fingerprint, which the destination checks before it resumes the VM. */
  complete(t: HandoffTicket, appPort: number, verify?: { memorySha256: string; diskSha256: string }): Promise<ReceivedVm> {
    const body = { appPort, ...(verify ? { verify: { memorySha256: verify.memorySha256, diskSha256: verify.diskSha256 } } : {}) };
    return call('have the destination resume the VM', `${this.base}/v1/handoffs/${t.handoffId}/complete`, { method: 'POST', ...json(t.ticket, body) }, ReceivedVmSchema, 10 * 60_000);
  }

  status(t: HandoffTicket): Promise<ReceiveStatus> {
    return call('read the handoff at the destination', `${this.base}/v1/handoffs/${t.handoffId}`, { method: 'GET', ...json(t.ticket) }, ReceiveStatusSchema, 30_000);
  }

  /** The destination removes what it made; it forgets the ticket. */
  abort(t: HandoffTicket, reason: string): Promise<ReceiveStatus> {
    return call('abort the handoff at the destination', `${this.base}/v1/handoffs/${t.handoffId}`, { method: 'DELETE', ...json(t.ticket, { reason }) }, ReceiveStatusSchema, 60_000);
  }
}

export interface UploadResult {
  bytes: number;
  /** Bytes sent by this call (less than `bytes` when an earlier attempt got some through). */
  sent: number;
  ms: number;
  attempts: number;
}

const OffsetSchema = z.coerce.number().int().nonnegative();

/**
 * Uploads a round file to the receiving host: HEAD says how much it has, PUT sends the rest with
 * `Upload-Offset`. A broken connection is retried from the host's offset (`attempts` times).
 */
export interface UploadOptions {
  attempts?: number;
  onProgress?(sent: number, total: number): void;
  signal?: AbortSignal;
}

export function uploadRound(t: HandoffTicket, round: number, file: string, opts: UploadOptions = {}): Promise<UploadResult> {
  return upload(t, `${t.receiverUrl}/rounds/${round}`, `round ${round}`, file, opts);
}

/** Uploads the base VM package to a receiving host that lacks it (resumable like a round). */
export function uploadBase(t: HandoffTicket, file: string, opts: UploadOptions = {}): Promise<UploadResult> {
  return upload(t, `${t.receiverUrl}/base`, 'the base package', file, opts);
}

async function upload(t: HandoffTicket, url: string, what: string, file: string, opts: UploadOptions): Promise<UploadResult> {
  const total = (await stat(file)).size;
  const t0 = performance.now();
  const attempts = opts.attempts ?? 5;
  let sent = 0;
  let lastError: unknown;
  for (let attempt = 1; attempt <= attempts; attempt++) {
    opts.signal?.throwIfAborted();
    try {
      const head = await fetch(url, { method: 'HEAD', headers: { authorization: `Bearer ${t.ticket}` }, signal: AbortSignal.timeout(30_000) });
      if (!head.ok) throw await failure(`upload ${what}`, head);
      const offset = OffsetSchema.parse(head.headers.get('upload-offset') ?? '0');
      if (offset === total) return { bytes: total, sent, ms: Math.round(performance.now() - t0), attempts: attempt };
      if (offset > total) throw new CloudletError('CONFLICT', `the receiving host has ${offset} bytes of ${what}, more than its ${total}`, { fix: 'retry the handoff' });
      const body = createReadStream(file, { start: offset, highWaterMark: 256 * 1024 });
      let here = offset;
      body.on('data', (c: Buffer | string) => {
        here += c.length;
        sent += c.length;
        opts.onProgress?.(here, total);
      });
      const res = await fetch(url, {
        method: 'PUT',
        headers: { authorization: `Bearer ${t.ticket}`, 'content-type': 'application/octet-stream', 'upload-offset': String(offset), 'content-length': String(total - offset) },
        body: body as unknown as ReadableStream,
        duplex: 'half',
        ...(opts.signal ? { signal: opts.signal } : {}),
      } as RequestInit);
      if (!res.ok) throw await failure(`upload ${what}`, res);
      await res.arrayBuffer();
    } catch (e) {
      if (e instanceof CloudletError && !e.retryable) throw e;
      if (opts.signal?.aborted) throw e;
      lastError = e;
      await new Promise((r) => setTimeout(r, Math.min(4000, 250 * 2 ** attempt)));
    }
  }
  throw lastError instanceof CloudletError ? lastError : unreachable(`upload ${what} (${attempts} attempts)`, url, lastError);
}
