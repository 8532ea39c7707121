/**
 * The `cloudlet` CLI in --api mode against the real service: the HTTP API over the Temporal-backed
 * CloudletService, two host workers, real libvirt/QEMU. Through CLI commands only: import the base
 * on both hosts, resume it on A, customize the guest, make an overlay of it, provision on B from
 * the overlay, and B's application answers with A's state; progress of the workflow's stages is
 * shown while it runs, and a bad overlay URL fails with the workflow's own error.
 */
import { startApi, type RunningApi } from '../../src/api/server';
import { runCli } from '../../src/cli/main';
import { createLogger } from '../../src/common/logger';
import { GuestAppClient } from '../../src/guest/app-client';
import { TemporalCloudletService } from '../../src/service/temporal';
import type { InstanceInfo, OperationStatus, OverlayInfo } from '../../src/service/types';
import { startTestCluster, type TestCluster } from '../helpers/cluster';
import { testBasePackage } from '../helpers/test-base';
import { Capture } from '../helpers/capture';

jest.setTimeout(20 * 60_000);

interface Done<R> {
  operation: OperationStatus;
  result: R;
}

describe('the cloudlet CLI through a running service (--api)', () => {
  let cluster: TestCluster;
  let suffix: string;
  let hostA: string;
  let hostB: string;
  let token: string;
  let api: RunningApi;
  let pkg: { packageFile: string; baseId: string };

  const cli = async (...args: string[]): Promise<{ code: number; out: string; err: string }> => {
    const stdout = new Capture();
    const stderr = new Capture();
    const code = await runCli(['--json', ...args], { stdout, stderr, env: { CLOUDLET_API_URL: api.url, CLOUDLET_API_TOKEN: token } });
    return { code, out: stdout.text, err: stderr.text };
  };
  const ok = async <T>(...args: string[]): Promise<T & { stderr: string }> => {
    const r = await cli(...args);
    if (r.code !== 0) throw new Error(`cloudlet ${args.join(' ')} exited ${r.code}: ${r.out} ${r.err}`);
    return { ...(JSON.parse(r.out) as T), stderr: r.err };
  };

  beforeAll(async () => {
    pkg = await testBasePackage(256);
    cluster = await startTestCluster('cli', ['ca', 'cb']);
    [hostA = '', hostB = ''] = cluster.hosts;
    suffix = cluster.suffix;
    token = `cli-token-${suffix}-0123456789`;
    api = await startApi(new TemporalCloudletService(cluster.client, cluster.config, { hosts: cluster.hosts }), { tokens: [token], port: 0, logger: createLogger('api', 'warn') });
  });

  afterAll(async () => {
    await api?.close();
    await cluster?.stop();
  });

  it('imports, resumes, makes an overlay on A and provisions it on B, with progress', async () => {
    const hosts = JSON.parse((await cli('hosts', 'list')).out) as Array<{ id: string; serving: boolean }>;
    expect(hosts.map((h) => [h.id, h.serving])).toEqual([
      [hostA, true],
      [hostB, true],
    ]);

    for (const hostId of [hostA, hostB]) {
      const imp = await ok<Done<{ baseId: string }>>('base', 'import', pkg.packageFile, '--host', hostId);
      expect(imp.operation).toMatchObject({ kind: 'importBaseVm', state: 'succeeded', hostId });
      expect(imp.result.baseId).toBe(pkg.baseId);
      // The operation and its Web UI link came first on stderr.
      const first = JSON.parse(imp.stderr.split('\n')[0] ?? '{}') as { type: string; id: string; webUiUrl: string };
      expect(first).toMatchObject({ type: 'operation', id: imp.operation.id });
      expect(first.webUiUrl).toContain(encodeURIComponent(imp.operation.id));
    }
    const listed = await cli('base', 'list');
    const bases = JSON.parse(listed.out) as Array<{ id: string; hostIds: string[] }>;
    expect(bases.find((b) => b.id === pkg.baseId)?.hostIds.sort()).toEqual([hostA, hostB].sort());

    const resumed = await ok<Done<{ instanceId: string }> & { instance: InstanceInfo }>('instance', 'resume', '--base', pkg.baseId.slice(0, 10), '--host', hostA);
    expect(resumed.instance).toMatchObject({ hostId: hostA, state: 'running', baseId: pkg.baseId });
    const appA = new GuestAppClient(Number((resumed.instance.appEndpoint ?? '').split(':')[1]));
    const before = (await appA.waitForState(60_000)).state;
    await appA.set(`cli-${suffix}`, 'customized through the CLI');

    const made = await ok<Done<{ overlayId: string }> & { overlay: OverlayInfo }>('overlay', 'create', '--instance', resumed.instance.id);
    expect(made.overlay).toMatchObject({ baseId: pkg.baseId, id: made.result.overlayId });
    expect((await ok<InstanceInfo>('instance', 'info', resumed.instance.id)).state).not.toBe('running');

    const prov = await ok<Done<{ instanceId: string; timings: Record<string, number> }> & { instance: InstanceInfo }>('synthesize', made.overlay.id.slice(0, 16), '--host', hostB);
    expect(prov.operation).toMatchObject({ kind: 'synthesizeVm', state: 'succeeded', hostId: hostB });
    expect(prov.result.timings.firstResponseMs).toBeGreaterThan(0);
    // Each stage of the workflow was shown while it ran, in order, and finished.
    const stages = prov.stderr
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { type: string; stage?: string; finished?: boolean })
      .filter((l) => l.type === 'progress' && l.finished)
      .map((l) => l.stage);
    // The workflow times each stage under "<stage>Ms" (and the preflight's three checks under
    // their own names). A stage that starts and ends between two polls may not be shown, so:
    // what was shown is among the timed stages, in their order.
    const timed = Object.keys(prov.result.timings).filter((k) => k !== 'firstResponseMs').map((k) => k.replace(/Ms$/, ''));
    expect(stages.length).toBeGreaterThan(0);
    expect(stages).toEqual(timed.filter((s) => stages.includes(s)));
    expect(timed.slice(0, 4)).toEqual(['preflight', 'inspect overlay', 'verify CPU model', 'check base']);

    const appB = new GuestAppClient(Number((prov.instance.appEndpoint ?? '').split(':')[1]));
    const state = await appB.state();
    expect(state.token).toBe(`cli-${suffix}`);
    expect(state.disk).toBe('customized through the CLI');
    expect(state.bootId).toBe(before.bootId);

    const term = await ok<Done<unknown>>('instance', 'terminate', prov.instance.id);
    expect(term.operation.state).toBe('succeeded');
    expect((await ok<InstanceInfo>('instance', 'info', prov.instance.id)).state).toBe('terminated');
  });

  it('a provision from a URL that serves no overlay fails with the workflow error and exit 1', async () => {
    const r = await cli('synthesize', 'http://127.0.0.1:9/none.overlay', '--host', hostB);
    expect(r.code).toBe(1);
    const err = (JSON.parse(r.out) as { error: { code: string; message: string; details: { operationId: string } } }).error;
    expect(err.details.operationId).toMatch(new RegExp(`^synthesizeVm/${hostB}/`));
    expect(err.message).toContain(`operation ${err.details.operationId} failed`);
    expect(err.message).toContain('Temporal Web UI');
    const status = await ok<OperationStatus>('operation', 'status', err.details.operationId);
    expect(status.state).toBe('failed');
    expect(status.error?.type).toBe(err.code);
  });
});
