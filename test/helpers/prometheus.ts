/**
 * A real Prometheus (Debian's package, installed by infra/setup.sh) scraping the given targets
 * every second, with its data in a temporary directory; `query` asks its HTTP API.
 */
import { freePort } from '../../src/common/ports';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { waitFor } from './poll';

export interface ScrapeJob {
  job: string;
  targets: string[];
  bearer?: string;
}

export interface RunningPrometheus {
  url: string;
  /** The instant vector of a PromQL expression: each series' labels and value. */
  query(expr: string): Promise<Array<{ labels: Record<string, string>; value: number }>>;
  stop(): Promise<void>;
}

export function scrapeConfig(jobs: ScrapeJob[], intervalS = 1): string {
  const lines = ['global:', `  scrape_interval: ${intervalS}s`, `  scrape_timeout: ${intervalS}s`, 'scrape_configs:'];
  for (const j of jobs) {
    lines.push(`  - job_name: ${JSON.stringify(j.job)}`);
    if (j.bearer) lines.push('    authorization:', '      type: Bearer', `      credentials: ${JSON.stringify(j.bearer)}`);
    lines.push('    static_configs:', `      - targets: ${JSON.stringify(j.targets)}`);
  }
  return `${lines.join('\n')}\n`;
}

export async function startPrometheus(jobs: ScrapeJob[]): Promise<RunningPrometheus> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cloudlet-prometheus-'));
  const config = path.join(dir, 'prometheus.yml');
  fs.writeFileSync(config, scrapeConfig(jobs));
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const log = fs.openSync(path.join(dir, 'prometheus.log'), 'a');
  const proc: ChildProcess = spawn('prometheus', [`--config.file=${config}`, `--storage.tsdb.path=${path.join(dir, 'data')}`, `--web.listen-address=127.0.0.1:${port}`], { stdio: ['ignore', log, log] });
  let exited = false;
  proc.on('exit', () => (exited = true));
  try {
    await waitFor('Prometheus to be ready', async () => {
      if (exited) throw new Error(`prometheus exited: ${fs.readFileSync(path.join(dir, 'prometheus.log'), 'utf8').slice(-2000)}`);
      return (await fetch(`${url}/-/ready`).catch(() => undefined))?.ok === true;
    }, 60_000);
  } catch (e) {
    proc.kill('SIGKILL');
    throw e;
  }
  return {
    url,
    async query(expr) {
      const res = await fetch(`${url}/api/v1/query?query=${encodeURIComponent(expr)}`);
      const body = (await res.json()) as { status: string; error?: string; data?: { result: Array<{ metric: Record<string, string>; value: [number, string] }> } };
      if (body.status !== 'success') throw new Error(`PromQL ${expr}: ${body.error ?? res.status}`);
      return (body.data?.result ?? []).map((r) => ({ labels: r.metric, value: Number(r.value[1]) }));
    },
    async stop() {
      if (!exited) {
        const gone = new Promise((r) => proc.once('exit', r));
        proc.kill('SIGTERM');
        await gone;
      }
      fs.closeSync(log);
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
