/**
 * The HTTP API's boundary: zod schemas for what clients send (parsed) and what the API answers
 * (documented in the OpenAPI document). Every named schema is registered in `apiSchemas`, which is
 * where the OpenAPI components come from.
 */
import { z } from 'zod';
import { TENANT_NAME } from '../core/cluster-catalog/types';
import { HOST_ID_PATTERN } from '../common/names';

/** Named schemas of the API; their names become OpenAPI components. */
export const apiSchemas = z.registry<{ id: string; description?: string }>();

export function named<T extends z.ZodType>(id: string, schema: T, description?: string): T {
  apiSchemas.add(schema, description === undefined ? { id } : { id, description });
  return schema;
}

// ---- identifiers -------------------------------------------------------------------------------

export const HostIdSchema = z.string().regex(HOST_ID_PATTERN, 'a host id: lower-case letters, digits and dashes (a DNS label)');
export const Sha256IdSchema = z.string().regex(/^[0-9a-f]{64}$/, 'a sha256 in lower-case hex (64 characters)');
export const InstanceIdSchema = z
  .string()
  .regex(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/, 'an instance id: letters, digits, ".", "_" and "-", at most 128 characters');
/** Workflow ids, e.g. "synthesizeVm/host-b/inst-1a2b" (slashes allowed). */
export const OperationIdSchema = z.string().min(1).max(1000);
export const IdempotencyKeySchema = z
  .string()
  .regex(/^[A-Za-z0-9_-]{1,64}$/, 'an Idempotency-Key: 1 to 64 characters of A-Z, a-z, 0-9, "_" and "-"');
const PortSchema = z.number().int().min(1).max(65535);

function isHttpUrl(s: string): boolean {
  try {
    const u = new URL(s);
    return u.protocol === 'http:' || u.protocol === 'https:';
  } catch {
    return false;
  }
}
/** An http(s) URL or an absolute path on the host that runs the operation. */
const UrlOrHostPath = (what: string) =>
  z
    .string()
    .min(1)
    .max(4096)
    .refine((s) => isHttpUrl(s) || s.startsWith('/'), `${what} must be an http(s) URL or an absolute path on the host`);

// ---- requests ----------------------------------------------------------------------------------

export const ImportBaseBodySchema = named(
  'ImportBaseRequest',
  z.strictObject({
    hostId: HostIdSchema,
    source: UrlOrHostPath('source').describe('The base package: an http(s) URL or an absolute path on the host.'),
    tenant: z.string().regex(TENANT_NAME, 'a tenant name').optional().describe('The tenant the base is for (only it sees the base); without one every tenant may use it.'),
  }),
);

export const ResumeBaseBodySchema = named(
  'ResumeBaseRequest',
  z.strictObject({
    hostId: HostIdSchema,
    appPort: PortSchema.optional().describe('Guest port to forward to the host (the application port).'),
  }),
);

export const ProvisionBodySchema = named(
  'ProvisionRequest',
  z.strictObject({
    hostId: HostIdSchema,
    overlayUrl: UrlOrHostPath('overlayUrl').describe('The overlay to synthesize from (the original system\'s overlay_url).'),
    waitForAppPort: PortSchema.optional().describe('Report success only once the guest answers on this port.'),
    warmPool: z.boolean().optional().describe('false: restore as usual even when the host\'s warm pool has a VM ready (default true; docs/warm-pool.md).'),
  }),
);

