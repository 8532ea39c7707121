/**
 * Follow the user (docs/mobility.md), end to end on the real parts: two clusters ("east" and
 * "west": their own Temporal namespaces, host workers, APIs, neighbour registries), a device with
 * one address and an emulated link to each cluster (network namespaces, veth, tbf, delay relays
 * whose delay changes while they run), real RTT probes both ways, and a real handoff.
 *
 * The user first sits near east (noise below the threshold: no decision), then between the two
 * (above the threshold, but west is not enough nearer: the controller stays, never flaps), then
 * walks to west (the controller asks its neighbours, skips the unreachable one, and moves the VM;
 * the application keeps its state; west watches it from then on). Figures are printed.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createLogger } from '../../src/common/logger';
import { startApi, type RunningApi } from '../../src/api/server';
import { CloudletApiClient } from '../../src/api/client';
import { TemporalCloudletService } from '../../src/service';
import { TemporalHandoffService } from '../../src/service/handoff';
import { refreshScheduleId, TemporalMobilityService } from '../../src/service/mobility';
import { SqliteNeighbourRegistry } from '../../src/core/mobility/registry';
import { SqliteClusterCatalog } from '../../src/core/cluster-catalog';
import { loadHandoffSecret } from '../../src/common/handoff-secret';
import { GuestAppClient } from '../../src/guest/app-client';
import { freePort } from '../../src/common/ports';
import type { MobilityState } from '../../src/service/mobility-types';
import { runCli } from '../../src/cli/main';
import { startTestCluster, type TestCluster } from '../helpers/cluster';
import { testBasePackage } from '../helpers/test-base';
import { pollUntil } from '../helpers/poll';
import { startDeviceNetwork, type DeviceNetwork } from '../../src/links/device-network';
import { Capture } from '../helpers/capture';

jest.setTimeout(30 * 60_000);

const POLICY = { thresholdMs: 50, hysteresisMs: 10, window: 5, minSamples: 3, minGainMs: 15, minGainRatio: 0.2, tieMs: 5, cooldownMs: 6000, checkIntervalMs: 500, selfProbeAfterMs: 0 };

/** A deterministic noise trace (xorshift), in [lo, hi]. */
function noise(seed: number, n: number, lo: number, hi: number): number[] {
  let x = seed;
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out.push(lo + ((x >>> 0) % (hi - lo + 1)));
  }
  return out;
}

