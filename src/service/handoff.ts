/**
 * Handoff on Temporal, both sides of it:
 *
 * - as the destination, the cluster issues tickets (to callers with its API credentials), starts
 *   a receiveHandoff run on a host holding the VM's base, and turns the ticket-authenticated
 *   calls of the source (round arrived, complete, abort, status) into updates, signals and
 *   queries of that run;
 * - as the source, it asks the destination's API for a ticket with the credentials the caller
 *   gave (they never enter Temporal's history) and starts handoffVm on the instance's host.
 */
import { randomBytes } from 'node:crypto';
import { WorkflowNotFoundError, WorkflowUpdateFailedError, type Client, type WorkflowHandle } from '@temporalio/client';
import { ApplicationFailure } from '@temporalio/common';
import { assertHostServing } from '../client/connect';
import { HandoffPeer, type AppliedRoundInfo, type BaseImported, type Fingerprint, type HandoffTicket, type ReceivedVm, type ReceiveStatus } from '../client/handoff-peer';
import { CloudletError } from '../core/errors';
import { issueTicket, verifyTicket, type TicketClaims } from '../core/handoff/ticket';
import { abortSignal, baseArrivedUpdate, completeUpdate, handoffVm, receiveHandoff, receiveStateQuery, roundArrivedUpdate, type ReceiveState } from '../workflows';
import type { TemporalCloudletService } from './temporal';
import { receiveOperationId, type BeginReceiveRequest, type HandoffInstanceRequest, type HandoffService, type TicketView } from './handoff-types';
import { digestToken, type ClusterCatalog, type HandoffTicketRecord } from '../core/cluster-catalog';
import type { OperationRef } from './types';

export interface HandoffServiceOptions {
  hosts: string[];
  secret: Buffer;
  /**
   * The cluster catalog: each ticket is recorded there by its digest (with the VM's tenant and its
   * expiry), checked on every ticket call, ended when the VM arrives or the handoff is aborted, and
   * revocable by an admin. Without one, a ticket is good by its signature and the handoff's state.
   */
  catalog?: Pick<ClusterCatalog, 'addTicket' | 'ticketByDigest' | 'ticketOfHandoff' | 'endTicket' | 'listTickets'>;
  /** Tickets expire after this long (default 30 min). */
  ticketTtlMs?: number;
  /** A receiving host gives up after this long without word from the source (default 5 min). */
  idleTimeoutMs?: number;
}

const PREPARE_WAIT_MS = 120_000;
/** How long a status waits for the receiving host's worker to answer. */
const STATUS_QUERY_MS = 5000;
/** How long an abort waits for the receiving host to have removed what it made. */
const ABORT_WAIT_MS = 15_000;

export class TemporalHandoffService implements HandoffService {
  constructor(
    private readonly client: Client,
    private readonly service: TemporalCloudletService,
    private readonly options: HandoffServiceOptions,
  ) {}

  // ---- destination ---------------------------------------------------------------------------------

