/**
 * The recipe machinery without a guest VM: the recipe script under the test guest's real busybox
 * (quoting, modes, exit codes), and the schedule service against the real Temporal server (input
 * errors, unknown hosts and recipes, pause/unpause/trigger/delete, and a triggered rebuild on a
 * host that lacks the base: it fails early, before any VM, keeps nothing and records why).
 */
import type { Client } from '@temporalio/client';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { hostDir, loadConfig, type Config } from '../../src/config';
import { connectClient } from '../../src/client/connect';
import { createHostWorker, type HostWorker } from '../../src/workers/host-worker';
import { createLogger } from '../../src/common/logger';
import { createRecipeActivities, parseRecipe, readRecipeState, recipeScript, type RecipeInput } from '../../src/activities/recipes';
import { RecipeSchedules } from '../../src/service/schedules';
import { ensureInfra, REPO, uniqueSuffix } from '../helpers/infra';
import { pollUntil } from '../helpers/poll';

jest.setTimeout(10 * 60_000);

describe('recipe scripts under the guest\'s busybox', () => {
  let work: string;
  let busybox: string;

  beforeAll(() => {
    ensureInfra(['guest']); // caches the busybox-static package the guest is built from
    const debs = path.join(REPO, 'var', 'cache', 'guest', 'debs', 'busybox-static');
    const version = fs.readdirSync(debs)[0] as string;
    const deb = fs.readdirSync(path.join(debs, version)).find((f) => f.endsWith('.deb')) as string;
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'recipe-script-'));
    execFileSync('dpkg-deb', ['-x', path.join(debs, version, deb), path.join(work, 'bb')]);
    busybox = path.join(work, 'bb', 'bin', 'busybox');
  });
  afterAll(() => fs.rmSync(work, { recursive: true, force: true }));

  const run = (recipe: RecipeInput): { status: number; output: string } => {
    const script = path.join(work, 'script.sh');
    fs.writeFileSync(script, recipeScript(parseRecipe(recipe)));
    try {
      return { status: 0, output: execFileSync(busybox, ['sh', script], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }) };
    } catch (e) {
      const err = e as { status: number; stdout: string };
      return { status: err.status, output: err.stdout };
    }
  };
  const base = { recipeId: 'quoting', hostId: 'local', baseId: 'a'.repeat(64) };

  it('writes every file byte for byte, whatever it holds, then runs the command', () => {
    const tricky = [
      "it's \"quoted\" $HOME `uname` $(id) \\n \\",
      'CLOUDLET_RECIPE_EOF',
      'unicode: é ✓ 漢字',
      '\ttabs\r\nand CRLF',
      '',
    ].join('\n');
    const files = [
      { path: `${work}/out/dir with space/it's.txt`, content: tricky },
      { path: `${work}/out/empty`, content: '' },
      { path: `${work}/out/run.sh`, content: '#!/bin/sh\necho from-run-sh "$1"\n', mode: '755' },
      { path: `${work}/out/big.txt`, content: 'x'.repeat(200_000) },
    ];
    const r = run({ ...base, files, command: `"${work}/out/run.sh" arg; exit 7` });
    expect(r.status).toBe(7);
    expect(r.output).toContain('from-run-sh arg');
    for (const f of files) {
      expect(r.output).toContain(`cloudlet-recipe: wrote ${f.path}`);
      expect(fs.readFileSync(f.path, 'utf8')).toBe(f.content);
    }
    expect(fs.statSync(`${work}/out/run.sh`).mode & 0o777).toBe(0o755);
    expect(fs.statSync(`${work}/out/empty`).mode & 0o777).toBe(0o644);
    expect(fs.readdirSync(`${work}/out`).filter((n) => n.includes('recipe-tmp'))).toEqual([]);
  });

  it('stops with 90 before the command when a file cannot be written', () => {
    fs.writeFileSync(`${work}/plainfile`, '');
    const r = run({ ...base, files: [{ path: `${work}/plainfile/sub/x`, content: 'x' }], command: 'echo the command ran' });
    expect(r.status).toBe(90);
    expect(r.output).not.toContain('the command ran');
  });

  it('refuses malformed recipes, naming every field', () => {
    expect(() => parseRecipe({ recipeId: 'Bad_Id', hostId: 'local', baseId: 'xyz', command: '', files: [{ path: 'relative', content: 'x' }, { path: '/a/../b', content: 'x' }], extra: true }))
      .toThrow(/recipeId: .*baseId: .*files\.0\.path: an absolute path.*files\.1\.path: no "\.\." segment.*command: .*Unrecognized key: "extra"/s);
    expect(() => parseRecipe({ ...base, command: 'true', files: Array.from({ length: 5 }, (_, i) => ({ path: `/f${i}`, content: 'x'.repeat(250_000) })) }))
      .toThrow(/files: the files of a recipe hold at most 1048576 bytes/);
    expect(() => parseRecipe({ ...base, command: 'true', appPort: 8081 })).toThrow(/check: a recipe whose application is not on port 8080 needs a check/);
    expect(parseRecipe({ ...base, command: 'true', appPort: 8081, check: { path: '/', expect: 'ok' } }).check).toEqual({ path: '/', expect: 'ok', timeoutSeconds: 30 });
    expect(parseRecipe({ ...base, command: 'true' })).toEqual({ ...base, command: 'true', files: [], packages: [], timeoutSeconds: 300, appPort: 8080 });
  });
});

