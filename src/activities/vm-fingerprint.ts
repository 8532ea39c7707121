/**
 * A paused VM's fingerprint for a full handoff verification: sha256 of its guest-physical memory
 * (QMP pmemsave, from 1 MiB up: below are ROM and device windows that are not RAM) and of its
 * whole disk as the guest sees it (qemu-img convert of the qcow2 chain into a sparse raw file).
 * Independent of the handoff's own rounds and digests: both sides compute it the same way.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { sha256Sparse } from '../core/sparse';
import type { Hypervisor } from '../hypervisor/types';

const execFileP = promisify(execFile);
const LOW = 1024 * 1024;

export interface VmFingerprint {
  memorySha256: string;
  diskSha256: string;
  ms: number;
}

export async function fingerprintVm(hv: Hypervisor, domain: string, diskPath: string, tmpDir: string): Promise<VmFingerprint> {
  const t0 = performance.now();
  const xml = await hv.domainXml(domain);
  const kib = Number(/<memory unit='KiB'>(\d+)<\/memory>/.exec(xml)?.[1] ?? '0');
  const mem = path.join(tmpDir, `.fingerprint-${process.pid}.mem`);
  const raw = path.join(tmpDir, `.fingerprint-${process.pid}.raw`);
  try {
    await hv.pmemsave(domain, mem, kib * 1024);
    const memorySha256 = await new Promise<string>((resolve, reject) => {
      const h = createHash('sha256');
      fs.createReadStream(mem, { start: LOW }).on('data', (c) => h.update(c)).on('end', () => resolve(h.digest('hex'))).on('error', reject);
    });
    await execFileP('qemu-img', ['convert', '-U', '-O', 'raw', diskPath, raw]);
    const disk = await sha256Sparse(raw);
    return { memorySha256, diskSha256: disk.sha256, ms: Math.round(performance.now() - t0) };
  } finally {
    await fs.promises.rm(mem, { force: true });
    await fs.promises.rm(raw, { force: true });
  }
}