  async beginReceive(req: BeginReceiveRequest): Promise<HandoffTicket> {
    let hostId = req.hostId;
    if (hostId !== undefined) {
      if (!this.options.hosts.includes(hostId)) throw new CloudletError('UNKNOWN_HOST', `host ${hostId} is not a host of this cluster`, { fix: `choose one of ${this.options.hosts.join(', ')}, or leave hostId out` });
      await assertHostServing(this.client, hostId);
    } else {
      // A serving host that holds the base; else a serving host, to which the source sends it.
      const base = await this.service.getBase(req.baseId);
      const serving = await Promise.all(this.options.hosts.map(async (h) => ((await assertHostServing(this.client, h).then(() => true, () => false)) ? h : undefined)));
      hostId = serving.find((h) => h !== undefined && base?.hostIds.includes(h)) ?? serving.find((h) => h !== undefined);
      if (hostId === undefined) {
        throw new CloudletError('DESTINATION_UNAVAILABLE', `no host of this cluster (${this.options.hosts.join(', ')}) is serving`, {
          fix: 'start a host worker (npx tsx src/workers/main.ts --host <id>)',
        });
      }
    }
    const existing = await this.service.getInstance(req.instanceId);
    if (existing && (existing.state === 'running' || existing.state === 'provisioning')) {
      throw new CloudletError('CONFLICT', `this cluster already has an instance ${req.instanceId} (${existing.state} on ${existing.hostId})`, { fix: 'terminate it first' });
    }
    const handoffId = `ho-${Date.now().toString(36)}-${randomBytes(4).toString('hex')}`;
    const expiresAt = Date.now() + (this.options.ticketTtlMs ?? 30 * 60_000);
    const workflowId = receiveWorkflowId({ host: hostId, inst: req.instanceId, hid: handoffId });
    await this.service.start('receiveHandoff', receiveHandoff, workflowId, {
      hostId,
      handoffId,
      instanceId: req.instanceId,
      baseId: req.baseId,
      ...(this.options.idleTimeoutMs !== undefined ? { idleTimeoutMs: this.options.idleTimeoutMs } : {}),
    }, `Receive instance ${req.instanceId} by handoff ${handoffId} on host ${hostId}`);
    const handle = this.client.workflow.getHandle(workflowId);
    const state = await this.waitPrepared(handle);
    const ticket = issueTicket(this.options.secret, { hid: handoffId, host: hostId, inst: req.instanceId, exp: expiresAt });
    try {
      await this.options.catalog?.addTicket({ handoffId, digest: digestToken(ticket), hostId, instanceId: req.instanceId, ...(req.tenant ? { tenant: req.tenant } : {}), expiresAt: new Date(expiresAt).toISOString() });
    } catch (e) {
      // A ticket the catalog does not hold would be refused: the receiving host lets go now.
      await handle.signal(abortSignal, { reason: 'the ticket could not be recorded' }).catch(() => undefined);
      throw e;
    }
    return {
      handoffId,
      ticket,
      hostId,
      instanceId: req.instanceId,
      receiverUrl: state.receiverUrl ?? '',
      expiresAt: new Date(expiresAt).toISOString(),
      ...(state.phase === 'awaiting base' ? { needsBase: true } : {}),
    };
  }

  private async waitPrepared(handle: WorkflowHandle): Promise<ReceiveState> {
    const deadline = Date.now() + PREPARE_WAIT_MS;
    for (;;) {
      const st = await handle.query(receiveStateQuery).catch(() => undefined);
      if (st?.receiverUrl && (st.phase === 'receiving' || st.phase === 'awaiting base')) return st;
      if (st && (st.phase === 'failed' || st.phase === 'aborted')) break;
      const d = await handle.describe();
      if (d.status.name !== 'RUNNING') break;
      if (Date.now() > deadline) throw new CloudletError('TIMEOUT', `the receiving host did not get ready within ${PREPARE_WAIT_MS / 1000} s`, { fix: `look at run ${handle.workflowId} in the Temporal Web UI` });
      await new Promise((r) => setTimeout(r, 200));
    }
    try {
      await handle.result();
    } catch (e) {
      throw causeOf(e, 'prepare to receive the VM');
    }
    throw new CloudletError('CONFLICT', 'the receiving run ended before it was ready', { fix: `look at run ${handle.workflowId}` });
  }

  /**
   * The run a ticket is for, when the ticket is good for handoff `hid`: signed by this cluster,
   * not expired, for this handoff, and (with a catalog) recorded there and not revoked. `ended`:
   * a ticket that was used or aborted still reads the status and aborts (again); otherwise 403.
   */
  private async handleFor(ticket: string, hid: string, ended: 'allow' | 'refuse' = 'refuse'): Promise<{ handle: WorkflowHandle; claims: TicketClaims }> {
    const claims = verifyTicket(this.options.secret, ticket);
    if (claims.hid !== hid) throw new CloudletError('FORBIDDEN', `the ticket is for handoff ${claims.hid}, not ${hid}`, { fix: 'use the ticket issued for this handoff' });
    const catalog = this.options.catalog;
    if (catalog) {
      // Reading (status, abort) goes on by the signature when the catalog does not answer: a
      // source that cannot learn that its VM arrived would resume its own copy.
      const rec = await catalog.ticketByDigest(digestToken(ticket)).catch((e: unknown) => {
        if (ended === 'allow') return 'unread' as const;
        throw e;
      });
      if (rec === 'unread') return { claims, handle: this.client.workflow.getHandle(receiveWorkflowId(claims)) };
      if (!rec) throw new CloudletError('UNAUTHORIZED', `handoff ticket refused: the cluster catalog holds no such ticket for handoff ${hid}`, { fix: 'ask the destination API for a new ticket (POST /v1/handoffs)' });
      if (rec.ended === 'revoked') throw new CloudletError('UNAUTHORIZED', `handoff ticket refused: an admin revoked it at ${rec.endedAt ?? '?'}`, { fix: 'ask the destination cluster\'s operators; start a new handoff for a new ticket' });
      if (rec.ended && ended === 'refuse') throw new CloudletError('FORBIDDEN', `handoff ${hid} has ended (${rec.ended}): its ticket is used up`, { fix: 'start a new handoff for a new ticket' });
    }
    return { claims, handle: this.client.workflow.getHandle(receiveWorkflowId(claims)) };
  }

