/**
 * Scheduled overlay rebuilds on real Temporal (Schedules) and real libvirt, with two host
 * workers: a recipe's schedule rebuilds its overlay on host A on its own (resume the base, run
 * the recipe in the guest through the exec endpoint, create and publish the overlay, verify it by
 * synthesizing it once), and the new overlay synthesizes, on host B, a VM whose application shows
 * the recipe ran. A base re-import triggers another rebuild, which keeps the first overlay as the
 * previous one; a rebuild whose check fails keeps the current overlay and leaves nothing behind.
 */
import type { Client } from '@temporalio/client';
import { WorkflowFailedError } from '@temporalio/client';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { hostDir, loadConfig, type Config } from '../../src/config';
import { connectClient } from '../../src/client/connect';
import { createHostWorker, type HostWorker } from '../../src/workers/host-worker';
import { createLogger } from '../../src/common/logger';
import { importBaseVm, rebuildOverlay, synthesizeVm, terminateVm } from '../../src/workflows';
import type { RebuildOverlayResult } from '../../src/workflows/rebuild';
import { readRecipeState, type RecipeInput } from '../../src/activities/recipes';
import { RecipeSchedules } from '../../src/service/schedules';
import { GuestAppClient } from '../../src/guest/app-client';
import { ensureInfra, uniqueSuffix } from '../helpers/infra';
import { testBasePackage } from '../helpers/test-base';
import { pollUntil } from '../helpers/poll';

jest.setTimeout(40 * 60_000);

