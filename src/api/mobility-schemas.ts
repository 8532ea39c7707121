/**
 * The mobility routes' schemas (registered with the API's named schemas for the OpenAPI document).
 * Limits: an RTT sample is a positive number of milliseconds up to 60 s (more is not an RTT, it is
 * a broken measurement); a policy's fields keep to POLICY_LIMITS (src/workflows/mobility-policy.ts).
 */
import { z } from 'zod';
import { INTEGER_FIELDS, POLICY_LIMITS, type MobilityPolicy } from '../workflows/mobility-policy';
import { NEIGHBOUR_NAME_PATTERN } from '../core/mobility/registry';
import { named, RecipeIdSchema, Sha256IdSchema } from './schemas';

export const MAX_RTT_MS = 60_000;

const DeviceAddressSchema = z.string().min(3).max(300).regex(/^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/, 'host:port of the device\'s RTT responder');
export const RttMsSchema = z.number().positive('an RTT is above 0 ms').max(MAX_RTT_MS, `an RTT above ${MAX_RTT_MS} ms is a failed measurement, not an RTT`);

const policyShape = Object.fromEntries(
  (Object.entries(POLICY_LIMITS) as [keyof MobilityPolicy, readonly [number, number]][]).map(([k, [lo, hi]]) => [k, (INTEGER_FIELDS.includes(k) ? z.number().int() : z.number()).min(lo).max(hi).optional()]),
) as Record<keyof MobilityPolicy, z.ZodOptional<z.ZodNumber>>;
export const PolicyPatchSchema = named('MobilityPolicyPatch', z.strictObject(policyShape), 'Fields of the mobility policy to change (docs/mobility.md); every one optional.');

export const NeighbourNameParamsSchema = z.strictObject({ name: z.string().regex(NEIGHBOUR_NAME_PATTERN, 'a neighbour name (DNS label)') });

export const AddNeighbourBodySchema = named(
  'AddNeighbourRequest',
  z.strictObject({
    name: z.string().regex(NEIGHBOUR_NAME_PATTERN, 'a DNS label, e.g. "west"'),
    apiUrl: z.string().min(1).max(2000),
    token: z.string().min(16, 'a bearer token the neighbour API accepts (16+ characters)').max(4096),
  }),
  'A neighbour cluster: its API URL and a token its API accepts (kept in the registry, never shown).',
);

export const NeighbourSchema = named(
  'Neighbour',
  z.object({
    name: z.string(),
    apiUrl: z.string(),
    addedAt: z.string(),
    status: z.enum(['fresh', 'stale', 'unreachable', 'unmeasured']),
    rtt: z.object({ ms: z.number(), measuredAt: z.string(), servingHosts: z.number() }).optional(),
    lastError: z.object({ message: z.string(), at: z.string() }).optional(),
  }),
);
export const NeighbourListSchema = z.array(NeighbourSchema);

export const RttReportBodySchema = named(
  'RttReport',
  z.strictObject({
    samples: z.array(RttMsSchema).min(1).max(100),
    device: DeviceAddressSchema.optional(),
  }),
  'RTT samples (ms) the device measured to this cloudlet; `device`: where the device answers RTT probes.',
);

export const WatchBodySchema = named(
  'WatchRequest',
  z.strictObject({ device: DeviceAddressSchema.optional(), policy: PolicyPatchSchema.optional(), cooldownMs: z.number().int().min(0).max(86_400_000).optional() }),
  'Start (or change) the mobility controller of an instance.',
);

export const MoveBodySchema = z.strictObject({ neighbour: z.string().regex(NEIGHBOUR_NAME_PATTERN).optional() });
export const PauseBodySchema = z.strictObject({ paused: z.boolean() });

export const RttProbeBodySchema = named(
  'RttProbeRequest',
  z.strictObject({ device: DeviceAddressSchema, baseId: Sha256IdSchema.optional() }),
  'Measure this cluster\'s RTT to the device (and say whether it holds the base).',
);

export const DiscoverQuerySchema = z.strictObject({ app: z.union([Sha256IdSchema, RecipeIdSchema]), device: DeviceAddressSchema });

/** Answers are checked loosely: they are built by the service. */
export const AnyObjectSchema = z.record(z.string(), z.unknown());