  private async requireOpen(handle: WorkflowHandle, hid: string): Promise<void> {
    const d = await handle.describe().catch(() => undefined);
    if (!d || d.status.name !== 'RUNNING') {
      throw new CloudletError('FORBIDDEN', `handoff ${hid} has ended (${d ? d.status.name.toLowerCase() : 'unknown'}): its ticket is used up`, { fix: 'start a new handoff for a new ticket' });
    }
  }

  async baseArrived(ticket: string, hid: string): Promise<BaseImported> {
    const { handle } = await this.handleFor(ticket, hid);
    await this.requireOpen(handle, hid);
    try {
      return await handle.executeUpdate(baseArrivedUpdate);
    } catch (e) {
      throw causeOf(e, 'import the base package');
    }
  }

  async roundArrived(ticket: string, hid: string, round: { round: number; final: boolean }): Promise<AppliedRoundInfo> {
    const { handle } = await this.handleFor(ticket, hid);
    await this.requireOpen(handle, hid);
    try {
      return await handle.executeUpdate(roundArrivedUpdate, { args: [round] });
    } catch (e) {
      throw causeOf(e, `apply round ${round.round}`);
    }
  }

  async complete(ticket: string, hid: string, appPort: number, verify?: Fingerprint): Promise<ReceivedVm> {
    const { handle } = await this.handleFor(ticket, hid);
    await this.requireOpen(handle, hid);
    let vm: ReceivedVm;
    try {
      vm = await handle.executeUpdate(completeUpdate, { args: [{ appPort, ...(verify ? { verify } : {}) }] });
    } catch (e) {
      throw causeOf(e, 'resume the VM');
    }
    // Single use: the VM is here, the ticket is good for nothing more than its status. (The
    // receiving run's end records the same; a catalog that does not answer now must not turn
    // the arrival into a failure the source would answer by resuming its own copy.)
    await this.options.catalog?.endTicket(hid, 'used').catch(() => false);
    return vm;
  }

  async status(ticket: string, hid: string): Promise<ReceiveStatus> {
    const { handle, claims } = await this.handleFor(ticket, hid, 'allow');
    let st: ReceiveState;
    try {
      st = await this.client.withDeadline(Date.now() + STATUS_QUERY_MS, () => handle.query(receiveStateQuery));
    } catch (e) {
      throw new CloudletError('DESTINATION_UNAVAILABLE', `the receiving host ${claims.host} does not answer about handoff ${hid}`, { fix: 'check that its worker runs', cause: e });
    }
    return { handoffId: hid, phase: st.phase, applied: st.applied, ...(st.result ? { result: st.result } : {}), ...(st.error ? { error: st.error } : {}) };
  }

  async abort(ticket: string, hid: string, reason: string): Promise<ReceiveStatus> {
    const { handle } = await this.handleFor(ticket, hid, 'allow');
    // The run stops first: a catalog that does not answer must not keep the host receiving.
    await this.stopReceiving(handle, reason);
    await this.options.catalog?.endTicket(hid, 'aborted').catch(() => false);
    const st = await this.client.withDeadline(Date.now() + 5000, () => this.status(ticket, hid)).catch(() => undefined);
    return st ?? { handoffId: hid, phase: 'aborted', applied: 0, error: 'the receiving host has not confirmed yet; it removes what it made when it runs again' };
  }

  /** Signals the receiving run to abort and waits (a while) for it to end. */
  private async stopReceiving(handle: WorkflowHandle, reason: string): Promise<void> {
    const d = await handle.describe();
    if (d.status.name === 'RUNNING') {
      await handle.signal(abortSignal, { reason });
      // The receiving host removes what it made; a host that is down does so when it is back.
      const deadline = Date.now() + ABORT_WAIT_MS;
      while (Date.now() < deadline && (await handle.describe()).status.name === 'RUNNING') await new Promise((r) => setTimeout(r, 250));
    }
  }

  async listTickets(): Promise<TicketView[]> {
    const catalog = this.needCatalog();
    const now = Date.now();
    return (await catalog.listTickets()).map((t) => ticketView(t, now));
  }

