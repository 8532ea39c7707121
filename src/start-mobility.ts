/**
 * Step 4 of `npm start`: the VM follows its user. After step 3 the instance runs on west; its
 * user's device sits near west, then walks to east. The device has one address and an emulated
 * link to each cluster (src/links/device-network.ts) whose delay changes as it walks; it measures
 * its RTT to west and reports it; west's mobility controller decides (each decision printed with
 * its reason) and hands the VM off to east, which answers with the same state.
 */
import { CloudletApiClient } from './api/client';
import { GuestAppClient } from './guest/app-client';
import { startDeviceNetwork } from './links/device-network';
import type { MobilityDecision, MobilityState } from './service/mobility-types';

export interface StoryCluster {
  name: string;
  api: CloudletApiClient;
  apiUrl: string;
  token: string;
  /** Where its RTT probes leave from (its CLOUDLET_PROBE_FROM). */
  probeFrom: string;
}

export interface MobilityStoryDeps {
  say(msg: string): void;
  /** Where the instance runs now, and where its user walks to. */
  from: StoryCluster;
  to: StoryCluster;
  instanceId: string;
  /** The token its application holds. */
  appToken: string;
}

const POLICY = { thresholdMs: 40, hysteresisMs: 10, window: 5, minSamples: 3, minGainMs: 10, minGainRatio: 0.25, cooldownMs: 5000, checkIntervalMs: 500, selfProbeAfterMs: 0 };
const ms = (x: number | undefined): string => (x === undefined ? '–' : `${Math.round(x)} ms`);

export async function mobilityStory(deps: MobilityStoryDeps): Promise<{ movedTo: string; appEndpoint: string }> {
  const { say, from, to, instanceId } = deps;
  // Each cluster knows the other (a neighbour left from an earlier run is replaced).
  for (const [a, b] of [[from, to], [to, from]] as const) {
    await a.api.mobility.removeNeighbour(b.name).catch(() => undefined);
    await a.api.mobility.addNeighbour({ name: b.name, apiUrl: b.apiUrl, token: b.token });
  }
  const net = await startDeviceNetwork([
    { name: from.name, apiPort: Number(new URL(from.apiUrl).port), probeFrom: from.probeFrom, rttMs: 8 },
    { name: to.name, apiPort: Number(new URL(to.apiUrl).port), probeFrom: to.probeFrom, rttMs: 70 },
  ]);
  try {
    say(`the device answers RTT probes at ${net.address}; RTT to ${from.name} 8 ms, to ${to.name} 70 ms (emulated links)`);
    await from.api.mobility.watchInstance(instanceId, { device: net.address, policy: POLICY });
    say(`${from.name} watches instance ${instanceId}: move when the median RTT passes ${POLICY.thresholdMs} ms and a neighbour is ${POLICY.minGainMs} ms nearer`);
    const device = new CloudletApiClient({ baseUrl: net.apiUrl(from.name), token: from.token });
    let shown = 0;
    const report = async (): Promise<MobilityState> => {
      const st = await device.mobility.reportRtt(instanceId, await device.mobility.measureRtt(3), net.address);
      for (const d of st.decisions.filter((x: MobilityDecision) => x.seq > shown)) {
        say(`  decision #${d.seq} (${d.trigger}, median ${ms(d.smoothedMs)}): ${d.outcome}${d.to ? ` to ${d.to}` : ''}: ${d.why}`);
        shown = d.seq;
      }
      return st;
    };
    for (const rtt of [12, 25, 9, 31, 18, 22, 14, 28]) {
      await net.setRtt(from.name, rtt);
      await report();
    }
    const quiet = await from.api.mobility.mobilityState(instanceId);
    say(`user near ${from.name} (link delay 9–31 ms; measured median ${ms(quiet?.smoothedMs)}): ${quiet?.decisionCount ?? 0} decisions`);
    say(`the user walks to ${to.name}: RTT to ${from.name} 90 ms, to ${to.name} 10 ms`);
    await net.setRtt(to.name, 10);
    await net.setRtt(from.name, 90);
    const walked = Date.now();
    let st = await report();
    while (!st.decisions.some((d) => d.outcome === 'move')) {
      if (Date.now() - walked > 120_000) throw new Error(`no move decision within 120 s of the walk (last check: ${st.lastCheck?.why ?? 'none'})`);
      st = await report();
    }
    const move = st.decisions.find((d) => d.outcome === 'move') as MobilityDecision;
    say(`  handing off to ${move.to ?? '?'} (run ${move.handoff?.workflowId ?? 'starting'})`);
    for (;;) {
      const s = await from.api.mobility.mobilityState(instanceId);
      const d = s?.decisions.find((x) => x.seq === move.seq);
      if (d?.handoff?.state === 'failed') throw new Error(`the handoff failed: ${d.handoff.error ?? ''}`);
      if (s?.phase === 'moved' && d?.handoff?.appEndpoint) {
        const state = await new GuestAppClient(Number(d.handoff.appEndpoint.split(':')[1])).state();
        if (state.token !== deps.appToken) throw new Error(`the moved VM answered with token "${state.token}", expected "${deps.appToken}"`);
        say(`${to.name}'s VM answers with the same state: ${JSON.stringify(state)}`);
        say(`  the walk → decision ${((move.at - walked) / 1000).toFixed(1)} s; → answering at ${to.name} ${(((d.handoff.answeredAt ?? Date.now()) - walked) / 1000).toFixed(1)} s (VM paused ${((d.handoff.pausedMs ?? 0) / 1000).toFixed(2)} s)`);
        const next = await to.api.mobility.mobilityState(instanceId);
        say(`${to.name} watches it now (${next?.phase ?? 'not'}; cooling down until ${next ? new Date(next.cooldownUntil).toISOString() : '–'})`);
        await to.api.mobility.unwatchInstance(instanceId).catch(() => undefined);
        // The story's clusters end here: their registries (and the refresh Schedules) are emptied.
        for (const [a, b] of [[from, to], [to, from]] as const) await a.api.mobility.removeNeighbour(b.name).catch(() => undefined);
        return { movedTo: to.name, appEndpoint: d.handoff.appEndpoint };
      }
      await new Promise((r) => setTimeout(r, 1000));
    }
  } finally {
    await net.close();
  }
}
