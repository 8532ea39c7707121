/**
 * One worker process per cloudlet host. It polls the host's own task queue for activities (they
 * touch this host's files and hypervisor) and for the workflow tasks of the host's own operations,
 * and the shared queue for workflow tasks of runs started there (rebuilds, self-tests, older
 * clients). Running an operation's workflow on its host's queue lets it run short host checks as
 * local activities and have its activities dispatched eagerly (docs/operations.md).
 */
import { bundleWorkflowCode, NativeConnection, Runtime, Worker } from '@temporalio/worker';
import type { ActivityInterceptorsFactory, WorkerOptions, WorkflowBundleWithSourceMap } from '@temporalio/worker';
import { makeWorkflowExporter, OpenTelemetryActivityInboundInterceptor, OpenTelemetryActivityOutboundInterceptor } from '@temporalio/interceptors-opentelemetry/lib/worker';
import { activeTracing } from '../common/tracing';
import type { Logger } from 'pino';
import { hostTaskQueue, SearchAttributes } from '../common/names';
import type { Config } from '../config';
import { hostDir } from '../config';
import { createHostActivities } from '../activities';
import { createMobilityActivities } from '../activities/mobility';
import { connectClient } from '../client/connect';
import { hostMonitor } from '../workflows/host-monitor';
import { reconcileHost } from '../workflows/reconcile';
import { warmPool } from '../workflows/warm-pool';
import { SqliteNeighbourRegistry, type NeighbourRegistry } from '../core/mobility/registry';
import { prewarmJoin } from '../core/snapshot';
import { installRuntimeLogging } from './runtime-logging';
import { startPublisher } from './publisher';
import { registerHandoffReceiver } from './handoff-receiver';
import { loadHandoffSecret } from '../common/handoff-secret';
import { LibvirtHypervisor } from '../hypervisor/libvirt';
import { activityMetrics, unwatchHost, watchHost } from './host-metrics';
import fs from 'node:fs';
import path from 'node:path';

export interface HostWorker {
  /** Resolves when both workers have stopped. */
  run(): Promise<void>;
  shutdown(): void;
  connection: NativeConnection;
  /** Where this host publishes its overlays. */
  publicUrl: string;
}

const bundles = new Map<boolean, Promise<WorkflowBundleWithSourceMap>>();
/**
 * The workflows, bundled once per process (every Worker of every host in it shares the bundle);
 * with tracing, with Temporal's OpenTelemetry workflow interceptors in it.
 */
function workflowBundle(traced: boolean): Promise<WorkflowBundleWithSourceMap> {
  let b = bundles.get(traced);
  if (!b) {
    b = bundleWorkflowCode({
      workflowsPath: require.resolve('../workflows'),
      logger: Runtime.instance().logger,
      ...(traced ? { workflowInterceptorModules: [require.resolve('@temporalio/interceptors-opentelemetry/lib/workflow-interceptors')] } : {}),
    });
    bundles.set(traced, b);
  }
  return b;
}

/** Temporal's OpenTelemetry interceptors and workflow span sink, when this process traces. */
function tracingOptions(): Pick<WorkerOptions, 'sinks'> & { activity: ActivityInterceptorsFactory[] } {
  const tracing = activeTracing();
  if (!tracing) return { activity: [] };
  return {
    activity: [(ctx) => ({ inbound: new OpenTelemetryActivityInboundInterceptor(ctx), outbound: new OpenTelemetryActivityOutboundInterceptor(ctx) })],
    sinks: { exporter: makeWorkflowExporter(tracing.processor, tracing.resource) },
  };
}

/**
 * `publishPort`: the port of the host's HTTP server (overlays, handoff receiver; default any free
 * one). `advertisedUrl`: the URL other hosts reach it at when that is not its own address (a proxy,
 * an emulated link); default the server's own.
 */
