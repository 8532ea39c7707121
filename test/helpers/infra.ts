/**
 * Integration tests talk to the real Temporal dev server and real libvirt. `npm test` has
 * already started them through infra/setup.sh; a test file run on its own starts what is
 * missing through the same idempotent scripts.
 */
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import type { Client } from '@temporalio/client';
import { assertHostServing } from '../../src/client/connect';

export const REPO = path.resolve(__dirname, '..', '..');

export function ensureInfra(parts: Array<'temporal' | 'libvirt' | 'guest'> = ['temporal', 'libvirt', 'guest']): void {
  const scripts: Record<string, string[]> = {
    temporal: ['infra/temporal.sh', 'start'],
    libvirt: ['infra/libvirt.sh', 'start'],
    guest: ['infra/guest/build.sh'],
  };
  for (const p of parts) {
    execFileSync('bash', scripts[p] ?? [], { cwd: REPO, stdio: ['ignore', 'ignore', 'inherit'], timeout: 30 * 60_000 });
  }
}

/** A short unique suffix for queue, host and instance names of one test run. */
export function uniqueSuffix(): string {
  return `${process.pid.toString(36)}${Date.now().toString(36).slice(-5)}`;
}

/** Destroy and undefine every libvirt domain of the given test hosts (named cl-<hostId>-*). */
export function removeHostDomains(hostIds: string[]): void {
  const virsh = (...args: string[]): string => execFileSync('virsh', ['-c', 'qemu:///system', ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  const names = virsh('list', '--all', '--name').split('\n').map((s) => s.trim()).filter(Boolean);
  for (const n of names.filter((x) => hostIds.some((h) => x.startsWith(`cl-${h}-`)))) {
    try {
      virsh('destroy', n);
    } catch {
      // already shut off
    }
    try {
      virsh('undefine', n);
    } catch {
      // already gone
    }
  }
}

/** The command line that runs a host worker as ONE process (so a signal reaches the worker itself). */
export function workerCommand(hostId: string): { command: string; args: string[] } {
  return { command: process.execPath, args: ['--import', 'tsx', path.join(REPO, 'src', 'workers', 'main.ts'), '--host', hostId] };
}

/** Wait (with a deadline) until a worker polls each host's task queue. */
export async function waitForHostsServing(client: Client, hostIds: string[], timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (const h of hostIds) {
    for (;;) {
      try {
        await assertHostServing(client, h);
        break;
      } catch (e) {
        if (Date.now() > deadline) throw e;
        await new Promise((r) => setTimeout(r, 200));
      }
    }
  }
}
