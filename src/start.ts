/**
 * `npm start`: the main job end to end on the embedded defaults. infra/setup.sh has already
 * installed and started Temporal and libvirt and built the test guest; this starts a worker for
 * the local host, runs the guestSelfTest workflow on it, and tells where to look.
 */
import { execFile, spawn } from 'node:child_process';
import { promisify } from 'node:util';
import fs from 'node:fs';
import path from 'node:path';
import { loadConfig, REPO_ROOT } from './config';
import { assertHostServing, connectClient } from './client/connect';
import { guestSelfTest, progressQuery } from './workflows';
import { isCloudletError } from './core/errors';

const execFileP = promisify(execFile);
const say = (msg: string): void => console.log(`\x1b[1;34m[cloudlet]\x1b[0m ${msg}`);

async function waitUntil(what: string, check: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function main(): Promise<void> {
  const config = loadConfig();
  const hostId = config.hostId;
  const logDir = path.join(config.varDir, 'logs');
  fs.mkdirSync(logDir, { recursive: true });
  const workerLog = path.join(logDir, `worker-${hostId}.log`);
  say(`starting the worker of host "${hostId}" (log: ${path.relative(REPO_ROOT, workerLog)})`);
  const out = fs.openSync(workerLog, 'a');
  const worker = spawn(process.execPath, ['--import', 'tsx', path.join(__dirname, 'workers', 'main.ts'), '--host', hostId], {
    stdio: ['ignore', out, out],
    env: process.env,
  });
  let workerExited = false;
  worker.on('exit', () => (workerExited = true));
  const client = await connectClient(config);
  try {
    await waitUntil(`the worker of host ${hostId} to poll`, async () => {
      if (workerExited) throw new Error(`the worker exited early; see ${workerLog}`);
      try {
        await assertHostServing(client, hostId);
        return true;
      } catch {
        return false;
      }
    }, 120_000);

    const workflowId = `guest-self-test/${hostId}/${new Date().toISOString().replace(/[:.]/g, '-')}`;
    const handle = await client.workflow.start(guestSelfTest, {
      taskQueue: config.workflowTaskQueue,
      workflowId,
      args: [{ hostId }],
      staticSummary: `Self-test of host ${hostId}: boot, save, restore, replug NIC, check the app`,
    });
    const uiUrl = `${config.webUiUrl}/namespaces/${config.namespace}/workflows/${encodeURIComponent(workflowId)}`;
    say(`started workflow ${workflowId}`);
    say(`follow it in the Temporal Web UI: ${uiUrl}`);
    let last = '';
    const poll = setInterval(() => {
      handle.query(progressQuery).then((p) => {
        if (p.stage !== last) say(`stage: ${(last = p.stage)}`);
      }, () => undefined);
    }, 500);
    try {
      const result = await handle.result();
      say(`the guest's application answered after save, restore and NIC replug: ${JSON.stringify(result.answer)}`);
      say(`timings (ms): ${JSON.stringify(result.timings)}`);
    } finally {
      clearInterval(poll);
    }
    const query = `CloudletOperation='guestSelfTest' AND CloudletHost='${hostId}'`;
    say(`the latest runs, as \`.tools/temporal workflow list --query "${query}"\` shows them:`);
    const cli = path.join(REPO_ROOT, '.tools', 'temporal');
    // Visibility is eventually consistent: wait until the finished run is listed.
    let listing = '';
    await waitUntil('the run to be listed', async () => {
      const { stdout } = await execFileP(cli, ['workflow', 'list', '--address', config.temporalAddress, '--namespace', config.namespace, '--query', query, '--limit', '5']);
      listing = stdout;
      return stdout.includes(workflowId) && /Completed/.test(stdout);
    }, 30_000);
    console.log(listing.trimEnd());
    say(`Web UI: ${uiUrl}`);
    say('stop everything with `npm run stop`');
  } finally {
    worker.kill('SIGTERM');
    await client.connection.close();
  }
}

main().catch((err: unknown) => {
  console.error(`\x1b[1;31m[cloudlet] error:\x1b[0m ${isCloudletError(err) || err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
