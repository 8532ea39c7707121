/** Admission by memory: the ledger's decisions under concurrent requests, and its edge cases. */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createAdmissionActivities, domainMemoryBytes, releaseAdmission } from '../../src/activities/admission';
import { isCloudletError } from '../../src/core/errors';

const MiB = 1024 * 1024;

describe('admission by memory', () => {
  let dataDir: string;
  beforeEach(() => {
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'admission-'));
  });
  afterEach(() => fs.rmSync(dataDir, { recursive: true, force: true }));

  it('reads the guest memory of a domain XML in its unit', () => {
    expect(domainMemoryBytes("<domain><memory unit='KiB'>262144</memory></domain>")).toBe(256 * MiB);
    expect(domainMemoryBytes('<domain><memory unit="GiB">1</memory></domain>')).toBe(1024 * MiB);
    expect(domainMemoryBytes('<domain><memory>1024</memory></domain>')).toBe(MiB);
    // Fail closed: no readable size admits nothing.
    expect(() => domainMemoryBytes('<domain/>')).toThrow(/no <memory> element/);
    expect(() => domainMemoryBytes("<memory unit='PiB'>1</memory>")).toThrow(/unit "PiB"/);
  });

  it('admits exactly what fits among concurrent requests, again the admitted, and more once one is released', async () => {
    const acts = createAdmissionActivities({ hostId: 'h', dataDir, admission: { vmMemoryBytes: 800 * MiB, reserveBytes: 0 } });
    const answers = await Promise.all(Array.from({ length: 10 }, (_, i) => acts.admitInstance({ instanceId: `i-${i}`, memoryBytes: 256 * MiB })));
    const admitted = answers.flatMap((a, i) => (a.admitted ? [`i-${i}`] : []));
    expect(admitted).toHaveLength(3);
    expect(answers.find((a) => !a.admitted)).toEqual({ admitted: false, committedBytes: 768 * MiB, capacityBytes: 800 * MiB });
    expect((await acts.admitInstance({ instanceId: admitted[0] as string, memoryBytes: 256 * MiB })).admitted).toBe(true);
    const waiting = ['i-0', 'i-1', 'i-2', 'i-3', 'i-4'].find((i) => !admitted.includes(i)) as string;
    expect((await acts.admitInstance({ instanceId: waiting, memoryBytes: 256 * MiB })).admitted).toBe(false);
    await releaseAdmission(dataDir, admitted[1] as string);
    expect((await acts.admitInstance({ instanceId: waiting, memoryBytes: 256 * MiB })).admitted).toBe(true);
  });

  it('refuses a VM larger than all the host gives VMs with NO_MEMORY, naming the figures', async () => {
    const acts = createAdmissionActivities({ hostId: 'h', dataDir, admission: { vmMemoryBytes: 512 * MiB, reserveBytes: 0 } });
    const err = await acts.admitInstance({ instanceId: 'big', memoryBytes: 1024 * MiB }).catch((e: unknown) => e);
    expect(isCloudletError(err) && err.code).toBe('NO_MEMORY');
    expect(String(err)).toMatch(/needs 1024 MiB .* gives its VMs 512 MiB in all/);
    expect(err).toMatchObject({ retryable: false });
  });

  it('defaults to the total memory less the reserve', async () => {
    const acts = createAdmissionActivities({ hostId: 'h', dataDir, admission: { reserveBytes: os.totalmem() - 300 * MiB } });
    expect((await acts.admitInstance({ instanceId: 'a', memoryBytes: 256 * MiB })).capacityBytes).toBe(300 * MiB);
    expect((await acts.admitInstance({ instanceId: 'b', memoryBytes: 256 * MiB })).admitted).toBe(false);
  });
});
