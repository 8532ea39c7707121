/**
 * Measure a link profile end to end (docs/links.md, "Measured here"): a local HTTP server on
 * 127.0.0.1, a link in front of it, then small requests on a kept-alive connection, one on a new
 * connection, one download and one upload (both SHA-256 checked). Used by
 * `npx tsx src/links/main.ts --measure --profile wifi38`.
 */
import { createHash } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { CloudletError } from '../core/errors';
import { openLink, type LinkStats } from './link';
import type { LinkProfile, LinkProfileInput } from './profiles';

export interface LinkMeasurement {
  profile: LinkProfile;
  openMs: number;
  closeMs: number;
  /** Small GETs on one kept-alive connection. */
  smallRequestMs: { min: number; median: number; samples: number };
  /** One small GET on a new connection (pays the emulated handshake too). */
  newConnectionMs: number;
  download: { bytes: number; ms: number; mbit: number };
  upload: { bytes: number; ms: number; mbit: number };
  stats: LinkStats;
}

export interface MeasureOptions {
  downloadBytes?: number;
  uploadBytes?: number;
  samples?: number;
}

const round = (x: number, digits = 1): number => Number(x.toFixed(digits));

/**
 * The far end of a link measurement, on 127.0.0.1: `GET /download` answers `body`, `POST /upload`
 * answers the sha256 (hex) of what it received, anything else answers "ok".
 */
export async function startProbeServer(body: Buffer): Promise<http.Server> {
  const server = http.createServer((req, res) => {
    if (req.url === '/download') {
      res.writeHead(200, { 'content-length': body.length });
      res.end(body);
    } else if (req.url === '/upload') {
      const h = createHash('sha256');
      req.on('data', (d: Buffer) => h.update(d));
      req.on('end', () => res.end(h.digest('hex')));
    } else {
      res.end('ok');
    }
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return server;
}

export async function measureLink(profile: LinkProfileInput, options: MeasureOptions = {}): Promise<LinkMeasurement> {
  const downloadBytes = options.downloadBytes ?? 8 * 1024 * 1024;
  const uploadBytes = options.uploadBytes ?? 2 * 1024 * 1024;
  const samples = options.samples ?? 10;
  const data = Buffer.alloc(Math.max(downloadBytes, uploadBytes));
  for (let i = 0; i + 4 <= data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
  const digest = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

  const server = await startProbeServer(data.subarray(0, downloadBytes));
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  try {
    const t0 = performance.now();
    const link = await openLink({ profile, target: { host: '127.0.0.1', port: (server.address() as AddressInfo).port } });
    const openMs = performance.now() - t0;
    try {
      await request(link.url('/small'), agent);
      const small: number[] = [];
      for (let i = 0; i < samples; i++) small.push((await request(link.url('/small'), agent)).ms);
      small.sort((a, b) => a - b);
      const fresh = await request(link.url('/small'));
      const down = await request(link.url('/download'));
      if (digest(down.body) !== digest(data.subarray(0, downloadBytes))) {
        throw new CloudletError('CORRUPT', `the ${downloadBytes}-byte download through link ${link.id} arrived altered`, { fix: 'report this: the relays must keep bytes and order' });
      }
      const upBody = data.subarray(0, uploadBytes);
      const up = await request(link.url('/upload'), undefined, upBody);
      if (up.body.toString() !== digest(upBody)) {
        throw new CloudletError('CORRUPT', `the ${uploadBytes}-byte upload through link ${link.id} arrived altered`, { fix: 'report this: the relays must keep bytes and order' });
      }
      const stats = await link.stats();
      const t1 = performance.now();
      await link.close();
      return {
        profile: link.profile,
        openMs: Math.round(openMs),
        closeMs: Math.round(performance.now() - t1),
        smallRequestMs: { min: round(small[0] ?? NaN), median: round(small[Math.floor(small.length / 2)] ?? NaN), samples },
        newConnectionMs: round(fresh.ms),
        download: { bytes: downloadBytes, ms: Math.round(down.ms), mbit: round((downloadBytes * 8) / (down.ms * 1000)) },
        upload: { bytes: uploadBytes, ms: Math.round(up.ms), mbit: round((uploadBytes * 8) / (up.ms * 1000)) },
        stats,
      };
    } finally {
      await link.close();
    }
  } finally {
    agent.destroy();
    await new Promise((r) => server.close(r));
  }
}

function request(url: string, agent?: http.Agent, body?: Buffer): Promise<{ ms: number; body: Buffer }> {
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const req = http.request(url, { agent, method: body ? 'POST' : 'GET', headers: body ? { 'content-length': body.length } : {} }, (res) => {
      const parts: Buffer[] = [];
      res.on('data', (d: Buffer) => parts.push(d));
      res.on('end', () => resolve({ ms: performance.now() - t0, body: Buffer.concat(parts) }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}
