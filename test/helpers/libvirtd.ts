/** libvirtd faults for tests: SIGKILL the running libvirtd (whoever started it), start one again. */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { REPO } from './infra';

export function killLibvirtd(): void {
  const pid = Number(fs.readFileSync('/run/libvirtd.pid', 'utf8').trim());
  if (!(pid > 1) || fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim() !== 'libvirtd') throw new Error(`/run/libvirtd.pid names ${pid}, not a libvirtd`);
  process.kill(pid, 'SIGKILL');
}

export function startLibvirtd(): void {
  execFileSync('bash', ['infra/libvirt.sh', 'start'], { cwd: REPO, stdio: ['ignore', 'ignore', 'inherit'], timeout: 120_000 });
}

const virsh = (...args: string[]): string => execFileSync('virsh', ['-c', 'qemu:///system', ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });

/** The libvirt domains of a test host (running or not). */
export function domainsOf(hostId: string, onlyRunning = false): string[] {
  return virsh('list', ...(onlyRunning ? [] : ['--all']), '--name').split('\n').map((s) => s.trim()).filter((n) => n.startsWith(`cl-${hostId}-`));
}
