/**
 * The CLI's --api mode against a real HTTP API server (src/api/server.ts) on 127.0.0.1:<random>
 * over the in-memory FakeCloudletService: every command goes through the typed client and fetch,
 * operations are followed to their end with progress, failures come back as exit 1 with the
 * workflow's failure type, message and Web UI link.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startApi, type RunningApi } from '../../src/api/server';
import { runCli } from '../../src/cli/main';
import { FakeCloudletService, FakeRecipeSchedules } from '../../src/service/fake';
import type { BaseInfo, HostInfo, InstanceInfo, OperationRef, OperationStatus, OverlayInfo } from '../../src/service/types';
import { Capture } from '../helpers/capture';

const TOKEN = 'cli-api-test-token-0123456789';

let fake: FakeCloudletService;
let api: RunningApi;
let tmp: string;

async function serve(options: ConstructorParameters<typeof FakeCloudletService>[0] = {}): Promise<void> {
  fake = new FakeCloudletService(options);
  api = await startApi(fake, { tokens: [TOKEN], schedules: new FakeRecipeSchedules(fake), host: '127.0.0.1', port: 0 });
}

beforeEach(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'cloudlet-cli-api-'));
  await serve();
});

afterEach(async () => {
  await api.close();
  fake.cleanup();
  fs.rmSync(tmp, { recursive: true, force: true });
});

interface Run {
  code: number;
  out: string;
  err: string;
}

/** Run the CLI in API mode (URL and token from the environment unless `env` says otherwise). */
async function cli(args: string[], opts: { tty?: boolean; env?: NodeJS.ProcessEnv } = {}): Promise<Run> {
  const stdout = new Capture();
  const stderr = new Capture();
  if (opts.tty) stderr.isTTY = true;
  const env = opts.env ?? { CLOUDLET_API_URL: api.url, CLOUDLET_API_TOKEN: TOKEN };
  const code = await runCli(args, { stdout, stderr, env }, { poll: { intervalMs: 2, maxIntervalMs: 5 } });
  return { code, out: stdout.text, err: stderr.text };
}

async function json<T>(...args: string[]): Promise<T> {
  const r = await cli(['--json', ...args]);
  if (r.code !== 0) throw new Error(`cloudlet ${args.join(' ')} exited ${r.code}: ${r.err}`);
  return JSON.parse(r.out) as T;
}

interface Done<R> {
  operation: OperationStatus;
  result: R;
}

/** Poll `fn` until it returns a value (no fixed sleeps). */
async function until<T>(fn: () => T | undefined, what: string, ms = 5000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setImmediate(r));
  }
}

async function importedBase(): Promise<string> {
  const a = await json<Done<{ baseId: string }> & { base: BaseInfo }>('base', 'import', 'http://127.0.0.1:9/base.pkg', '--host', 'host-a');
  await json('base', 'import', 'http://127.0.0.1:9/base.pkg', '--host', 'host-b');
  return a.result.baseId;
}

