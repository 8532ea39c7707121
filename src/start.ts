/**
 * `npm start`: the main job end to end on the embedded defaults. infra/setup.sh has already
 * installed and started Temporal and libvirt and built the test guest. This starts one worker
 * process per host (host-a and host-b, two "hosts" on this one machine) and runs:
 *   1. guestSelfTest on host-a: boot, customize, save, restore, replug the NIC, check the app;
 *   2. the cloudlet story: import a base VM on both hosts, resume it on host-a, customize its
 *      application, create and publish an overlay on host-a, synthesize it on host-b from the
 *      overlay's URL, and check that host-b's VM answers with host-a's state;
 *   3. handoff between clusters: east and west (their own namespaces, a host each, API servers
 *      with their own tokens); a customized VM on east is handed off live to west through the
 *      APIs, and west's VM answers with east's state (src/start-handoff.ts).
 * It prints the first-response breakdown and where to look: the Temporal Web UI, and the cloudlet
 * dashboard of an API it leaves running (docs/dashboard.md).
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import type { Client } from '@temporalio/client';
import { loadConfig, REPO_ROOT, type Config } from './config';
import { assertHostServing, connectClient } from './client/connect';
import { guestSelfTest, progressQuery } from './workflows';
import { isCloudletError } from './core/errors';
import { TemporalCloudletService } from './service/temporal';
import type { OperationRef, OperationStatus } from './service/types';
import { guestBasePackage } from './guest/base-package';
import { GuestAppClient } from './guest/app-client';
import { LibvirtHypervisor } from './hypervisor/libvirt';
import { handoffStory } from './start-handoff';

const execFileP = promisify(execFile);
const say = (msg: string): void => console.log(`\x1b[1;34m[cloudlet]\x1b[0m ${msg}`);
const HOSTS = ['host-a', 'host-b'] as const;

async function waitUntil(what: string, check: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

function startWorker(config: Config, hostId: string): ChildProcess {
  const logDir = path.join(config.varDir, 'logs');
  fs.mkdirSync(logDir, { recursive: true });
  const log = path.join(logDir, `worker-${hostId}.log`);
  say(`starting the worker of ${hostId} (log: ${path.relative(REPO_ROOT, log)})`);
  const out = fs.openSync(log, 'a');
  return spawn(process.execPath, ['--import', 'tsx', path.join(__dirname, 'workers', 'main.ts'), '--host', hostId], {
    stdio: ['ignore', out, out],
    env: {
      ...process.env,
      CLOUDLET_NAMESPACE: config.namespace,
      CLOUDLET_WORKFLOW_QUEUE: config.workflowTaskQueue,
      CLOUDLET_NEIGHBOURS_DB: config.mobility.registryFile,
      ...(config.mobility.probeFrom ? { CLOUDLET_PROBE_FROM: config.mobility.probeFrom } : {}),
    },
  });
}

async function selfTest(client: Client, config: Config, hostId: string): Promise<string> {
  const workflowId = `guest-self-test/${hostId}/${new Date().toISOString().replace(/[:.]/g, '-')}`;
  const handle = await client.workflow.start(guestSelfTest, {
    taskQueue: config.workflowTaskQueue,
    workflowId,
    args: [{ hostId }],
    staticSummary: `Self-test of host ${hostId}: boot, save, restore, replug NIC, check the app`,
  });
  say(`started ${workflowId}`);
  let last = '';
  const poll = setInterval(() => {
    handle.query(progressQuery).then((p) => {
      if (p.stage !== last) say(`  stage: ${(last = p.stage)}`);
    }, () => undefined);
  }, 500);
  try {
    const result = await handle.result();
    say(`the guest's application answered after save, restore and NIC replug: ${JSON.stringify(result.answer)}`);
    say(`  timings (ms): ${JSON.stringify(result.timings)}`);
  } finally {
    clearInterval(poll);
  }
  return workflowId;
}

/** Wait for an operation, printing its stages as they change. */
async function follow(service: TemporalCloudletService, op: OperationRef): Promise<Record<string, unknown>> {
  say(`${op.kind}: ${op.id}`);
  let last = '';
  for (;;) {
    const s: OperationStatus | undefined = await service.getOperation(op.id);
    if (s?.progress && s.progress.stage !== last) say(`  stage: ${(last = s.progress.stage)}`);
    if (s?.state === 'succeeded') return s.result as Record<string, unknown>;
    if (s && s.state !== 'running') throw new Error(`${op.id} ${s.state}: ${s.error?.type ?? ''} ${s.error?.message ?? ''}`);
    await new Promise((r) => setTimeout(r, 300));
  }
}

