/**
 * The cluster catalog records operations as their workflows end, with no API process running:
 * on the real Temporal server and host workers, the catalog holds a run's end (result, failure or
 * cancellation) as soon as its result is known. A run that could not record itself (the catalog
 * unreachable from the worker) still ends as it would, and the API's sync from visibility records
 * it afterwards, leaving the workflows' own records alone.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { WorkflowFailedError, type Client } from '@temporalio/client';
import { SqliteClusterCatalog } from '../../src/core/cluster-catalog';
import { hostTaskQueue } from '../../src/common/names';
import { reconcileHost, importBaseVm, synthesizeVm } from '../../src/workflows';
import { CatalogSync } from '../../src/service/catalog-sync';
import { failureOf } from '../../src/service/failure';
import { startTestCluster, type TestCluster } from '../helpers/cluster';
import { startStallingServer } from '../helpers/stalling-server';
import { pollUntil } from '../helpers/poll';

jest.setTimeout(5 * 60_000);

let dir: string;
let cluster: TestCluster;
let catalog: SqliteClusterCatalog;
let host: string;
let client: Client;

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cloudlet-records-'));
  const file = path.join(dir, 'catalog.sqlite');
  cluster = await startTestCluster('records', ['rec'], { env: { CLOUDLET_CATALOG_DB: file } });
  [host = ''] = cluster.hosts;
  client = cluster.client;
  catalog = new SqliteClusterCatalog(file);
});

afterAll(async () => {
  await catalog?.close();
  await cluster?.stop();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

test('a run that succeeds is in the catalog with its result when its result is known, from the host queue and from the shared queue', async () => {
  for (const [suffix, taskQueue, onHostQueue] of [['own', hostTaskQueue(host), true], ['shared', cluster.config.workflowTaskQueue, undefined]] as const) {
    const workflowId = `reconcileHost/${host}/records-${suffix}`;
    const handle = await client.workflow.start(reconcileHost, { workflowId, taskQueue, args: [{ hostId: host, ...(onHostQueue ? { onHostQueue } : {}) }] });
    const result = await handle.result();
    const rec = await catalog.closedOperation(workflowId);
    expect(rec).toMatchObject({ id: workflowId, kind: 'reconcileHost', type: 'reconcileHost', hostId: host, status: 'succeeded', result });
    expect(rec?.error).toBeUndefined();
    const described = await handle.describe();
    expect(rec?.startedAt).toBe(described.startTime.toISOString());
    expect(Date.parse(rec?.closedAt ?? '')).toBeGreaterThanOrEqual(described.startTime.getTime());
    expect(Date.parse(rec?.closedAt ?? '')).toBeLessThanOrEqual((described.closeTime ?? new Date()).getTime());
  }
  // The run the worker started when it started is recorded too.
  const atStart = await catalog.closedOperations({ kinds: ['reconcileHost'], hosts: [host] });
  expect(atStart.filter((o) => !o.id.includes('/records-')).length).toBeGreaterThanOrEqual(1);
  // Nothing moved the sync's mark: no sync ran.
  expect(await catalog.syncMark()).toBeUndefined();
});

test('a run that fails is in the catalog with the failure its result throws', async () => {
  const workflowId = `synthesizeVm/${host}/records-refused`;
  const handle = await client.workflow.start(synthesizeVm, {
    workflowId,
    taskQueue: hostTaskQueue(host),
    args: [{ hostId: host, instanceId: 'records-refused', overlayUrl: '/etc/passwd', onHostQueue: true }],
  });
  const err = await handle.result().catch((e: unknown) => e);
  expect(err).toBeInstanceOf(WorkflowFailedError);
  const expected = failureOf(err, 'FAILED');
  expect(expected.type).toBe('SOURCE_REFUSED');
  const rec = await catalog.closedOperation(workflowId);
  expect(rec).toMatchObject({ id: workflowId, kind: 'synthesizeVm', hostId: host, status: 'failed', error: expected });
  expect(rec?.result).toBeUndefined();
});

test('a cancelled run is in the catalog as cancelled; an import held by its server stops within seconds', async () => {
  const server = await startStallingServer(Buffer.alloc(1 << 20, 7), 'held.pkg', { stallFirst: true });
  try {
    const workflowId = `importBaseVm/${host}/records-cancelled`;
    const handle = await client.workflow.start(importBaseVm, { workflowId, taskQueue: hostTaskQueue(host), args: [{ hostId: host, source: `${server.url}`, onHostQueue: true }] });
    await pollUntil('the import to be held by the server', 60_000, async () => (server.holding() ? true : undefined));
    const cancelledAt = Date.now();
    await handle.cancel();
    await expect(handle.result()).rejects.toBeInstanceOf(WorkflowFailedError);
    // The held download was aborted when the cancel reached the activity (it heartbeats while it
    // waits): before, the run waited out the activity's 20 s heartbeat timeout and ended failed.
    expect(Date.now() - cancelledAt).toBeLessThan(15_000);
    expect((await handle.describe()).status.name).toBe('CANCELLED');
    const rec = await catalog.closedOperation(workflowId);
    expect(rec).toMatchObject({ id: workflowId, kind: 'importBaseVm', status: 'failed', error: { type: 'CANCELLED', nonRetryable: true } });
    // The partial download is gone.
    const tmp = path.join(cluster.config.varDir, 'hosts', host, 'store', 'tmp');
    expect((fs.existsSync(tmp) ? fs.readdirSync(tmp) : []).filter((n) => n.includes('download'))).toEqual([]);
  } finally {
    server.release();
    await server.close();
  }
});

test('a run whose worker cannot reach the catalog ends as it would; the sync from visibility records it and leaves the other records as they are', async () => {
  // A second cluster in the same namespace whose workers are given a catalog they cannot open.
  const blocked = path.join(dir, 'not-a-directory');
  fs.writeFileSync(blocked, 'a file, so the catalog under it cannot be made');
  const other = await startTestCluster('records-off', ['roff'], { env: { CLOUDLET_CATALOG_DB: path.join(blocked, 'catalog.sqlite') } });
  try {
    const [offHost = ''] = other.hosts;
    const workflowId = `reconcileHost/${offHost}/records-unrecorded`;
    const result = await other.client.workflow.execute(reconcileHost, { workflowId, taskQueue: hostTaskQueue(offHost), args: [{ hostId: offHost, onHostQueue: true }] });
    expect(result).toMatchObject({ hostId: offHost, lost: [] });
    expect(await catalog.closedOperation(workflowId)).toBeUndefined();
    // Nor anywhere else: not in the default catalog of this var directory either.
    const fallback = new SqliteClusterCatalog(path.join(other.config.varDir, 'clusters', other.config.namespace, 'catalog.sqlite'));
    try {
      expect(await fallback.closedOperation(workflowId)).toBeUndefined();
    } finally {
      await fallback.close();
    }
    const own = await catalog.closedOperation(`reconcileHost/${host}/records-own`);
    expect(own).toBeDefined();
    // The API's sync over both clusters' hosts: it records the run that could not record itself.
    const sync = new CatalogSync(client, catalog, [host, offHost]);
    await pollUntil('the unrecorded run to be listed closed by visibility', 60_000, async () => {
      await sync.sync();
      return (await catalog.closedOperation(workflowId)) ? true : undefined;
    });
    expect(await catalog.closedOperation(workflowId)).toMatchObject({ kind: 'reconcileHost', hostId: offHost, status: 'succeeded', result });
    // The workflow's own record is left as it was (not read again from visibility), and the sync's
    // mark moved to what it saw.
    expect(await catalog.closedOperation(`reconcileHost/${host}/records-own`)).toEqual(own);
    expect(await catalog.syncMark()).toBeDefined();
  } finally {
    await other.stop();
  }
});