export const DeployBodySchema = named(
  'DeployRequest',
  z.strictObject({
    overlayUrl: z.string().url().refine((u) => /^https?:\/\//.test(u), 'an http(s) URL').describe('The overlay every VM is synthesized from; each host fetches it once.'),
    hosts: z.array(HostIdSchema).min(1).max(32).describe('The hosts to spread the VMs over.'),
    count: z.number().int().min(1).max(200).describe('How many VMs in all, spread evenly over the hosts.'),
    waitForAppPort: PortSchema.optional().describe('Report each VM only once the guest answers on this port.'),
  }),
);

export const CreateOverlayBodySchema = named(
  'CreateOverlayRequest',
  z.strictObject({
    instanceId: InstanceIdSchema,
    keepInstance: z.boolean().optional().describe('Keep the instance running after its snapshot (default false: destroy it).'),
  }),
);

export const Sha256ParamsSchema = z.strictObject({ id: Sha256IdSchema });
export const InstanceParamsSchema = z.strictObject({ id: InstanceIdSchema });
export const OperationParamsSchema = z.strictObject({ id: OperationIdSchema });

// ---- responses ---------------------------------------------------------------------------------

export const OperationKindSchema = z.enum(['importBaseVm', 'resumeBaseVm', 'createOverlay', 'synthesizeVm', 'terminateVm', 'rebuildOverlay', 'handoffVm', 'receiveHandoff', 'reconcileHost']);

export const OperationRefSchema = named(
  'OperationRef',
  z.object({
    id: z.string().describe('The workflow id, e.g. "synthesizeVm/host-b/inst-1a2b".'),
    kind: OperationKindSchema,
    webUiUrl: z.string().optional().describe('The run in the Temporal Web UI.'),
  }),
);

export const AcceptedSchema = named(
  'Accepted',
  z.object({
    operation: OperationRefSchema,
    statusUrl: z.string().describe('Path of the operation\'s status (also in the Location header), relative to the API root.'),
  }),
  'The operation started (or, for a repeated Idempotency-Key, the one started before).',
);

export const ProgressSchema = named(
  'Progress',
  z.object({
    stage: z.string(),
    done: z.array(z.string()),
    bytesDone: z.number().optional(),
    bytesTotal: z.number().optional(),
  }),
);

export const OperationStatusSchema = named(
  'OperationStatus',
  z.object({
    id: z.string(),
    kind: OperationKindSchema,
    webUiUrl: z.string().optional(),
    state: z.enum(['running', 'succeeded', 'failed', 'cancelled']),
    hostId: z.string(),
    parentOperationId: z.string().optional().describe('The operation this one is a step of (a deployment\'s synthesis).'),
    startedAt: z.string(),
    closedAt: z.string().optional(),
    progress: ProgressSchema.optional(),
    result: z.unknown().optional().describe('The result when it succeeded (shape depends on kind).'),
    error: z.object({ type: z.string(), message: z.string(), nonRetryable: z.boolean() }).optional(),
  }),
);

export const HostStatsSchema = named(
  'HostStats',
  z.object({ memAvailableBytes: z.number(), memTotalBytes: z.number(), storeFreeBytes: z.number(), runningInstances: z.number().int(), at: z.number() }),
  'What the host has room for, read by its hostMonitor run every 5 s (at: epoch ms of the reading).',
);
export const WarmPoolSchema = named(
  'WarmPool',
  z.object({
    targets: z.record(z.string(), z.number().int()).describe('Ready VMs wanted per base id.'),
    entries: z.array(z.object({ entryId: z.string(), baseId: z.string(), domain: z.string(), memoryBytes: z.number(), createdAt: z.string(), startMs: z.number() })).describe('Ready VMs: started, paused, waiting for a synthesis.'),
    taken: z.number().int().describe('Pool VMs that syntheses took and that still run as instances.'),
    discarded: z.array(z.object({ entryId: z.string(), reason: z.string() })).describe('What the last step discarded, and why.'),
    short: z.string().optional().describe('Why the pool is below its targets and cannot grow now.'),
    memory: z.object({ capacityBytes: z.number(), admittedBytes: z.number(), poolBytes: z.number(), availableBytes: z.number(), reserveBytes: z.number() }),
    at: z.number().describe('When the pool was last looked at (epoch ms).'),
  }),
  'A host\'s warm pool (docs/warm-pool.md), as its warmPool run last saw it.',
);
export const HostInfoSchema = named('HostInfo', z.object({ id: z.string(), serving: z.boolean(), stats: HostStatsSchema.optional(), pool: WarmPoolSchema.optional() }));
export const HostParamsSchema = z.strictObject({ hostId: HostIdSchema });
export const PoolTargetBodySchema = named(
  'PoolTargetRequest',
  z.strictObject({
    baseId: Sha256IdSchema.describe('The base whose VMs the pool keeps ready (it must be on the host).'),
    size: z.number().int().min(0).max(16).describe('Ready VMs to keep (0: none). Each counts its guest memory against what the host gives VMs.'),
  }),
);
export const PoolTargetSchema = named('PoolTarget', z.object({ hostId: z.string(), baseId: z.string(), size: z.number().int() }));

export const BaseInfoSchema = named(
  'BaseInfo',
  z.object({
    id: z.string(),
    hostIds: z.array(z.string()),
    diskBytes: z.number(),
    memoryBytes: z.number(),
    cpuModel: z.string().optional(),
    importedAt: z.string(),
    operationIds: z.array(z.string()).describe('The import operations that brought it to its hosts.'),
  }),
);

export const OverlayInfoSchema = named(
  'OverlayInfo',
  z.object({
    id: z.string().describe('sha256 of the overlay file (also its ETag).'),
    baseId: z.string(),
    bytes: z.number(),
    url: z.string().describe('Where hosts fetch it (HTTP, Range supported).'),
    createdAt: z.string(),
    fromInstanceId: z.string().optional(),
    operationId: z.string().describe('The operation that made it (createOverlay or rebuildOverlay).'),
  }),
);

export const InstanceInfoSchema = named(
  'InstanceInfo',
  z.object({
    id: z.string(),
    hostId: z.string(),
    state: z.enum(['provisioning', 'running', 'terminating', 'terminated', 'failed', 'lost']).describe('lost: the VM stopped without a terminate (its host crashed or rebooted); reconciliation removed its files.'),
    baseId: z.string(),
    overlayId: z.string().optional(),
    appEndpoint: z.string().optional(),
    timings: z.record(z.string(), z.number()).optional(),
    operationId: z.string(),
    parentOperationId: z.string().optional().describe('The operation that started operationId, when it is a step of another (a deployment).'),
    progress: ProgressSchema.optional().describe('While provisioning: the progress of the operation that makes it (GET /v1/instances/{id} only).'),
  }),
);

export const ErrorBodySchema = named(
  'Error',
  z.object({
    error: z.object({
      code: z.string().describe('NOT_FOUND, CONFLICT, BAD_INPUT, UNAUTHORIZED, INTERNAL, ...'),
      message: z.string(),
      fix: z.string().optional(),
      requestId: z.string(),
      issues: z
        .array(z.object({ path: z.array(z.union([z.string(), z.number()])), message: z.string(), code: z.string() }))
        .optional()
        .describe('For 400: what is wrong, where (zod issues).'),
      details: z.record(z.string(), z.unknown()).optional(),
    }),
  }),
);
export type ErrorBody = z.infer<typeof ErrorBodySchema>;

export const HostListSchema = named('HostList', z.object({ hosts: z.array(HostInfoSchema) }));
export const BaseListSchema = named('BaseList', z.object({ bases: z.array(BaseInfoSchema) }));
export const OverlayListSchema = named('OverlayList', z.object({ overlays: z.array(OverlayInfoSchema) }));
export const InstanceListSchema = named('InstanceList', z.object({ instances: z.array(InstanceInfoSchema) }));
export const HealthSchema = named('Health', z.object({ ok: z.literal(true) }));

// ---- recipe schedules --------------------------------------------------------------------------

export const RecipeIdSchema = z.string().regex(/^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$/, 'a recipe id: lower-case letters, digits and dashes, at most 40');
export const RecipeParamsSchema = z.strictObject({ recipeId: RecipeIdSchema });

/**
 * A recipe as the API checks it: its fields and their limits (unknown fields refused); the
 * service checks the rest (file paths, package names, the check's port: see docs/recipes.md),
 * and its BAD_INPUT is a 400.
 */
export const RecipeBodySchema = named(
  'Recipe',
  z.strictObject({
    recipeId: RecipeIdSchema,
    hostId: HostIdSchema.describe('The host that builds and verifies the overlay; it must hold the base.'),
    baseId: Sha256IdSchema,
    files: z.array(z.strictObject({ path: z.string().max(1024), content: z.string(), mode: z.string().optional() })).max(64).optional(),
    packages: z.array(z.string().max(200)).max(200).optional().describe('Debian packages to install first (guests with apt only).'),
    command: z.string().min(1).max(64 * 1024).describe('Shell script run in the guest that installs and starts the application.'),
    check: z.strictObject({ path: z.string().max(1024), expect: z.string().max(4096), timeoutSeconds: z.number().int().min(1).max(600).optional() }).optional(),
    timeoutSeconds: z.number().int().min(1).max(3600).optional(),
    appPort: PortSchema.optional(),
  }),
);

export const CreateScheduleBodySchema = named(
  'CreateScheduleRequest',
  z.strictObject({
    recipe: RecipeBodySchema,
    every: z.string().regex(/^\d{1,7}\s*(s|m|h|d)$/, 'a number (at most 7 digits) and a unit: s, m, h or d, e.g. "6h"').describe('Rebuild interval (at least 10 s).'),
    paused: z.boolean().optional(),
    note: z.string().max(500).optional(),
    triggerImmediately: z.boolean().optional().describe('Also start one rebuild right away.'),
  }),
);

export const ScheduleNoteBodySchema = named('ScheduleNote', z.strictObject({ note: z.string().max(500).optional() }));

const RecipeRunSchema = z.object({ workflowId: z.string(), runId: z.string(), scheduledAt: z.string(), startedAt: z.string() });

export const ScheduleInfoSchema = named(
  'Schedule',
  z.object({
    recipeId: z.string(),
    scheduleId: z.string().describe('The Temporal Schedule id (recipe-<recipeId>).'),
    recipe: z.unknown(),
    every: z.string(),
    paused: z.boolean(),
    note: z.string().optional(),
    recentRuns: z.array(RecipeRunSchema),
    nextRunAt: z.string().optional(),
    runningWorkflowIds: z.array(z.string()).optional(),
    actionsTaken: z.number().optional(),
    skippedOverlap: z.number().optional(),
    lastRun: RecipeRunSchema.extend({ status: z.string() }).optional(),
    lastSucceeded: RecipeRunSchema.extend({ result: z.unknown() }).optional(),
  }),
);
export const TriggeredSchema = named(
  'ScheduleTriggered',
  z.object({
    recipeId: z.string(),
    scheduleUrl: z.string(),
    operation: OperationRefSchema.optional().describe('The rebuild this trigger started.'),
    statusUrl: z.string().optional().describe('Path of that rebuild\'s status (also in the Location header).'),
    skippedWhileRunning: z.array(z.string()).optional().describe('Nothing started: the workflow ids of the rebuilds of this recipe that were running.'),
  }),
);
export const ScheduleListSchema = named('ScheduleList', z.object({ schedules: z.array(ScheduleInfoSchema) }));
