/**
 * `virsh` for what the native binding lacks (attach/detach device, restore with XML, domain
 * capabilities, CPU comparison, QEMU monitor commands). Arguments go to execFile: no shell.
 */
import { execFile } from 'node:child_process';

export class VirshError extends Error {
  constructor(
    readonly args: string[],
    readonly stderr: string,
    readonly exitCode: number | string | undefined,
  ) {
    super(`virsh ${args.join(' ')} failed: ${stderr.trim() || `exit ${String(exitCode)}`}`);
    this.name = 'VirshError';
  }
}

export function runVirsh(uri: string, args: string[], timeoutMs = 120000): Promise<string> {
  const full = ['-c', uri, ...args];
  return new Promise((resolve, reject) => {
    execFile('virsh', full, { timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (err) {
        const e = err as NodeJS.ErrnoException & { code?: number | string };
        const msg = String(stderr).trim() || (e.code === 'ENOENT' ? 'virsh is not installed' : e.message);
        reject(new VirshError(args, msg, e.code));
        return;
      }
      resolve(String(stdout));
    });
  });
}
