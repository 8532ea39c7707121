/**
 * The warm pool's claim protocol on files and the in-memory hypervisor: two syntheses that race
 * for one entry never both get it; a retried synthesis removes only a VM it really took; an entry
 * claimed by a synthesis is not discarded by the pool's step.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FakeHypervisor } from '../../src/hypervisor/fake';
import type { DomainSpec } from '../../src/hypervisor/types';
import { claimPoolEntry, domainShape, giveBackEntry, poolDir, releaseClaimIn, startClaim, takeEntry, type PoolEntry } from '../../src/activities/pool-entries';
import { createLogger } from '../../src/common/logger';

const XML = (name: string, mac: string, disk: string): string => `<domain type='qemu'><name>${name}</name><uuid>6f1c0a52-0000-4000-8000-00000000000${name.length % 10}</uuid><memory unit='KiB'>262144</memory><os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${disk}'/><target dev='vda' bus='virtio'/></disk><interface type='user'><mac address='${mac}'/><model type='virtio'/></interface><serial type='file'><source path='/x/serial.log'/><target port='0'/></serial></devices></domain>`;

describe('warm pool entries', () => {
  let dataDir: string;
  let hv: FakeHypervisor;
  const log = createLogger('test', 'silent');

  beforeEach(() => {
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'pool-'));
    hv = new FakeHypervisor();
  });
  afterEach(() => fs.rmSync(dataDir, { recursive: true, force: true }));

  /** A ready entry: its directory, entry.json, a disk file, and its paused VM. */
  const entry = (entryId: string): PoolEntry => {
    const dir = path.join(poolDir(dataDir), entryId);
    fs.mkdirSync(dir, { recursive: true });
    const e: PoolEntry = { entryId, baseId: 'b', domain: `cl-h-pool-${entryId}`, shape: domainShape(XML('base', '52:54:00:00:00:01', '/base/disk.raw')), memoryBytes: 256 << 20, createdAt: new Date().toISOString(), startMs: 1 };
    fs.writeFileSync(path.join(dir, 'entry.json'), JSON.stringify(e));
    fs.writeFileSync(path.join(dir, 'disk.qcow2'), 'empty layer');
    hv.domains.set(e.domain, { spec: { name: e.domain } as DomainSpec, state: 'paused', persistent: false });
    return e;
  };
  const instance = (id: string): string => {
    const dir = path.join(dataDir, 'instances', id);
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, 'disk.qcow2'), `synthesized disk of ${id}`);
    return dir;
  };
  const launchXml = XML('cl-h-dev', '52:54:00:aa:bb:cc', '/h/instances/dev/disk.qcow2');

  it('gives one entry to one of two racing syntheses; the other restores as usual', async () => {
    entry('p00000001');
    const [a, b] = [instance('a'), instance('b')];
    const got = await Promise.all([a, b].map((dir) => claimPoolEntry({ hostId: 'h', dataDir, hypervisor: hv, log }, { baseId: 'b', launchXml, instanceDir: dir })));
    expect(got.filter((g) => g !== undefined)).toHaveLength(1);
    const winner = got[0] ? a : b;
    // The winner's disk is the entry's file, with the synthesized content; the entry's path links to it.
    expect(fs.readFileSync(path.join(winner, 'disk.qcow2'), 'utf8')).toBe(`synthesized disk of ${path.basename(winner)}`);
    expect(fs.realpathSync(path.join(poolDir(dataDir), 'p00000001'))).toBe(fs.realpathSync(winner));
  });

  it('takes no entry of another shape or base, nor one whose VM is gone', async () => {
    const e = entry('p00000002');
    hv.domains.delete(e.domain);
    const dir = instance('c');
    expect(await claimPoolEntry({ hostId: 'h', dataDir, hypervisor: hv, log }, { baseId: 'b', launchXml, instanceDir: dir })).toBeUndefined();
    entry('p00000003');
    expect(await claimPoolEntry({ hostId: 'h', dataDir, hypervisor: hv, log }, { baseId: 'other', launchXml, instanceDir: dir })).toBeUndefined();
    const bigger = launchXml.replace('262144', '524288');
    expect(await claimPoolEntry({ hostId: 'h', dataDir, hypervisor: hv, log }, { baseId: 'b', launchXml: bigger, instanceDir: dir })).toBeUndefined();
    expect((await claimPoolEntry({ hostId: 'h', dataDir, hypervisor: hv, log }, { baseId: 'b', launchXml, instanceDir: dir }))?.entryId).toBe('p00000003');
  });

  it('lets a retry remove the VM it took, and only that one', async () => {
    const e = entry('p00000004');
    const dir = instance('d');
    await claimPoolEntry({ hostId: 'h', dataDir, hypervisor: hv, log }, { baseId: 'b', launchXml, instanceDir: dir });
    await releaseClaimIn({ hostId: 'h', dataDir, hypervisor: hv }, dir);
    expect(hv.domains.has(e.domain)).toBe(false);
    expect(fs.existsSync(path.join(poolDir(dataDir), 'p00000004'))).toBe(false);

    // A claim file written, but the entry never moved here (cut off in between): it goes back to the pool, VM kept.
    const f = entry('p00000005');
    const other = instance('e');
    expect(await takeEntry(path.join(poolDir(dataDir), 'p00000005'), 'e')).toBe(true);
    fs.writeFileSync(path.join(other, 'pool-claim.json'), JSON.stringify(f));
    await releaseClaimIn({ hostId: 'h', dataDir, hypervisor: hv }, other);
    expect(hv.domains.has(f.domain)).toBe(true);
    expect(fs.existsSync(path.join(poolDir(dataDir), 'p00000005', 'claim'))).toBe(false);
  });

  it('removes the VMs a retried synthesis had started for itself and not yet moved, and no other', async () => {
    // Cut off while it started them (early start): one half-made, one complete, both claimed as its starts.
    const half = path.join(poolDir(dataDir), '.new-p00000007');
    fs.mkdirSync(half, { recursive: true });
    fs.writeFileSync(path.join(half, 'claim'), startClaim('g'));
    const whole = entry('p00000008');
    fs.writeFileSync(path.join(poolDir(dataDir), 'p00000008', 'claim'), startClaim('g'));
    hv.domains.set('cl-h-pool-p00000007', { spec: { name: 'cl-h-pool-p00000007' } as DomainSpec, state: 'paused', persistent: false });
    // Another synthesis's start, and a pool entry it is taking: not touched.
    const others = entry('p00000009');
    fs.writeFileSync(path.join(poolDir(dataDir), 'p00000009', 'claim'), startClaim('h'));
    const taking = entry('p0000000a');
    expect(await takeEntry(path.join(poolDir(dataDir), 'p0000000a'), 'g')).toBe(true);
    await releaseClaimIn({ hostId: 'h', dataDir, hypervisor: hv }, instance('g'));
    expect(fs.existsSync(half)).toBe(false);
    expect(fs.existsSync(path.join(poolDir(dataDir), 'p00000008'))).toBe(false);
    expect(hv.domains.has('cl-h-pool-p00000007')).toBe(false);
    expect(hv.domains.has(whole.domain)).toBe(false);
    expect(hv.domains.has(others.domain)).toBe(true);
    expect(hv.domains.has(taking.domain)).toBe(true);
    expect(fs.existsSync(path.join(poolDir(dataDir), 'p0000000a'))).toBe(true);
  });

  it('keeps an entry a synthesis holds from the pool\'s discard, until it is given back', async () => {
    entry('p00000006');
    const dir = path.join(poolDir(dataDir), 'p00000006');
    expect(await takeEntry(dir, 'f')).toBe(true);
    expect(await takeEntry(dir, 'discard', { takeStale: true })).toBe(false);
    expect(await takeEntry(dir, 'f')).toBe(true); // its own claim again (a retry)
    await giveBackEntry(dir, 'f');
    expect(await takeEntry(dir, 'discard', { takeStale: true })).toBe(true);
  });
});