test('the whole story through the API: import, resume, overlay, download, provision, terminate', async () => {
  const hosts = await json<HostInfo[]>('hosts', 'list');
  expect(hosts.map((h) => h.id)).toEqual(['host-a', 'host-b']);

  const imp = await json<Done<{ baseId: string; hostId: string }> & { base: BaseInfo }>('base', 'import', 'http://127.0.0.1:9/base.pkg', '--host', 'host-a');
  expect(imp.operation).toMatchObject({ kind: 'importBaseVm', state: 'succeeded', hostId: 'host-a' });
  expect(imp.operation.progress?.done).toEqual(['fetch', 'verify', 'unpack', 'register']);
  expect(imp.base.hostIds).toEqual(['host-a']);
  const baseId = imp.result.baseId;
  await json('base', 'import', 'http://127.0.0.1:9/base.pkg', '--host', 'host-b');
  expect((await json<BaseInfo[]>('base', 'list')).map((b) => [b.id, [...b.hostIds].sort()])).toEqual([[baseId, ['host-a', 'host-b']]]);
  // A unique prefix names the base, as standalone.
  expect((await json<BaseInfo>('base', 'info', baseId.slice(0, 8))).id).toBe(baseId);

  const resumed = await json<Done<{ instanceId: string }> & { instance: InstanceInfo }>('instance', 'resume', '--base', baseId.slice(0, 10), '--host', 'host-a', '--app-port', '8080');
  expect(resumed.instance).toMatchObject({ hostId: 'host-a', state: 'running', baseId });
  expect(fake.calls.find((c) => c.method === 'resumeBase')?.args).toEqual([{ hostId: 'host-a', baseId, appPort: 8080 }]);
  const instanceId = resumed.instance.id;

  const made = await json<Done<{ overlayId: string }> & { overlay: OverlayInfo }>('overlay', 'create', '--instance', instanceId, '--keep');
  expect(made.overlay).toMatchObject({ baseId, fromInstanceId: instanceId });
  expect(fake.calls.find((c) => c.method === 'createOverlay')?.args).toEqual([{ instanceId, keepInstance: true }]);
  expect((await json<InstanceInfo>('instance', 'info', instanceId)).state).toBe('running');
  const overlayId = made.overlay.id;
  expect((await json<OverlayInfo[]>('overlay', 'list')).map((o) => o.id)).toEqual([overlayId]);
  expect((await json<OverlayInfo>('overlay', 'info', made.overlay.url)).id).toBe(overlayId);

  // The download is the published file, byte for byte (its sha256 is its id).
  const file = path.join(tmp, 'o.overlay');
  const dl = await json<{ bytes: number; path: string }>('overlay', 'download', overlayId.slice(0, 12), file);
  expect(dl.path).toBe(file);
  expect(createHash('sha256').update(fs.readFileSync(file)).digest('hex')).toBe(overlayId);
  expect(fs.readdirSync(tmp)).toEqual(['o.overlay']);

  // Synthesis on the other host, from the overlay named by id: the service is given its URL.
  const prov = await cli(['synthesize', overlayId, '--host', 'host-b', '--wait-for-app', '8080']);
  expect(prov.code).toBe(0);
  expect(fake.calls.find((c) => c.method === 'provisionInstance')?.args).toEqual([{ hostId: 'host-b', overlayUrl: made.overlay.url, waitForAppPort: 8080 }]);
  const newId = /provisioned instance (inst-\w+) on host-b/.exec(prov.out)?.[1] ?? '';
  expect(prov.out).toMatch(/first response\s+1900 ms/);
  expect(prov.out).toContain(`overlay    ${overlayId}`);
  expect(prov.err).toContain(`operation synthesizeVm/host-b/${newId}`);
  expect(prov.err).toContain(`web UI  http://127.0.0.1:8233/namespaces/default/workflows/${encodeURIComponent(`synthesizeVm/host-b/${newId}`)}`);

  const list = await cli(['instance', 'list']);
  expect(list.out.split('\n')[0]).toMatch(/^INSTANCE\s+HOST\s+STATE\s+BASE\s+OVERLAY\s+APP$/);
  expect(list.out).toMatch(new RegExp(`${newId}\\s+host-b\\s+running`));

  const term = await json<Done<unknown>>('instance', 'terminate', newId);
  expect(term.operation).toMatchObject({ kind: 'terminateVm', state: 'succeeded' });
  expect((await json<InstanceInfo>('instance', 'info', newId)).state).toBe('terminated');

  const status = await json<OperationStatus>('operation', 'status', term.operation.id);
  expect(status).toMatchObject({ id: term.operation.id, state: 'succeeded', hostId: 'host-b' });

  // The base package comes down as a file.
  const pkg = path.join(tmp, 'base.pkg');
  const exp = await json<{ bytes: number }>('base', 'export', baseId, pkg);
  expect(fs.statSync(pkg).size).toBe(exp.bytes);
  expect(createHash('sha256').update(fs.readFileSync(pkg)).digest('hex')).toBe(baseId);
});

