/**
 * Calls from one cloudlet cluster to another's API (handoff, neighbours, mobility): JSON over
 * HTTP with a bearer token, answers parsed with zod, the other side's error codes kept.
 */
import { z } from 'zod';
import { CloudletError, type ErrorCode } from '../core/errors';
import { isErrorCode } from '../api/codes';

const ErrorBodySchema = z.object({ error: z.object({ code: z.string(), message: z.string(), fix: z.string().optional() }) });

export function unreachable(what: string, url: string, cause: unknown): CloudletError {
  const why = (cause as { cause?: { code?: string } })?.cause?.code ?? (cause as Error)?.message ?? String(cause);
  return new CloudletError('DESTINATION_UNAVAILABLE', `${what}: ${url} did not answer (${why})`, {
    fix: 'check that the other cloudlet\'s API (and, for a handoff, its host workers) run and are reachable from this host',
    cause,
  });
}

export async function failure(what: string, res: Response): Promise<CloudletError> {
  const text = await res.text().catch(() => '');
  let code: ErrorCode = res.status >= 500 ? 'DESTINATION_UNAVAILABLE' : res.status === 401 ? 'UNAUTHORIZED' : res.status === 403 ? 'FORBIDDEN' : 'BAD_INPUT';
  let message = text.slice(0, 300);
  try {
    const body = ErrorBodySchema.parse(JSON.parse(text));
    if (isErrorCode(body.error.code)) code = body.error.code;
    message = body.error.message;
  } catch {
    // not our JSON error body
  }
  return new CloudletError(code, `${what}: ${new URL(res.url || 'http://unknown').host} answered ${res.status}: ${message}`, {
    details: { status: res.status },
    ...(code === 'UNAUTHORIZED' ? { fix: 'use credentials the destination API accepts (its CLOUDLET_API_TOKENS), or a fresh ticket' } : {}),
  });
}

export async function call<T>(what: string, url: string, init: RequestInit, schema: z.ZodType<T>, timeoutMs = 120_000): Promise<T> {
  let res: Response;
  try {
    res = await fetch(url, { ...init, signal: AbortSignal.timeout(timeoutMs) });
  } catch (e) {
    throw unreachable(what, url, e);
  }
  if (!res.ok) throw await failure(what, res);
  const parsed = schema.safeParse(await res.json());
  if (!parsed.success) throw new CloudletError('DESTINATION_UNAVAILABLE', `${what}: unexpected answer from ${url}: ${parsed.error.message}`, { fix: 'check that both clusters run compatible versions' });
  return parsed.data;
}

export const json = (bearer: string, body?: unknown): RequestInit => ({
  headers: { authorization: `Bearer ${bearer}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
  ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
});

