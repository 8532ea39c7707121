/**
 * Bearer-token authentication. Tokens come from configuration; the presented token is compared
 * with every configured one in constant time (sha256 digests of equal length, no early exit), so
 * neither a token's content nor its length leaks through timing.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { ApiError } from './errors';

export const REALM = 'cloudlet';

/** Tokens shorter than this are refused at start: they are guessable. */
export const MIN_TOKEN_LENGTH = 16;

export class TokenSet {
  private readonly digests: Buffer[];

  constructor(tokens: readonly string[]) {
    this.digests = tokens.map(digest);
  }

  get size(): number {
    return this.digests.length;
  }

  /** True when `presented` equals one of the tokens; takes the same time whichever matches. */
  accepts(presented: string): boolean {
    const d = digest(presented);
    let ok = false;
    for (const known of this.digests) ok = timingSafeEqual(d, known) || ok;
    return ok;
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

/** Check the request's Authorization header; throws a 401 ApiError with a WWW-Authenticate challenge. */
export function authenticate(header: string | undefined, tokens: TokenSet): void {
  if (header === undefined || header === '') {
    throw new ApiError(401, 'UNAUTHORIZED', 'this request needs an Authorization: Bearer <token> header', {
      fix: 'send one of the tokens configured in CLOUDLET_API_TOKENS',
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
  if (!tokens.accepts(m[1])) {
    throw new ApiError(401, 'UNAUTHORIZED', 'the bearer token is not one this API accepts', {
      fix: 'use a token listed in the server\'s CLOUDLET_API_TOKENS',
      headers: { 'www-authenticate': `Bearer realm="${REALM}", error="invalid_token"` },
    });
  }
}
