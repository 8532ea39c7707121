/** libvirtd faults for tests: SIGKILL the running libvirtd (whoever started it), start one again. */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { REPO } from './infra';

export function killLibvirtd(): void {
  const pid = Number(fs.readFileSync('/run/libvirtd.pid', 'utf8').trim());
  if (!(pid > 1) || fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim() !== 'libvirtd') throw new Error(`/run/libvirtd.pid names ${pid}, not a libvirtd`);
  process.kill(pid, 'SIGKILL');
}

/** Starts libvirtd (infra/libvirt.sh start); what the script said (its stderr, also passed on). */
export function startLibvirtd(): string {
  const r = spawnSync('bash', ['infra/libvirt.sh', 'start'], { cwd: REPO, stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8', timeout: 120_000 });
  process.stderr.write(r.stderr);
  if (r.status !== 0) throw new Error(`bash infra/libvirt.sh start failed (${r.error?.message ?? `exit ${r.status}`}): ${r.stderr.slice(-500)}`);
  return r.stderr;
}

const STATUS_DIR = '/run/libvirt/qemu';
/** A status libvirt wrote when it began a start, before it recorded QEMU's pid. */
const NO_PID = /<domstatus [^>]*pid='0'/;

/** Whether libvirt's status file of `domain` says it was being started with no QEMU pid yet. */
export function startedWithoutPid(domain: string): boolean {
  try {
    return NO_PID.test(fs.readFileSync(`${STATUS_DIR}/${domain}.xml`, 'utf8'));
  } catch {
    return false;
  }
}

const virsh = (...args: string[]): string => execFileSync('virsh', ['-c', 'qemu:///system', ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });

/** The libvirt domains of a test host (running or not). */
export function domainsOf(hostId: string, onlyRunning = false): string[] {
  return virsh('list', ...(onlyRunning ? [] : ['--all']), '--name').split('\n').map((s) => s.trim()).filter((n) => n.startsWith(`cl-${hostId}-`));
}

/**
 * Waits until libvirtd has begun to start a domain whose name starts with `prefix` and has not
 * yet recorded its QEMU's pid (its status file says pid='0': the window of ~30 ms in which a
 * libvirtd that dies leaves the domain half-started, docs/hypervisor.md), then kills libvirtd.
 * If the poll missed the window, libvirtd is killed anyway, later (startedWithoutPid tells which).
 * The domain's name.
 */
export async function killLibvirtdWhileStarting(prefix: string, timeoutMs: number): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const names = (await fs.promises.readdir(STATUS_DIR).catch(() => [] as string[])).filter((f) => f.startsWith(prefix) && f.endsWith('.xml'));
    for (const f of names) {
      const status = await fs.promises.readFile(`${STATUS_DIR}/${f}`, 'utf8').catch(() => '');
      if (/<domstatus [^>]*pid='\d+'/.test(status)) {
        killLibvirtd();
        return f.slice(0, -4);
      }
    }
    await new Promise((r) => setTimeout(r, 1));
  }
  throw new Error(`libvirtd did not start a domain named ${prefix}* within ${timeoutMs} ms`);
}

/**
 * Expects the synthesized instance of `result` to be the only domain of the host: named after the
 * instance when its save file was restored, or the VM its synthesis started for itself (early
 * start, `earlyStart: 'own'`).
 */
export function expectOnlyVmOf(hostId: string, result: Record<string, unknown>): void {
  const want = result.earlyStart === 'own' ? new RegExp(`^cl-${hostId}-pool-p[0-9a-f]{8}$`) : new RegExp(`^cl-${hostId}-${String(result.instanceId)}$`);
  const domains = domainsOf(hostId);
  expect(domains).toHaveLength(1);
  expect(domains[0]).toMatch(want);
}
