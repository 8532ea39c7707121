/**
 * Wait for a condition, never for a fixed time: call `attempt` until it returns a value other
 * than undefined, retrying when it throws, and fail after `timeoutMs` naming what was awaited and
 * the last error seen.
 */
export async function pollUntil<T>(what: string, timeoutMs: number, attempt: () => Promise<T | undefined>, intervalMs = 200): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const value = await attempt();
      if (value !== undefined) return value;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last instanceof Error ? ` (last error: ${last.message})` : ''}`);
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** pollUntil for a yes/no condition. */
export async function waitFor(what: string, check: () => Promise<boolean>, timeoutMs: number, intervalMs = 200): Promise<void> {
  await pollUntil(what, timeoutMs, async () => ((await check()) ? true : undefined), intervalMs);
}
