/**
 * What the API offers for mobility (docs/mobility.md), independent of how it is carried out (the
 * Temporal-backed TemporalMobilityService; the API answers 501 without one).
 */
import type { ClusterInfo, DeviceRttAnswer } from '../client/neighbour-peer';
import type { MobilityPolicy } from '../workflows/mobility-policy';
import type { NeighbourView } from '../core/mobility/registry';
import type { MobilityDecision, MobilityState } from '../workflows/mobility';

export type { ClusterInfo, DeviceRttAnswer, MobilityDecision, MobilityPolicy, MobilityState, NeighbourView };

export interface WatchRequest {
  /** host:port of the device's RTT responder. */
  device?: string;
  policy?: Partial<MobilityPolicy>;
  /** Start in a cooldown this long (ms): an instance that just arrived by a move. */
  cooldownMs?: number;
}

export interface DiscoveredCluster {
  cluster: string;
  apiUrl: string;
  /** This cluster's (or the neighbour's) RTT to the device (ms). */
  rttMs: number;
  holdsBase: boolean;
  servingHosts: number;
  /** POST here with { hostId, overlayUrl } to synthesize the application. */
  provisionUrl: string;
  self: boolean;
}

export interface Discovery {
  app: string;
  baseId: string;
  overlayUrl?: string;
  device: string;
  /** Nearest first; within tieMs, a cluster holding the base first. */
  clusters: DiscoveredCluster[];
  /** Neighbours that did not answer or could not reach the device. */
  skipped: Array<{ cluster: string; error: string }>;
}

export interface MobilityService {
  clusterInfo(): Promise<ClusterInfo>;
  addNeighbour(n: { name: string; apiUrl: string; token: string }): Promise<NeighbourView>;
  listNeighbours(): Promise<NeighbourView[]>;
  removeNeighbour(name: string): Promise<void>;
  /** Measure every neighbour now (the refreshNeighbours run the schedule also starts). */
  refreshNeighbours(): Promise<NeighbourView[]>;
  /** This cluster's RTT to a device (and whether it holds a base). */
  probeDevice(device: string, baseId?: string): Promise<DeviceRttAnswer>;
  /** Samples the device measured; starts the instance's controller when it has none. */
  reportRtt(instanceId: string, samples: number[], device?: string): Promise<MobilityState>;
  watch(instanceId: string, req: WatchRequest): Promise<MobilityState>;
  state(instanceId: string): Promise<MobilityState>;
  setPolicy(instanceId: string, patch: Partial<MobilityPolicy>): Promise<MobilityPolicy>;
  pause(instanceId: string, paused: boolean): Promise<MobilityState>;
  moveNow(instanceId: string, neighbour?: string): Promise<MobilityDecision>;
  stop(instanceId: string): Promise<void>;
  discover(app: string, device: string, selfUrl: string): Promise<Discovery>;
}
