/**
 * Is KVM really usable here? /dev/kvm may exist and open fine while guests hang (nested
 * virtualization in some sandboxes: real-mode code runs, the switch to long mode never returns).
 * So we run QEMU on a tiny firmware that goes real mode -> protected mode -> long mode (paging on)
 * and then writes to an isa-debug-exit port, which makes QEMU exit with code (0x21 << 1) | 1 = 67.
 * It must do that within a couple of seconds under KVM; the same payload under TCG first proves
 * the probe itself works. The verdict is cached per process; CLOUDLET_VIRT_TYPE=kvm|qemu overrides.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CloudletError } from '../core/errors';
import type { VirtType } from './types';

/**
 * Assembled from (GNU as, `as --64`, linked at 0 as a flat binary; placed at the start of the
 * 64 KiB firmware, which QEMU maps at 0xF0000):
 *   .code16: cli; ds=0xF000; lgdtl gdtdesc; cr0.PE=1; ljmpl $0x08, pm32
 *   .code32: ds=es=ss=0x10; zero 0x1000-0x3FFF; PML4[0]=0x2003; PDPT[0]=0x3003; PD[0]=0x83 (2 MiB);
 *            cr3=0x1000; cr4.PAE=1; EFER.LME=1; cr0.PG=1; ljmp $0x18, lm64
 *   .code64: mov $0x21,%al; out %al,$0xf4; hlt; jmp .
 *   gdt: null, code32 0x00CF9A000000FFFF, data 0x00CF92000000FFFF, code64 0x00AF9A000000FFFF
 * The reset vector (offset 0xFFF0) is `ljmp $0xF000, $0x0000`.
 */
const PROBE_CODE_HEX =
  'fab800f08ed8660f0116b0000f20c06683c8010f22c066ea1e000f00080066b810008ed88ec08ed0bf0010000031c0b9000c0000' +
  'f3abc7050010000003200000c7050020000003300000c7050030000083000000b8001000000f22d80f20e083c8200f22e0b98000' +
  '00c00f320d000100000f300f20c00d000000800f22c0ea85000f001800b021e6f4f4ebfd0f1f40000000000000000000ffff0000' +
  '009acf00ffff00000092cf00ffff0000009aaf001f0090000f00';
const RESET_VECTOR = Buffer.from([0xea, 0x00, 0x00, 0x00, 0xf0]);
export const PROBE_EXIT_CODE = 67;

export function probeFirmware(): Buffer {
  const fw = Buffer.alloc(64 * 1024);
  Buffer.from(PROBE_CODE_HEX, 'hex').copy(fw, 0);
  RESET_VECTOR.copy(fw, 0xfff0);
  return fw;
}

export interface ProbeResult {
  ok: boolean;
  ms: number;
  detail: string;
}

/** Runs the probe firmware under one accelerator; never throws. */
export function probeAccel(accel: 'kvm' | 'tcg', firmware: string, timeoutMs: number, qemu = 'qemu-system-x86_64'): Promise<ProbeResult> {
  const args = ['-accel', accel, '-machine', 'pc', '-m', '16', '-bios', firmware,
    '-device', 'isa-debug-exit,iobase=0xf4,iosize=0x04',
    '-display', 'none', '-nodefaults', '-no-user-config', '-monitor', 'none', '-serial', 'none'];
  const t0 = performance.now();
  return new Promise((resolve) => {
    execFile(qemu, args, { timeout: timeoutMs, killSignal: 'SIGKILL' }, (err, _stdout, stderr) => {
      const ms = Math.round(performance.now() - t0);
      const e = err as { code?: number | string; killed?: boolean } | null;
      const code: number | string | undefined = e ? e.code : 0;
      if (code === PROBE_EXIT_CODE) {
        resolve({ ok: true, ms, detail: `${accel}: the probe reached long mode in ${ms} ms` });
      } else if (e?.killed) {
        resolve({ ok: false, ms, detail: `${accel}: the probe guest did not reach long mode within ${timeoutMs} ms (it hangs)` });
      } else if (e?.code === 'ENOENT') {
        resolve({ ok: false, ms, detail: `${qemu} is not installed (apt-get install qemu-system-x86)` });
      } else {
        const msg = String(stderr).trim().split('\n').filter((l) => !/warning:/.test(l)).join(' ').slice(0, 300);
        resolve({ ok: false, ms, detail: `${accel}: QEMU exited with ${String(code)}${msg ? `: ${msg}` : ''}` });
      }
    });
  });
}

export interface VirtTypeVerdict {
  virtType: VirtType;
  reason: string;
}

/** Probes (no cache). `env` is read for CLOUDLET_VIRT_TYPE. */
export async function detectVirtType(env: NodeJS.ProcessEnv = process.env, kvmTimeoutMs = 2000): Promise<VirtTypeVerdict> {
  const forced = env.CLOUDLET_VIRT_TYPE;
  if (forced !== undefined && forced !== '') {
    if (forced !== 'kvm' && forced !== 'qemu') {
      throw new CloudletError('BAD_INPUT', `CLOUDLET_VIRT_TYPE is "${forced}"`, { fix: 'set CLOUDLET_VIRT_TYPE to kvm or qemu, or unset it to detect' });
    }
    return { virtType: forced, reason: `CLOUDLET_VIRT_TYPE=${forced}` };
  }
  try {
    fs.accessSync('/dev/kvm', fs.constants.R_OK | fs.constants.W_OK);
  } catch (e) {
    return { virtType: 'qemu', reason: `/dev/kvm is not usable (${(e as NodeJS.ErrnoException).code ?? String(e)})` };
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cloudlet-kvm-probe-'));
  try {
    const fw = path.join(dir, 'probe.bin');
    fs.writeFileSync(fw, probeFirmware());
    const tcg = await probeAccel('tcg', fw, 10000);
    if (!tcg.ok) return { virtType: 'qemu', reason: `the probe itself failed under TCG, so KVM cannot be verified (${tcg.detail})` };
    const kvm = await probeAccel('kvm', fw, kvmTimeoutMs);
    return kvm.ok ? { virtType: 'kvm', reason: kvm.detail } : { virtType: 'qemu', reason: `/dev/kvm exists but ${kvm.detail}` };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

let cached: Promise<VirtTypeVerdict> | undefined;

/** detectVirtType, once per process. */
export function virtTypeVerdict(): Promise<VirtTypeVerdict> {
  cached ??= detectVirtType().catch((e: unknown) => {
    cached = undefined;
    throw e;
  });
  return cached;
}