test('progress while a workflow runs: JSON lines, a bar per stage on a terminal, silence in a pipe', async () => {
  const baseId = await importedBase();

  const asJson = await cli(['--json', 'instance', 'resume', '--base', baseId, '--host', 'host-a']);
  expect(asJson.code).toBe(0);
  const lines = asJson.err.trim().split('\n').map((l) => JSON.parse(l) as { type: string; id?: string; webUiUrl?: string; stage?: string; finished?: boolean });
  const opId = (JSON.parse(asJson.out) as Done<unknown>).operation.id;
  expect(lines[0]).toEqual({ type: 'operation', id: opId, kind: 'resumeBaseVm', webUiUrl: expect.stringContaining(encodeURIComponent(opId)) as unknown });
  // Every stage of the workflow, in order, each finished.
  expect(lines.filter((l) => l.type === 'progress' && l.finished).map((l) => l.stage)).toEqual(['prepare disk', 'restore memory', 'replug NIC', 'verify CPU model']);

  const tty = await cli(['instance', 'resume', '--base', baseId, '--host', 'host-b'], { tty: true });
  expect(tty.code).toBe(0);
  expect(tty.err).toMatch(/operation resumeBaseVm\/host-b\/inst-\w+/);
  for (const stage of ['prepare disk', 'restore memory', 'replug NIC', 'verify CPU model']) expect(tty.err).toMatch(new RegExp(`${stage} .*100% \\|`));
  expect(tty.err).toMatch(/KiB \/ [\d.]+ KiB/);

  const pipe = await cli(['instance', 'resume', '--base', baseId, '--host', 'host-a']);
  expect(pipe.code).toBe(0);
  const id = /^resumed instance (inst-\w+) on host-a\n/.exec(pipe.out)?.[1];
  expect(id).toBeDefined();
  // Only the operation and where to watch it: no bars.
  const op = `resumeBaseVm/host-a/${id}`;
  expect(pipe.err).toBe(`operation ${op}\n  web UI  http://127.0.0.1:8233/namespaces/default/workflows/${encodeURIComponent(op)}\n`);
});

test('--no-wait returns the operation at once; operation wait follows it later', async () => {
  await api.close();
  fake.cleanup();
  await serve({ autoAdvance: false });
  const base = fake.addBase(['host-a']);

  const started = await json<{ operation: OperationRef }>('instance', 'resume', '--base', base.id, '--host', 'host-a', '--no-wait');
  expect(started.operation.kind).toBe('resumeBaseVm');
  const text = await cli(['operation', 'status', started.operation.id]);
  expect(text.out).toMatch(/state\s+running/);
  expect(text.out).toMatch(/stage\s+prepare disk/);

  const waiting = cli(['--json', 'operation', 'wait', started.operation.id]);
  await until(() => (fake.calls.filter((c) => c.method === 'getOperation').length >= 3 ? true : undefined), 'the CLI to poll');
  fake.advance(started.operation.id, true);
  const r = await waiting;
  expect(r.code).toBe(0);
  expect((JSON.parse(r.out) as Done<{ instanceId: string }>).operation.state).toBe('succeeded');
});

test('an operation that fails while the CLI waits: exit 1, its failure type and message, the Web UI link', async () => {
  await api.close();
  fake.cleanup();
  await serve({ autoAdvance: false });
  const base = fake.addBase(['host-a', 'host-b']);
  const overlay = fake.addOverlay(base.id, Buffer.from('overlay bytes'));

  const running = cli(['--json', 'synthesize', overlay.url, '--host', 'host-b']);
  const opId = await until(() => fake.calls.some((c) => c.method === 'getOperation') ? (fake.calls.find((c) => c.method === 'getOperation')?.args[0] as string) : undefined, 'the CLI to poll');
  fake.fail(opId, 'CORRUPT', 'overlay segment 3 of 7 is corrupt (sha256 differs)');
  const r = await running;
  expect(r.code).toBe(1);
  const err = (JSON.parse(r.out) as { error: { code: string; message: string; retryable: boolean; details: { operationId: string } } }).error;
  expect(err.code).toBe('CORRUPT');
  expect(err.retryable).toBe(false);
  expect(err.message).toContain('segment 3 of 7');
  expect(err.message).toContain(`Temporal Web UI: http://127.0.0.1:8233/namespaces/default/workflows/${encodeURIComponent(opId)}`);
  expect(err.details.operationId).toBe(opId);
  expect((await json<InstanceInfo[]>('instance', 'list')).map((i) => i.state)).toEqual(['failed']);

  // The failed operation's status says the same.
  const status = await cli(['operation', 'status', opId]);
  expect(status.out).toMatch(/error\s+CORRUPT: overlay segment 3 of 7 is corrupt \(sha256 differs\) \(non-retryable\)/);

  // Waiting too long is a TIMEOUT that says the operation goes on.
  const again = await json<{ operation: OperationRef }>('synthesize', overlay.url, '--host', 'host-b', '--no-wait');
  const slow = await cli(['instance', 'resume', '--base', base.id, '--host', 'host-a', '--wait-timeout', '0.05']);
  expect(slow.code).toBe(1);
  expect(slow.err).toMatch(/TIMEOUT: operation resumeBaseVm\/host-a\/inst-\w+ is still running .*Fix: the operation goes on in the service: follow it with `cloudlet operation wait resumeBaseVm\/host-a\/inst-\w+`/);
  expect((await json<OperationStatus>('operation', 'status', again.operation.id)).state).toBe('running');
});

