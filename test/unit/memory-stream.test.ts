/**
 * migrateToFile without libvirt: a scripted QMP peer plays QEMU (it connects to the socket that
 * `migrate` names and writes a stream), so the receiving side, the status handling and the
 * clean-up are checked quickly. Plus the QMP reply parser and the save cookie.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { encodeSaveHeader, readSaveHeader } from '../../src/core/snapshot/header';
import { migrateToFile, parseMigrateStatus, saveCookieXml } from '../../src/hypervisor/memory-stream';
import { parseQmpReply, QmpError, type QmpCommand, type QmpSend } from '../../src/hypervisor/qmp';

const log = pino({ level: 'silent' });
let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'memory-stream-unit-'));
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const XML = "<domain type='qemu'><name>ms-unit</name></domain>\n";

interface Peer {
  qmp: QmpSend;
  calls: QmpCommand[];
  socketPath(): string | undefined;
}

/** A QMP peer: on `migrate` it connects and sends `stream` (or nothing); query-migrate answers `status()`. */
function peer(opts: { stream?: Buffer; connect?: boolean; status?: (sent: boolean) => unknown; refuse?: Record<string, string> }): Peer {
  const calls: QmpCommand[] = [];
  let sent = false;
  let sock: string | undefined;
  return {
    calls,
    socketPath: () => sock,
    qmp: async (command) => {
      calls.push(command);
      const desc = opts.refuse?.[command.execute];
      if (desc) throw new QmpError(command.execute, 'GenericError', desc);
      if (command.execute === 'migrate') {
        sock = String(command.arguments?.['uri']).replace(/^unix:/, '');
        expect(fs.statSync(path.dirname(sock)).mode & 0o077).toBe(0); // private directory
        if (opts.connect !== false) {
          const c = net.connect(sock, () => {
            c.end(opts.stream ?? Buffer.alloc(0), () => (sent = true));
          });
          c.on('close', () => (sent = true));
        }
        return {};
      }
      if (command.execute === 'query-migrate') return (opts.status ?? ((s: boolean) => (s ? { status: 'completed', downtime: 12 } : { status: 'active' })))(sent);
      return {};
    },
  };
}

const stream = Buffer.concat([Buffer.from('QEVM'), Buffer.from([0, 0, 0, 3]), Buffer.alloc(20 * 1024 * 1024, 0xab)]);

