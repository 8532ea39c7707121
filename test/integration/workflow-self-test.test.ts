/**
 * The seed workflow end to end on the real Temporal dev server and real libvirt: boot the test
 * guest on a host worker, customize it, save, restore, replug the NIC, and check the app.
 */
import type { Client } from '@temporalio/client';
import { WorkflowFailedError } from '@temporalio/client';
import { loadConfig, type Config } from '../../src/config';
import { assertHostServing, connectClient } from '../../src/client/connect';
import { createHostWorker, type HostWorker } from '../../src/workers/host-worker';
import { createLogger } from '../../src/common/logger';
import { guestSelfTest } from '../../src/workflows';
import { isCloudletError } from '../../src/core/errors';
import { ensureInfra, uniqueSuffix, waitForHostsServing } from '../helpers/infra';

jest.setTimeout(15 * 60_000);

describe('guestSelfTest workflow on a real Temporal server and real libvirt', () => {
  const suffix = uniqueSuffix();
  const hostId = `t-${suffix}`;
  let config: Config;
  let client: Client;
  let worker: HostWorker;
  let running: Promise<void>;

  beforeAll(async () => {
    ensureInfra();
    config = { ...loadConfig({ CLOUDLET_LOG_LEVEL: 'warn' }), workflowTaskQueue: `wf-test-${suffix}` };
    client = await connectClient(config);
    worker = await createHostWorker(config, hostId, createLogger('test-worker', 'warn'));
    running = worker.run();
    await waitForHostsServing(client, [hostId]);
  });

  afterAll(async () => {
    worker?.shutdown();
    await running;
    await client?.connection.close();
  });

  it('restores the guest with its memory and disk state after save, restore and NIC replug', async () => {
    await assertHostServing(client, hostId);
    const workflowId = `guest-self-test/${hostId}`;
    const result = await client.workflow.execute(guestSelfTest, {
      taskQueue: config.workflowTaskQueue,
      workflowId,
      args: [{ hostId, memoryMiB: 256 }],
    });
    // Same boot (no reboot), same in-memory token, same disk message, counter kept counting.
    expect(result.answer.bootId).toBe(result.bootId);
    expect(result.answer.token).toBe(result.token);
    expect(result.answer.disk).toMatch(/^customized by guest-self-test\//);
    expect(result.answer.counter).toBeGreaterThanOrEqual(2);
    for (const k of ['bootToReadyMs', 'saveMs', 'restoreMs', 'unplugMs', 'plugMs']) {
      expect(result.timings[k]).toBeGreaterThan(0);
    }

    // The run is visible with its search attributes (visibility is eventually consistent).
    const query = `WorkflowId = '${workflowId}' AND CloudletHost = '${hostId}' AND CloudletOperation = 'guestSelfTest' AND CloudletStatus = 'succeeded'`;
    const deadline = Date.now() + 30_000;
    let found = 0;
    while (found === 0 && Date.now() < deadline) {
      found = 0;
      for await (const _ of client.workflow.list({ query })) found++;
      if (found === 0) await new Promise((r) => setTimeout(r, 250));
    }
    expect(found).toBe(1);
  });

  it('refuses a host that no worker serves, naming the host and the fix', async () => {
    const err = await assertHostServing(client, 'no-such-host').catch((e: unknown) => e);
    expect(isCloudletError(err) && err.code).toBe('UNKNOWN_HOST');
    expect(String((err as Error).message)).toMatch(/no-such-host.*start the host's worker/);
  });

  it('fails non-retryably, without leaving a VM, when the guest image is missing', async () => {
    const otherHost = `u-${suffix}`;
    const cfg: Config = { ...config, varDir: `${config.varDir}/test-missing-guest-${suffix}`, workflowTaskQueue: `wf-test2-${suffix}` };
    const w = await createHostWorker(cfg, otherHost, createLogger('test-worker-2', 'warn'));
    const r = w.run();
    try {
      const err = await client.workflow
        .execute(guestSelfTest, { taskQueue: cfg.workflowTaskQueue, workflowId: `guest-self-test/${otherHost}`, args: [{ hostId: otherHost }] })
        .catch((e: unknown) => e);
      expect(err).toBeInstanceOf(WorkflowFailedError);
      const cause = (err as WorkflowFailedError).cause?.cause as { type?: string; message?: string; nonRetryable?: boolean } | undefined;
      expect(cause?.type).toBe('NOT_FOUND');
      expect(cause?.nonRetryable).toBe(true);
      expect(cause?.message).toMatch(/test guest .*infra\/guest\/build\.sh/);
    } finally {
      w.shutdown();
      await r;
    }
  });
});
