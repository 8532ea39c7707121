/**
 * Bearer-token authentication: who is asking. Two kinds of token:
 * - configured ones (CLOUDLET_API_TOKENS): the operators' admin tokens, of no tenant, compared in
 *   constant time (sha256 digests of equal length, no early exit);
 * - tokens minted into the cluster catalog (POST /v1/tokens): each acts for one tenant in one
 *   role, is stored as its sha256 only, and is looked up by that digest on every request, so a
 *   token added or revoked takes effect at once, without a restart.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { digestToken, isCatalogToken, type ClusterCatalog, type Role } from '../core/cluster-catalog';
import { ApiError } from './errors';

export const REALM = 'cloudlet';

/** Tokens shorter than this are refused at start: they are guessable. */
export const MIN_TOKEN_LENGTH = 16;

/** Who a request acts as. `tenant` is undefined for the cluster's operators (configured tokens). */
export interface Principal {
  role: Role;
  tenant?: string;
  /** The token's public id ("config-1" for the first configured token); logged, never the token. */
  tokenId: string;
}

export class TokenSet {
  private readonly digests: Buffer[];

  constructor(tokens: readonly string[]) {
    this.digests = tokens.map(digest);
  }

  get size(): number {
    return this.digests.length;
  }

  /** The index of the token `presented` equals, or -1; takes the same time whichever matches. */
  indexOf(presented: string): number {
    const d = digest(presented);
    let found = -1;
    this.digests.forEach((known, i) => {
      if (timingSafeEqual(d, known)) found = i;
    });
    return found;
  }

  accepts(presented: string): boolean {
    return this.indexOf(presented) >= 0;
  }
}

function digest(s: string): Buffer {
  return createHash('sha256').update(s, 'utf8').digest();
}

/** Parse `CLOUDLET_API_TOKENS` (comma-separated, blanks ignored) and check each token's length. */
export function parseTokens(value: string | undefined): string[] {
  const tokens = (value ?? '')
    .split(',')
    .map((t) => t.trim())
    .filter((t) => t.length > 0);
  for (const t of tokens) {
    if (t.length < MIN_TOKEN_LENGTH || /\s/.test(t)) {
      throw new Error(
        `CLOUDLET_API_TOKENS holds a token of ${t.length} characters; tokens must be at least ${MIN_TOKEN_LENGTH} characters without spaces. ` +
          'Fix: generate one with `openssl rand -hex 32`',
      );
    }
  }
  return tokens;
}

export class Authenticator {
  private readonly configured: TokenSet;

  constructor(
    tokens: readonly string[],
    private readonly catalog: ClusterCatalog | undefined,
  ) {
    this.configured = new TokenSet(tokens);
  }

  /** The principal of the request's Authorization header; throws a 401 ApiError with a WWW-Authenticate challenge. */
  async authenticate(header: string | undefined): Promise<Principal> {
    if (header === undefined || header === '') {
      throw new ApiError(401, 'UNAUTHORIZED', 'this request needs an Authorization: Bearer <token> header', {
        fix: 'send a token configured in CLOUDLET_API_TOKENS or one minted with POST /v1/tokens',
        headers: { 'www-authenticate': `Bearer realm="${REALM}"` },
      });
    }
    const m = /^Bearer[ ]+([^\s]+)\s*$/i.exec(header);
    if (!m || m[1] === undefined) {
      throw new ApiError(401, 'UNAUTHORIZED', 'the Authorization header is not of the form "Bearer <token>"', {
        fix: 'send Authorization: Bearer <token>',
        headers: { 'www-authenticate': `Bearer realm="${REALM}", error="invalid_request"` },
      });
    }
    const token = m[1];
    const i = this.configured.indexOf(token);
    if (i >= 0) return { role: 'admin', tokenId: `config-${i + 1}` };
    if (this.catalog && isCatalogToken(token)) {
      const rec = await this.catalog.tokenByDigest(digestToken(token));
      if (rec) return { role: rec.role, tenant: rec.tenant, tokenId: rec.id };
    }
    throw new ApiError(401, 'UNAUTHORIZED', 'the bearer token is not one this API accepts (unknown, mistyped or revoked)', {
      fix: 'use a token listed in the server\'s CLOUDLET_API_TOKENS, or ask an admin for a new one (POST /v1/tokens)',
      headers: { 'www-authenticate': `Bearer realm="${REALM}", error="invalid_token"` },
    });
  }
}

/** Which role a route needs: admins may do everything, members act on their tenant's resources, readers only read them. */
export type Access = Role;

const RANK: Record<Role, number> = { reader: 0, member: 1, admin: 2 };

/** Refuses (403) a principal whose role is below what the route needs. */
export function authorize(p: Principal, needs: Access, what: string): void {
  if (RANK[p.role] >= RANK[needs]) return;
  throw new ApiError(403, 'FORBIDDEN', `a ${p.role} token may not ${what}: it needs the ${needs} role`, {
    fix: needs === 'admin' ? 'ask an operator (an admin token) to do it' : 'use a member token of your tenant (a reader token only reads)',
  });
}
