/**
 * The handoff routes' schemas (registered with the API's named schemas for the OpenAPI document).
 * The answers are the schemas the source's client parses them with (src/client/handoff-peer.ts).
 */
import { z } from 'zod';
import * as Peer from '../client/handoff-peer';
import { HostIdSchema, InstanceIdSchema, named, Sha256IdSchema } from './schemas';
import { TenantNameSchema } from './tenant-schemas';

const HttpUrl = z.string().url().refine((s) => /^https?:\/\//.test(s), 'an http(s) URL');

export const HandoffParamsSchema = z.strictObject({ id: z.string().regex(/^ho-[a-z0-9-]{1,78}$/, 'a handoff id (ho-...)') });

export const HandoffInstanceBodySchema = named(
  'HandoffInstanceRequest',
  z.strictObject({
    destination: z.strictObject({
      apiUrl: HttpUrl,
      credentials: z.strictObject({ token: z.string().min(1).max(4096) }),
    }),
    hostId: HostIdSchema.optional(),
    linkMbit: z.number().positive().max(100_000).optional(),
    verify: z.enum(['digests', 'full']).optional(),
    policy: z
      .strictObject({
        maxRounds: z.number().int().min(1).max(100).optional(),
        targetFinalMs: z.number().int().min(0).max(600_000).optional(),
        maxLiveMs: z.number().int().min(0).max(24 * 3600_000).optional(),
        notConvergingRatio: z.number().min(0).max(10).optional(),
      })
      .optional(),
  }),
  'Where to hand the instance off to: the destination cluster\'s API and credentials it accepts (used once, for a ticket).',
);

export const BeginReceiveBodySchema = named(
  'BeginReceiveRequest',
  z.strictObject({
    instanceId: InstanceIdSchema,
    baseId: Sha256IdSchema,
    hostId: HostIdSchema.optional(),
    tenant: TenantNameSchema.optional().describe("The tenant the VM belongs to at this cluster (the one it belonged to at the source); default the token's tenant"),
  }),
  'A source cluster asks to hand a VM over to this cluster.',
);

export const HandoffTicketSchema = named('HandoffTicket', Peer.HandoffTicketSchema, 'A short-lived, single-use ticket to send one VM to one host of this cluster, and where to send its rounds.');

export const BaseImportedSchema = named('BaseImported', Peer.BaseImportedSchema, 'The base package the source sent, imported on the receiving host.');
export const BaseArrivedBodySchema = z.strictObject({});
export const RoundArrivedBodySchema = named('RoundArrived', z.strictObject({ round: z.number().int().min(1).max(10_000), final: z.boolean() }));
export const AppliedRoundSchema = named('AppliedRound', Peer.AppliedRoundSchema);
const Sha = z.string().regex(/^[0-9a-f]{64}$/);
const FingerprintSchema = z.strictObject({ memorySha256: Sha, diskSha256: Sha });
export const CompleteBodySchema = named(
  'CompleteHandoff',
  z.strictObject({ appPort: z.number().int().min(1).max(65535), verify: FingerprintSchema.optional() }),
  'The VM\'s application port; with verify, the paused source\'s guest memory and disk hashes, which the destination checks before it resumes the VM.',
);
export const ReceivedVmSchema = named('ReceivedVm', Peer.ReceivedVmSchema);
export const AbortBodySchema = z.strictObject({ reason: z.string().max(1000).optional() });
export const ReceiveStatusSchema = named('ReceiveStatus', Peer.ReceiveStatusSchema);

export const TicketViewSchema = named(
  'HandoffTicketRecord',
  z.object({
    handoffId: z.string(),
    hostId: z.string(),
    instanceId: z.string(),
    tenant: z.string().optional().describe('The tenant the VM belongs to here; absent: the admins\''),
    createdAt: z.string(),
    expiresAt: z.string(),
    endedAt: z.string().optional(),
    ended: z.enum(['used', 'aborted', 'revoked']).optional(),
    state: z.enum(['live', 'expired', 'used', 'aborted', 'revoked']).describe('live: good until it expires; expired; or how it ended'),
  }),
  'A handoff ticket this cluster issued, as its catalog keeps it (by digest: never the ticket itself).',
);
export const TicketListSchema = named('HandoffTicketList', z.object({ tickets: z.array(TicketViewSchema) }));
