/**
 * Disk image helpers (qemu-img), for VMs whose disk is a qcow2 layer over a base image.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { CloudletError } from '../core/errors';
import type { DiskFormat } from './types';

function qemuImg(args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('qemu-img', args, (err, stdout, stderr) => {
      if (err) {
        reject(new CloudletError('HYPERVISOR', `qemu-img ${args.join(' ')} failed: ${String(stderr).trim() || err.message}`, {
          fix: 'check the image paths and that qemu-utils is installed (bash infra/libvirt.sh start installs it)',
          cause: err,
        }));
        return;
      }
      resolve(String(stdout));
    });
  });
}

/** Creates `file`, a qcow2 image whose reads fall through to `backing` (absolute path recorded). */
export async function createQcow2Overlay(file: string, backing: string, backingFormat: DiskFormat = 'raw'): Promise<void> {
  const abs = path.resolve(backing);
  if (!fs.existsSync(abs)) {
    throw new CloudletError('NOT_FOUND', `backing image ${abs} does not exist`, { fix: 'build or fetch the base disk first (e.g. bash infra/guest/build.sh)' });
  }
  await qemuImg(['create', '-q', '-f', 'qcow2', '-F', backingFormat, '-b', abs, path.resolve(file)]);
}
