/**
 * Activities of mobility (docs/mobility.md): ask the neighbours in the registry for their RTT to
 * a device, measure this cluster's own, get a handoff ticket from the chosen neighbour, have it
 * watch the instance after the move, and refresh the registry's RTTs (a Schedule runs that). They
 * run on the cluster's shared workflow queue: any worker of the cluster can do them.
 * Credentials stay in the registry and this process; a ticket is what enters a run's history.
 */
import type { Logger } from 'pino';
import { HandoffPeer, type HandoffTicket } from '../client/handoff-peer';
import { NeighbourPeer } from '../client/neighbour-peer';
import { CloudletError } from '../core/errors';
import type { CandidateReport, MobilityPolicy } from '../workflows/mobility-policy';
import { neighbourView, type NeighbourRegistry, type NeighbourView } from '../core/mobility/registry';
import { measureDeviceRtt, parseDeviceAddress, type RttMeasurement } from '../core/mobility/rtt';

export interface MobilityActivityDeps {
  /** Opened on first use (the file is shared with the API process). */
  registry: () => NeighbourRegistry;
  /** Local address this cluster's probes leave from (CLOUDLET_PROBE_FROM). */
  probeFrom?: string;
  /** A neighbour measured longer ago than this is stale (default 3 min). */
  staleAfterMs?: number;
  log: Logger;
}

export function createMobilityActivities(deps: MobilityActivityDeps) {
  const token = async (name: string): Promise<{ apiUrl: string; token: string }> => {
    const reg = deps.registry();
    const n = await reg.get(name);
    const t = await reg.token(name);
    if (!n || t === undefined) throw new CloudletError('NOT_FOUND', `neighbour ${name} is not in the registry`, { fix: 'add it with POST /v1/neighbours' });
    return { apiUrl: n.apiUrl, token: t };
  };

  return {
    /** Every neighbour's RTT to the device, asked in parallel; one that does not answer is reported unreachable, never fatal. */
    async mobilityAskNeighbours(input: { device: string; baseId: string; timeoutMs?: number }): Promise<CandidateReport[]> {
      const reg = deps.registry();
      const all = await reg.list();
      return Promise.all(
        all.map(async (n): Promise<CandidateReport> => {
          const t = await reg.token(n.name);
          try {
            const a = await new NeighbourPeer(n.apiUrl, t ?? '', input.timeoutMs ?? 10_000).deviceRtt(input.device, input.baseId);
            return {
              neighbour: n.name,
              apiUrl: n.apiUrl,
              reachable: true,
              rttMs: a.rttMs,
              servingHosts: a.servingHosts,
              ...(a.holdsBase !== undefined ? { holdsBase: a.holdsBase } : {}),
              ...(a.memAvailableBytes !== undefined ? { memAvailableBytes: a.memAvailableBytes } : {}),
            };
          } catch (e) {
            const message = (e as Error).message;
            // A neighbour that answered (with an error: it could not reach the device, say) is reachable.
            const reachable = e instanceof CloudletError && e.details.status !== undefined;
            if (!reachable) await reg.record(n.name, { ok: false, error: message, at: new Date() });
            deps.log.info({ neighbour: n.name, err: message }, 'neighbour gave no RTT to the device');
            return { neighbour: n.name, apiUrl: n.apiUrl, reachable, error: message.slice(0, 300) };
          }
        }),
      );
    },

    /** This cluster's own RTT to the device. */
    async mobilityProbeDevice(input: { device: string; samples?: number }): Promise<RttMeasurement> {
      return measureDeviceRtt(parseDeviceAddress(input.device), { samples: input.samples ?? 5, ...(deps.probeFrom ? { localAddress: deps.probeFrom } : {}) });
    },

    /** A handoff ticket from the neighbour (its credentials from the registry). */
    async mobilityBeginHandoff(input: { neighbour: string; instanceId: string; baseId: string; tenant?: string }): Promise<{ apiUrl: string; ticket: HandoffTicket }> {
      const n = await token(input.neighbour);
      const ticket = await new HandoffPeer(n.apiUrl).begin(n.token, { instanceId: input.instanceId, baseId: input.baseId, ...(input.tenant ? { tenant: input.tenant } : {}) });
      return { apiUrl: n.apiUrl, ticket };
    },

    /** After a move: the neighbour's cluster starts its own controller for the instance (cooling down first). */
    async mobilityWatchAtNeighbour(input: { neighbour: string; instanceId: string; device?: string; policy: MobilityPolicy; cooldownMs: number }): Promise<void> {
      const n = await token(input.neighbour);
      await new NeighbourPeer(n.apiUrl, n.token).watch(input.instanceId, {
        ...(input.device ? { device: input.device } : {}),
        policy: { ...input.policy },
        cooldownMs: input.cooldownMs,
      });
    },

    /** Measure every neighbour (RTT of small API requests, serving hosts) and record it. */
    async refreshNeighbours(): Promise<NeighbourView[]> {
      const reg = deps.registry();
      const all = await reg.list();
      await Promise.all(
        all.map(async (n) => {
          const t = (await reg.token(n.name)) ?? '';
          try {
            const m = await new NeighbourPeer(n.apiUrl, t, 10_000).measure(3);
            await reg.record(n.name, { ok: true, rttMs: m.rttMs, servingHosts: m.info.servingHosts, at: new Date() });
          } catch (e) {
            await reg.record(n.name, { ok: false, error: (e as Error).message, at: new Date() });
          }
        }),
      );
      const now = Date.now();
      return (await reg.list()).map((n) => neighbourView(n, now, deps.staleAfterMs ?? 180_000));
    },
  };
}

export type MobilityActivities = ReturnType<typeof createMobilityActivities>;
