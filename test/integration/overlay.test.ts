/**
 * Overlay round trip on the REAL test guest: restore the base VM (its save file, with a qcow2 over
 * the base disk), customize it through /cgi-bin/set, `virsh save` it, create an overlay, apply it,
 * compare the save file byte for byte and the disks with `qemu-img compare`, then restore the
 * synthesized VM under libvirt and check the application answers with the token.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { importBase, openBase } from '../../src/core/base';
import { isCloudletError } from '../../src/core/errors';
import { applyOverlay, baseFilesOf, createOverlay, readOverlayMeta } from '../../src/core/overlay';
import type { BaseRef } from '../../src/core/overlay';
import { sha256File } from '../../src/core/store/files';
import { GuestAppClient } from '../../src/guest/app-client';
import { loadGuestImage } from '../../src/guest/manifest';
import { editDomainXml } from '../../src/hypervisor/domain-xml';
import { LibvirtHypervisor } from '../../src/hypervisor/libvirt';
import { ensureInfra, REPO } from '../helpers/infra';
import { testBasePackage } from '../helpers/test-base';

let dir: string;
let hv: LibvirtHypervisor;
let base: BaseRef & { savePath: string };
let domain: string | undefined;
let appPort: number;
const token = `ov-${randomBytes(6).toString('hex')}`;
const message = `overlay-it-${process.pid}`;
let launchDisk: string;
let launchSave: string;
let overlayPath: string;

async function stopDomain(): Promise<void> {
  if (!domain) return;
  await hv.destroy(domain).catch(() => undefined);
  await hv.undefine(domain).catch(() => undefined);
}

beforeAll(async () => {
  ensureInfra(['libvirt', 'guest']);
  const guest = loadGuestImage(path.join(REPO, 'var', 'guest'));
  appPort = guest.appPort;
  const pkg = await testBasePackage();
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ov-it-'));
  const store = path.join(dir, 'store');
  await importBase(store, pkg.packageFile);
  base = await openBase(store, pkg.baseId);
  hv = new LibvirtHypervisor();

  // Resume the base on a qcow2 over its disk, customize it, save it: the launch VM.
  launchDisk = path.join(dir, 'launch.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base.diskPath, '-F', 'raw', launchDisk]);
  // The base was saved with its raw disk: point the restore at the qcow2 layer, format included.
  const xml = editDomainXml(await hv.saveFileXml(base.savePath), { diskPath: launchDisk, diskFormat: 'qcow2', serialPath: path.join(dir, 'launch-serial.log') });
  const restored = await hv.restore(base.savePath, { xml });
  domain = restored.name;
  const fwd = await hv.forwardPort(domain, { guestPort: appPort });
  const app = new GuestAppClient(fwd.hostPort);
  await app.waitForState(60_000);
  const set = await app.set(token, message);
  expect(set).toMatchObject({ token, disk: message });
  launchSave = path.join(dir, 'launch.sav');
  await hv.save(domain, launchSave);
  await stopDomain();
}, 1_200_000);

afterAll(async () => {
  if (hv) {
    await stopDomain();
    await hv.close();
  }
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

test('create -> apply rebuilds the customized guest exactly', async () => {
  overlayPath = path.join(dir, 'launch.overlay');
  const meta = await createOverlay({ base, launchDiskPath: launchDisk, launchSavePath: launchSave, outPath: overlayPath });
  expect(meta.base.id).toBe(base.id);
  expect(meta.launch.memory.mode).toBe('parsed');
  expect(meta.launch.memory.changedChunks).toBeGreaterThan(0);
  expect(meta.launch.disk.changedChunks).toBeGreaterThan(0);
  const overlaySize = fs.statSync(overlayPath).size;
  expect(overlaySize).toBeLessThan(fs.statSync(launchSave).size / 4);
  expect((await readOverlayMeta(overlayPath)).launch.memory.saveFileSha256).toBe((await sha256File(launchSave)).sha256);

  const outDisk = path.join(dir, 'synth.qcow2');
  const outSave = path.join(dir, 'synth.sav');
  const { timings } = await applyOverlay({ base: baseFilesOf(base), overlay: overlayPath, outDiskPath: outDisk, outSavePath: outSave });
  expect(timings['total']).toBeGreaterThan(0);
  expect((await sha256File(outSave)).sha256).toBe((await sha256File(launchSave)).sha256);
  execFileSync('qemu-img', ['compare', '-q', outDisk, launchDisk]);
  execFileSync('qemu-img', ['check', '-q', outDisk]);
}, 600_000);

test('the synthesized VM resumes under libvirt and answers with the token', async () => {
  const outDisk = path.join(dir, 'synth.qcow2');
  const restored = await hv.restore(path.join(dir, 'synth.sav'), { diskPath: outDisk, serialPath: path.join(dir, 'synth-serial.log') });
  domain = restored.name;
  const fwd = await hv.forwardPort(domain, { guestPort: appPort });
  const app = new GuestAppClient(fwd.hostPort);
  const { state } = await app.waitForState(60_000);
  expect(state).toMatchObject({ token, disk: message });
  // The synthesized qcow2 (written by our own writer) takes new writes from QEMU.
  expect(await app.set(`${token}-2`, `${message}-after-synthesis`)).toMatchObject({ token: `${token}-2`, disk: `${message}-after-synthesis` });
  await stopDomain();
  execFileSync('qemu-img', ['check', '-q', outDisk]);
}, 600_000);

test('applies from an http URL with Range requests, resuming after a dropped connection', async () => {
  const bytes = fs.readFileSync(overlayPath);
  let drops = 0;
  let ranges = 0;
  const server = http.createServer((req, res) => {
    const m = /^bytes=(\d+)-(\d+)?$/.exec(req.headers.range ?? '');
    if (!m) {
      res.writeHead(200, { 'content-length': bytes.length });
      res.end(bytes);
      return;
    }
    ranges += 1;
    const from = Number(m[1]);
    const to = m[2] ? Number(m[2]) : bytes.length - 1;
    if (from >= bytes.length) {
      res.writeHead(416);
      res.end();
      return;
    }
    const body = bytes.subarray(from, Math.min(to, bytes.length - 1) + 1);
    res.writeHead(206, { 'content-length': body.length, 'content-range': `bytes ${from}-${from + body.length - 1}/${bytes.length}` });
    if (body.length > 8 * 1024 && drops === 0) {
      // Send half of the body, then break the connection.
      drops += 1;
      res.write(body.subarray(0, body.length >> 1), () => res.destroy());
      return;
    }
    res.end(body);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  try {
    const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/launch.overlay`;
    const outDisk = path.join(dir, 'http.qcow2');
    const outSave = path.join(dir, 'http.sav');
    await applyOverlay({ base: baseFilesOf(base), overlay: url, outDiskPath: outDisk, outSavePath: outSave });
    expect(drops).toBe(1);
    expect(ranges).toBeGreaterThanOrEqual(4); // header, meta, data area, resumed data area
    expect((await sha256File(outSave)).sha256).toBe((await sha256File(launchSave)).sha256);
    execFileSync('qemu-img', ['compare', '-q', outDisk, launchDisk]);
  } finally {
    server.close();
  }
}, 600_000);

test('the overlay does not apply to another base', async () => {
  const err = await applyOverlay({ base: { ...baseFilesOf(base), id: '0'.repeat(64) }, overlay: overlayPath, outDiskPath: path.join(dir, 'x.qcow2'), outSavePath: path.join(dir, 'x.sav') }).catch((e: unknown) => e);
  expect(isCloudletError(err) && err.code).toBe('WRONG_BASE');
  expect(fs.existsSync(path.join(dir, 'x.qcow2'))).toBe(false);
});