describe('mobility: the VM follows its user by RTT', () => {
  let east: TestCluster;
  let west: TestCluster;
  let eastApi: RunningApi;
  let westApi: RunningApi;
  let eastCloud: CloudletApiClient;
  let westCloud: CloudletApiClient;
  let net: DeviceNetwork;
  let pkg: { packageFile: string; baseId: string };
  const registries: SqliteNeighbourRegistry[] = [];
  const catalogs: SqliteClusterCatalog[] = [];
  /** A member token of `tenant` minted at a cluster's API, as a client. */
  const memberOf = async (api: RunningApi, adminToken: string, tenant: string): Promise<CloudletApiClient> => {
    const res = await fetch(`${api.url}/v1/tokens`, { method: 'POST', headers: { authorization: `Bearer ${adminToken}`, 'content-type': 'application/json' }, body: JSON.stringify({ tenant, role: 'member', name: `${tenant} in the mobility test` }) });
    expect(res.status).toBe(201);
    return new CloudletApiClient({ baseUrl: api.url, token: ((await res.json()) as { token: string }).token });
  };
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'mobility-'));
  const eastToken = `east-token-${Date.now()}-0123456789`;
  const westToken = `west-token-${Date.now()}-0123456789`;
  const figures: Record<string, unknown> = {};

  beforeAll(async () => {
    pkg = await testBasePackage(256);
    // Each cluster's API and workers share a catalog of their own (tenants, owners, ended operations).
    east = await startTestCluster('east', ['ma'], { namespace: 'east', env: { CLOUDLET_PROBE_FROM: '127.0.1.1', CLOUDLET_NEIGHBOURS_DB: path.join(tmp, 'east.sqlite'), CLOUDLET_CATALOG_DB: path.join(tmp, 'east-catalog.sqlite') } });
    west = await startTestCluster('west', ['mb'], { namespace: 'west', env: { CLOUDLET_PROBE_FROM: '127.0.1.2', CLOUDLET_NEIGHBOURS_DB: path.join(tmp, 'west.sqlite'), CLOUDLET_CATALOG_DB: path.join(tmp, 'west-catalog.sqlite') } });
    const log = createLogger('api', 'warn');
    const apiOf = async (c: TestCluster, name: 'east' | 'west', token: string): Promise<RunningApi> => {
      const catalog = new SqliteClusterCatalog(c.config.catalog.file);
      catalogs.push(catalog);
      const service = new TemporalCloudletService(c.client, c.config, { hosts: c.hosts, catalog });
      const registry = new SqliteNeighbourRegistry(c.config.mobility.registryFile);
      registries.push(registry);
      return startApi(service, {
        catalog,
        handoffs: new TemporalHandoffService(c.client, service, { hosts: c.hosts, secret: loadHandoffSecret(c.config.varDir, name), idleTimeoutMs: 120_000 }),
        mobility: new TemporalMobilityService(c.client, service, {
          cluster: name,
          hosts: c.hosts,
          workflowTaskQueue: c.config.workflowTaskQueue,
          registry,
          ...(c.config.mobility.probeFrom ? { probeFrom: c.config.mobility.probeFrom } : {}),
          // Low, so the noise phase makes east's controller continue as new.
          controllerHistoryLimit: 120,
          catalog,
        }),
        tokens: [token],
        port: 0,
        logger: log,
      });
    };
    eastApi = await apiOf(east, 'east', eastToken);
    westApi = await apiOf(west, 'west', westToken);
    eastCloud = new CloudletApiClient({ baseUrl: eastApi.url, token: eastToken });
    westCloud = new CloudletApiClient({ baseUrl: westApi.url, token: westToken });
    for (const [cloud, host] of [[eastCloud, east.hosts[0]], [westCloud, west.hosts[0]]] as const) {
      const op = await cloud.importBase({ hostId: host ?? '', source: pkg.packageFile });
      expect((await cloud.waitForOperation(op.id, { timeoutMs: 5 * 60_000 })).state).toBe('succeeded');
    }
    net = await startDeviceNetwork([
      { name: 'east', apiPort: Number(new URL(eastApi.url).port), probeFrom: '127.0.1.1', rttMs: 10 },
      { name: 'west', apiPort: Number(new URL(westApi.url).port), probeFrom: '127.0.1.2', rttMs: 80 },
    ]);
  });

  afterAll(async () => {
    console.log(`mobility figures: ${JSON.stringify(figures)}`);
    await net?.close();
    await eastApi?.close();
    await westApi?.close();
    for (const r of registries) await r.close();
    for (const c of catalogs) await c.close();
    await east?.stop();
    await west?.stop();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  it('registers neighbours, refuses bad input without changing anything, and measures them', async () => {
    const ghostPort = await freePort();
    await eastCloud.mobility.addNeighbour({ name: 'west', apiUrl: westApi.url, token: westToken });
    await eastCloud.mobility.addNeighbour({ name: 'ghost', apiUrl: `http://127.0.0.1:${ghostPort}`, token: 'ghost-token-0123456789' });
    await westCloud.mobility.addNeighbour({ name: 'east', apiUrl: `${eastApi.url}/`, token: eastToken });

    const before = await eastCloud.mobility.listNeighbours();
    const bad = async (p: string, body: unknown): Promise<number> =>
      (await fetch(`${eastApi.url}${p}`, { method: 'POST', headers: { authorization: `Bearer ${eastToken}`, 'content-type': 'application/json' }, body: JSON.stringify(body) })).status;
    expect(await bad('/v1/neighbours', { name: 'evil', apiUrl: 'file:///etc/passwd', token: 'x'.repeat(20) })).toBe(400);
    expect(await bad('/v1/neighbours', { name: 'evil', apiUrl: 'http://user:pw@127.0.0.1:1', token: 'x'.repeat(20) })).toBe(400);
    expect(await bad('/v1/neighbours', { name: 'west', apiUrl: westApi.url, token: westToken })).toBe(409);
    expect(await bad('/v1/instances/i-nope/rtt', { samples: [12] })).toBe(404);
    expect(await bad('/v1/instances/i-nope/rtt', { samples: [-3] })).toBe(400);
    expect(await bad('/v1/instances/i-nope/rtt', { samples: [1e9] })).toBe(400);
    expect(await bad('/v1/rtt-probes', { device: 'not-an-address' })).toBe(400);
    expect(await eastCloud.mobility.listNeighbours()).toEqual(before);

    const list = await eastCloud.mobility.refreshNeighbours();
    const w = list.find((n) => n.name === 'west');
    expect(w?.status).toBe('fresh');
    expect(w?.rtt?.servingHosts).toBe(1);
    expect(list.find((n) => n.name === 'ghost')?.status).toBe('unreachable');

    // The CLI sees the same: the registry, and the cluster's own probe of the device.
    const cli = async (...args: string[]): Promise<{ code: number; out: string; err: string }> => {
      const stdout = new Capture();
      const stderr = new Capture();
      const code = await runCli(['--json', ...args], { stdout, stderr, env: { CLOUDLET_API_URL: eastApi.url, CLOUDLET_API_TOKEN: eastToken, CLOUDLET_NEIGHBOUR_TOKEN: westToken } });
      return { code, out: stdout.text, err: stderr.text };
    };
    const listed = await cli('neighbour', 'list');
    expect(listed.code).toBe(0);
    expect((JSON.parse(listed.out) as Array<{ name: string; status: string }>).map((n) => `${n.name}:${n.status}`)).toEqual(['ghost:unreachable', 'west:fresh']);
    const probed = await cli('probe', 'device', net.address);
    expect(probed.code).toBe(0);
    expect((JSON.parse(probed.out) as { cluster: string; rttMs: number }).rttMs).toBeGreaterThanOrEqual(net.rtt('east'));
    const refused = await cli('neighbour', 'add', 'west', westApi.url);
    expect(refused.code).not.toBe(0);
    expect(refused.err).toMatch(/CONFLICT|exists/);
    expect((await cli('mobility', 'show', 'i-nope')).code).not.toBe(0);

    // Adding the first neighbour made the Schedule that measures them; a run it starts records
    // a newer measurement.
    const schedule = east.client.schedule.getHandle(refreshScheduleId('east'));
    expect((await schedule.describe()).action).toMatchObject({ taskQueue: east.config.workflowTaskQueue });
    const measuredAt = w?.rtt?.measuredAt ?? '';
    await schedule.trigger();
    await pollUntil('the scheduled refresh to measure west again', 60_000, async () => {
      const again = (await eastCloud.mobility.listNeighbours()).find((n) => n.name === 'west');
      return again?.rtt && again.rtt.measuredAt > measuredAt ? again : undefined;
    }, 250);
  });

  it('follows the user: no decision under noise, no move between close neighbours, a move to the nearest once the user walks there', async () => {
    // A running instance on east, tenant acme's, whose application holds some state.
    const eastAcme = await memberOf(eastApi, eastToken, 'acme');
    const op = await eastAcme.resumeBase({ hostId: east.hosts[0] ?? '', baseId: pkg.baseId }, `mob-${east.suffix}`);
    const s = await eastAcme.waitForOperation(op.id, { timeoutMs: 5 * 60_000 });
    expect(s.state).toBe('succeeded');
    const { instanceId, hostPort } = s.result as { instanceId: string; hostPort: number };
    const app = new GuestAppClient(hostPort);
    await app.waitForState(60_000);
    await app.set('tok-mobility', 'state that must survive the move');

    // Discovery from east, with the user near east: east first, then west; the ghost is skipped.
    const d1 = await eastCloud.mobility.discover(pkg.baseId, net.address);
    expect(d1.clusters.map((c) => c.cluster)).toEqual(['east', 'west']);
    expect(d1.clusters[0]?.holdsBase).toBe(true);
    expect(d1.skipped.map((x) => x.cluster)).toEqual(['ghost']);

    // The device talks to east through its link, and so does east to the device.
    const device = new CloudletApiClient({ baseUrl: net.apiUrl('east'), token: eastToken });
    const report = async (): Promise<MobilityState> => device.mobility.reportRtt(instanceId, await device.mobility.measureRtt(3), net.address);
    await eastCloud.mobility.watchInstance(instanceId, { device: net.address, policy: POLICY });

    // 1. Noise below the threshold: 40 reports, the link's delay changing before each.
    for (const rtt of noise(7, 40, 8, 38)) {
      await net.setRtt('east', rtt);
      await report();
    }
    const quiet = await pollUntil('the controller to have checked the last samples', 10_000, async () => {
      const st = await eastCloud.mobility.mobilityState(instanceId);
      return st && st.lastCheck && st.lastCheck.at > Date.now() - 2000 ? st : undefined;
    }, 200);
    figures.noiseReports = 40;
    figures.decisionsUnderNoise = quiet.decisionCount;
    expect(quiet.decisionCount).toBe(0);
    expect(quiet.smoothedMs).toBeLessThan(POLICY.thresholdMs);
    // Its history stayed bounded: the controller continued as new, keeping its samples and device.
    const runs: string[] = [];
    for await (const w of east.client.workflow.list({ query: `WorkflowId = 'mobility/${instanceId}'` })) runs.push(w.runId);
    figures.controllerRunsAfterNoise = runs.length;
    expect(runs.length).toBeGreaterThan(1);
    expect(quiet.device).toBe(net.address);
    expect(quiet.samples.length).toBeGreaterThanOrEqual(POLICY.window);

    // 2. Between the two: east above the threshold, west a little nearer but not by the minimum gain.
    await net.setRtt('east', 70);
    await net.setRtt('west', 66);
    const stay = await pollUntil('a decision between close neighbours', 60_000, async () => {
      const st = await report();
      return st.decisionCount >= 1 ? st : undefined;
    }, 0);
    const first = stay.decisions[0];
    expect(first?.outcome).toBe('stay');
    expect(first?.why).toMatch(/west .* is not enough nearer/);
    expect(first?.why).toMatch(/skipped ghost/);
    expect(first?.candidates.find((c) => c.neighbour === 'ghost')?.reachable).toBe(false);
    // Through another cooldown and check, it still does not move.
    const again = await pollUntil('a second decision between close neighbours', 60_000, async () => {
      const st = await report();
      return st.decisionCount >= 2 ? st : undefined;
    }, 0);
    expect(again.decisions.every((x) => x.outcome === 'stay')).toBe(true);
    // What the Temporal Web UI shows of the run (its current details): RTT, threshold, last decision and why.
    const meta = (await east.client.workflow.getHandle(`mobility/${instanceId}`).query('__temporal_workflow_metadata')) as { currentDetails?: string };
    expect(meta.currentDetails).toMatch(/RTT [0-9.]+ ms \(median of 5\), threshold 50 ms/);
    expect(meta.currentDetails).toMatch(/last decision #2 \(threshold\): \*\*stay\*\*: best neighbour west .* is not enough nearer/);
    figures.decisionsBetweenCloseNeighbours = again.decisionCount;
    expect((await eastCloud.getInstance(instanceId))?.state).toBe('running');

    // Back near east: the crossing ends once the RTT is below threshold − hysteresis.
    await net.setRtt('east', 10);
    await net.setRtt('west', 80);
    await pollUntil('the crossing to end', 60_000, async () => {
      const st = await report();
      return st.crossedAt === undefined && st.smoothedMs !== undefined && st.smoothedMs < POLICY.thresholdMs - POLICY.hysteresisMs ? st : undefined;
    }, 0);

    // 3. The user walks to west.
    await net.setRtt('west', 12);
    await net.setRtt('east', 110);
    const walkedAt = Date.now();
    const moving = await pollUntil('the controller to decide to move', 60_000, async () => {
      const st = await report();
      return st.decisions.some((x) => x.outcome === 'move') ? st : undefined;
    }, 0);
    const move = moving.decisions.find((x) => x.outcome === 'move');
    expect(move?.to).toBe('west');
    expect(move?.trigger).toBe('threshold');
    expect(move?.candidates.find((c) => c.neighbour === 'ghost')?.reachable).toBe(false);
    const moved = await pollUntil('the handoff to finish', 15 * 60_000, async () => {
      const st = await eastCloud.mobility.mobilityState(instanceId);
      return st && (st.phase === 'moved' || st.decisions.some((x) => x.handoff?.state === 'failed')) ? st : undefined;
    }, 1000);
    const done = moved.decisions.find((x) => x.outcome === 'move');
    expect(done?.handoff?.error).toBeUndefined();
    expect(moved.phase).toBe('moved');
    expect(moved.movedTo?.neighbour).toBe('west');
    const endpoint = done?.handoff?.appEndpoint ?? '';
    const moved2 = new GuestAppClient(Number(endpoint.split(':')[1]));
    const state = await moved2.state();
    expect(state.token).toBe('tok-mobility');
    expect(state.disk).toBe('state that must survive the move');
    const answeredAt = done?.handoff?.answeredAt ?? Date.now();
    figures.crossingToDecisionMs = (move?.at ?? 0) - (move?.crossedAt ?? 0);
    figures.walkToDecisionMs = (move?.at ?? 0) - walkedAt;
    figures.crossingToAnsweringMs = answeredAt - (move?.crossedAt ?? 0);
    figures.handoffPausedMs = done?.handoff?.pausedMs;
    figures.handoffTotalMs = done?.handoff?.totalMs;
    expect(figures.crossingToDecisionMs as number).toBeLessThan(15_000);

    // The instance runs at west, which watches it now (cooling down first), and no longer at east.
    expect((await westCloud.getInstance(instanceId))?.state).toBe('running');
    // It is still acme's: acme's members at west see it, another tenant's do not.
    expect((await (await memberOf(westApi, westToken, 'acme')).getInstance(instanceId))?.state).toBe('running');
    expect(await (await memberOf(westApi, westToken, 'globex')).getInstance(instanceId)).toBeUndefined();
    expect((await eastCloud.getInstance(instanceId))?.state).toBe('terminated');
    const atWest = await westCloud.mobility.mobilityState(instanceId);
    expect(atWest?.device).toBe(net.address);
    expect(atWest?.policy.thresholdMs).toBe(POLICY.thresholdMs);
    expect(atWest?.cooldownUntil).toBeGreaterThan(answeredAt);

    // Discovery from west now: west is nearest.
    const d2 = await westCloud.mobility.discover(pkg.baseId, net.address);
    expect(d2.clusters[0]?.cluster).toBe('west');

    // Operators at west: pause (a user far away makes no decision), change the policy (a bad
    // value is refused and changes nothing), then force a move back to east.
    const deviceWest = new CloudletApiClient({ baseUrl: net.apiUrl('west'), token: westToken });
    expect((await westCloud.mobility.pauseMobility(instanceId, true)).paused).toBe(true);
    await net.setRtt('west', 120);
    for (let i = 0; i < 6; i++) await deviceWest.mobility.reportRtt(instanceId, await deviceWest.mobility.measureRtt(3), net.address);
    const paused = await pollUntil('a check while paused', 10_000, async () => {
      const st = await westCloud.mobility.mobilityState(instanceId);
      return st?.lastCheck?.why === 'paused' ? st : undefined;
    });
    expect(paused.decisionCount).toBe(0);
    await expect(westCloud.mobility.setMobilityPolicy(instanceId, { hysteresisMs: 500 })).rejects.toMatchObject({ status: 400 });
    expect((await westCloud.mobility.setMobilityPolicy(instanceId, { thresholdMs: 200 })).thresholdMs).toBe(200);
    expect((await westCloud.mobility.mobilityState(instanceId))?.policy.hysteresisMs).toBe(POLICY.hysteresisMs);
    await expect(westCloud.mobility.moveInstance(instanceId, 'nobody')).rejects.toMatchObject({ status: 404 });
    const forced = await westCloud.mobility.moveInstance(instanceId, 'east');
    expect(forced).toMatchObject({ trigger: 'forced', outcome: 'move', to: 'east' });
    const back = await pollUntil('the forced move to finish', 15 * 60_000, async () => {
      const st = await westCloud.mobility.mobilityState(instanceId);
      return st && (st.phase === 'moved' || st.decisions.some((x) => x.handoff?.state === 'failed')) ? st : undefined;
    }, 1000);
    const forcedDone = back.decisions.find((x) => x.seq === forced.seq);
    expect(forcedDone?.handoff?.error).toBeUndefined();
    expect(back.movedTo?.neighbour).toBe('east');
    expect((await new GuestAppClient(Number((forcedDone?.handoff?.appEndpoint ?? '').split(':')[1])).state()).token).toBe('tok-mobility');
    figures.forcedMoveTotalMs = forcedDone?.handoff?.totalMs;

    // An operator stops the controller at east; the instance keeps running.
    await eastCloud.mobility.unwatchInstance(instanceId);
    await pollUntil('the controller at east to stop', 30_000, async () => ((await eastCloud.mobility.mobilityState(instanceId))?.phase === 'stopped' ? true : undefined), 200);
    expect((await eastCloud.getInstance(instanceId))?.state).toBe('running');
    // Back at east it is acme's again (west named the tenant it had there).
    expect((await eastAcme.getInstance(instanceId))?.state).toBe('running');
    const end = await eastCloud.terminateInstance(instanceId);
    expect((await eastCloud.waitForOperation(end.id, { timeoutMs: 5 * 60_000 })).state).toBe('succeeded');
  });

  it('removing the last neighbour deletes the refresh Schedule; an unknown neighbour is 404', async () => {
    await expect(eastCloud.mobility.removeNeighbour('nobody')).rejects.toMatchObject({ status: 404 });
    for (const n of ['west', 'ghost']) await eastCloud.mobility.removeNeighbour(n);
    await westCloud.mobility.removeNeighbour('east');
    expect(await eastCloud.mobility.listNeighbours()).toEqual([]);
    await expect(east.client.schedule.getHandle(refreshScheduleId('east')).describe()).rejects.toThrow(/not found/i);
    await expect(west.client.schedule.getHandle(refreshScheduleId('west')).describe()).rejects.toThrow(/not found/i);
  });
});
