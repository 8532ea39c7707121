/**
 * API tokens: `clt_<id>_<secret>`, 8 hex digits of public id and 48 of secret (192 bits). Only the
 * sha256 of the whole token is stored; the id finds it for listing and revocation.
 */
import { createHash, randomBytes } from 'node:crypto';
import type { NewToken, Role } from './types';

const TOKEN = /^clt_([0-9a-f]{8})_[0-9a-f]{48}$/;

export function digestToken(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}

/** A new token (returned once, to be handed to its holder) and the record to store. */
export function mintToken(tenant: string, role: Role, name: string): { token: string; record: NewToken } {
  const id = randomBytes(4).toString('hex');
  const token = `clt_${id}_${randomBytes(24).toString('hex')}`;
  return { token, record: { id, digest: digestToken(token), tenant, role, name } };
}

/** True when the string has the shape of a catalog token (other tokens are configured ones). */
export function isCatalogToken(token: string): boolean {
  return TOKEN.test(token);
}
