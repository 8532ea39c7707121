/** The client's view of a synthesized VM: its forwarded port as soon as its record has it, and its first answer. */
import fs from 'node:fs';
import { z } from 'zod';
import { GuestAppClient, type GuestState } from '../src/guest/app-client';

const POLL_MS = 20;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * First successful GET /cgi-bin/state on 127.0.0.1:port, polled every POLL_MS. Also reports the
 * longest failed attempt: a request that hangs (slirp accepts before the guest can answer) would
 * make the measured time late by up to that much.
 */
export async function firstAnswer(port: () => number | undefined, deadlineMs: number): Promise<{ state: GuestState; longestFailedMs: number; port: number }> {
  const deadline = Date.now() + deadlineMs;
  let longestFailedMs = 0;
  for (;;) {
    const p = port();
    if (p !== undefined) {
      const a0 = performance.now();
      try {
        return { state: await new GuestAppClient(p).state(2000), longestFailedMs, port: p };
      } catch {
        longestFailedMs = Math.max(longestFailedMs, performance.now() - a0); // not answering yet
      }
    }
    if (Date.now() > deadline) throw new Error(`the application did not answer within ${deadlineMs} ms`);
    await sleep(POLL_MS);
  }
}

const InstanceFileSchema = z.object({ hostPort: z.number().int().optional() });

/** The forwarded port of an instance, read from its record on host B as soon as it is written. */
export function instancePortWatcher(file: string): () => number | undefined {
  return () => {
    try {
      return InstanceFileSchema.parse(JSON.parse(fs.readFileSync(file, 'utf8'))).hostPort;
    } catch {
      return undefined; // not written yet (or being renamed into place)
    }
  };
}

