/**
 * Host-side client of the test guest's application (busybox httpd + CGI on the guest's port
 * 8080, reached through a QEMU user-network forward on 127.0.0.1; docs/test-guest.md), and a
 * readiness wait for any HTTP application behind such a forward.
 */
import { z } from 'zod';
import { CloudletError } from '../core/errors';

export const GuestStateSchema = z.object({
  token: z.string(),
  disk: z.string(),
  counter: z.coerce.number().int(),
  bootId: z.string(),
});
export type GuestState = z.infer<typeof GuestStateSchema>;

async function getJson(url: string, timeoutMs: number): Promise<GuestState> {
  const res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
  const text = await res.text();
  if (!res.ok) throw new CloudletError('HYPERVISOR', `the guest application answered ${res.status} to ${url}: ${text.slice(0, 200)}`);
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch (cause) {
    throw new CloudletError('CORRUPT', `the guest application's answer to ${url} is not JSON: ${text.slice(0, 200)}`, { cause });
  }
  return GuestStateSchema.parse(body);
}

/** First per-attempt deadline of waitForState (doubled after each failed attempt). */
const ATTEMPT_MS = 1000;
/** Pause between two attempts of waitForState. */
const RETRY_MS = 25;

export class GuestAppClient {
  constructor(readonly hostPort: number, readonly host = '127.0.0.1') {}

  private url(p: string): string {
    return `http://${this.host}:${this.hostPort}${p}`;
  }

  state(timeoutMs = 5000): Promise<GuestState> {
    return getJson(this.url('/cgi-bin/state'), timeoutMs);
  }

  set(token: string, message: string, timeoutMs = 10000): Promise<GuestState> {
    const q = new URLSearchParams({ token, message });
    return getJson(this.url(`/cgi-bin/set?${q.toString()}`), timeoutMs);
  }

  /**
   * Poll until the application answers; `onWait` is called between attempts (e.g. to heartbeat).
   *
   * Right after a restore or a NIC replug the forward already accepts connections on the host,
   * but QEMU's user network queues the connection to the guest until the guest has configured
   * its new NIC (and drops it after about a second; its own retransmission comes seconds later).
   * So an attempt gets a short deadline first (ATTEMPT_MS, doubling up to `attemptMaxMs`) and a
   * failed attempt is retried after RETRY_MS: the first answer comes within a few tens of ms of
   * the guest being reachable, and a slow answer still gets the full per-attempt deadline.
   */
  async waitForState(timeoutMs: number, onWait?: () => void, attemptMaxMs = 3000): Promise<{ state: GuestState; waitedMs: number }> {
    const r = await this.retry('/cgi-bin/state', (ms) => this.state(ms), timeoutMs, onWait, attemptMaxMs);
    return { state: r.value, waitedMs: r.waitedMs };
  }

  /**
   * Poll until an application (any, not only the test guest's) answers HTTP on `path`, whatever
   * its status: a reply proves the guest's network and the application's socket are up (a bare
   * TCP connect does not: the forward accepts connections before the guest does).
   */
  async waitForHttp(path: string, timeoutMs: number, onWait?: () => void, attemptMaxMs = 3000): Promise<{ status: number; waitedMs: number }> {
    const r = await this.retry(path, async (ms) => {
      const res = await fetch(this.url(path), { signal: AbortSignal.timeout(ms) });
      await res.arrayBuffer();
      return res.status;
    }, timeoutMs, onWait, attemptMaxMs);
    return { status: r.value, waitedMs: r.waitedMs };
  }

  private async retry<T>(path: string, attempt: (ms: number) => Promise<T>, timeoutMs: number, onWait: (() => void) | undefined, attemptMaxMs: number): Promise<{ value: T; waitedMs: number }> {
    const started = Date.now();
    let lastError: unknown;
    let attemptMs = Math.min(ATTEMPT_MS, attemptMaxMs);
    while (Date.now() - started < timeoutMs) {
      const left = timeoutMs - (Date.now() - started);
      try {
        return { value: await attempt(Math.max(1, Math.min(attemptMs, left))), waitedMs: Date.now() - started };
      } catch (e) {
        lastError = e;
        onWait?.();
        attemptMs = Math.min(attemptMs * 2, attemptMaxMs);
        await new Promise((r) => setTimeout(r, RETRY_MS));
      }
    }
    throw new CloudletError('TIMEOUT', `the guest application at ${this.url(path)} did not answer within ${timeoutMs} ms (last error: ${lastError instanceof Error ? lastError.message : String(lastError)})`, {
      fix: 'check the VM is running and its port forward exists (virsh list; the serial log in the instance directory)',
    });
  }
}
