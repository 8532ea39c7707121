/** Schemas of the tenancy routes: tokens, tenants and their quotas (docs/security.md). */
import { z } from 'zod';
import { ROLES, TENANT_NAME } from '../core/cluster-catalog/types';
import { named } from './schemas';

export const TenantNameSchema = z.string().regex(TENANT_NAME, 'a tenant name: lower-case letters, digits and "-", 1-63 characters, starting with a letter or digit');
const RoleSchema = z.enum(ROLES);

export const PrincipalSchema = named(
  'Principal',
  z.object({ role: RoleSchema, tenant: z.string().optional().describe('Absent for the operators\' configured tokens.'), tokenId: z.string() }),
  'Who the presented token acts as.',
);

export const MintTokenBodySchema = named(
  'MintTokenRequest',
  z.strictObject({
    tenant: TenantNameSchema,
    role: RoleSchema.default('member'),
    name: z.string().max(100).refine((s) => [...s].every((c) => c >= ' ' && c !== '\u007f'), 'printable text, without control characters').default('').describe('Who or what holds the token (shown in listings).'),
  }),
);

const TokenInfoSchema = z.object({ id: z.string(), tenant: z.string(), role: RoleSchema, name: z.string(), createdAt: z.string(), revokedAt: z.string().optional() });
export const TokenRecordSchema = named('TokenInfo', TokenInfoSchema, 'A token as the catalog keeps it: never the token itself.');
export const MintedTokenSchema = named('MintedToken', TokenInfoSchema.extend({ token: z.string().describe('The bearer token: shown this once, stored only as its sha256.') }));
export const TokenListSchema = named('TokenList', z.object({ tokens: z.array(TokenRecordSchema) }));
export const TokenParamsSchema = z.strictObject({ id: z.string().regex(/^[0-9a-f]{8}$/, 'a token id (8 hex digits)') });

export const QuotaSchema = named(
  'Quota',
  z.strictObject({
    instances: z.number().int().min(0).max(100_000).optional().describe('Instances provisioning or running at once.'),
    memoryMiB: z.number().int().min(0).max(1 << 30).optional().describe('Their guest memory, MiB.'),
  }),
  'Limits of a tenant; an absent field is unlimited.',
);
export const TenantParamsSchema = z.strictObject({ tenant: TenantNameSchema });
export const TenantInfoSchema = named(
  'TenantInfo',
  z.object({
    tenant: z.string(),
    quota: QuotaSchema,
    usage: z.object({ instances: z.number().int(), memoryMiB: z.number().int() }),
    tokens: z.number().int().describe('Live tokens of the tenant.'),
  }),
);
export const TenantListSchema = named('TenantList', z.object({ tenants: z.array(TenantInfoSchema) }));
