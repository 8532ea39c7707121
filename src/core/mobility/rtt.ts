/**
 * Round-trip time between a cloudlet and a device, measured by an application-level ping over
 * TCP (docs/mobility.md, "How RTT is measured"):
 *
 *   the device runs a responder (`cloudlet probe --serve`, or `startRttResponder`): for every line
 *   `PING <n>` it answers `PONG <n>`;
 *   the cloudlet connects once, sends one warm-up ping (not counted: it pays for the connection's
 *   set-up on the path), then `samples` pings one after another, and takes their median.
 *
 * Why not a TCP connect time: any middlebox on the path (a SYN proxy, a NAT, the userspace relays
 * of an emulated link) may complete the handshake itself, so a connect time measures the nearest
 * box, not the device. An application-level ping crosses the whole path both ways, as the
 * application's own requests do. It needs no raw sockets (ICMP), so the API process can run it.
 */
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import { CloudletError } from '../errors';

export interface DeviceAddress {
  host: string;
  port: number;
}

/** `host:port` or `[v6]:port`, port 1–65535. */
export function parseDeviceAddress(text: string): DeviceAddress {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$/.exec(text.trim());
  const port = m ? Number(m[3]) : NaN;
  if (!m || !(port >= 1 && port <= 65535)) {
    throw new CloudletError('BAD_INPUT', `device address "${text}" is not host:port`, { fix: 'give the address the device runs its RTT responder on, e.g. 10.0.0.7:7070 or [fd00::7]:7070' });
  }
  return { host: m[1] ?? m[2] ?? '', port };
}

export const formatDeviceAddress = (a: DeviceAddress): string => (a.host.includes(':') ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`);

export interface RttMeasurement {
  /** The counted samples, in order (ms). */
  samples: number[];
  medianMs: number;
  minMs: number;
  /** The connection's set-up plus the warm-up ping (ms). */
  warmupMs: number;
}

export interface MeasureRttOptions {
  /** Counted pings (default 5). */
  samples?: number;
  /** For the whole measurement (default 5 s). */
  timeoutMs?: number;
  /** The local address probes leave from (a multihomed host picks its path; CLOUDLET_PROBE_FROM). */
  localAddress?: string;
}

export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? (s[mid] ?? NaN) : ((s[mid - 1] ?? NaN) + (s[mid] ?? NaN)) / 2;
}

const round2 = (x: number): number => Math.round(x * 100) / 100;

/** Ping the device's responder; DESTINATION_UNAVAILABLE when it cannot be reached or does not answer. */
export async function measureDeviceRtt(address: DeviceAddress, options: MeasureRttOptions = {}): Promise<RttMeasurement> {
  const count = options.samples ?? 5;
  const timeoutMs = options.timeoutMs ?? 5000;
  const where = formatDeviceAddress(address);
  return new Promise<RttMeasurement>((resolve, reject) => {
    const started = performance.now();
    const socket = net.connect({ host: address.host, port: address.port, ...(options.localAddress ? { localAddress: options.localAddress } : {}) });
    socket.setNoDelay(true);
    const samples: number[] = [];
    let warmupMs = 0;
    let seq = 0;
    let sentAt = 0;
    let buffered = '';
    let done = false;
    const finish = (err?: Error): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.destroy();
      if (err) {
        reject(new CloudletError('DESTINATION_UNAVAILABLE', `cannot measure the RTT to device ${where}: ${err.message}`, {
          fix: 'check that the device runs its RTT responder (cloudlet probe --serve) at that address and that this cloudlet can reach it',
          cause: err,
        }));
      } else {
        resolve({ samples: samples.map(round2), medianMs: round2(median(samples)), minMs: round2(Math.min(...samples)), warmupMs: round2(warmupMs) });
      }
    };
    const timer = setTimeout(() => finish(new Error(`no answer within ${timeoutMs} ms (${samples.length} of ${count} pings answered)`)), timeoutMs);
    const ping = (): void => {
      seq++;
      sentAt = performance.now();
      socket.write(`PING ${seq}\n`);
    };
    socket.on('connect', ping);
    socket.on('error', (e) => finish(e));
    socket.on('close', () => finish(new Error('the responder closed the connection')));
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      if (buffered.length > 4096) return finish(new Error('the responder sent something that is not a PONG line'));
      let nl: number;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, nl).trim();
        buffered = buffered.slice(nl + 1);
        if (line !== `PONG ${seq}`) return finish(new Error(`the responder answered "${line.slice(0, 40)}", not "PONG ${seq}"`));
        const now = performance.now();
        if (seq === 1) warmupMs = now - started;
        else samples.push(now - sentAt);
        if (samples.length >= count) return finish();
        ping();
      }
    });
  });
}

export interface RttResponder {
  address: DeviceAddress;
  close(): Promise<void>;
}

/** The device's side: answer `PING <n>` lines with `PONG <n>` (a line over 64 bytes closes the connection). */
export async function startRttResponder(listen: { host?: string; port?: number } = {}): Promise<RttResponder> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.setNoDelay(true);
    socket.setEncoding('utf8');
    let buffered = '';
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      let nl: number;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        const m = /^PING (\d{1,12})$/.exec(buffered.slice(0, nl).trim());
        buffered = buffered.slice(nl + 1);
        if (!m) return socket.destroy();
        socket.write(`PONG ${m[1]}\n`);
      }
      if (buffered.length > 64) socket.destroy();
    });
    socket.on('error', () => socket.destroy());
    socket.on('close', () => sockets.delete(socket));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(listen.port ?? 0, listen.host ?? '127.0.0.1', () => resolve());
  });
  const a = server.address() as net.AddressInfo;
  return {
    address: { host: a.address, port: a.port },
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
