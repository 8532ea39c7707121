/**
 * Metrics on the real parts: a host worker process with CLOUDLET_METRICS_PORT and the API serve
 * Prometheus metrics; a real Prometheus (Debian's package) scrapes both while an overlay made on
 * one host is synthesized on that worker's host. Afterwards Prometheus holds the cloudlet's series
 * with sensible values (the synthesis's activities and stages, the overlay's bytes, the running
 * instance, the host's memory and store space, its warm pool's levels, API requests by route) and
 * the Temporal SDK's own worker metrics.
 */
import { freePort } from '../../src/common/ports';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { createLogger } from '../../src/common/logger';
import { startApi, type RunningApi } from '../../src/api/server';
import { CloudletApiClient } from '../../src/api/client';
import { TemporalCloudletService } from '../../src/service';
import { assertHostServing } from '../../src/client/connect';
import { startTestCluster, type TestCluster } from '../helpers/cluster';
import { overlayOnFirstHost } from '../helpers/overlay-story';
import { REPO, removeHostDomains } from '../helpers/infra';
import { pollUntil, waitFor } from '../helpers/poll';
import { startPrometheus, type RunningPrometheus } from '../helpers/prometheus';

jest.setTimeout(20 * 60_000);

describe('Prometheus scrapes the workers and the API', () => {
  let cluster: TestCluster;
  let api: RunningApi;
  let cloud: CloudletApiClient;
  let prom: RunningPrometheus | undefined;
  let worker: ChildProcess | undefined;
  let mb = '';
  const token = `metrics-token-${Date.now()}-0123456789`;

  beforeAll(async () => {
    cluster = await startTestCluster('metrics', ['ma']);
    mb = `mb-${cluster.suffix}`;
  });

  afterAll(async () => {
    worker?.kill('SIGKILL');
    await prom?.stop();
    await api?.close();
    removeHostDomains([mb]);
    if (mb) fs.rmSync(path.join(REPO, 'var', 'hosts', mb), { recursive: true, force: true });
    await cluster?.stop();
  });

  it('has the synthesis, the host and the API in its series, beside the Temporal SDK\'s', async () => {
    const metricsPort = await freePort();
    worker = spawn(process.execPath, ['--import', 'tsx', path.join(REPO, 'src', 'workers', 'main.ts'), '--host', mb], {
      stdio: 'ignore',
      env: { ...process.env, CLOUDLET_WORKFLOW_QUEUE: cluster.config.workflowTaskQueue, CLOUDLET_LOG_LEVEL: 'warn', CLOUDLET_METRICS_PORT: String(metricsPort) },
    });
    await waitFor(`the worker of ${mb} to poll`, () => assertHostServing(cluster.client, mb).then(() => true, () => false), 120_000);
    const [ma = ''] = cluster.hosts;
    api = await startApi(new TemporalCloudletService(cluster.client, cluster.config, { hosts: [ma, mb] }), { tokens: [token], port: 0, logger: createLogger('api', 'warn') });
    cloud = new CloudletApiClient({ baseUrl: api.url, token });
    prom = await startPrometheus([
      { job: 'cloudlet-worker', targets: [`127.0.0.1:${metricsPort}`] },
      { job: 'cloudlet-api', targets: [new URL(api.url).host], bearer: token },
    ]);

    const { pkg, overlayUrl, done } = await overlayOnFirstHost(cloud, [ma, mb]);
    const synth = await done((await cloud.provisionInstance({ hostId: mb, overlayUrl })).id);
    expect(synth.hostId).toBe(mb);

    const p = prom;
    const one = (expr: string, ok: (v: number) => boolean) =>
      pollUntil(`Prometheus to have ${expr}`, 60_000, async () => {
        const r = await p.query(expr);
        return r.length > 0 && r.every((x) => ok(x.value)) ? r : undefined;
      }, 500);
    const h = `host="${mb}"`;
    // Both targets are up.
    await one('up{job="cloudlet-worker"}', (v) => v === 1);
    await one('up{job="cloudlet-api"}', (v) => v === 1);
    // The synthesis's activities ran once and succeeded; its stages have durations.
    await one(`cloudlet_activity_duration_seconds_count{${h},activity="synthesizeInstanceFiles",outcome="succeeded"}`, (v) => v === 1);
    await one(`cloudlet_activity_duration_seconds_sum{${h},activity="synthesizeInstanceFiles"}`, (v) => v > 0 && v < 600);
    const applied = await one(`cloudlet_stage_duration_seconds_count{${h},activity="synthesizeInstanceFiles"}`, (v) => v === 1);
    expect(applied.map((s) => s.labels.stage)).toEqual(expect.arrayContaining(['stream', 'total']));
    const stages = await one(`cloudlet_stage_duration_seconds_count{${h},activity="resumeInstance"}`, (v) => v >= 1);
    expect(stages.map((s) => s.labels.stage)).toEqual(expect.arrayContaining(['wait for app']));
    // The overlay's bytes were fetched; the instance runs; the host has memory and store space.
    await one(`cloudlet_transfer_bytes_total{${h},direction="received",what="overlay"}`, (v) => v > 1000 && v <= fs.statSync(pkg.packageFile).size);
    await one(`cloudlet_instances{${h},state="running"}`, (v) => v === 1);
    await one(`cloudlet_host_memory_available_bytes{${h}}`, (v) => v > 256 * 1024 * 1024);
    await one(`cloudlet_store_free_bytes{${h}}`, (v) => v > 0);
    // The warm pool: a base given one ready VM on the host shows it (target and ready) once it is started.
    await cloud.setPoolTarget(mb, pkg.baseId, 1);
    await one(`cloudlet_warm_pool_vms{${h},base="${pkg.baseId}",kind="target"}`, (v) => v === 1);
    await one(`cloudlet_warm_pool_vms{${h},base="${pkg.baseId}",kind="ready"}`, (v) => v === 1);
    await one('cloudlet_api_requests_total{job="cloudlet-api",method="POST",route="/v1/hosts/:hostId/pool",status="202"}', (v) => v === 1);
    // The Temporal SDK's own worker metrics come through the same target.
    await one(`temporal_num_pollers{job="cloudlet-worker",task_queue="cloudlet-host-${mb}"}`, (v) => v >= 1);
    await one('temporal_activity_execution_latency_count{job="cloudlet-worker"}', (v) => v >= 1);
    // The API: requests by route pattern and status.
    await one('cloudlet_api_requests_total{job="cloudlet-api",method="POST",route="/v1/instances",status="202"}', (v) => v === 1);
    await one('cloudlet_api_requests_total{job="cloudlet-api",route="/metrics",status="200"}', (v) => v >= 1);
  });
});
