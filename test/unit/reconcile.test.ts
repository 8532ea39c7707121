/** Reconciliation of instance records with the hypervisor (on the in-memory hypervisor). */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { DomainSpec } from '../../src/hypervisor/types';
import { FakeHypervisor } from '../../src/hypervisor/fake';
import { createReconcileActivities } from '../../src/activities/reconcile';
import { createLogger } from '../../src/common/logger';

describe('reconcileInstances', () => {
  let dataDir: string;
  beforeEach(() => {
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'reconcile-'));
  });
  afterEach(() => fs.rmSync(dataDir, { recursive: true, force: true }));

  const record = (id: string, extra: Record<string, unknown> = {}, files: string[] = []): void => {
    const dir = path.join(dataDir, 'instances', id);
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, 'instance.json'), JSON.stringify({ instanceId: id, hostId: 'h', domain: `cl-h-${id}`, baseId: 'b', appPort: 8000, createdAt: '2026-12-02T00:00:00Z', ...extra }));
    for (const f of files) fs.writeFileSync(path.join(dir, f), '');
    fs.mkdirSync(path.join(dataDir, 'admitted'), { recursive: true });
    fs.writeFileSync(path.join(dataDir, 'admitted', `${id}.json`), JSON.stringify({ memoryBytes: 1 }));
  };

  it('finds instances that ran and whose VM is gone, and removes their files, domain and admission; leaves the others', async () => {
    const hv = new FakeHypervisor();
    const running = (name: string, state: 'running' | 'paused' | 'shut off'): void => {
      hv.domains.set(name, { spec: { name } as DomainSpec, state, persistent: true });
    };
    record('alive', { hostPort: 40001 });
    running('cl-h-alive', 'running');
    record('paused', { hostPort: 40002 });
    running('cl-h-paused', 'paused');
    record('crashed', { hostPort: 40003 });
    running('cl-h-crashed', 'shut off');
    record('vanished', { hostPort: 40004 });
    record('synthesizing'); // never resumed: no port yet
    record('saving', { hostPort: 40005 }, ['launch.sav.partial']);
    fs.mkdirSync(path.join(dataDir, 'instances', 'no-record'), { recursive: true });

    const acts = createReconcileActivities({ hostId: 'h', dataDir, hypervisor: hv, log: createLogger('test', 'silent') });
    const r = await acts.reconcileInstances();
    expect(r.checked).toBe(6);
    expect(r.lost.map((l) => [l.instanceId, l.domainState]).sort()).toEqual([['crashed', 'shut off'], ['vanished', 'absent']]);
    for (const id of ['crashed', 'vanished']) {
      expect(fs.existsSync(path.join(dataDir, 'instances', id))).toBe(false);
      expect(fs.existsSync(path.join(dataDir, 'admitted', `${id}.json`))).toBe(false);
    }
    expect(hv.domains.has('cl-h-crashed')).toBe(false);
    for (const id of ['alive', 'paused', 'synthesizing', 'saving']) expect(fs.existsSync(path.join(dataDir, 'admitted', `${id}.json`))).toBe(true);
    // A second run finds nothing more.
    expect((await acts.reconcileInstances()).lost).toEqual([]);
  });

  it('reports domains of the host that nothing accounts for, and leaves them', async () => {
    const hv = new FakeHypervisor();
    const domain = (name: string, state: 'running' | 'paused' | 'shut off'): void => {
      hv.domains.set(name, { spec: { name } as DomainSpec, state, persistent: true });
    };
    record('alive', { hostPort: 40001 });
    domain('cl-h-alive', 'running');
    // A pool-served instance: its record names the pool VM's domain.
    record('pooled', { hostPort: 40002, domain: 'cl-h-pool-p0000000a', poolEntry: 'p0000000a' });
    domain('cl-h-pool-p0000000a', 'running');
    domain('cl-h-pool-p0000000b', 'paused'); // a ready pool VM: the pool's
    fs.mkdirSync(path.join(dataDir, 'pool', 'p0000000b'), { recursive: true });
    domain('cl-h-pool-p0000000c', 'paused'); // a pool VM whose entry is gone: nothing has it
    fs.mkdirSync(path.join(dataDir, 'instances', 'arriving'), { recursive: true });
    domain('cl-h-arriving', 'paused'); // a handoff's VM started ahead, no record yet
    domain('cl-h-stray', 'running');
    domain('cl-h-left', 'shut off');
    domain('cl-other-x', 'running'); // another host's

    const acts = createReconcileActivities({ hostId: 'h', dataDir, hypervisor: hv, log: createLogger('test', 'silent') });
    const r = await acts.reconcileInstances();
    expect(r.lost).toEqual([]);
    expect(r.orphans).toEqual([{ domain: 'cl-h-left', state: 'shut off' }, { domain: 'cl-h-pool-p0000000c', state: 'paused' }, { domain: 'cl-h-stray', state: 'running' }]);
    expect(hv.domains.has('cl-h-stray')).toBe(true);
  });

  it('leaves the domains of a host whose id starts with this one\'s to that host', async () => {
    const hosts = fs.mkdtempSync(path.join(os.tmpdir(), 'reconcile-hosts-'));
    try {
      const mine = path.join(hosts, 'host-a');
      fs.mkdirSync(path.join(hosts, 'host-a-2'), { recursive: true });
      fs.mkdirSync(mine, { recursive: true });
      const hv = new FakeHypervisor();
      for (const name of ['cl-host-a-stray', 'cl-host-a-2-theirs', 'cl-host-a-2-pool-p0000000a']) hv.domains.set(name, { spec: { name } as DomainSpec, state: 'running', persistent: true });
      const acts = createReconcileActivities({ hostId: 'host-a', dataDir: mine, hypervisor: hv, log: createLogger('test', 'silent') });
      expect((await acts.reconcileInstances()).orphans).toEqual([{ domain: 'cl-host-a-stray', state: 'running' }]);
    } finally {
      fs.rmSync(hosts, { recursive: true, force: true });
    }
  });
});
