/**
 * QEMU's own restore of a libvirt save file, without libvirt: QEMU started by hand with the command
 * line libvirt last gave the domain (from its log) and `-incoming exec:` on the QEMU stream inside
 * the save file, timed until the VM runs. The benchmarks compare libvirt's restore (and the warm
 * pool's) with it.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';

let ramDir: string | undefined;
/** A private directory on tmpfs for the guest RAM of QEMUs started by hand (removed at exit). */
function memDir(): string {
  if (!ramDir) {
    const dir = fs.mkdtempSync('/dev/shm/cloudlet-bench-ram-');
    ramDir = dir;
    process.once('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
  }
  return ramDir;
}

/** Offset of the QEMU stream in a libvirt save file: 92-byte header + data_len (XML, cookie, padding). */
export function qemuStreamOffset(file: string): number {
  const fd = fs.openSync(file, 'r');
  try {
    const h = Buffer.alloc(92);
    fs.readSync(fd, h, 0, 92, 0);
    if (h.subarray(0, 16).toString('latin1') !== 'LibvirtQemudSave') throw new Error(`${file} is not a libvirt save file`);
    if (h.readUInt32LE(28) !== 0) throw new Error(`${file} is compressed; the bench needs save_image_format = "raw"`);
    return 92 + h.readUInt32LE(20);
  } finally {
    fs.closeSync(fd);
  }
}

/** The argv of the last QEMU libvirt started for `name` (from /var/log/libvirt/qemu/<name>.log). */
export function lastQemuArgv(name: string): string[] {
  const log = fs.readFileSync(`/var/log/libvirt/qemu/${name}.log`, 'utf8');
  const start = log.lastIndexOf('/usr/bin/qemu-system-x86_64 \\\n');
  if (start < 0) throw new Error(`no QEMU command line in the log of ${name}`);
  const lines: string[] = [];
  for (const line of log.slice(start).split('\n')) {
    lines.push(line.replace(/ \\$/, ''));
    if (!line.endsWith(' \\')) break;
  }
  const argv: string[] = [];
  for (const line of lines) {
    // Each line holds an option and its value; values with spaces or JSON are single-quoted.
    const m = /^(\S+)(?: (.*))?$/.exec(line);
    if (!m?.[1]) continue;
    argv.push(m[1]);
    if (m[2] !== undefined) argv.push(m[2].replace(/^'(.*)'$/, '$1'));
  }
  return argv;
}

/** libvirt's argv, made standalone: our own QMP socket and serial file, no fd passing, no sandbox. */
export function standaloneArgv(argv: string[], qmp: string, serial: string, incoming: string): string[] {
  const out: string[] = [];
  for (let i = 1; i < argv.length; i++) {
    const opt = argv[i] as string;
    const val = argv[i + 1];
    const takesValue = opt.startsWith('-') && val !== undefined && !val.startsWith('-');
    if (opt === '-S') continue;
    if (takesValue) i++;
    if (opt === '-object' && val?.includes('"secret"')) continue;
    // A shared RAM file lives in libvirt's memory_backing_dir, named after the domain's run: ours goes in a directory of our own on tmpfs.
    if (opt === '-object' && val?.includes('"mem-path"')) { out.push(opt, val.replace(/"mem-path":"[^"]*"/, `"mem-path":"${memDir()}"`)); continue; }
    if (opt === '-add-fd' || opt === '-sandbox' || opt === '-incoming') continue;
    if (opt === '-chardev' && val?.includes('id=charmonitor')) { out.push(opt, `socket,id=charmonitor,path=${qmp},server=on,wait=off`); continue; }
    if (opt === '-chardev' && val?.includes('/dev/fdset/')) { out.push(opt, val.replace(/path=\/dev\/fdset\/\d+/, `path=${serial}`)); continue; }
    out.push(opt);
    if (takesValue) out.push(val);
  }
  out.push('-incoming', incoming);
  return out;
}

/** Minimal QMP client: connect (retrying), negotiate, then ask until the VM runs. */
export async function waitRunning(sock: string, deadlineMs: number): Promise<void> {
  const deadline = Date.now() + deadlineMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const c = net.createConnection(sock);
      let buf = '';
      let negotiated = false;
      c.on('error', () => resolve(false));
      c.on('data', (d) => {
        buf += d.toString();
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const msg = JSON.parse(buf.slice(0, nl)) as { QMP?: unknown; return?: { status?: string } };
          buf = buf.slice(nl + 1);
          if (msg.QMP) c.write('{"execute":"qmp_capabilities"}\n');
          else if (msg.return && !negotiated) { negotiated = true; c.write('{"execute":"query-status"}\n'); }
          else if (msg.return?.status !== undefined) {
            if (msg.return.status === 'running') { c.end(); resolve(true); return; }
            // The stream records the run state at save time (paused, as libvirt saves): like
            // libvirt, resume once the incoming migration is done.
            if (msg.return.status === 'paused') c.write('{"execute":"cont"}\n');
            setTimeout(() => c.write('{"execute":"query-status"}\n'), 10);
          }
        }
      });
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error('QEMU did not reach running');
    await new Promise((r) => setTimeout(r, 10));
  }
}

export async function qemuRestoreMs(argv: string[], saveFile: string, dir: string): Promise<number> {
  const qmp = path.join(dir, 'qmp.sock');
  fs.rmSync(qmp, { force: true });
  const offset = qemuStreamOffset(saveFile);
  const args = standaloneArgv(argv, qmp, path.join(dir, 'serial-qemu.log'), `exec:tail -c +${offset + 1} ${saveFile}`);
  const t0 = performance.now();
  const child = spawn(argv[0] as string, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += String(d)));
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  try {
    await Promise.race([waitRunning(qmp, 60000), exited.then(() => { throw new Error(`QEMU exited: ${stderr}`); })]);
    return performance.now() - t0;
  } finally {
    child.kill('SIGTERM');
    await exited;
  }
}

