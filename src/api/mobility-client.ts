/**
 * The mobility part of the typed client (docs/mobility.md): neighbours, RTT samples and probes,
 * the mobility controller, discovery. Reached as `CloudletApiClient.mobility`; it sends its
 * requests through the client's own (token, timeouts, error mapping).
 */
import { performance } from 'node:perf_hooks';
import type { ClusterInfo, DeviceRttAnswer, Discovery, MobilityDecision, MobilityPolicy, MobilityState, NeighbourView, WatchRequest } from '../service/mobility-types';

/** What MobilityApiClient needs of the client it belongs to. */
export interface ApiRequests {
  json<T>(method: string, apiPath: string, opts?: { body?: unknown }): Promise<T>;
  noContent(method: string, apiPath: string, body?: unknown): Promise<void>;
  orUndefined<T>(p: Promise<T>): Promise<T | undefined>;
  health(): Promise<boolean>;
}

export class MobilityApiClient {
  constructor(private readonly api: ApiRequests) {}

  async clusterInfo(): Promise<ClusterInfo> {
    return this.api.json<ClusterInfo>('GET', '/v1/cluster');
  }

  async listNeighbours(): Promise<NeighbourView[]> {
    return this.api.json<NeighbourView[]>('GET', '/v1/neighbours');
  }

  async addNeighbour(n: { name: string; apiUrl: string; token: string }): Promise<NeighbourView> {
    return this.api.json<NeighbourView>('POST', '/v1/neighbours', { body: n });
  }

  async removeNeighbour(name: string): Promise<void> {
    await this.api.noContent('DELETE', `/v1/neighbours/${encodeURIComponent(name)}`);
  }

  async refreshNeighbours(): Promise<NeighbourView[]> {
    return this.api.json<NeighbourView[]>('POST', '/v1/neighbours/refresh', { body: {} });
  }

  /** This cluster's RTT to a device's responder (what neighbours ask). */
  async probeDevice(device: string, baseId?: string): Promise<DeviceRttAnswer> {
    return this.api.json<DeviceRttAnswer>('POST', '/v1/rtt-probes', { body: { device, ...(baseId ? { baseId } : {}) } });
  }

  /**
   * The device's side: the RTT of small requests to this API on one kept-alive connection (one
   * warm-up, then `samples`, in ms). What a device reports with reportRtt.
   */
  async measureRtt(samples = 3): Promise<number[]> {
    await this.api.health();
    const out: number[] = [];
    for (let i = 0; i < samples; i++) {
      const t0 = performance.now();
      await this.api.health();
      out.push(Math.round((performance.now() - t0) * 100) / 100);
    }
    return out;
  }

  async reportRtt(instanceId: string, samples: number[], device?: string): Promise<MobilityState> {
    return this.api.json<MobilityState>('POST', `/v1/instances/${encodeURIComponent(instanceId)}/rtt`, { body: { samples, ...(device ? { device } : {}) } });
  }

  async mobilityState(instanceId: string): Promise<MobilityState | undefined> {
    return this.api.orUndefined(this.api.json<MobilityState>('GET', `/v1/instances/${encodeURIComponent(instanceId)}/mobility`));
  }

  async watchInstance(instanceId: string, req: WatchRequest = {}): Promise<MobilityState> {
    return this.api.json<MobilityState>('POST', `/v1/instances/${encodeURIComponent(instanceId)}/mobility`, { body: req });
  }

  async unwatchInstance(instanceId: string): Promise<void> {
    await this.api.noContent('DELETE', `/v1/instances/${encodeURIComponent(instanceId)}/mobility`);
  }

  async setMobilityPolicy(instanceId: string, patch: Partial<MobilityPolicy>): Promise<MobilityPolicy> {
    return this.api.json<MobilityPolicy>('POST', `/v1/instances/${encodeURIComponent(instanceId)}/mobility/policy`, { body: patch });
  }

  async pauseMobility(instanceId: string, paused: boolean): Promise<MobilityState> {
    return this.api.json<MobilityState>('POST', `/v1/instances/${encodeURIComponent(instanceId)}/mobility/pause`, { body: { paused } });
  }

  async moveInstance(instanceId: string, neighbour?: string): Promise<MobilityDecision> {
    return this.api.json<MobilityDecision>('POST', `/v1/instances/${encodeURIComponent(instanceId)}/mobility/move`, { body: neighbour ? { neighbour } : {} });
  }

  async discover(app: string, device: string): Promise<Discovery> {
    return this.api.json<Discovery>('GET', `/v1/discover?${new URLSearchParams({ app, device }).toString()}`);
  }
}
