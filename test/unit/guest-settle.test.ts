/**
 * "Left idle until it settles": the idle share of the guest's CPU between two /proc/stat `cpu`
 * lines, and the wait for a window idle enough, on the FakeHypervisor (guest commands answered by
 * FakeOptions.onGuestExec). No VM.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CloudletError } from '../../src/core/errors';
import { idleShareBetween, waitUntilIdle } from '../../src/guest/settle';
import { FakeHypervisor, type FakeOptions } from '../../src/hypervisor/fake';
import type { DomainSpec, GuestExecOptions } from '../../src/hypervisor/types';

/** A /proc/stat `cpu` line: user nice system idle iowait irq softirq steal guest guest_nice. */
const cpu = (user: number, nice: number, system: number, idle: number, iowait: number, irq = 0, softirq = 0, steal = 0, guest = 0, guestNice = 0): string =>
  `cpu  ${[user, nice, system, idle, iowait, irq, softirq, steal, guest, guestNice].join(' ')}`;

describe('idleShareBetween', () => {
  it('is idle + iowait over the total, between the two lines', () => {
    const before = cpu(1000, 10, 500, 20000, 300, 5, 7, 0);
    // +60 user, +0 nice, +20 system, +850 idle, +50 iowait, +10 irq, +10 softirq: 1000 in all.
    const after = cpu(1060, 10, 520, 20850, 350, 15, 17, 0);
    expect(idleShareBetween(before, after)).toBeCloseTo(0.9, 10);
  });

  it('reads the lines as /proc/stat prints them (two spaces after "cpu", a newline)', () => {
    expect(idleShareBetween('cpu  10 0 10 80 0 0 0 0 0 0\n', 'cpu  20 0 20 240 20 0 0 0 0 0\n')).toBeCloseTo(180 / 200, 10);
    expect(idleShareBetween(' cpu 1 2 3 4 5 6 7 8', 'cpu\t2 2 3 6 5 6 7 8')).toBeCloseTo(2 / 3, 10);
  });

  it('counts steal time as busy, not idle', () => {
    expect(idleShareBetween(cpu(0, 0, 0, 0, 0), cpu(0, 0, 0, 50, 0, 0, 0, 50))).toBeCloseTo(0.5, 10);
  });

  it('is 1 for a fully idle window and 0 for a fully busy one', () => {
    expect(idleShareBetween(cpu(5, 5, 5, 5, 5), cpu(5, 5, 5, 105, 5))).toBe(1);
    expect(idleShareBetween(cpu(5, 5, 5, 5, 5), cpu(105, 5, 5, 5, 5))).toBe(0);
  });

  it('gives 0 when no time passed (zero total), not NaN', () => {
    const line = cpu(1, 2, 3, 4, 5);
    expect(idleShareBetween(line, line)).toBe(0);
    expect(idleShareBetween('cpu', 'cpu')).toBe(0);
    expect(idleShareBetween('', '')).toBe(0);
  });

  it('gives 0 for lines that are not numbers', () => {
    expect(idleShareBetween('cpu a b c d e', 'cpu f g h i j')).toBe(0);
  });

  // The kernel counts guest time inside user time as well (and guest_nice inside nice), so the
  // total of a window is the first eight columns; adding guest and guest_nice counts it twice.
  it('does not count guest time twice (it is already in user time)', () => {
    // 100 jiffies: 50 user (of which 40 running a nested guest), 50 idle.
    const before = cpu(0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    const after = cpu(50, 0, 0, 50, 0, 0, 0, 0, 40, 0);
    expect(idleShareBetween(before, after)).toBeCloseTo(0.5, 10);
  });
});

describe('waitUntilIdle', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cloudlet-settle-'));
  });
  afterEach(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function guest(onGuestExec: FakeOptions['onGuestExec'], guestAgent = true): Promise<FakeHypervisor> {
    const file = (n: string): string => {
      const f = path.join(dir, n);
      fs.writeFileSync(f, '');
      return f;
    };
    const spec: DomainSpec = {
      name: 'settle-unit',
      memoryMiB: 512,
      vcpus: 1,
      kernel: file('vmlinuz'),
      disk: { path: file('disk.qcow2'), format: 'qcow2' },
      nic: { mac: '52:54:00:12:34:56' },
      serialPath: path.join(dir, 'serial.log'),
      guestAgent,
    };
    const hv = new FakeHypervisor({ onGuestExec });
    await hv.defineDomain(spec);
    await hv.start(spec.name);
    return hv;
  }

  /** A guest whose successive windows have these idle shares (in per cent of 1000 jiffies), then the last one forever. */
  function windows(idlePercents: number[]): { onGuestExec: NonNullable<FakeOptions['onGuestExec']>; seen: GuestExecOptions[] } {
    const seen: GuestExecOptions[] = [];
    let user = 1000;
    let idle = 50_000;
    return {
      seen,
      onGuestExec: (_domain, options) => {
        const share = idlePercents[Math.min(seen.length, idlePercents.length - 1)] ?? 0;
        seen.push(options);
        const before = cpu(user, 0, 100, idle, 10);
        user += (100 - share) * 10;
        idle += share * 10;
        return { exitCode: 0, stdout: `${before}\n${cpu(user, 0, 100, idle, 10)}\n`, stderr: '' };
      },
    };
  }

  it('measures windows in the guest until one is idle enough, then says settled', async () => {
    const w = windows([40, 85, 95, 20]);
    const hv = await guest(w.onGuestExec);
    const r = await waitUntilIdle(hv, 'settle-unit', { timeoutMs: 60_000, windowMs: 200 });
    expect(r.settled).toBe(true);
    expect(r.idleShare).toBeCloseTo(0.95, 10);
    expect(r.windowMs).toBe(200);
    expect(r.waitedMs).toBeGreaterThanOrEqual(0);
    expect(r.waitedMs).toBeLessThan(60_000);
    // Three windows: 0.40 and 0.85 are below the default 0.9.
    expect(w.seen).toHaveLength(3);
    expect(hv.calls.filter((c) => c.op === 'guestExec')).toHaveLength(3);
    for (const o of w.seen) {
      expect(o.path).toBe('/bin/sh');
      expect(o.args?.[0]).toBe('-c');
      expect(o.args?.[1]).toBe('head -n1 /proc/stat; sleep 0.2; head -n1 /proc/stat');
      // The guest command may take the window and then some; it is not the one to time out.
      expect(o.timeoutMs).toBeGreaterThan(200);
    }
  });

  it('uses a 5 s window by default and the given idle share', async () => {
    const w = windows([60]);
    const hv = await guest(w.onGuestExec);
    const r = await waitUntilIdle(hv, 'settle-unit', { timeoutMs: 60_000, idleShare: 0.5 });
    expect(r).toMatchObject({ settled: true, windowMs: 5000 });
    expect(r.idleShare).toBeCloseTo(0.6, 10);
    expect(w.seen).toHaveLength(1);
    expect(w.seen[0]?.args?.[1]).toContain('sleep 5.0;');
  });

  it('gives settled:false with the last window\'s share when the timeout passes', async () => {
    const w = windows([30, 50, 70]);
    const hv = await guest(w.onGuestExec);
    const t0 = Date.now();
    const r = await waitUntilIdle(hv, 'settle-unit', { timeoutMs: 40, windowMs: 100 });
    expect(r.settled).toBe(false);
    expect(r.idleShare).toBeCloseTo(0.7, 10);
    expect(r.windowMs).toBe(100);
    expect(r.waitedMs).toBeGreaterThanOrEqual(40);
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(w.seen.length).toBeGreaterThanOrEqual(3);
  });

  it('counts an answer without two lines as not idle', async () => {
    let n = 0;
    const hv = await guest(() => {
      n++;
      return { exitCode: 1, stdout: n < 3 ? 'cpu  1 2 3 4 5\n' : `${cpu(0, 0, 0, 0, 0)}\n${cpu(0, 0, 0, 100, 0)}\n`, stderr: 'head: oops' };
    });
    const r = await waitUntilIdle(hv, 'settle-unit', { timeoutMs: 60_000, windowMs: 10 });
    expect(r).toMatchObject({ settled: true, idleShare: 1 });
    expect(n).toBe(3);
  });

  it('passes on the failure of a guest without the agent channel', async () => {
    const hv = await guest(() => ({ exitCode: 0, stdout: '', stderr: '' }), false);
    const err = await waitUntilIdle(hv, 'settle-unit', { timeoutMs: 1000 }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(CloudletError);
    expect((err as CloudletError).code).toBe('CONFLICT');
  });
});
