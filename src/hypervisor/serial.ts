/**
 * Waiting for a line on a guest's serial console file (libvirt <serial type='file'>).
 */
import fs from 'node:fs/promises';
import { CloudletError } from '../core/errors';

const POLL_MS = 50;

/** Complete lines (ending in \n) of `text`, without \r. */
function completeLines(text: string): string[] {
  const end = text.lastIndexOf('\n');
  if (end < 0) return [];
  return text.slice(0, end).split('\n').map((l) => l.replace(/\r/g, ''));
}

/**
 * Resolves with the first complete line at or after byte `fromByte` of `path` that matches
 * `pattern`. The file may not exist yet (the VM is starting). Throws TIMEOUT naming the file and
 * the last lines seen.
 */
export async function waitForSerialLine(path: string, pattern: RegExp, timeoutMs: number, fromByte = 0): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  let text = '';
  let exists = false;
  for (;;) {
    try {
      const buf = await fs.readFile(path);
      exists = true;
      text = buf.subarray(Math.min(fromByte, buf.length)).toString('utf8');
      const hit = completeLines(text).find((l) => pattern.test(l));
      if (hit !== undefined) return hit;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
    if (Date.now() >= deadline) break;
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
  const last = text.split('\n').map((l) => l.replace(/\r/g, '')).filter((l) => l.trim() !== '').slice(-5);
  throw new CloudletError('TIMEOUT', exists
    ? `no line matching ${String(pattern)} appeared in the serial console ${path} within ${timeoutMs} ms; last lines: ${last.length ? last.map((l) => JSON.stringify(l)).join(' | ') : '(none)'}`
    : `the serial console file ${path} did not appear within ${timeoutMs} ms`, {
    fix: 'check that the VM runs (virsh list) and boots this guest; read the whole console file and /var/log/libvirt/qemu/<domain>.log',
    details: { path, pattern: String(pattern), timeoutMs, lastLines: last },
  });
}

/** Current size of the serial file (0 if absent): pass it as `fromByte` to wait only for new lines. */
export async function serialSize(path: string): Promise<number> {
  try {
    return (await fs.stat(path)).size;
  } catch {
    return 0;
  }
}
