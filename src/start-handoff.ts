/**
 * Step 3 of `npm start`: VM handoff between two clusters on this machine. "east" and "west" each
 * have their own Temporal namespace, one host (a worker process of its own), and an API server
 * with its own token. A VM resumed on east is customized, then handed off live to west through
 * the APIs only; west's VM answers with east's state, and east's VM is gone.
 */
import { randomBytes } from 'node:crypto';
import { type ChildProcess } from 'node:child_process';
import { CloudletApiClient } from './api/client';
import { startApi, type RunningApi } from './api/server';
import { assertHostServing, connectClient } from './client/connect';
import { loadHandoffSecret } from './common/handoff-secret';
import { createLogger } from './common/logger';
import type { Config } from './config';
import { GuestAppClient } from './guest/app-client';
import { TemporalCloudletService } from './service';
import { TemporalHandoffService } from './service/handoff';
import { TemporalMobilityService } from './service/mobility';
import { neighbourRegistryFile, SqliteNeighbourRegistry } from './core/mobility/registry';
import { mobilityStory, type StoryCluster } from './start-mobility';

export interface HandoffStoryDeps {
  config: Config;
  pkg: { packageFile: string; baseId: string };
  say(msg: string): void;
  startWorker(config: Config, hostId: string): ChildProcess;
  waitUntil(what: string, check: () => Promise<boolean>, timeoutMs: number): Promise<void>;
}

export async function handoffStory(deps: HandoffStoryDeps): Promise<void> {
  const { say } = deps;
  const clusters = [
    { name: 'east', host: 'east-1', probeFrom: '127.0.1.1' },
    { name: 'west', host: 'west-1', probeFrom: '127.0.1.2' },
  ] as const;
  const registries: SqliteNeighbourRegistry[] = [];
  const story: StoryCluster[] = [];
  const workers: ChildProcess[] = [];
  const apis: RunningApi[] = [];
  const clients: Array<Awaited<ReturnType<typeof connectClient>>> = [];
  try {
    const clouds: CloudletApiClient[] = [];
    const tokens: string[] = [];
    for (const c of clusters) {
      const config: Config = {
        ...deps.config,
        namespace: c.name,
        workflowTaskQueue: `${deps.config.workflowTaskQueue}-${c.name}`,
        mobility: { registryFile: neighbourRegistryFile(deps.config.varDir, c.name), probeFrom: c.probeFrom, neighbourHosts: [] },
      };
      workers.push(deps.startWorker(config, c.host));
      const client = await connectClient(config);
      clients.push(client);
      await deps.waitUntil(`the worker of ${c.host} (cluster ${c.name}) to poll`, () => assertHostServing(client, c.host).then(() => true, () => false), 120_000);
      const service = new TemporalCloudletService(client, config, { hosts: [c.host] });
      const token = randomBytes(24).toString('hex');
      const registry = new SqliteNeighbourRegistry(config.mobility.registryFile);
      registries.push(registry);
      const api = await startApi(service, {
        handoffs: new TemporalHandoffService(client, service, { hosts: [c.host], secret: loadHandoffSecret(config.varDir, c.name) }),
        mobility: new TemporalMobilityService(client, service, { cluster: c.name, hosts: [c.host], workflowTaskQueue: config.workflowTaskQueue, registry, probeFrom: c.probeFrom }),
        tokens: [token],
        port: 0,
        logger: createLogger(`api-${c.name}`, 'warn'),
      });
      apis.push(api);
      tokens.push(token);
      clouds.push(new CloudletApiClient({ baseUrl: api.url, token }));
      story.push({ name: c.name, api: clouds[clouds.length - 1] as CloudletApiClient, apiUrl: api.url, token, probeFrom: c.probeFrom });
      say(`cluster ${c.name}: namespace ${c.name}, host ${c.host}, API ${api.url}`);
    }
    const [east, west] = clouds as [CloudletApiClient, CloudletApiClient];
    const follow = async (cloud: CloudletApiClient, id: string) => {
      // Every stage once, those finished between two polls too (a round's summary is one).
      const seen = new Set<string>();
      const show = (stage: string): void => {
        if (stage && !seen.has(stage)) {
          seen.add(stage);
          say(`  ${stage}`);
        }
      };
      const s = await cloud.waitForOperation(id, {
        timeoutMs: 15 * 60_000,
        onProgress: (st) => {
          for (const d of st.progress?.done ?? []) show(d);
          show(st.progress?.stage ?? '');
        },
      });
      for (const d of s.progress?.done ?? []) show(d);
      return s.result as Record<string, unknown>;
    };
    for (const [i, c] of clusters.entries()) await follow(clouds[i] as CloudletApiClient, (await (clouds[i] as CloudletApiClient).importBase({ hostId: c.host, source: deps.pkg.packageFile })).id);
    const resumed = await follow(east, (await east.resumeBase({ hostId: 'east-1', baseId: deps.pkg.baseId })).id);
    const instanceId = String(resumed.instanceId);
    const token = `handoff-${Date.now().toString(36)}`;
    const app = new GuestAppClient(Number(resumed.hostPort));
    await app.waitForState(60_000);
    await app.set(token, 'set on east before the handoff');
    say(`instance ${instanceId} runs on east-1 with token ${token}; handing it off to west, live`);
    const op = await east.handoffInstance(instanceId, { destination: { apiUrl: apis[1]?.url ?? '', credentials: { token: tokens[1] ?? '' } } });
    const r = (await follow(east, op.id)) as { rounds: number; bytes: number; pausedMs: number; totalMs: number; destination: { appEndpoint: string; hostId: string } };
    const port = Number(r.destination.appEndpoint.split(':')[1]);
    const state = await new GuestAppClient(port).state();
    if (state.token !== token) throw new Error(`west's VM answered with token "${state.token}", expected "${token}"`);
    say(`west's VM (${r.destination.hostId}) answers with east's state: ${JSON.stringify(state)}`);
    say(`  ${r.rounds} rounds, ${(r.bytes / 1e6).toFixed(2)} MB, ${(r.totalMs / 1000).toFixed(1)} s in all, paused ${(r.pausedMs / 1000).toFixed(2)} s`);
    say(`east lists the instance as ${(await east.getInstance(instanceId))?.state ?? 'gone'}; west as ${(await west.getInstance(instanceId))?.state ?? '?'}`);
    deps.say('step 4: the VM follows its user: the device walks from west to east, west\'s mobility controller moves the VM');
    await mobilityStory({ say, from: story[1] as StoryCluster, to: story[0] as StoryCluster, instanceId, appToken: token });
    await follow(east, (await east.terminateInstance(instanceId)).id);
  } finally {
    for (const r of registries) await r.close();
    for (const a of apis) await a.close();
    for (const w of workers) w.kill('SIGTERM');
    for (const c of clients) await c.connection.close();
  }
}
