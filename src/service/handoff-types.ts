/**
 * What the API offers for handoff, independent of how it is carried out (the Temporal-backed
 * TemporalHandoffService; the API answers 501 without one).
 */
import type { AppliedRoundInfo, BaseImported, Fingerprint, HandoffTicket, ReceivedVm, ReceiveStatus } from '../client/handoff-peer';
import type { OperationRef } from './types';
import type { HandoffTicketRecord, TicketEnd } from '../core/cluster-catalog/types';

export type { AppliedRoundInfo, BaseImported, Fingerprint, HandoffTicket, ReceivedVm, ReceiveStatus };

/** A source asks this cluster to receive a VM. */
export interface BeginReceiveRequest {
  /** The id the VM has at the source; it keeps it here. */
  instanceId: string;
  /** The base the VM runs on (a host lacking it gets its package from the source first). */
  baseId: string;
  /** A host of this cluster (default: a serving host that holds the base, else any serving host). */
  hostId?: string;
  /** The tenant the VM belongs to here (recorded with its ticket); undefined: the admins'. */
  tenant?: string;
}

/** A ticket as an admin lists it (never the ticket itself). */
export interface TicketView extends HandoffTicketRecord {
  /** live: good until it expires; expired; or how it ended. */
  state: 'live' | 'expired' | TicketEnd;
}

/** Hand an instance of this cluster off to another cluster. */
export interface HandoffInstanceRequest {
  destination: {
    /** The destination cluster's API, e.g. http://west.example:8080 */
    apiUrl: string;
    /** Credentials its API accepts: used once, to get a ticket; never stored. */
    credentials: { token: string };
  };
  /** A host of the destination cluster (default: its choice). */
  hostId?: string;
  /** The tenant the instance belongs to here: the destination records the VM as that tenant's. */
  tenant?: string;
  /** Expected link rate to plan the first round with (Mbit/s; later rounds measure it). */
  linkMbit?: number;
  /**
   * 'digests' (default): the destination checks the rebuilt memory snapshot's sha256 and the
   * disk's chunk digests against the paused source's. 'full' also compares guest-physical memory
   * (QMP pmemsave) and the whole disk image content, hashed on both sides (longer pause).
   */
  verify?: 'digests' | 'full';
  /** When to stop the live rounds (see docs/handoff.md). */
  policy?: { maxRounds?: number; targetFinalMs?: number; maxLiveMs?: number; notConvergingRatio?: number };
}

export interface HandoffService {
  beginReceive(req: BeginReceiveRequest): Promise<HandoffTicket>;
  baseArrived(ticket: string, handoffId: string): Promise<BaseImported>;
  roundArrived(ticket: string, handoffId: string, round: { round: number; final: boolean }): Promise<AppliedRoundInfo>;
  complete(ticket: string, handoffId: string, appPort: number, verify?: Fingerprint): Promise<ReceivedVm>;
  status(ticket: string, handoffId: string): Promise<ReceiveStatus>;
  abort(ticket: string, handoffId: string, reason: string): Promise<ReceiveStatus>;
  /** The tickets this cluster issued, newest first (an admin's view). */
  listTickets(): Promise<TicketView[]>;
  /** An admin revokes a handoff's ticket: it is refused from now on, and the handoff is aborted. */
  revokeTicket(handoffId: string): Promise<TicketView>;
  handoffInstance(instanceId: string, req: HandoffInstanceRequest): Promise<OperationRef>;
}

/** The id of the receiveHandoff operation a ticket stands for (its owner is the tenant that asked for the ticket). */
export function receiveOperationId(hostId: string, instanceId: string, handoffId: string): string {
  return `receiveHandoff/${hostId}/${instanceId}/${handoffId}`;
}
