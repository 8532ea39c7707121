/**
 * What a cluster asks its neighbours' APIs (docs/mobility.md): how they are (serving hosts), how
 * far they are (the RTT of small requests to their API), how far the device is from them (they
 * measure it themselves), and, after a move, to watch the moved instance.
 */
import { performance } from 'node:perf_hooks';
import { z } from 'zod';
import { median } from '../core/mobility/rtt';
import { call, json } from './peer-http';

export const ClusterInfoSchema = z.object({
  cluster: z.string(),
  hosts: z.number().int(),
  servingHosts: z.number().int(),
  /** The most memory any serving host has available (bytes), when the hosts report it. */
  memAvailableBytes: z.number().optional(),
});
export type ClusterInfo = z.infer<typeof ClusterInfoSchema>;

export const DeviceRttAnswerSchema = z.object({
  cluster: z.string(),
  device: z.string(),
  rttMs: z.number(),
  minMs: z.number(),
  samples: z.array(z.number()),
  servingHosts: z.number().int(),
  /** Present when the question named a base. */
  holdsBase: z.boolean().optional(),
  memAvailableBytes: z.number().optional(),
});
export type DeviceRttAnswer = z.infer<typeof DeviceRttAnswerSchema>;

const HealthSchema = z.object({ ok: z.boolean() });

export class NeighbourPeer {
  private readonly base: string;
  constructor(
    apiUrl: string,
    private readonly token: string,
    private readonly timeoutMs = 10_000,
  ) {
    this.base = apiUrl.replace(/\/+$/, '');
  }

  info(): Promise<ClusterInfo> {
    return call('ask a neighbour about its cluster', `${this.base}/v1/cluster`, { method: 'GET', ...json(this.token) }, ClusterInfoSchema, this.timeoutMs);
  }

  /** The RTT of small requests to its API on one kept-alive connection (median of `samples`), and its info. */
  async measure(samples = 3): Promise<{ rttMs: number; info: ClusterInfo }> {
    const info = await this.info(); // also opens the connection
    const times: number[] = [];
    for (let i = 0; i < samples; i++) {
      const t0 = performance.now();
      await call('measure the RTT to a neighbour', `${this.base}/healthz`, { method: 'GET' }, HealthSchema, this.timeoutMs);
      times.push(performance.now() - t0);
    }
    return { rttMs: Math.round(median(times) * 100) / 100, info };
  }

  /** Its own RTT to the device, and whether it holds `baseId`. */
  deviceRtt(device: string, baseId?: string): Promise<DeviceRttAnswer> {
    return call('ask a neighbour for its RTT to the device', `${this.base}/v1/rtt-probes`, { method: 'POST', ...json(this.token, { device, ...(baseId ? { baseId } : {}) }) }, DeviceRttAnswerSchema, this.timeoutMs);
  }

  /** Start (or update) the mobility controller of an instance that now runs there. */
  watch(instanceId: string, body: { device?: string; policy?: Record<string, number>; cooldownMs?: number }): Promise<unknown> {
    return call('start the mobility controller at the new cluster', `${this.base}/v1/instances/${encodeURIComponent(instanceId)}/mobility`, { method: 'POST', ...json(this.token, body) }, z.unknown(), this.timeoutMs);
  }
}