describe('migrateToFile', () => {
  test('writes header + stream to outPath (via .tmp), reports bytes, downtime and progress, and clears the socket directory', async () => {
    const out = path.join(dir, 'ok.save');
    const header = encodeSaveHeader(XML);
    const p = peer({ stream });
    const progress: number[] = [];
    const r = await migrateToFile({ domain: 'ms-unit', outPath: out, header, qmp: p.qmp, wasRunning: true, onProgress: (b) => progress.push(b), log });
    expect(r).toMatchObject({ bytes: header.length + stream.length, downtimeMs: 12, wasRunning: true });
    const file = fs.readFileSync(out);
    expect(file.subarray(0, header.length).equals(header)).toBe(true);
    expect(file.subarray(header.length).equals(stream)).toBe(true);
    expect((await readSaveHeader(out)).qemuStreamOffset).toBe(header.length);
    expect(fs.existsSync(`${out}.tmp`)).toBe(false);
    expect(fs.existsSync(path.dirname(p.socketPath() ?? '/nonexistent/x'))).toBe(false);
    expect(progress.length).toBeGreaterThan(1);
    expect(progress[progress.length - 1]).toBe(r.bytes);
    expect(p.calls.map((c) => c.execute).slice(0, 3)).toEqual(['migrate-set-capabilities', 'migrate-set-parameters', 'migrate']);
    expect(p.calls[0]?.arguments).toEqual({ capabilities: [{ capability: 'x-ignore-shared', state: false }] });
    expect(Number(p.calls[1]?.arguments?.['max-bandwidth'])).toBeGreaterThan(2 ** 50);
  });

  test("QEMU's failure: HYPERVISOR with its error-desc; no file, no .tmp", async () => {
    const out = path.join(dir, 'failed.save');
    const p = peer({ stream: Buffer.from('QEVM'), status: (s) => (s ? { status: 'failed', 'error-desc': 'Unable to write to socket: Broken pipe' } : { status: 'active' }) });
    await expect(migrateToFile({ domain: 'ms-unit', outPath: out, header: encodeSaveHeader(XML), qmp: p.qmp, wasRunning: true, log })).rejects.toMatchObject({
      code: 'HYPERVISOR',
      message: expect.stringContaining('Unable to write to socket: Broken pipe'),
    });
    expect(fs.existsSync(out)).toBe(false);
    expect(fs.existsSync(`${out}.tmp`)).toBe(false);
  });

  test('a domain paused by an earlier stream (QEMU postmigrate): CONFLICT saying to resume first', async () => {
    const out = path.join(dir, 'again.save');
    const p = peer({ refuse: { migrate: "Can't migrate the vm that was paused due to previous migration" } });
    await expect(migrateToFile({ domain: 'ms-unit', outPath: out, header: encodeSaveHeader(XML), qmp: p.qmp, wasRunning: false, log })).rejects.toMatchObject({
      code: 'CONFLICT',
      message: expect.stringMatching(/domain "ms-unit" again.*Fix: .*resume/),
    });
    expect(fs.existsSync(`${out}.tmp`)).toBe(false);
    expect(p.calls.map((c) => c.execute)).not.toContain('migrate_cancel');
  });

  test('QEMU never connects: TIMEOUT after timeoutMs, and the migration is cancelled', async () => {
    const out = path.join(dir, 'slow.save');
    const p = peer({ connect: false });
    await expect(migrateToFile({ domain: 'ms-unit', outPath: out, header: encodeSaveHeader(XML), qmp: p.qmp, wasRunning: true, timeoutMs: 300, log })).rejects.toMatchObject({ code: 'TIMEOUT' });
    expect(p.calls.map((c) => c.execute)).toContain('migrate_cancel');
    expect(fs.existsSync(`${out}.tmp`)).toBe(false);
  });

  test('a stream that does not start with QEVM: CORRUPT', async () => {
    const out = path.join(dir, 'bad.save');
    await expect(migrateToFile({ domain: 'ms-unit', outPath: out, header: encodeSaveHeader(XML), qmp: peer({ stream: Buffer.from('nope') }).qmp, wasRunning: true, log })).rejects.toMatchObject({ code: 'CORRUPT' });
    expect(fs.existsSync(out)).toBe(false);
  });
});

describe('QMP replies and the save cookie', () => {
  test('parseQmpReply returns `return` and throws QmpError for an error reply (virsh exits 0 for both)', () => {
    expect(parseQmpReply('{"return":{"status":"completed"},"id":"libvirt-1"}\n', 'query-migrate')).toEqual({ status: 'completed' });
    expect(() => parseQmpReply('{"id":"libvirt-2","error":{"class":"GenericError","desc":"boom"}}', 'migrate')).toThrow(QmpError);
    expect(() => parseQmpReply('not json', 'migrate')).toThrow(/not JSON/);
    expect(parseMigrateStatus({ status: 'failed', 'error-desc': 'x', downtime: 3, ram: { transferred: 9 } })).toEqual({ status: 'failed', errorDesc: 'x', downtimeMs: 3, transferred: 9 });
  });

  test("saveCookieXml wraps the live XML's <cpu> in <cookie> as libvirt's save does", () => {
    const live = `<domain type='qemu' id='3'><name>x</name><cpu mode='custom' match='exact' check='full'><model fallback='forbid'>qemu64</model><feature policy='require' name='hypervisor'/><feature policy='require' name='lahf_lm'/></cpu></domain>`;
    const cookie = saveCookieXml(live) ?? '';
    expect(cookie).toMatch(/^<cookie>\s*<cpu mode="custom" match="exact" check="full">\s*<model fallback="forbid">qemu64<\/model>/);
    expect(cookie.match(/<feature policy="require" name="[a-z_]+"\/>/g)).toHaveLength(2);
    expect(saveCookieXml("<domain><name>x</name></domain>")).toBeUndefined();
  });
});
