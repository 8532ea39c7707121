/**
 * A test cluster on the real Temporal dev server: host workers run in this process (each polls its
 * host's queue, for activities and workflows, and a shared workflow queue of the test's own), with
 * unique host ids. stop() shuts the workers down and removes the hosts' VMs and files.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Client } from '@temporalio/client';
import { loadConfig, type Config } from '../../src/config';
import { connectClient } from '../../src/client/connect';
import { createHostWorker, type HostWorker } from '../../src/workers/host-worker';
import { createLogger } from '../../src/common/logger';
import { ensureInfra, removeHostDomains, uniqueSuffix, waitForHostsServing } from './infra';

export interface TestCluster {
  suffix: string;
  config: Config;
  client: Client;
  /** Host ids, in the order of the prefixes given. */
  hosts: string[];
  workers: HostWorker[];
  stop(): Promise<void>;
}

export interface TestClusterOptions {
  /** The cluster's own Temporal namespace (infra/temporal.sh creates "east" and "west"); default "default". */
  namespace?: string;
  /** More CLOUDLET_* settings of the cluster's workers (e.g. CLOUDLET_PROBE_FROM). */
  env?: Record<string, string>;
}

export async function startTestCluster(name: string, hostPrefixes: string[], options: TestClusterOptions = {}): Promise<TestCluster> {
  ensureInfra();
  const suffix = uniqueSuffix();
  const hosts = hostPrefixes.map((p) => `${p}-${suffix}`);
  const config: Config = {
    ...loadConfig({ CLOUDLET_LOG_LEVEL: 'warn', ...(options.namespace ? { CLOUDLET_NAMESPACE: options.namespace } : {}), ...(options.env ?? {}) }),
    workflowTaskQueue: `wf-${name}-${suffix}`,
  };
  const client = await connectClient(config);
  const workers: HostWorker[] = [];
  const runs: Promise<void>[] = [];
  for (const h of hosts) {
    const w = await createHostWorker(config, h, createLogger(`worker-${h}`, config.logLevel));
    workers.push(w);
    runs.push(w.run());
  }
  await waitForHostsServing(client, hosts);
  return {
    suffix,
    config,
    client,
    hosts,
    workers,
    async stop() {
      for (const w of workers) w.shutdown();
      await Promise.all(runs);
      await client.connection.close();
      removeHostDomains(hosts);
      for (const h of hosts) fs.rmSync(path.join(config.varDir, 'hosts', h), { recursive: true, force: true });
    },
  };
}
