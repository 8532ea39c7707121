/**
 * The libvirt addon's calls against the real libvirtd while the garbage collector runs. The
 * addon's workers hold raw pointers to the domain objects they were given; a domain object
 * collected while its call waits for a pool thread made CI's jest process die of SIGSEGV.
 * openHypervisor holds every call's objects until it settles. The stress (a child process: one
 * pool thread kept busy, 40 lookups per round, the domain objects dropped, two collections) is
 * run through openHypervisor, and through the bare addon to show that it does expose the hazard.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { REPO } from '../helpers/infra';

const DOMAIN = `native-calls-it-${process.pid}`;
const virsh = (...args: string[]) => spawnSync('virsh', ['-c', 'qemu:///system', ...args], { encoding: 'utf8' });

interface StressResult {
  status: number | null;
  signal: NodeJS.Signals | null;
  out: { rounds: number; calls: number; wrong: number; inFlight: number } | undefined;
  stderr: string;
}

function stress(mode: 'wrapped' | 'raw', rounds: number): StressResult {
  const r = spawnSync(process.execPath, ['--expose-gc', '--import', 'tsx', path.join(REPO, 'test', 'helpers', 'native-gc-stress.ts'), DOMAIN, mode, String(rounds)], {
    cwd: REPO,
    env: { ...process.env, UV_THREADPOOL_SIZE: '1' },
    encoding: 'utf8',
    timeout: 120_000,
  });
  const line = r.stdout.trim().split('\n').pop() ?? '';
  return { status: r.status, signal: r.signal, out: line.startsWith('{') ? JSON.parse(line) : undefined, stderr: r.stderr };
}

beforeAll(() => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'native-calls-'));
  const xml = path.join(dir, 'domain.xml');
  fs.writeFileSync(xml, `<domain type='qemu'><name>${DOMAIN}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>\n`);
  const r = virsh('define', xml);
  fs.rmSync(dir, { recursive: true, force: true });
  if (r.status !== 0) throw new Error(`virsh define ${DOMAIN} failed: ${r.stderr}`);
});

afterAll(() => {
  virsh('undefine', DOMAIN);
});

it('keeps every call correct through openHypervisor while its domain objects are collected', () => {
  const r = stress('wrapped', 20);
  expect(r.stderr).not.toMatch(/invalid domain pointer/);
  expect({ status: r.status, signal: r.signal }).toEqual({ status: 0, signal: null });
  expect(r.out).toEqual({ rounds: 20, calls: 20 * 80, wrong: 0, inFlight: 0 });
});

it('the same stress on the bare addon goes wrong (so the test above can fail)', () => {
  const r = stress('raw', 20);
  // Either the process died of the use after free, or libvirt saw freed domain pointers.
  const crashed = r.signal === 'SIGSEGV' || r.signal === 'SIGBUS' || r.signal === 'SIGABRT';
  expect(crashed || (r.out?.wrong ?? 0) > 0).toBe(true);
});