describe('recipe schedules against the Temporal server', () => {
  const suffix = uniqueSuffix();
  const hostId = `rs-${suffix}`;
  const recipeId = `nobase-${suffix}`;
  const missingBase = 'f'.repeat(64);
  let config: Config;
  let client: Client;
  let schedules: RecipeSchedules;
  let worker: HostWorker;
  let running: Promise<void>;
  const recipe: RecipeInput = { recipeId, hostId, baseId: missingBase, command: 'echo never runs' };

  beforeAll(async () => {
    ensureInfra(['temporal']);
    config = { ...loadConfig({ CLOUDLET_LOG_LEVEL: 'warn' }), workflowTaskQueue: `wf-schedsvc-${suffix}` };
    client = await connectClient(config);
    schedules = new RecipeSchedules(client, { workflowTaskQueue: config.workflowTaskQueue });
    worker = await createHostWorker(config, hostId, createLogger(`worker-${hostId}`, 'warn'));
    running = worker.run();
  });

  afterAll(async () => {
    await schedules?.delete(recipeId).catch(() => undefined);
    worker?.shutdown();
    await running;
    await client?.connection.close();
    fs.rmSync(hostDir(config, hostId), { recursive: true, force: true });
  });

  it('refuses bad input, unknown hosts and unknown recipes with typed errors', async () => {
    await expect(schedules.create({ ...recipe, baseId: 'nope' }, { every: '1h' })).rejects.toMatchObject({ code: 'BAD_INPUT', message: expect.stringMatching(/baseId/) });
    await expect(schedules.create(recipe, { every: '5s' })).rejects.toMatchObject({ code: 'BAD_INPUT', message: expect.stringMatching(/every: at least 10 s/) });
    await expect(schedules.create(recipe, { every: 'soon' })).rejects.toMatchObject({ code: 'BAD_INPUT' });
    await expect(schedules.create({ ...recipe, hostId: `nobody-${suffix}` }, { every: '1h' })).rejects.toMatchObject({ code: 'UNKNOWN_HOST' });
    for (const op of [() => schedules.get(`unknown-${suffix}`), () => schedules.trigger(`unknown-${suffix}`), () => schedules.pause(`unknown-${suffix}`), () => schedules.delete(`unknown-${suffix}`)]) {
      await expect(op()).rejects.toMatchObject({ code: 'NOT_FOUND' });
    }
    await expect(schedules.get('Not/An/Id')).rejects.toMatchObject({ code: 'BAD_INPUT' });
  });

  it('pauses, unpauses, triggers (also while paused) and deletes; a rebuild without the base fails early and keeps nothing', async () => {
    const created = await schedules.create(recipe, { every: '1h', paused: true, note: 'created paused by the test' });
    expect(created).toMatchObject({ recipeId, scheduleId: `recipe-${recipeId}`, paused: true, note: 'created paused by the test', every: '1h', recentRuns: [] });
    expect(created.recipe).toEqual(parseRecipe(recipe));

    const triggered = await schedules.trigger(recipeId);
    const run = await pollUntil('the triggered rebuild to start', 60_000, async () => (await schedules.get(recipeId)).recentRuns[0]);
    expect(triggered).toEqual({ started: run.workflowId });
    const failure = await client.workflow.getHandle(run.workflowId, run.runId).result().catch((e: unknown) => e as { cause?: { type?: string; message?: string } });
    expect(failure.cause?.type).toBe('WRONG_BASE');
    expect(failure.cause?.message).toMatch(new RegExp(`rebuild of recipe ${recipeId} failed at "resume base"; the previous overlay stays current: .*does not have base ${missingBase}`));

    const details = await schedules.get(recipeId);
    expect(details.paused).toBe(true);
    expect(details.lastRun).toMatchObject({ workflowId: run.workflowId, status: 'FAILED' });
    expect(details.lastSucceeded).toBeUndefined();
    const state = await readRecipeState(hostDir(config, hostId), recipeId);
    expect(state?.current).toBeUndefined();
    expect(state?.lastFailure).toMatchObject({ workflowId: run.workflowId, message: expect.stringMatching(/^resume base: .*does not have base/) });
    const instances = path.join(hostDir(config, hostId), 'instances');
    expect(fs.existsSync(instances) ? fs.readdirSync(instances) : []).toEqual([]);

    await schedules.unpause(recipeId, 'back on');
    expect((await schedules.get(recipeId)).paused).toBe(false);
    await pollUntil('the schedule to be listed', 30_000, async () => ((await schedules.list()).find((s) => s.recipeId === recipeId && !s.paused)));
    expect(await schedules.onBaseReimported('0'.repeat(64))).toEqual({ triggered: [], skippedPaused: [] });
    // What importBaseVm calls after an import: the host's recipes on that base are rebuilt.
    const activities = createRecipeActivities({ hostId, dataDir: hostDir(config, hostId), log: createLogger('recipes', 'warn'), temporal: { address: config.temporalAddress, namespace: config.namespace } });
    expect(await activities.rebuildRecipesOfBase({ baseId: missingBase })).toEqual({ triggered: [recipeId], skippedPaused: [] });
    const again = await pollUntil('the re-import to start a rebuild', 60_000, async () => (await schedules.get(recipeId)).recentRuns[1]);
    await expect(client.workflow.getHandle(again.workflowId, again.runId).result()).rejects.toMatchObject({ cause: { type: 'WRONG_BASE' } });
    await schedules.pause(recipeId, 'off again');
    expect((await schedules.get(recipeId)).note).toBe('off again');
    await schedules.delete(recipeId);
    await expect(schedules.get(recipeId)).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });
});