async function story(client: Client, config: Config): Promise<{ workflowId: string; pkg: { packageFile: string; baseId: string } }> {
  const [a, b] = HOSTS;
  const service = new TemporalCloudletService(client, config, { hosts: [...HOSTS] });
  const hv = new LibvirtHypervisor();
  const pkg = await guestBasePackage(hv, config.varDir, 256, say).finally(() => hv.close());
  say(`base VM package: ${path.relative(REPO_ROOT, pkg.packageFile)} (base ${pkg.baseId.slice(0, 12)}…)`);
  const run = Date.now().toString(36);
  for (const hostId of HOSTS) await follow(service, await service.importBase({ hostId, source: pkg.packageFile }, `start-${run}`));

  const resumeOp = await service.resumeBase({ hostId: a, baseId: pkg.baseId }, `dev-${run}`);
  const resumed = await follow(service, resumeOp);
  const devId = String(resumed.instanceId);
  const appA = new GuestAppClient(Number(resumed.hostPort));
  const token = `token-${run}`;
  await appA.waitForState(60_000);
  await appA.set(token, `application installed on ${a}`);
  say(`customized instance ${devId} on ${a}: token ${token}`);

  const made = await follow(service, await service.createOverlay({ instanceId: devId }, `overlay-${run}`));
  say(`overlay ${String(made.overlayId).slice(0, 12)}… (${made.bytes} bytes) published at ${made.url}`);

  const provisionOp = await service.provisionInstance({ hostId: b, overlayUrl: String(made.url) }, `app-${run}`);
  const synth = await follow(service, provisionOp);
  const state = await new GuestAppClient(Number(synth.hostPort)).state();
  if (state.token !== token) throw new Error(`host-b's VM answered with token "${state.token}", expected "${token}"`);
  say(`host-b's synthesized VM answers with host-a's state: ${JSON.stringify(state)}`);
  const timings = synth.timings as Record<string, number>;
  say('first-response breakdown (ms):');
  for (const [k, v] of Object.entries(timings)) say(`  ${k.replace(/Ms$/, '').padEnd(24)} ${v}`);
  say(`Web UI: ${provisionOp.webUiUrl}`);
  await follow(service, await service.terminateInstance(String(synth.instanceId), `end-${run}`));
  return { workflowId: provisionOp.id, pkg };
}

/**
 * The API (with its dashboard) over host-a and host-b, left running in the background so the page
 * shows the story just run; a token of its own in var/secrets; `npm run stop` stops it.
 */
