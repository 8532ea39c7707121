/**
 * HTTP GET/HEAD under a fetch policy (docs/security.md). The address is checked where the
 * connection is made: host names are resolved by a lookup that hands the socket only allowed
 * addresses (no window between a check and a second resolution for DNS rebinding to use), address
 * literals are checked before the request, and every redirect is followed by hand and checked
 * again. Connect, header and body-idle timeouts come from the policy's limits.
 */
import dns from 'node:dns';
import type { LookupAddress, LookupOptions } from 'node:dns';
import { Agent, fetch as undiciFetch, type Response } from 'undici';
import { CloudletError, findCause, isCloudletError } from '../errors';
import { normalizeAddress, refused, type FetchPolicy } from './policy';

export type { Response } from 'undici';

type LookupCallback = (err: NodeJS.ErrnoException | null, address: string | LookupAddress[], family?: number) => void;

/** A refusal by the lookup, turned into SOURCE_REFUSED for the URL by `guardedFetch`. */
class LookupRefusal extends Error {
  readonly code = 'SOURCE_REFUSED';
}

function fixOf(policy: FetchPolicy): string {
  return `fetch from an allowed address (allowed now: ${policy.allow.entries.join(', ') || 'nothing'}); an operator extends CLOUDLET_FETCH_ALLOW`;
}

/** A dns.lookup that returns only the addresses the policy allows for `hostname`. */
function guardedLookup(policy: FetchPolicy) {
  return (hostname: string, options: LookupOptions, callback: LookupCallback): void => {
    dns.lookup(hostname, { ...options, all: true }, (err, addresses) => {
      if (err) return callback(err, []);
      const allowed = addresses.filter((a) => policy.allow.refusal(a.address, hostname) === undefined);
      if (allowed.length === 0) {
        const why = addresses.map((a) => policy.allow.refusal(a.address, hostname)).join('; ');
        return callback(new LookupRefusal(`${hostname} resolves to ${why || 'no address'}`), []);
      }
      if (options.all) return callback(null, allowed);
      const first = allowed[0] as LookupAddress;
      return callback(null, first.address, first.family);
    });
  };
}

/** One connection pool per policy: keep-alive connections are reused between Range requests. */
const agents = new WeakMap<FetchPolicy, Agent>();
function agentFor(policy: FetchPolicy): Agent {
  let agent = agents.get(policy);
  if (!agent) {
    agent = new Agent({
      connect: { lookup: guardedLookup(policy), timeout: policy.limits.headersTimeoutMs },
      headersTimeout: policy.limits.headersTimeoutMs,
      bodyTimeout: policy.limits.bodyIdleTimeoutMs,
    });
    agents.set(policy, agent);
  }
  return agent;
}

/** Refuses a URL that is not http(s), carries credentials, or names a refused address literally. */
export function checkUrl(what: string, url: string, policy: FetchPolicy): URL {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new CloudletError('BAD_INPUT', `${what} "${url}" is not a URL`, { fix: 'give an http(s) URL' });
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw refused(what, url, `the scheme ${u.protocol} is not http or https`, 'give an http(s) URL');
  if (u.username || u.password) throw refused(what, url, 'it carries credentials', 'give the URL without user name and password');
  const literal = normalizeAddress(u.hostname);
  if (literal) {
    const why = policy.allow.refusal(literal.address);
    if (why) throw refused(what, url, why, fixOf(policy));
  }
  return u;
}

export interface GuardedInit {
  method?: 'GET' | 'HEAD';
  headers?: Record<string, string>;
  signal?: AbortSignal;
}

/**
 * Fetches `url` under `policy`, following up to `maxRedirects` redirects, each checked. Network
 * failures throw TypeError as fetch does (their cause says why); policy refusals throw
 * SOURCE_REFUSED, timeouts TIMEOUT.
 */
export async function guardedFetch(what: string, url: string, policy: FetchPolicy, init: GuardedInit = {}): Promise<Response> {
  let current = checkUrl(what, url, policy);
  const agent = agentFor(policy);
  for (let hop = 0; ; hop++) {
    let res: Response;
    try {
      res = await undiciFetch(current, {
        method: init.method ?? 'GET',
        ...(init.headers ? { headers: init.headers } : {}),
        ...(init.signal ? { signal: init.signal } : {}),
        redirect: 'manual',
        dispatcher: agent,
      });
    } catch (e) {
      throw unwrap(e, what, current.href, policy);
    }
    const location = res.status >= 300 && res.status < 400 ? res.headers.get('location') : null;
    if (location === null) return res;
    await res.body?.cancel().catch(() => undefined);
    if (hop >= policy.limits.maxRedirects) throw refused(what, url, `it redirects more than ${policy.limits.maxRedirects} times`, 'give the final URL');
    current = checkUrl(what, new URL(location, current).href, policy);
  }
}

/** The policy's or the timeout's own error out of fetch's TypeError; other failures as they are. */
function unwrap(e: unknown, what: string, url: string, policy: FetchPolicy): unknown {
  const code = (c: unknown): unknown => (c as { code?: unknown }).code;
  const c = findCause(e, (x) => isCloudletError(x) || x instanceof LookupRefusal || code(x) === 'UND_ERR_HEADERS_TIMEOUT' || code(x) === 'UND_ERR_CONNECT_TIMEOUT', 5);
  if (c === undefined || isCloudletError(c)) return c ?? e;
  if (c instanceof LookupRefusal) return refused(what, url, c.message, fixOf(policy));
  return new CloudletError('TIMEOUT', `${what} ${url} did not answer within ${policy.limits.headersTimeoutMs} ms`, { fix: 'check that the server is up; an operator may raise CLOUDLET_FETCH_TIMEOUT_S', cause: e });
}

/** A body-idle timeout while reading, as a TIMEOUT error (other errors as they are). */
export function bodyError(e: unknown, what: string, url: string, policy: FetchPolicy): unknown {
  if (findCause(e, (c) => (c as { code?: unknown }).code === 'UND_ERR_BODY_TIMEOUT', 5) === undefined) return e;
  return new CloudletError('TIMEOUT', `${what} ${url} sent nothing for ${policy.limits.bodyIdleTimeoutMs} ms`, { fix: 'check the server and the network; an operator may raise CLOUDLET_FETCH_IDLE_TIMEOUT_S', cause: e });
}