test('the mode is explicit: standalone-only and API-only commands say what they need', async () => {
  const standaloneOnly = await cli(['base', 'create', '--disk', 'd.raw', '--memory', 'm.sav']);
  expect(standaloneOnly.code).toBe(1);
  expect(standaloneOnly.err).toMatch(/BAD_INPUT: `cloudlet base create` works on this machine's files and is not offered through the cloudlet API .*Fix: run it without --api/);

  const apiOnly = await cli(['instance', 'list'], { env: {} });
  expect(apiOnly.code).toBe(1);
  expect(apiOnly.err).toMatch(/`cloudlet instance list` talks to a running cloudlet service, and no API was given\. Fix: pass --api <url> and --token <token> \(or set CLOUDLET_API_URL/);

  const neither = await cli(['overlay', 'create'], { env: {} });
  expect(neither.code).toBe(1);
  expect(neither.err).toMatch(/needs either the launch VM's files \(--base, --disk and --memory: standalone.*\) or an instance of a cloudlet service \(--instance <id> with --api <url>\)/);
  const filesToApi = await cli(['overlay', 'create', '--base', 'b', '--disk', 'd', '--memory', 'm']);
  expect(filesToApi.err).toMatch(/--base, --disk, --memory are for standalone use/);
  const instanceStandalone = await cli(['overlay', 'create', '--instance', 'inst-1'], { env: {} });
  expect(instanceStandalone.err).toMatch(/`cloudlet overlay create --instance` goes through a cloudlet service/);

  const hostStandalone = await cli(['synthesize', 'o.overlay', '--host', 'host-b'], { env: {} });
  expect(hostStandalone.err).toMatch(/`cloudlet synthesize --host` goes through a cloudlet service/);
  const noWaitStandalone = await cli(['synthesize', 'o.overlay', '--no-wait'], { env: {} });
  expect(noWaitStandalone.err).toMatch(/`cloudlet synthesize --no-wait` goes through a cloudlet service/);
  const resumeViaApi = await cli(['synthesize', 'http://127.0.0.1:9/o.overlay', '--host', 'host-b', '--resume']);
  expect(resumeViaApi.err).toMatch(/--resume of `cloudlet synthesize` work on this machine's store/);
  const noHost = await cli(['base', 'import', 'http://127.0.0.1:9/b.pkg']);
  expect(noHost.err).toMatch(/needs the host to import on\. Fix: add --host/);
  expect(fake.calls.filter((c) => c.method !== 'listHosts')).toEqual([]);
});

test('--api and --token flags; a wrong token, an unknown host, an unreachable API', async () => {
  const flags = await cli(['--json', '--api', api.url, '--token', TOKEN, 'hosts', 'list'], { env: {} });
  expect(flags.code).toBe(0);
  expect((JSON.parse(flags.out) as HostInfo[]).length).toBe(2);
  // Flags win over the environment.
  const flagWins = await cli(['--api', api.url, '--token', 'wrong-token-0123456789', 'hosts', 'list']);
  expect(flagWins.code).toBe(1);
  expect(flagWins.err).toMatch(/^cloudlet: UNAUTHORIZED: .*token/i);

  const unknownHost = await cli(['base', 'import', 'http://127.0.0.1:9/b.pkg', '--host', 'host-z']);
  expect(unknownHost.code).toBe(1);
  expect(unknownHost.err).toMatch(/UNKNOWN_HOST: host host-z is not part of this cloudlet/);

  const { port } = new URL(api.url);
  await api.close();
  const down = await cli(['--api', `http://127.0.0.1:${port}`, 'hosts', 'list'], { env: {} });
  expect(down.code).toBe(1);
  expect(down.err).toMatch(/cannot reach the cloudlet API at http:\/\/127\.0\.0\.1:\d+\/v1\/hosts .*Fix: check the --api URL/);
  await serve(); // for afterEach
});

test('an idempotency key makes a retried command one operation', async () => {
  const baseId = await importedBase();
  const a = await json<{ operation: OperationRef }>('instance', 'resume', '--base', baseId, '--host', 'host-a', '--no-wait', '--idempotency-key', 'resume-1');
  const b = await json<Done<unknown>>('instance', 'resume', '--base', baseId, '--host', 'host-a', '--idempotency-key', 'resume-1');
  expect(b.operation.id).toBe(a.operation.id);
  expect(fake.calls.filter((c) => c.method === 'resumeBase').map((c) => c.idempotencyKey)).toEqual(['resume-1', 'resume-1']);
  expect((await json<InstanceInfo[]>('instance', 'list')).length).toBe(1);
});

test('recipe schedules: create from a recipe file, list, trigger, pause, unpause, delete', async () => {
  const baseId = await importedBase();
  const recipeFile = path.join(tmp, 'web.json');
  fs.writeFileSync(recipeFile, JSON.stringify({ recipeId: 'web', hostId: 'host-a', baseId, command: 'httpd -p 8080 -h /www', appPort: 8080 }));

  const created = await json<{ scheduleId: string; every: string; paused: boolean }>('schedule', 'create', '--recipe', recipeFile, '--every', '6h', '--note', 'nightly');
  expect(created).toMatchObject({ scheduleId: 'recipe-web', every: '6h', paused: false });
  expect((await cli(['schedule', 'list'])).out).toMatch(/^RECIPE\s+SCHEDULE\s+EVERY\s+STATE\s+LAST RUN\nweb\s+recipe-web\s+6h\s+active\s+-$/m);

  const trig = await cli(['schedule', 'trigger', 'web']);
  expect(trig.code).toBe(0);
  const info = await json<{ recentRuns: Array<{ workflowId: string }> }>('schedule', 'info', 'web');
  expect(info.recentRuns.map((r) => r.workflowId)).toEqual([expect.stringMatching(/^rebuildOverlay\/host-a\/web-/) as unknown]);
  expect(trig.out).toContain(`started rebuild ${info.recentRuns[0]?.workflowId ?? '?'} of recipe web; follow it with \`cloudlet operation wait`);
  // --wait follows the rebuild it started to its end.
  const waited = await json<{ recipeId: string; operation: { id: string; kind: string; state: string } }>('schedule', 'trigger', 'web', '--wait');
  expect(waited).toMatchObject({ recipeId: 'web', operation: { kind: 'rebuildOverlay', state: 'succeeded' } });
  expect(waited.operation.id).toMatch(/^rebuildOverlay\/host-a\/web-/);

  expect((await cli(['schedule', 'pause', 'web', '--note', 'maintenance'])).code).toBe(0);
  expect((await cli(['schedule', 'info', 'web'])).out).toMatch(/state\s+paused \(maintenance\)/);
  expect((await cli(['schedule', 'unpause', 'web'])).code).toBe(0);
  expect((await json<{ paused: boolean }>('schedule', 'info', 'web')).paused).toBe(false);
  expect((await cli(['schedule', 'delete', 'web'])).code).toBe(0);
  const gone = await cli(['schedule', 'info', 'web']);
  expect(gone.code).toBe(1);
  expect(gone.err).toMatch(/NOT_FOUND: there is no schedule for recipe web/);

  // A recipe the API refuses: the fields at fault are listed.
  const badFile = path.join(tmp, 'bad.json');
  fs.writeFileSync(badFile, JSON.stringify({ recipeId: 'web', hostId: 'host-a' }));
  const bad = await cli(['--json', 'schedule', 'create', '--recipe', badFile, '--every', '6h']);
  expect(bad.code).toBe(1);
  const issues = (JSON.parse(bad.out) as { error: { issues: Array<{ path: string[] }> } }).error.issues.map((i) => i.path.join('.'));
  expect(issues).toEqual(expect.arrayContaining(['body.recipe.baseId', 'body.recipe.command']) as unknown);
  const notJson = path.join(tmp, 'nope.json');
  fs.writeFileSync(notJson, 'recipeId: web');
  expect((await cli(['schedule', 'create', '--recipe', notJson, '--every', '6h'])).err).toMatch(/the recipe file .*nope\.json is not JSON/);
});