export async function createHostWorker(config: Config, hostId: string, log: Logger, publishPort = 0, advertisedUrl?: string): Promise<HostWorker> {
  installRuntimeLogging(log);
  const connection = await NativeConnection.connect({ address: config.temporalAddress });
  const dataDir = hostDir(config, hostId);
  // One worker per host: whatever a killed predecessor left in the store's temp area is garbage.
  await fs.promises.rm(path.join(dataDir, 'store', 'tmp'), { recursive: true, force: true });
  const secret = loadHandoffSecret(config.varDir, config.namespace);
  const publisher = await startPublisher(path.join(dataDir, 'store'), {
    port: publishPort,
    extend: (app) => registerHandoffReceiver(app, { hostId, dataDir, secret }),
  });
  // The first synthesis on this host should not pay for the hashing thread and I/O buffers.
  await prewarmJoin();
  const publicUrl = (advertisedUrl ?? publisher.url).replace(/\/+$/, '');
  const activities = createHostActivities({ hostId, dataDir, config, log, publicUrl: () => publicUrl });
  const traced = tracingOptions();
  const workflows = await workflowBundle(traced.sinks !== undefined);
  watchHost(hostId, dataDir, new LibvirtHypervisor({ logger: log }));
  const hostQueueWorker = await Worker.create({
    connection,
    namespace: config.namespace,
    taskQueue: hostTaskQueue(hostId),
    activities,
    workflowBundle: workflows,
    maxConcurrentActivityTaskExecutions: 4,
    // Heartbeats reach the server every 2 s at most (not 80% of the heartbeat timeout), so a
    // cancelled long step hears of it within seconds.
    maxHeartbeatThrottleInterval: '2 seconds',
    interceptors: { activity: [...traced.activity, activityMetrics(hostId)] },
    ...(traced.sinks ? { sinks: traced.sinks } : {}),
  });
  // Mobility's activities (neighbours, RTT probes) run on the cluster's shared queue: any worker can.
  let registry: NeighbourRegistry | undefined;
  const mobility = createMobilityActivities({
    registry: () => (registry ??= new SqliteNeighbourRegistry(config.mobility.registryFile)),
    ...(config.mobility.probeFrom ? { probeFrom: config.mobility.probeFrom } : {}),
    log,
  });
  const sharedQueueWorker = await Worker.create({
    connection,
    namespace: config.namespace,
    taskQueue: config.workflowTaskQueue,
    activities: mobility,
    interceptors: { activity: [...traced.activity, activityMetrics(hostId)] },
    workflowBundle: workflows,
    ...(traced.sinks ? { sinks: traced.sinks } : {}),
  });
  log.info({ hostId, publishes: publisher.url, queues: [hostTaskQueue(hostId), config.workflowTaskQueue] }, 'host worker ready');
  let stopping = false;
  return {
    connection,
    publicUrl,
    async run() {
      const running = Promise.all([hostQueueWorker.run(), sharedQueueWorker.run()]);
      // The host's stats, for the API and the neighbours (a run per host; see hostMonitor).
      const monitorId = `hostMonitor/${hostId}`;
      const client = await connectClient(config).catch((e: unknown) => {
        log.warn({ err: (e as Error).message }, 'cannot start the host monitor: GET /v1/hosts shows no stats for this host');
        return undefined;
      });
      await client?.workflow
        .start(hostMonitor, {
          workflowId: monitorId,
          taskQueue: hostTaskQueue(hostId),
          args: [{ hostId, everyMs: config.hostStatsEveryMs }],
          workflowIdConflictPolicy: 'TERMINATE_EXISTING',
          // Twice what its 60 readings take (10 min at the default 5 s): a run times out only
          // once no worker serves the host.
          workflowRunTimeout: Math.max(10 * 60_000, 120 * config.hostStatsEveryMs),
          staticSummary: `Stats of host ${hostId} (free memory, store, running instances), read every ${config.hostStatsEveryMs / 1000} s; reconciles the host every 60 readings`,
        })
        .catch((e: unknown) => log.warn({ err: (e as Error).message }, 'cannot start the host monitor: GET /v1/hosts shows no stats for this host'));
      // The host's warm pool of ready VMs (docs/warm-pool.md): empty until a base is given a size.
      const poolId = `warmPool/${hostId}`;
      await client?.workflow
        .start(warmPool, {
          workflowId: poolId,
          taskQueue: hostTaskQueue(hostId),
          args: [{ hostId, everyMs: config.warmPoolEveryMs }],
          workflowIdConflictPolicy: 'TERMINATE_EXISTING',
          // Its 200 steps wait up to everyMs each (and start VMs in between): well over twice that.
          workflowRunTimeout: Math.max(60 * 60_000, 400 * config.warmPoolEveryMs),
          staticSummary: `Warm pool of host ${hostId}: ready VMs per base, refilled after each use`,
        })
        .catch((e: unknown) => log.warn({ err: (e as Error).message }, 'cannot start the warm pool: syntheses on this host restore as usual'));
      // What a crash or a reboot of this host left behind: instances whose VM is gone (docs/reliability.md).
      await client?.workflow
        .start(reconcileHost, {
          workflowId: `reconcileHost/${hostId}/${new Date().toISOString()}`,
          taskQueue: hostTaskQueue(hostId),
          args: [{ hostId }],
          typedSearchAttributes: [
            { key: SearchAttributes.host, value: hostId },
            { key: SearchAttributes.operation, value: 'reconcileHost' },
            { key: SearchAttributes.status, value: 'running' },
          ],
          staticSummary: `Reconcile host ${hostId}'s instances with its hypervisor (at worker start)`,
        })
        .catch((e: unknown) => log.warn({ err: (e as Error).message }, 'cannot start the reconciliation of this host'));
      try {
        await running;
      } finally {
        await client?.workflow.getHandle(monitorId).terminate('the host worker stopped').catch(() => undefined);
        await client?.workflow.getHandle(`warmPool/${hostId}`).terminate('the host worker stopped').catch(() => undefined);
        await client?.connection.close();
        unwatchHost(hostId);
        await registry?.close();
        await publisher.close();
        await connection.close();
      }
    },
    shutdown() {
      // Idempotent: a second signal (or a test's second stop) finds the workers stopping already.
      if (stopping) return;
      stopping = true;
      hostQueueWorker.shutdown();
      sharedQueueWorker.shutdown();
    },
  };
}