  async revokeTicket(hid: string): Promise<TicketView> {
    const catalog = this.needCatalog();
    const rec = await catalog.ticketOfHandoff(hid);
    if (!rec) throw new CloudletError('NOT_FOUND', `this cluster issued no ticket for handoff ${hid}`, { fix: 'list them with GET /v1/handoff-tickets' });
    if (await catalog.endTicket(hid, 'revoked')) {
      // Its receiving host stops and removes what it made, so the receiver refuses the ticket too.
      const handle = this.client.workflow.getHandle(receiveOperationId(rec.hostId, rec.instanceId, hid));
      try {
        await this.stopReceiving(handle, 'an admin of the destination revoked the ticket');
      } catch (e) {
        if (!(e instanceof WorkflowNotFoundError)) {
          throw new CloudletError('DESTINATION_UNAVAILABLE', `ticket of handoff ${hid} revoked (the API refuses it), but its receiving run could not be told to stop: ${(e as Error).message}`, {
            fix: 'revoke it again once the Temporal server answers; until then its receiving host still takes uploads for it',
            cause: e,
          });
        }
      }
    }
    return ticketView((await catalog.ticketOfHandoff(hid)) ?? rec, Date.now());
  }

  private needCatalog(): NonNullable<HandoffServiceOptions['catalog']> {
    if (!this.options.catalog) throw new CloudletError('CATALOG_UNAVAILABLE', 'this API server keeps no cluster catalog, so it keeps no handoff tickets', { fix: 'start it with the Temporal backend (npm run api), which opens the catalog' });
    return this.options.catalog;
  }

  // ---- source ------------------------------------------------------------------------------------

  async handoffInstance(instanceId: string, req: HandoffInstanceRequest): Promise<OperationRef> {
    const inst = await this.service.getInstance(instanceId);
    if (!inst || inst.state !== 'running') {
      throw new CloudletError(inst ? 'CONFLICT' : 'NOT_FOUND', inst ? `instance ${instanceId} is ${inst.state}; only a running instance can be handed off` : `instance ${instanceId} does not exist`, { fix: 'list instances with GET /v1/instances' });
    }
    const peer = new HandoffPeer(req.destination.apiUrl);
    const ticket = await peer.begin(req.destination.credentials.token, { instanceId, baseId: inst.baseId, ...(req.hostId ? { hostId: req.hostId } : {}), ...(req.tenant ? { tenant: req.tenant } : {}) });
    return this.service.start('handoffVm', handoffVm, `handoffVm/${inst.hostId}/${instanceId}/${ticket.handoffId}`, {
      hostId: inst.hostId,
      instanceId,
      destination: { apiUrl: req.destination.apiUrl, ticket },
      ...(req.linkMbit ? { linkBytesPerSec: (req.linkMbit * 1e6) / 8 } : {}),
      ...(req.verify ? { verify: req.verify } : {}),
      ...(req.policy ? { policy: req.policy } : {}),
    }, `Hand off instance ${instanceId} from host ${inst.hostId} to ${req.destination.apiUrl} (host ${ticket.hostId})`);
  }
}

function ticketView(t: HandoffTicketRecord, now: number): TicketView {
  return { ...t, state: t.ended ?? (Date.parse(t.expiresAt) < now ? 'expired' : 'live') };
}

function receiveWorkflowId(c: Pick<TicketClaims, 'host' | 'inst' | 'hid'>): string {
  return receiveOperationId(c.host, c.inst, c.hid);
}

/** A CloudletError for what a run or an update refused. */
function causeOf(e: unknown, what: string): CloudletError {
  if (e instanceof CloudletError) return e;
  let cause: unknown = e;
  while (cause instanceof Error && cause.cause && !(cause instanceof ApplicationFailure)) cause = cause.cause;
  const message = cause instanceof Error ? cause.message : String(cause);
  if (e instanceof WorkflowUpdateFailedError && !(cause instanceof ApplicationFailure)) {
    // The update's validator refused it: the handoff has ended or the round is out of order.
    return new CloudletError(/ended/.test(message) ? 'FORBIDDEN' : 'CONFLICT', `${what}: ${message}`, { fix: 'start a new handoff' });
  }
  const type = cause instanceof ApplicationFailure ? cause.type : undefined;
  const known = ['WRONG_BASE', 'CORRUPT', 'DIGEST_MISMATCH', 'CONFLICT', 'TIMEOUT', 'HYPERVISOR', 'CPU_MODEL_UNUSABLE', 'NO_MEMORY'] as const;
  const code = known.find((k) => k === type) ?? 'CONFLICT';
  return new CloudletError(code, `${what}: ${message}`);
}
