/**
 * Tracing on the real parts: the API (this process) and a host worker (a process of its own) each
 * write their spans to a trace file. One synthesis started through the API is one trace: the API
 * request, the workflow start, the workflow run and its activities on the worker's host, and the
 * activities' inner steps (fetch/decompress/apply, restore, replug, app wait), each a child of
 * the span that ran it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createLogger } from '../../src/common/logger';
import { initTracing, type SpanLine, type Tracing } from '../../src/common/tracing';
import { startApi, type RunningApi } from '../../src/api/server';
import { CloudletApiClient } from '../../src/api/client';
import { TemporalCloudletService } from '../../src/service';
import { assertHostServing } from '../../src/client/connect';
import { startTestCluster, type TestCluster } from '../helpers/cluster';
import { overlayOnFirstHost } from '../helpers/overlay-story';
import { REPO, removeHostDomains } from '../helpers/infra';
import { pollUntil, waitFor } from '../helpers/poll';

jest.setTimeout(20 * 60_000);

function spansIn(file: string): SpanLine[] {
  if (!fs.existsSync(file)) return [];
  return fs.readFileSync(file, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as SpanLine);
}

describe('one synthesis is one trace across the API and the host worker', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cloudlet-traces-'));
  const apiFile = path.join(dir, 'api.jsonl');
  const workerFile = path.join(dir, 'worker.jsonl');
  let tracing: Tracing;
  let cluster: TestCluster;
  let api: RunningApi;
  let worker: ChildProcess | undefined;
  let tb = '';
  const token = `trace-token-${Date.now()}-0123456789`;

  beforeAll(async () => {
    // Before the cluster's client exists: it then carries the API's trace into the workflows.
    tracing = initTracing('cloudlet-api', { file: apiFile });
    cluster = await startTestCluster('traces', ['ta']);
    tb = `tb-${cluster.suffix}`;
  });

  afterAll(async () => {
    worker?.kill('SIGKILL');
    await api?.close();
    removeHostDomains([tb]);
    if (tb) fs.rmSync(path.join(REPO, 'var', 'hosts', tb), { recursive: true, force: true });
    await cluster?.stop();
    await tracing?.shutdown();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('links the API request, the workflow, its activities and their steps', async () => {
    worker = spawn(process.execPath, ['--import', 'tsx', path.join(REPO, 'src', 'workers', 'main.ts'), '--host', tb], {
      stdio: 'ignore',
      env: { ...process.env, CLOUDLET_WORKFLOW_QUEUE: cluster.config.workflowTaskQueue, CLOUDLET_LOG_LEVEL: 'warn', CLOUDLET_TRACE_FILE: workerFile },
    });
    await waitFor(`the worker of ${tb} to poll`, () => assertHostServing(cluster.client, tb).then(() => true, () => false), 120_000);
    const [ta = ''] = cluster.hosts;
    api = await startApi(new TemporalCloudletService(cluster.client, cluster.config, { hosts: [ta, tb] }), { tokens: [token], port: 0, logger: createLogger('api', 'warn') });
    const cloud = new CloudletApiClient({ baseUrl: api.url, token });
    const { overlayUrl, done } = await overlayOnFirstHost(cloud, [ta, tb]);
    await done((await cloud.provisionInstance({ hostId: tb, overlayUrl })).id);

    // The API's span for the provisioning request, and its trace.
    await tracing.processor.forceFlush();
    const request = spansIn(apiFile).filter((s) => s.name === 'POST /v1/instances').at(-1);
    expect(request?.service).toBe('cloudlet-api');
    const traceId = request?.traceId ?? '';
    expect(spansIn(apiFile).some((s) => s.traceId === traceId && /^StartWorkflow:synthesizeVm$/.test(s.name) && s.parentSpanId === request?.spanId)).toBe(true);

    // The worker process wrote the rest of the same trace.
    // Early start: the VM the synthesis started for itself loaded the save during the apply; its
    // user-mode NIC is its own QEMU's, so nothing is replugged.
    const want = ['RunWorkflow:synthesizeVm', 'RunActivity:synthesizeInstanceFiles', 'RunActivity:resumeInstance', 'fetch, decompress and apply overlay', 'apply: stream', 'load the rest into the started VM', 'restore', 'wait for app'];
    const spans = await pollUntil('the worker\'s spans of the synthesis', 60_000, async () => {
      const mine = spansIn(workerFile).filter((s) => s.traceId === traceId);
      return want.every((n) => mine.some((s) => s.name === n)) ? mine : undefined;
    }, 500);
    expect(new Set(spans.map((s) => s.service))).toEqual(new Set([`cloudlet-worker-${tb}`]));
    const byName = (n: string): SpanLine | undefined => spans.find((s) => s.name === n);
    // Steps are children of the activity that ran them; an activity, of the workflow's span tree.
    expect(byName('restore')?.parentSpanId).toBe(byName('RunActivity:resumeInstance')?.spanId);
    expect(byName('wait for app')?.parentSpanId).toBe(byName('RunActivity:resumeInstance')?.spanId);
    expect(byName('fetch, decompress and apply overlay')?.parentSpanId).toBe(byName('RunActivity:synthesizeInstanceFiles')?.spanId);
    expect(byName('load the rest into the started VM')?.parentSpanId).toBe(byName('RunActivity:synthesizeInstanceFiles')?.spanId);
    expect(spans.some((s) => s.name === 'replug NIC')).toBe(false);
    expect(byName('restore')?.durationMs).toBeGreaterThan(0);
    const ids = new Set([...spans, ...spansIn(apiFile)].map((s) => s.spanId));
    const activity = byName('RunActivity:resumeInstance');
    expect(activity?.parentSpanId && ids.has(activity.parentSpanId)).toBe(true);
  });
});