describe('scheduled overlay rebuilds', () => {
  const suffix = uniqueSuffix();
  const hostA = `ra-${suffix}`;
  const hostB = `rb-${suffix}`;
  const recipeId = `site-${suffix}`;
  const marker = `built by recipe ${recipeId}`;
  const token = `recipe-token-${suffix}`;
  let config: Config;
  let client: Client;
  let schedules: RecipeSchedules;
  const workers: HostWorker[] = [];
  const runs: Promise<void>[] = [];
  let pkg: { packageFile: string; baseId: string };
  let recipe: RecipeInput;
  let first: RebuildOverlayResult;
  let second: RebuildOverlayResult;

  const exec = <T>(wf: (...a: never[]) => Promise<T>, id: string, arg: unknown): Promise<T> =>
    client.workflow.execute(wf as (a: unknown) => Promise<T>, { taskQueue: config.workflowTaskQueue, workflowId: id, args: [arg] });
  const overlaysOnA = (): string[] => fs.readdirSync(path.join(hostDir(config, hostA), 'store', 'overlays')).filter((f) => f.endsWith('.overlay')).sort();
  const instancesOf = (hostId: string): string[] => {
    const dir = path.join(hostDir(config, hostId), 'instances');
    return fs.existsSync(dir) ? fs.readdirSync(dir) : [];
  };
  const domainsOf = (hostId: string): string[] =>
    execFileSync('virsh', ['-c', 'qemu:///system', 'list', '--all', '--name'], { encoding: 'utf8' }).split('\n').filter((n) => n.startsWith(`cl-${hostId}-`));

  /** Wait for the schedule's newest run after `seen` runs to start, then for its result. */
  async function nextRun(seen: number): Promise<{ workflowId: string; result: RebuildOverlayResult }> {
    const run = await pollUntil('the schedule to start a rebuild', 5 * 60_000, async () => (await schedules.get(recipeId)).recentRuns[seen]);
    const result = await client.workflow.getHandle<(r: unknown) => Promise<RebuildOverlayResult>>(run.workflowId, run.runId).result();
    return { workflowId: run.workflowId, result };
  }

  beforeAll(async () => {
    ensureInfra();
    config = { ...loadConfig({ CLOUDLET_LOG_LEVEL: 'warn' }), workflowTaskQueue: `wf-sched-${suffix}` };
    pkg = await testBasePackage(256);
    client = await connectClient(config);
    schedules = new RecipeSchedules(client, { workflowTaskQueue: config.workflowTaskQueue });
    for (const h of [hostA, hostB]) {
      const w = await createHostWorker(config, h, createLogger(`worker-${h}`, 'warn'));
      workers.push(w);
      runs.push(w.run());
    }
    for (const hostId of [hostA, hostB]) {
      await exec(importBaseVm, `importBaseVm/${hostId}/${pkg.baseId.slice(0, 12)}`, { hostId, source: pkg.packageFile });
    }
    recipe = {
      recipeId,
      hostId: hostA,
      baseId: pkg.baseId,
      files: [
        { path: '/data/app/message.txt', content: marker },
        { path: '/data/site/index.html', content: `<h1>${marker}</h1>\n` },
      ],
      // Installs a second web server (a process: memory state) and sets the app's token.
      command: [
        `printf '%s' '${token}' > /run/app/token`,
        'httpd -p 8081 -h /data/site',
        `for i in 1 2 3 4 5 6 7 8 9 10; do grep -q ':1F91 ' /proc/net/tcp && break; usleep 200000; done`,
        'echo installed',
      ].join('\n'),
      // Verified on the port of the server the recipe started (so the check proves the process came along).
      appPort: 8081,
      check: { path: '/', expect: `<h1>${marker}</h1>` },
      timeoutSeconds: 60,
    };
  });

  afterAll(async () => {
    await schedules?.delete(recipeId).catch(() => undefined);
    for (const w of workers) w.shutdown();
    await Promise.all(runs);
    await client?.connection.close();
    for (const h of [hostA, hostB]) fs.rmSync(hostDir(config, h), { recursive: true, force: true });
  });

  it('rebuilds the overlay on its own, and the overlay synthesizes a VM where the recipe ran', async () => {
    const created = await schedules.create(recipe, { every: '30s' });
    expect(created.scheduleId).toBe(`recipe-${recipeId}`);
    expect(created.paused).toBe(false);
    expect(Date.parse(created.nextRunAt ?? '')).toBeGreaterThan(Date.now() - 1000);

    // Nobody triggers it: the interval starts the first rebuild. Pause at once, so that it is the only one.
    const run = await pollUntil('the schedule to start a rebuild on its own', 2 * 60_000, async () => (await schedules.get(recipeId)).recentRuns[0]);
    await schedules.pause(recipeId, 'test: one automatic run is enough');
    expect(run.workflowId.startsWith(`rebuildOverlay/${recipeId}`)).toBe(true);
    // A trigger while that rebuild runs (seconds: resume, recipe, overlay, verification) starts
    // nothing (overlap SKIP) and names the running one.
    expect(await schedules.trigger(recipeId)).toEqual({ skippedWhileRunning: [run.workflowId] });
    first = await client.workflow.getHandle<(r: unknown) => Promise<RebuildOverlayResult>>(run.workflowId, run.runId).result();
    expect(first.overlayId).toMatch(/^[0-9a-f]{64}$/);
    expect(first.url).toBe(`${workers[0]?.publicUrl}/overlays/${first.overlayId}.overlay`);
    expect(first.previousOverlayId).toBeUndefined();
    expect(first.timings.verifySynthesizeMs).toBeGreaterThan(0);

    // The service reports it, the host recorded it as current, and nothing of the run is left over.
    const details = await schedules.get(recipeId);
    expect(details.paused).toBe(true);
    expect(details.lastSucceeded?.result.overlayId).toBe(first.overlayId);
    const state = await readRecipeState(hostDir(config, hostA), recipeId);
    expect(state?.current?.overlayId).toBe(first.overlayId);
    expect(state?.current?.workflowId).toBe(run.workflowId);
    expect(instancesOf(hostA)).toEqual([]);
    expect(domainsOf(hostA)).toEqual([]);
    expect((await schedules.list()).map((s) => s.recipeId)).toContain(recipeId);

    // Operators find the run, started by the schedule, with its search attributes.
    const query = `WorkflowId = '${run.workflowId}' AND TemporalScheduledById = 'recipe-${recipeId}' AND CloudletOperation = 'rebuildOverlay' AND CloudletHost = '${hostA}' AND CloudletOverlayId = '${first.overlayId}' AND CloudletStatus = 'succeeded'`;
    await pollUntil('the run to be listed by its search attributes', 30_000, async () => {
      for await (const w of client.workflow.list({ query })) return w.workflowId;
      return undefined;
    });

    // The new overlay synthesizes on host B a VM whose app shows what the recipe did (disk, memory, a process).
    const synth = await exec(synthesizeVm, `synthesizeVm/${hostB}/site1`, { hostId: hostB, instanceId: 'site1', overlayUrl: first.url });
    try {
      const app = new GuestAppClient(synth.hostPort);
      const answer = await app.state();
      expect(answer.disk).toBe(marker);
      expect(answer.token).toBe(token);
      const res = await fetch(`http://127.0.0.1:${synth.hostPort}/cgi-bin/exec`, { method: 'POST', body: `printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 8081` });
      const out = (await res.json()) as { exitCode: number; output: string };
      expect(out.output).toContain(`<h1>${marker}</h1>`);
    } finally {
      await exec(terminateVm, `terminateVm/${hostB}/site1`, { hostId: hostB, instanceId: 'site1' });
    }
    expect(instancesOf(hostB)).toEqual([]);
  });

  it('rebuilds on a base re-import, keeping the previous overlay', async () => {
    // A paused schedule is left alone by a re-import.
    await pollUntil('the schedule to be listed', 30_000, async () => ((await schedules.list()).some((s) => s.recipeId === recipeId) ? true : undefined));
    expect(await schedules.onBaseReimported(pkg.baseId, { hostId: hostA })).toEqual({ triggered: [], skippedPaused: [recipeId] });

    // Re-made with a long interval: only the re-import starts a rebuild.
    await schedules.delete(recipeId);
    await expect(schedules.get(recipeId)).rejects.toMatchObject({ code: 'NOT_FOUND' });
    await schedules.create(recipe, { every: '1h', note: 'rebuilt when its base is re-imported' });
    await expect(schedules.create(recipe, { every: '1h' })).rejects.toMatchObject({ code: 'CONFLICT' });
    await pollUntil('the new schedule to be listed', 30_000, async () => ((await schedules.list()).some((s) => s.recipeId === recipeId && !s.paused) ? true : undefined));

    const reimport = await exec(importBaseVm, `importBaseVm/${hostA}/${pkg.baseId.slice(0, 12)}/again`, { hostId: hostA, source: pkg.packageFile });
    expect(reimport.baseId).toBe(pkg.baseId);
    // The import workflow itself triggered the rebuild of the recipes that use the base.
    expect(reimport.rebuilds).toEqual({ triggered: [recipeId], skippedPaused: [] });
    second = (await nextRun(0)).result;
    expect(second.overlayId).not.toBe(first.overlayId);
    expect(second.previousOverlayId).toBe(first.overlayId);

    const state = await readRecipeState(hostDir(config, hostA), recipeId);
    expect(state?.current?.overlayId).toBe(second.overlayId);
    expect(state?.previous?.overlayId).toBe(first.overlayId);
    expect(overlaysOnA()).toEqual([`${first.overlayId}.overlay`, `${second.overlayId}.overlay`].sort());
    await schedules.delete(recipeId);
  });

  it('keeps the current overlay when a rebuild fails its check, and leaves nothing behind', async () => {
    const broken: RecipeInput = { ...recipe, check: { path: '/cgi-bin/state', expect: 'something the recipe never wrote', timeoutSeconds: 3 } };
    const workflowId = `rebuildOverlay/${recipeId}/broken-check`;
    const err = await exec(rebuildOverlay, workflowId, broken).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(WorkflowFailedError);
    const failure = (err as WorkflowFailedError).cause as { type?: string; message?: string } | undefined;
    expect(failure?.type).toBe('RECIPE_CHECK_FAILED');
    expect(failure?.message).toMatch(/failed at "verify: check application"; the previous overlay stays current/);

    const state = await readRecipeState(hostDir(config, hostA), recipeId);
    expect(state?.current?.overlayId).toBe(second.overlayId);
    expect(state?.previous?.overlayId).toBe(first.overlayId);
    expect(state?.lastFailure?.workflowId).toBe(workflowId);
    expect(state?.lastFailure?.overlayId).toMatch(/^[0-9a-f]{64}$/);
    // The unverified overlay is gone from the store; the verified ones stay.
    expect(overlaysOnA()).toEqual([`${first.overlayId}.overlay`, `${second.overlayId}.overlay`].sort());
    expect(instancesOf(hostA)).toEqual([]);
    expect(domainsOf(hostA)).toEqual([]);

    // A malformed recipe fails at once, non-retryably, naming the field.
    const bad = await exec(rebuildOverlay, `rebuildOverlay/${recipeId}/bad`, { ...recipe, baseId: 'nope' }).catch((e: unknown) => e);
    const badCause = (bad as WorkflowFailedError).cause?.cause as { type?: string; message?: string } | undefined;
    expect(badCause?.type).toBe('BAD_INPUT');
    expect(badCause?.message).toMatch(/baseId/);
  });
});
