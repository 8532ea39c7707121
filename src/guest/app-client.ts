/**
 * Host-side client of the test guest's application (busybox httpd + CGI on the guest's port
 * 8080, reached through a QEMU user-network forward on 127.0.0.1). See docs/test-guest.md.
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

  /** Poll until the application answers; `onWait` is called between attempts (e.g. to heartbeat). */
  async waitForState(timeoutMs: number, onWait?: () => void): Promise<{ state: GuestState; waitedMs: number }> {
    const started = Date.now();
    let lastError: unknown;
    while (Date.now() - started < timeoutMs) {
      try {
        return { state: await this.state(3000), waitedMs: Date.now() - started };
      } catch (e) {
        lastError = e;
        onWait?.();
        await new Promise((r) => setTimeout(r, 200));
      }
    }
    throw new CloudletError('TIMEOUT', `the guest application at ${this.url('/cgi-bin/state')} did not answer within ${timeoutMs} ms (last error: ${lastError instanceof Error ? lastError.message : String(lastError)})`, {
      fix: 'check the VM is running and its port forward exists (virsh list; the serial log in the instance directory)',
    });
  }
}
