import os from 'node:os';
import { ApplicationFailure } from '@temporalio/common';
import { loadConfig } from '../../src/config';
import { CloudletError } from '../../src/core/errors';
import { hostTaskQueue, HOST_ID_PATTERN } from '../../src/common/names';
import { withFailureMapping } from '../../src/activities/failures';

describe('configuration', () => {
  it('has embedded defaults', () => {
    const c = loadConfig({});
    expect(c.temporalAddress).toBe('127.0.0.1:7233');
    expect(c.namespace).toBe('default');
    expect(c.webUiUrl).toBe('http://127.0.0.1:8233');
    expect(c.hostId).toBe('local');
    expect(c.workflowTaskQueue).toBe('cloudlet-workflows');
  });

  it('rejects bad values with the variable named', () => {
    expect(() => loadConfig({ CLOUDLET_HOST_ID: 'Bad_Host' })).toThrow(/CLOUDLET_HOST_ID/);
    expect(() => loadConfig({ CLOUDLET_TEMPORAL_ADDRESS: 'nohostport' })).toThrow(/CLOUDLET_TEMPORAL_ADDRESS: host:port/);
  });

  it('derives one task queue per host', () => {
    expect(hostTaskQueue('host-a')).toBe('cloudlet-host-host-a');
    expect(HOST_ID_PATTERN.test('host-a')).toBe(true);
    expect(HOST_ID_PATTERN.test('-a')).toBe(false);
  });
});

describe('activity failure mapping', () => {
  const acts = withFailureMapping({
    async wrongBase(): Promise<void> {
      throw new CloudletError('WRONG_BASE', 'overlay needs base abc, host has def', { fix: 'import base abc' });
    },
    async flaky(): Promise<void> {
      throw new CloudletError('HYPERVISOR_UNAVAILABLE', 'libvirtd is not reachable');
    },
    async plain(): Promise<number> {
      return 42;
    },
  });

  it('turns unfixable errors into non-retryable failures with their code', async () => {
    const e = await acts.wrongBase().catch((x: unknown) => x);
    expect(e).toBeInstanceOf(ApplicationFailure);
    expect((e as ApplicationFailure).type).toBe('WRONG_BASE');
    expect((e as ApplicationFailure).nonRetryable).toBe(true);
    expect((e as ApplicationFailure).message).toMatch(/Fix: import base abc/);
  });

  it('keeps transient errors retryable and passes results through', async () => {
    const e = await acts.flaky().catch((x: unknown) => x);
    expect((e as ApplicationFailure).nonRetryable).toBe(false);
    await expect(acts.plain()).resolves.toBe(42);
  });

  it('turns a full disk anywhere in the cause chain into NO_SPACE, naming the host and its directory', async () => {
    const dataDir = os.tmpdir();
    const full = withFailureMapping(
      {
        async write(): Promise<void> {
          const enospc = Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC', path: '/x/memory.sav' });
          throw new Error('apply failed', { cause: enospc });
        },
      },
      { hostId: 'host-b', dataDir },
    );
    const e = await full.write().catch((x: unknown) => x);
    expect((e as ApplicationFailure).type).toBe('NO_SPACE');
    expect((e as ApplicationFailure).nonRetryable).toBe(true);
    expect((e as ApplicationFailure).message).toMatch(new RegExp(`host host-b's disk is full \\(${dataDir}: \\d+ MiB free.*writing /x/memory.sav`));
  });

  it('leaves an error that only mentions a full disk in its text as it is', async () => {
    const other = withFailureMapping({
      async recipe(): Promise<void> {
        throw new CloudletError('BAD_INPUT', 'the recipe failed: dpkg: error: No space left on device (in the guest)');
      },
    });
    const e = await other.recipe().catch((x: unknown) => x);
    expect((e as ApplicationFailure).type).toBe('BAD_INPUT');
  });
});
