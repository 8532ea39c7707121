/**
 * Fan-out benchmark (docs/deployments.md): how the time until all N VMs answer grows with N and
 * with the number of hosts, for a deployment (POST /v1/deployments: each host fetches the overlay
 * once) beside the baseline measured in the same run: N separate POST /v1/instances at once,
 * each synthesis fetching the overlay by URL itself.
 *
 *   npx tsx bench/deployments.ts [--counts 1,2,4,6] [--hosts 1,2]      (npm run bench -- deployments)
 *
 * Two host workers in this process, the real Temporal dev server and libvirt, the 256 MiB test
 * guest. The overlay is served by a server of the bench's own that counts its GETs. Prints JSON
 * lines {"bench":"deployments","method","hosts","count","allAnsweringMs","firstResponseMs":{median,max},"overlayGets"}
 * to stdout; progress to stderr. Every VM is terminated after its case.
 */
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { CloudletApiClient } from '../src/api/client';
import { startApi } from '../src/api/server';
import { createLogger } from '../src/common/logger';
import { TemporalCloudletService } from '../src/service';
import { startTestCluster } from '../test/helpers/cluster';
import { testBasePackage } from '../test/helpers/test-base';
import { median } from './lib';

const arg = (name: string, dflt: string): number[] => {
  const i = process.argv.indexOf(`--${name}`);
  return (i >= 0 ? (process.argv[i + 1] ?? dflt) : dflt).split(',').map(Number).filter((n) => Number.isInteger(n) && n > 0);
};
const say = (m: string): void => void process.stderr.write(`[bench] ${m}\n`);

async function main(): Promise<void> {
  const counts = arg('counts', '1,2,4,6');
  const hostCounts = arg('hosts', '1,2');
  const pkg = await testBasePackage(256);
  const cluster = await startTestCluster('bench-deploy', ['ba', 'bb']);
  const token = `bench-${Date.now()}-0123456789`;
  const api = await startApi(new TemporalCloudletService(cluster.client, cluster.config, { hosts: cluster.hosts }), { tokens: [token], port: 0, logger: createLogger('api', 'warn') });
  const cloud = new CloudletApiClient({ baseUrl: api.url, token });
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-deploy-'));
  let gets = 0;
  let server: http.Server | undefined;
  const done = async (id: string): Promise<Record<string, unknown>> => {
    const s = await cloud.waitForOperation(id, { timeoutMs: 20 * 60_000, intervalMs: 100, maxIntervalMs: 500 });
    if (s.state !== 'succeeded') throw new Error(`operation ${id} ended ${s.state}: ${s.error?.message ?? ''}`);
    return s.result as Record<string, unknown>;
  };
  try {
    for (const h of cluster.hosts) await done((await cloud.importBase({ hostId: h, source: pkg.packageFile })).id);
    const dev = await done((await cloud.resumeBase({ hostId: cluster.hosts[0] ?? '', baseId: pkg.baseId })).id);
    const made = await done((await cloud.createOverlay({ instanceId: String(dev.instanceId) })).id);
    const file = path.join(tmp, `${String(made.overlayId)}.overlay`);
    await cloud.downloadOverlay(String(made.overlayId), file);
    server = http.createServer((req, res) => {
      if (req.url !== `/overlays/${path.basename(file)}`) return void res.writeHead(404).end();
      if (req.method === 'GET') gets++;
      const size = fs.statSync(file).size;
      // Range requests too: a synthesis from a URL reads the overlay's meta by Range first.
      const m = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
      if (m) {
        const start = Number(m[1]);
        const end = m[2] ? Math.min(Number(m[2]), size - 1) : size - 1;
        res.writeHead(206, { 'content-length': end - start + 1, 'content-range': `bytes ${start}-${end}/${size}`, 'accept-ranges': 'bytes' });
        return void fs.createReadStream(file, { start, end }).pipe(res);
      }
      res.writeHead(200, { 'content-length': size, 'accept-ranges': 'bytes' });
      fs.createReadStream(file).pipe(res);
    });
    await new Promise<void>((r) => server?.listen(0, '127.0.0.1', () => r()));
    const overlayUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}/overlays/${path.basename(file)}`;
    say(`overlay ${String(made.overlayId).slice(0, 12)}… (${fs.statSync(file).size} bytes) served at ${overlayUrl}`);

    for (const nh of hostCounts) {
      const hosts = cluster.hosts.slice(0, nh);
      for (const count of counts) {
        for (const method of ['deployment', 'separate provisions'] as const) {
          gets = 0;
          const t0 = Date.now();
          let vms: Array<{ instanceId: string; firstResponseMs: number; answeredAt: number }>;
          if (method === 'deployment') {
            const r = (await done((await cloud.deploy({ overlayUrl, hosts, count })).id)) as { hosts: Array<{ vms: Array<{ instanceId: string; firstResponseMs?: number; answeredAt?: number; error?: string }> }> };
            const all = r.hosts.flatMap((h) => h.vms);
            if (all.some((v) => v.error)) throw new Error(`a deployed VM failed: ${all.find((v) => v.error)?.error ?? ''}`);
            vms = all.map((v) => ({ instanceId: v.instanceId, firstResponseMs: v.firstResponseMs ?? NaN, answeredAt: v.answeredAt ?? Date.now() }));
          } else {
            const ops = await Promise.all(Array.from({ length: count }, (_, i) => cloud.provisionInstance({ hostId: hosts[i % hosts.length] ?? '', overlayUrl })));
            const rs = await Promise.all(ops.map((o) => done(o.id)));
            vms = rs.map((r) => ({ instanceId: String(r.instanceId), firstResponseMs: Number((r.timings as Record<string, number>).firstResponseMs), answeredAt: Number(r.answeredAt ?? Date.now()) }));
          }
          const allAnsweringMs = Math.max(...vms.map((v) => v.answeredAt)) - t0;
          const line = { bench: 'deployments', method, hosts: nh, count, allAnsweringMs, firstResponseMs: { median: median(vms.map((v) => v.firstResponseMs)), max: Math.max(...vms.map((v) => v.firstResponseMs)) }, overlayGets: gets, load: os.loadavg()[0] };
          process.stdout.write(`${JSON.stringify(line)}\n`);
          say(`${method}: ${count} VMs over ${nh} host(s): all answering after ${(allAnsweringMs / 1000).toFixed(1)} s, ${gets} overlay GETs`);
          for (const v of vms) await done((await cloud.terminateInstance(v.instanceId)).id);
        }
      }
    }
  } finally {
    await new Promise<void>((r) => (server ? server.close(() => r()) : r()));
    await api.close();
    await cluster.stop();
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`bench deployments: ${(e as Error).message}\n`);
  process.exit(1);
});
