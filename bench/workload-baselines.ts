/**
 * The workloads bench's baselines, made from the same launch VM as our overlay:
 * - NAIVE overlay (the original prototype's): xdelta3 of the whole launch disk and of the whole
 *   launch memory snapshot against the base's, each compressed with `xz -9`; the client downloads
 *   both, decodes them against its base, restores, replugs the NIC and asks.
 * - WHOLE VM copy: the launch disk as a qcow2 (allocated clusters only: a raw 4 GiB image would be
 *   mostly zeros on the wire) and the launch memory snapshot as saved; downloaded, restored, asked.
 * Files are made once per launch VM (cached beside it) and served over HTTP by the bench.
 */
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { randomMac } from '../src/activities/guest';
import { readSaveHeader, rewriteSaveHeaderXml } from '../src/core/snapshot';
import { editDomainXml } from '../src/hypervisor/domain-xml';
import type { Hypervisor } from '../src/hypervisor/types';

const run = promisify(execFile);

export interface LaunchFiles {
  /** The launch VM's disk, flattened to raw (sparse). */
  diskRaw: string;
  /** The launch VM's libvirt save file. */
  save: string;
}

export interface BaselineFiles {
  naive: { disk: string; memory: string; bytes: number };
  whole: { disk: string; memory: string; bytes: number };
}

const size = (f: string): number => fs.statSync(f).size;

async function once(file: string, make: (tmp: string) => Promise<void>): Promise<string> {
  if (!fs.existsSync(file)) {
    const tmp = `${file}.tmp`;
    await make(tmp);
    fs.renameSync(tmp, file);
  }
  return file;
}

/** xdelta3's source window: the whole base file (at most 2 GiB, xdelta3's limit). */
function sourceWindow(base: string): string {
  return String(Math.min(2 ** 31, Math.max(size(base), 1 << 20)));
}

/** xdelta3 (source window covering the whole image, as the prototype's one-shot diff) then xz -9. */
async function naiveDelta(base: string, target: string, out: string): Promise<string> {
  return once(out, async (tmp) => {
    const vcdiff = `${tmp}.vcdiff`;
    const window = sourceWindow(base);
    await run('xdelta3', ['-e', '-f', '-B', window, '-s', base, target, vcdiff], { maxBuffer: 1 << 20 });
    await run('xz', ['-9', '-T1', '-k', '-f', vcdiff]);
    fs.renameSync(`${vcdiff}.xz`, tmp);
    fs.rmSync(vcdiff, { force: true });
  });
}

/** Makes (once) the naive overlay's two blobs and the whole-copy files in `dir`. */
export async function prepareBaselines(dir: string, base: { disk: string; save: string }, launch: LaunchFiles): Promise<BaselineFiles> {
  fs.mkdirSync(dir, { recursive: true });
  const nDisk = await naiveDelta(base.disk, launch.diskRaw, path.join(dir, 'naive-disk.vcdiff.xz'));
  const nMem = await naiveDelta(base.save, launch.save, path.join(dir, 'naive-memory.vcdiff.xz'));
  const wDisk = await once(path.join(dir, 'whole-disk.qcow2'), (tmp) => run('qemu-img', ['convert', '-O', 'qcow2', launch.diskRaw, tmp]).then(() => undefined));
  const wMem = await once(path.join(dir, 'whole-memory.sav'), async (tmp) => fs.copyFileSync(launch.save, tmp));
  return {
    naive: { disk: nDisk, memory: nMem, bytes: size(nDisk) + size(nMem) },
    whole: { disk: wDisk, memory: wMem, bytes: size(wDisk) + size(wMem) },
  };
}

/** curl in its own process, through the emulated link. */
async function download(url: string, file: string): Promise<void> {
  await run('curl', ['--fail', '--silent', '--show-error', '--output', file, url]);
}

export interface BaselineRun {
  transferMs: number;
  decodeMs: number;
  restoreMs: number;
  replugMs: number;
  hostPort: number;
  domain: string;
}

/**
 * Fetch one baseline's files from `baseUrl` (the bench's file server behind the link), decode
 * them (naive) or take them as they are (whole), restore under `domain`, replug, forward `appPort`.
 */
export async function runBaseline(hv: Hypervisor, method: 'naive' | 'whole', o: { baseUrl: string; workDir: string; domain: string; base: { disk: string; save: string }; files: BaselineFiles; appPort: number }): Promise<BaselineRun> {
  fs.rmSync(o.workDir, { recursive: true, force: true });
  fs.mkdirSync(o.workDir, { recursive: true });
  const f = o.files[method];
  const got = { disk: path.join(o.workDir, path.basename(f.disk)), memory: path.join(o.workDir, path.basename(f.memory)) };
  const t0 = performance.now();
  await Promise.all([download(`${o.baseUrl}/${path.basename(f.disk)}`, got.disk), download(`${o.baseUrl}/${path.basename(f.memory)}`, got.memory)]);
  const t1 = performance.now();
  let disk = got.disk;
  let save = got.memory;
  if (method === 'naive') {
    disk = path.join(o.workDir, 'disk.raw');
    save = path.join(o.workDir, 'memory.sav');
    const decode = async (xzFile: string, source: string, out: string): Promise<void> => {
      // xdelta3 reads the delta from standard input when it names no input file; its source
      // window must be as large as the encoder's, or it re-reads the source in small pieces
      // (81 s of system time instead of 3 s for a 190 MB memory snapshot).
      await run('sh', ['-c', 'xz -d -c "$1" | xdelta3 -d -c -B "$4" -s "$2" > "$3"', 'sh', xzFile, source, out, sourceWindow(source)]);
    };
    await Promise.all([decode(got.disk, o.base.disk, disk), decode(got.memory, o.base.save, save)]);
  }
  const t2 = performance.now();
  const header = await readSaveHeader(save);
  await rewriteSaveHeaderXml(save, editDomainXml(header.domainXml, { name: o.domain, uuid: randomUUID(), diskPath: disk, diskFormat: method === 'naive' ? 'raw' : 'qcow2', serialPath: path.join(o.workDir, 'serial.log') }));
  await hv.restore(save);
  const t3 = performance.now();
  await hv.replugNic(o.domain, { mac: randomMac() });
  const hostPort = (await hv.forwardPort(o.domain, { guestPort: o.appPort })).hostPort;
  const t4 = performance.now();
  return { transferMs: t1 - t0, decodeMs: t2 - t1, restoreMs: t3 - t2, replugMs: t4 - t3, hostPort, domain: o.domain };
}

export async function removeBaseline(hv: Hypervisor, r: { domain: string; workDir: string }): Promise<void> {
  await hv.destroy(r.domain).catch(() => undefined);
  await hv.undefine(r.domain).catch(() => undefined);
  fs.rmSync(r.workDir, { recursive: true, force: true });
}