async function startDashboardApi(config: Config): Promise<{ url: string; tokenFile: string }> {
  const port = Number(process.env.CLOUDLET_DASHBOARD_PORT ?? 8080);
  const pidFile = path.join(config.varDir, 'run', 'api.pid');
  const tokenFile = path.join(config.varDir, 'secrets', 'dashboard-token');
  fs.mkdirSync(path.dirname(pidFile), { recursive: true });
  fs.mkdirSync(path.dirname(tokenFile), { recursive: true, mode: 0o700 });
  if (!fs.existsSync(tokenFile)) fs.writeFileSync(tokenFile, `${randomBytes(24).toString('base64url')}\n`, { mode: 0o600 });
  const token = fs.readFileSync(tokenFile, 'utf8').trim();
  // An API an earlier `npm start` left running goes first (it may be of an older checkout).
  try {
    const pid = Number(fs.readFileSync(pidFile, 'utf8'));
    // Only if that pid is still our API (not a process that reused the number).
    if (fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(path.join('api', 'main.ts'))) process.kill(pid, 'SIGTERM');
  } catch {
    // none running
  }
  const url = `http://127.0.0.1:${port}`;
  await waitUntil(`port ${port} to be free`, async () => !(await fetch(`${url}/healthz`).then((r) => r.ok, () => false)), 15_000);
  const out = fs.openSync(path.join(config.varDir, 'logs', 'api.log'), 'a');
  const api = spawn(process.execPath, ['--import', 'tsx', path.join(__dirname, 'api', 'main.ts')], {
    stdio: ['ignore', out, out],
    detached: true,
    env: { ...process.env, CLOUDLET_API_TOKENS: token, CLOUDLET_HOSTS: HOSTS.join(','), CLOUDLET_API_PORT: String(port), CLOUDLET_NAMESPACE: config.namespace },
  });
  api.unref();
  fs.writeFileSync(pidFile, String(api.pid));
  await waitUntil('the API to answer', async () => {
    if (api.exitCode !== null) throw new Error('the API exited at start; see var/logs/api.log');
    return fetch(`${url}/healthz`).then((r) => r.ok, () => false);
  }, 60_000);
  return { url: `${url}/dashboard/`, tokenFile };
}

async function main(): Promise<void> {
  const config = loadConfig();
  const workers = HOSTS.map((h) => startWorker(config, h));
  const client = await connectClient(config);
  try {
    for (const [i, hostId] of HOSTS.entries()) {
      await waitUntil(`the worker of ${hostId} to poll`, async () => {
        if (workers[i]?.exitCode !== null) throw new Error(`the worker of ${hostId} exited early; see var/logs/worker-${hostId}.log`);
        return assertHostServing(client, hostId).then(() => true, () => false);
      }, 120_000);
    }
    say('step 1: the self-test workflow on host-a');
    await selfTest(client, config, HOSTS[0]);
    say('step 2: base VM on both hosts, overlay made on host-a, VM synthesized on host-b');
    const { workflowId: synthId, pkg } = await story(client, config);
    say('step 3: live handoff of a running VM from cluster east to cluster west (namespaces, hosts, APIs of their own)');
    await handoffStory({ config, pkg, say, startWorker, waitUntil });

    const query = `CloudletHost IN ('host-a', 'host-b') AND ExecutionStatus = 'Completed'`;
    say(`the latest runs, as \`.tools/temporal workflow list --query "${query}"\` shows them:`);
    let listing = '';
    await waitUntil('the runs to be listed', async () => {
      const { stdout } = await execFileP(path.join(REPO_ROOT, '.tools', 'temporal'), ['workflow', 'list', '--address', config.temporalAddress, '--namespace', config.namespace, '--query', query, '--limit', '8']);
      listing = stdout;
      return stdout.includes(synthId.split('/').slice(0, 2).join('/'));
    }, 30_000);
    console.log(listing.trimEnd());
    const dashboard = await startDashboardApi(config);
    say(`Web UI: ${config.webUiUrl}/namespaces/${config.namespace}/workflows`);
    say(`Dashboard: ${dashboard.url} (API token in ${path.relative(REPO_ROOT, dashboard.tokenFile)}; the API keeps running, log var/logs/api.log)`);
    say('stop everything with `npm run stop`');
  } finally {
    for (const w of workers) w.kill('SIGTERM');
    await client.connection.close();
  }
}

main().catch((err: unknown) => {
  console.error(`\x1b[1;31m[cloudlet] error:\x1b[0m ${isCloudletError(err) || err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
