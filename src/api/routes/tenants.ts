/**
 * Tenancy routes: who am I, tokens (minted, listed, revoked by admins), tenants with their quota
 * and usage. Without a cluster catalog the token and tenant routes answer 501.
 */
import type { ClusterCatalog } from '../../core/cluster-catalog';
import { mintToken } from '../../core/cluster-catalog';
import { ApiError } from '../errors';
import { defineRoute, R, type Route } from '../route';
import type { TenantScope } from '../tenancy';
import type { CloudletService } from '../../service/types';
import {
  MintedTokenSchema,
  MintTokenBodySchema,
  PrincipalSchema,
  QuotaSchema,
  TenantInfoSchema,
  TenantListSchema,
  TenantParamsSchema,
  TokenListSchema,
  TokenParamsSchema,
} from '../tenant-schemas';

export function tenantRoutes(catalog: ClusterCatalog | undefined): Route[] {
  const need = (): ClusterCatalog => {
    if (!catalog) throw new ApiError(501, 'NOT_IMPLEMENTED', 'this API server runs without a cluster catalog, so it has no tenants or minted tokens', { fix: 'start it with the Temporal backend (npm run api), which opens the catalog (CLOUDLET_CATALOG_DB or CLOUDLET_CATALOG_URL)' });
    return catalog;
  };
  const info = async (c: ClusterCatalog, service: CloudletService, scope: TenantScope, tenant: string) => {
    const quota = (await c.quotaOf(tenant)) ?? {};
    const tokens = (await c.listTokens()).filter((t) => t.tenant === tenant && !t.revokedAt).length;
    // The tenant's usage as the tenant itself would count it.
    const usage = await scope.forTenant(tenant).usage(service, 0);
    return { tenant, quota, usage, tokens };
  };
  return [
    defineRoute({
      method: 'GET',
      path: '/v1/whoami',
      operationId: 'whoami',
      summary: 'Who the presented token acts as: its role, tenant and id',
      tag: 'meta',
      responses: { 200: { description: 'The principal.', schema: PrincipalSchema }, 401: R.unauthorized },
      handler: async ({ scope }) => scope.principal,
    }),
    defineRoute({
      method: 'POST',
      path: '/v1/tokens',
      operationId: 'mintToken',
      summary: 'Mint a token for a tenant and role (shown once; stored as its sha256)',
      tag: 'tenants',
      access: 'admin',
      body: MintTokenBodySchema,
      responses: { 201: { description: 'The new token.', schema: MintedTokenSchema }, 400: R.badInput, 401: R.unauthorized, 403: R.forbidden },
      handler: async ({ body, reply, req }) => {
        const { token, record } = mintToken(body.tenant, body.role, body.name);
        const rec = await need().addToken(record);
        req.log.info({ minted: rec.id, forTenant: rec.tenant, forRole: rec.role }, 'token minted');
        void reply.code(201);
        return { ...rec, token };
      },
    }),
    defineRoute({
      method: 'GET',
      path: '/v1/tokens',
      operationId: 'listTokens',
      summary: 'List the minted tokens (ids, tenants, roles; never the tokens)',
      tag: 'tenants',
      access: 'admin',
      responses: { 200: { description: 'The tokens, revoked ones included.', schema: TokenListSchema }, 401: R.unauthorized, 403: R.forbidden },
      handler: async () => ({ tokens: await need().listTokens() }),
    }),
    defineRoute({
      method: 'DELETE',
      path: '/v1/tokens/{id}',
      operationId: 'revokeToken',
      summary: 'Revoke a token: the next request with it is refused',
      tag: 'tenants',
      access: 'admin',
      params: TokenParamsSchema,
      responses: { 200: { description: 'Revoked.' }, 400: R.badInput, 401: R.unauthorized, 403: R.forbidden, 404: R.notFound },
      handler: async ({ params, req }) => {
        if (!(await need().revokeToken(params.id))) throw new ApiError(404, 'NOT_FOUND', `no live token ${params.id}`, { fix: 'list tokens with GET /v1/tokens' });
        req.log.info({ revoked: params.id }, 'token revoked');
        return { revoked: params.id };
      },
    }),
    defineRoute({
      method: 'GET',
      path: '/v1/tenants',
      operationId: 'listTenants',
      summary: 'List tenants (those with tokens or a quota) with their quota and usage',
      tag: 'tenants',
      access: 'admin',
      responses: { 200: { description: 'The tenants.', schema: TenantListSchema }, 401: R.unauthorized, 403: R.forbidden },
      handler: async ({ service, scope }) => {
        const c = need();
        const names = new Set([...(await c.listTokens()).filter((t) => !t.revokedAt).map((t) => t.tenant), ...(await c.listQuotas()).map((q) => q.tenant)]);
        return { tenants: await Promise.all([...names].sort().map((t) => info(c, service, scope, t))) };
      },
    }),
    defineRoute({
      method: 'GET',
      path: '/v1/tenants/{tenant}',
      operationId: 'getTenant',
      summary: 'A tenant\'s quota and usage (members and readers: their own tenant only)',
      tag: 'tenants',
      params: TenantParamsSchema,
      responses: { 200: { description: 'The tenant.', schema: TenantInfoSchema }, 400: R.badInput, 401: R.unauthorized, 404: R.notFound },
      handler: async ({ params, service, scope }) => {
        if (!scope.isAdmin && scope.principal.tenant !== params.tenant) throw new ApiError(404, 'NOT_FOUND', `tenant ${params.tenant} does not exist`, { fix: 'ask about your own tenant (GET /v1/whoami names it)' });
        return info(need(), service, scope, params.tenant);
      },
    }),
    defineRoute({
      method: 'POST',
      path: '/v1/tenants/{tenant}/quota',
      operationId: 'setQuota',
      summary: 'Set a tenant\'s quota (instances, guest memory); a field left out is unlimited',
      tag: 'tenants',
      access: 'admin',
      params: TenantParamsSchema,
      body: QuotaSchema,
      responses: { 200: { description: 'The tenant with its new quota.', schema: TenantInfoSchema }, 400: R.badInput, 401: R.unauthorized, 403: R.forbidden },
      handler: async ({ params, body, service, scope, req }) => {
        const c = need();
        await c.setQuota(params.tenant, body);
        req.log.info({ forTenant: params.tenant, quota: body }, 'quota set');
        return info(c, service, scope, params.tenant);
      },
    }),
  ];
}
