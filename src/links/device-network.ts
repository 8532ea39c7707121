/**
 * An emulated mobile device and its paths to several cloudlet clusters, for mobility tests
 * (docs/mobility.md, "Testing it"). Per cluster, two emulated links (src/links: network
 * namespaces, a veth pair, tbf, userspace delay relays) with the same round-trip delay:
 *
 *   device → cluster: the device's requests to the cluster's API (apiUrl(cluster));
 *   cluster → device: the cluster's RTT probes to the device's responder.
 *
 * The device has ONE address (`address`), as a real one has: a small router listening there
 * sends each connection into the link of the cluster it comes from, told apart by the loopback
 * address the cluster's probes leave from (CLOUDLET_PROBE_FROM, e.g. 127.0.1.1 for east). It
 * stands in for IP routing; it moves bytes and adds no delay. setRtt(cluster, ms) changes both
 * links of a cluster while they run: the user walks.
 */
import net from 'node:net';
import { openLink, type Link } from './link';
import { startRttResponder, type RttResponder } from '../core/mobility/rtt';

export interface DeviceNetwork {
  /** host:port every cluster probes the device at. */
  address: string;
  /** The URL at which the device reaches a cluster's API (through its link). */
  apiUrl(cluster: string): string;
  setRtt(cluster: string, rttMs: number): Promise<void>;
  rtt(cluster: string): number;
  close(): Promise<void>;
}

export interface ClusterPath {
  name: string;
  /** The cluster's API port on 127.0.0.1. */
  apiPort: number;
  /** The loopback address the cluster's probes leave from. */
  probeFrom: string;
  rttMs: number;
  rateMbit?: number;
}

export async function startDeviceNetwork(paths: ClusterPath[]): Promise<DeviceNetwork> {
  const responder: RttResponder = await startRttResponder({ host: '127.0.0.1', port: 0 });
  const links = new Map<string, { toCloudlet: Link; toDevice: Link; probeFrom: string; rttMs: number }>();
  const sockets = new Set<net.Socket>();
  let router: net.Server | undefined;
  const close = async (): Promise<void> => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((r) => (router ? router.close(() => r()) : r()));
    await Promise.all([...links.values()].flatMap((l) => [l.toCloudlet.close(), l.toDevice.close()]));
    await responder.close();
  };
  try {
    for (const p of paths) {
      const profile = { rateMbit: p.rateMbit ?? 50, rttMs: p.rttMs };
      const toCloudlet = await openLink({ profile, target: { host: '127.0.0.1', port: p.apiPort } });
      const toDevice = await openLink({ profile, target: { host: '127.0.0.1', port: responder.address.port } });
      links.set(p.name, { toCloudlet, toDevice, probeFrom: p.probeFrom, rttMs: p.rttMs });
    }
    const bySource = new Map([...links.values()].map((l) => [l.probeFrom, l.toDevice]));
    router = net.createServer((inbound) => {
      sockets.add(inbound);
      inbound.on('close', () => sockets.delete(inbound));
      const link = bySource.get((inbound.remoteAddress ?? '').replace(/^::ffff:/, ''));
      if (!link) return inbound.destroy(); // no route from there
      const outbound = net.connect({ host: link.host, port: link.port });
      sockets.add(outbound);
      outbound.on('close', () => sockets.delete(outbound));
      inbound.pipe(outbound).pipe(inbound);
      inbound.on('error', () => outbound.destroy());
      outbound.on('error', () => inbound.destroy());
    });
    await new Promise<void>((r) => router?.listen(0, '127.0.0.1', () => r()));
  } catch (e) {
    await close();
    throw e;
  }
  const port = (router.address() as net.AddressInfo).port;
  const get = (cluster: string) => {
    const l = links.get(cluster);
    if (!l) throw new Error(`no path to cluster ${cluster}`);
    return l;
  };
  return {
    address: `127.0.0.1:${port}`,
    apiUrl: (cluster) => get(cluster).toCloudlet.url(),
    async setRtt(cluster, rttMs) {
      const l = get(cluster);
      await Promise.all([l.toCloudlet.setDelay(rttMs), l.toDevice.setDelay(rttMs)]);
      l.rttMs = rttMs;
    },
    rtt: (cluster) => get(cluster).rttMs,
    close,
  };
}
