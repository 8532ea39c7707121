/**
 * Handoff tickets: what the destination's API gives a source so that it may send one VM to one
 * host of the destination, for a short time. A ticket is `<claims, base64url JSON>.<HMAC-SHA256,
 * base64url>` under the destination cluster's secret, which its API and its host workers share.
 * The host checks the signature, the expiry and that the handoff is still receiving; once the
 * handoff ends (resumed, aborted or expired) its ticket is worth nothing (single use).
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { z } from 'zod';
import { CloudletError } from '../errors';

export const TicketClaimsSchema = z.object({
  /** Handoff id (the receiving workflow's key). */
  hid: z.string().regex(/^[a-z0-9][a-z0-9-]{0,80}$/),
  /** Destination host. */
  host: z.string().min(1),
  /** Instance id the VM will have at the destination. */
  inst: z.string().min(1),
  /** Expiry, ms since the epoch. */
  exp: z.number().int().positive(),
  /** Random, so two tickets for one handoff differ. */
  n: z.string().min(8),
});
export type TicketClaims = z.infer<typeof TicketClaimsSchema>;

const b64 = (b: Buffer): string => b.toString('base64url');

function sign(secret: Buffer, body: string): Buffer {
  return createHmac('sha256', secret).update(body, 'utf8').digest();
}

export function issueTicket(secret: Buffer, claims: Omit<TicketClaims, 'n'>): string {
  const body = b64(Buffer.from(JSON.stringify({ ...claims, n: randomBytes(9).toString('hex') }), 'utf8'));
  return `${body}.${b64(sign(secret, body))}`;
}

function refused(why: string): CloudletError {
  return new CloudletError('UNAUTHORIZED', `handoff ticket refused: ${why}`, { fix: 'ask the destination API for a new ticket (POST /v1/handoffs with valid credentials)' });
}

/** The ticket's claims if its signature holds and it has not expired; UNAUTHORIZED otherwise. */
export function verifyTicket(secret: Buffer, ticket: string, now = Date.now()): TicketClaims {
  const [body, mac, extra] = ticket.split('.');
  if (!body || !mac || extra !== undefined) throw refused('not of the form <claims>.<signature>');
  const want = sign(secret, body);
  const got = Buffer.from(mac, 'base64url');
  if (got.length !== want.length || !timingSafeEqual(got, want)) throw refused('the signature does not match (not issued by this cluster, or altered)');
  let claims: TicketClaims;
  try {
    claims = TicketClaimsSchema.parse(JSON.parse(Buffer.from(body, 'base64url').toString('utf8')));
  } catch {
    throw refused('its claims do not parse');
  }
  if (claims.exp < now) throw refused(`it expired at ${new Date(claims.exp).toISOString()}`);
  return claims;
}
