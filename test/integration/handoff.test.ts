/**
 * Live VM handoff between two clusters ("east" and "west": their own Temporal namespaces, host
 * workers, API servers, tokens and ticket secrets) on the real Temporal server and libvirt. The
 * guest writes memory and disk throughout. Checked: the destination answers with the source's
 * latest state and its guest memory and disk equal the paused source's (full verification,
 * pmemsave and disk image hashes on both sides); the source is gone; a bad or used ticket is
 * refused and nothing is received; a cancelled handoff resumes the source and leaves nothing at
 * the destination; a destination killed mid-handoff leaves the source serving and, once the
 * destination is back, nothing there; a destination host that lacks the base gets its package
 * from the source first and lists it afterwards; a synthesized VM (started early, under a pool
 * entry's name) moves like a resumed one.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import { runCli } from '../../src/cli/main';
import path from 'node:path';
import { createLogger } from '../../src/common/logger';
import { startApi, type RunningApi } from '../../src/api/server';
import { SqliteClusterCatalog } from '../../src/core/cluster-catalog';
import { CloudletApiClient } from '../../src/api/client';
import { TemporalCloudletService } from '../../src/service';
import { TemporalHandoffService } from '../../src/service/handoff';
import { loadHandoffSecret } from '../../src/common/handoff-secret';
import { GuestAppClient } from '../../src/guest/app-client';
import { assertHostServing } from '../../src/client/connect';
import { startTestCluster, type TestCluster } from '../helpers/cluster';
import { testBasePackage } from '../helpers/test-base';
import { REPO, removeHostDomains } from '../helpers/infra';
import { pollUntil, waitFor } from '../helpers/poll';
import { GUEST_WRITER_SCRIPT, testGuestExec } from '../helpers/guest-writer';
import type { HandoffInstanceRequest } from '../../src/service/handoff-types';
import { Capture } from '../helpers/capture';

jest.setTimeout(30 * 60_000);

const CHURN = GUEST_WRITER_SCRIPT;
const guestExec = testGuestExec;

describe('live handoff between two clusters', () => {
  let east: TestCluster;
  let west: TestCluster;
  let eastApi: RunningApi;
  let westApi: RunningApi;
  let eastCloud: CloudletApiClient;
  let westCloud: CloudletApiClient;
  const westToken = `west-token-${Date.now()}-0123456789`;
  const eastToken = `east-token-${Date.now()}-0123456789`;
  let pkg: { packageFile: string; baseId: string };
  let westCatalog: SqliteClusterCatalog | undefined;
  /** A west host whose worker is a process of its own, to be killed. */
  let wb = '';
  let wbWorker: ChildProcess | undefined;
  const startWb = (): void => {
    wbWorker = startWorkerProcess(wb, 'west', west.config.workflowTaskQueue);
  };

  beforeAll(async () => {
    pkg = await testBasePackage(256);
    east = await startTestCluster('east', ['ea'], { namespace: 'east' });
    // wn never imports the base: a handoff to it carries the base package first.
    west = await startTestCluster('west', ['wa', 'wn'], { namespace: 'west' });
    wb = `wb-${west.suffix}`;
    startWb();
    await waitFor(`the worker of ${wb} to poll`, () => assertHostServing(west.client, wb).then(() => true, () => false), 120_000);
    const log = createLogger('api', 'warn');
    const eastService = new TemporalCloudletService(east.client, east.config, { hosts: east.hosts });
    const westHosts = [...west.hosts, wb];
    // West keeps a cluster catalog (the one its workers use): its tickets are recorded there.
    westCatalog = new SqliteClusterCatalog(west.config.catalog.file);
    const westService = new TemporalCloudletService(west.client, west.config, { hosts: westHosts, catalog: westCatalog });
    eastApi = await startApi(eastService, {
      handoffs: new TemporalHandoffService(east.client, eastService, { hosts: east.hosts, secret: loadHandoffSecret(east.config.varDir, 'east') }),
      tokens: [eastToken], port: 0, logger: log,
    });
    westApi = await startApi(westService, {
      // Short for the killed-destination test, but longer than a first round takes on a busy machine.
      handoffs: new TemporalHandoffService(west.client, westService, { hosts: westHosts, secret: loadHandoffSecret(west.config.varDir, 'west'), idleTimeoutMs: 60_000, catalog: westCatalog }),
      catalog: westCatalog,
      tokens: [westToken], port: 0, logger: log,
    });
    eastCloud = new CloudletApiClient({ baseUrl: eastApi.url, token: eastToken });
    westCloud = new CloudletApiClient({ baseUrl: westApi.url, token: westToken });
    for (const [cloud, host] of [[eastCloud, east.hosts[0]], [westCloud, west.hosts[0]], [westCloud, wb]] as const) {
      const op = await cloud.importBase({ hostId: host ?? '', source: pkg.packageFile });
      expect((await cloud.waitForOperation(op.id, { timeoutMs: 5 * 60_000 })).state).toBe('succeeded');
    }
  });

  afterAll(async () => {
    wbWorker?.kill('SIGKILL');
    removeHostDomains([wb]);
    if (wb) fs.rmSync(path.join(REPO, 'var', 'hosts', wb), { recursive: true, force: true });
    await eastApi?.close();
    await westApi?.close();
    await westCatalog?.close();
    await east?.stop();
    await west?.stop();
  });

  async function runningInstance(tag: string): Promise<{ id: string; port: number }> {
    const op = await eastCloud.resumeBase({ hostId: east.hosts[0] ?? '', baseId: pkg.baseId }, `${tag}-${east.suffix}`);
    const s = await eastCloud.waitForOperation(op.id, { timeoutMs: 5 * 60_000 });
    expect(s.state).toBe('succeeded');
    const r = s.result as { instanceId: string; hostPort: number };
    const app = new GuestAppClient(r.hostPort);
    await app.waitForState(60_000);
    await app.set(`tok-${tag}`, `state of ${tag}`);
    expect(await guestExec(r.hostPort, CHURN)).toBe('started');
    await waitFor('the guest\'s writer to write', async () => Number(await guestExec(r.hostPort, 'cat /run/seq')) > 1, 60_000);
    return { id: r.instanceId, port: r.hostPort };
  }

  /** The operation once it is no longer running (waitForOperation throws on failure or cancellation). */
  async function ended(id: string) {
    return pollUntil(`operation ${id} to end`, 10 * 60_000, async () => {
      const st = await eastCloud.getOperation(id);
      return st && st.state !== 'running' ? st : undefined;
    }, 500);
  }

  /** West's handoff tickets, as its admins list them. */
  async function listTickets(): Promise<Array<{ handoffId: string; hostId: string; instanceId: string; state: string; ended?: string }>> {
    const res = await fetch(`${westApi.url}/v1/handoff-tickets`, { headers: { authorization: `Bearer ${westToken}` } });
    expect(res.status).toBe(200);
    return ((await res.json()) as { tickets: Array<{ handoffId: string; hostId: string; instanceId: string; state: string; ended?: string }> }).tickets;
  }

  const handoffBody = (extra: Partial<HandoffInstanceRequest> = {}): HandoffInstanceRequest => ({ destination: { apiUrl: westApi.url, credentials: { token: westToken } }, ...extra });

  it('moves a VM that writes memory and disk; the destination has its latest state, exactly; the source is gone; its ticket is used up', async () => {
    const inst = await runningInstance('live');
    const seqBefore = Number(await guestExec(inst.port, 'cat /run/seq'));
    const op = await eastCloud.handoffInstance(inst.id, handoffBody({ verify: 'full', hostId: west.hosts[0] ?? '' }));
    const s = await eastCloud.waitForOperation(op.id, { timeoutMs: 15 * 60_000 });
    expect(s.error).toBeUndefined();
    expect(s.state).toBe('succeeded');
    const r = s.result as { rounds: number; bytes: number; destination: { appEndpoint: string; instanceId: string; hostId: string; timings: Record<string, number> }; verified: { memorySha256: string; diskSha256: string }; handoffId: string };
    expect(r.rounds).toBeGreaterThanOrEqual(2);
    // The VM's RAM is a shared file: the cut-over carried the device state only, and the
    // destination checked the RAM it loaded page by page against the paused source's digests.
    expect(r.destination.timings['verify memoryMs']).toBeGreaterThanOrEqual(0);
    // Its QEMU was started during the live rounds: the cut-over only loaded the device state.
    expect(r.destination.timings['load device stateMs']).toBeGreaterThan(0);
    expect(r.destination.timings['start QEMU for the device stateMs']).toBeUndefined();
    expect(r.verified.memorySha256).toMatch(/^[0-9a-f]{64}$/);
    expect(r.destination.hostId).toBe(west.hosts[0]);
    // Every round is in the progress.
    expect(s.progress?.done.filter((d) => /round/.test(d)).length).toBeGreaterThanOrEqual(2);

    const port = Number(r.destination.appEndpoint.split(':')[1]);
    const dest = new GuestAppClient(port);
    // Read the disk through QEMU, not the guest's page cache: the destination's QEMU may have been
    // started ahead with its disk layer rewritten in place before it took the device state.
    await guestExec(port, 'sync; echo 3 > /proc/sys/vm/drop_caches; echo dropped');
    const st = await dest.state();
    expect(st.token).toBe('tok-live');
    expect(st.disk).toBe('state of live');
    // The writer kept running through the handoff and carries on at the destination.
    const seqDisk = Number(await guestExec(port, 'cat /data/app/seq'));
    const seqMem = Number(await guestExec(port, 'cat /run/seq'));
    expect(seqMem).toBeGreaterThan(seqBefore);
    expect(seqDisk).toBeGreaterThanOrEqual(seqMem - 1);
    await waitFor('the guest to carry on writing at the destination', async () => Number(await guestExec(port, 'cat /run/seq')) > seqMem, 60_000);

    // The source VM and its files are gone; the clusters list the instance where it is.
    expect(fs.existsSync(path.join(east.config.varDir, 'hosts', east.hosts[0] ?? '', 'instances', inst.id))).toBe(false);
    expect((await eastCloud.listInstances()).find((i) => i.id === inst.id)?.state).toBe('terminated');
    expect((await westCloud.listInstances()).find((i) => i.id === inst.id)?.state).toBe('running');

    // The used ticket is refused, by the API and by the receiving host, and nothing is received.
    const ticket = (s.result as { ticket?: string }).ticket;
    expect(ticket).toBeUndefined(); // never in a result
    const forged = await fetch(`${westApi.url}/v1/handoffs/${r.handoffId}/rounds`, { method: 'POST', headers: { authorization: 'Bearer forged.ticket', 'content-type': 'application/json' }, body: JSON.stringify({ round: 1, final: false }) });
    expect(forged.status).toBe(401);
    // West's catalog holds the ticket as used: single use, on the record.
    expect((await listTickets()).find((t) => t.handoffId === r.handoffId)).toMatchObject({ instanceId: inst.id, hostId: west.hosts[0], state: 'used', ended: 'used' });
  });

  it('moves a synthesized VM that started early (its own QEMU, files behind a symlink) with full verification', async () => {
    const ea = east.hosts[0] ?? '';
    // An overlay of a launch VM on east, synthesized on east: the synthesis starts its VM early.
    const launch = await eastCloud.waitForOperation((await eastCloud.resumeBase({ hostId: ea, baseId: pkg.baseId }, `syn-launch-${east.suffix}`)).id, { timeoutMs: 5 * 60_000 });
    const launchId = String((launch.result as { instanceId: string }).instanceId);
    const launchApp = new GuestAppClient((launch.result as { hostPort: number }).hostPort);
    await launchApp.waitForState(60_000);
    await launchApp.set('tok-synthesized', 'state of the launch VM');
    const made = await eastCloud.waitForOperation((await eastCloud.createOverlay({ instanceId: launchId })).id, { timeoutMs: 5 * 60_000 });
    const overlayUrl = (await eastCloud.getOverlay(String((made.result as { overlayId: string }).overlayId)))?.url ?? '';
    const syn = await eastCloud.waitForOperation((await eastCloud.provisionInstance({ hostId: ea, overlayUrl })).id, { timeoutMs: 5 * 60_000 });
    const synthesized = syn.result as { instanceId: string; hostPort: number; earlyStart?: string };
    expect(synthesized.earlyStart).toBe('own');
    const app = new GuestAppClient(synthesized.hostPort);
    expect((await app.state()).token).toBe('tok-synthesized');
    expect(await guestExec(synthesized.hostPort, CHURN)).toBe('started');
    await waitFor('the guest\'s writer to write', async () => Number(await guestExec(synthesized.hostPort, 'cat /run/seq')) > 1, 60_000);

    const op = await eastCloud.handoffInstance(synthesized.instanceId, handoffBody({ verify: 'full', hostId: west.hosts[0] ?? '' }));
    const s = await eastCloud.waitForOperation(op.id, { timeoutMs: 15 * 60_000 });
    expect(s.error).toBeUndefined();
    const r = s.result as { destination: { appEndpoint: string; hostId: string }; verified: { memorySha256: string } };
    expect(r.verified.memorySha256).toMatch(/^[0-9a-f]{64}$/);
    const port = Number(r.destination.appEndpoint.split(':')[1]);
    await guestExec(port, 'sync; echo 3 > /proc/sys/vm/drop_caches; echo dropped');
    const st = await new GuestAppClient(port).state();
    expect(st.token).toBe('tok-synthesized');
    expect(st.disk).toBe('state of the launch VM');
    // The source's VM, its directory and the pool's symlink to it are gone.
    const eastHost = path.join(east.config.varDir, 'hosts', ea);
    expect(fs.existsSync(path.join(eastHost, 'instances', synthesized.instanceId))).toBe(false);
    expect(fs.readdirSync(path.join(eastHost, 'pool')).filter((n) => /^p[0-9a-f]{8}$/.test(n))).toEqual([]);
    await westCloud.waitForOperation((await westCloud.terminateInstance(synthesized.instanceId)).id, { timeoutMs: 5 * 60_000 });
  });

  it('a destination host without the base gets its package from the source, imports it, then receives the VM', async () => {
    const wn = west.hosts[1] ?? '';
    expect((await westCloud.listBases()).find((b) => b.id === pkg.baseId)?.hostIds).not.toContain(wn);
    const inst = await runningInstance('base');
    const op = await eastCloud.handoffInstance(inst.id, handoffBody({ hostId: wn }));
    const s = await eastCloud.waitForOperation(op.id, { timeoutMs: 15 * 60_000 });
    expect(s.error).toBeUndefined();
    const r = s.result as { base?: { baseId: string; bytes: number; importMs: number }; destination: { appEndpoint: string; hostId: string } };
    expect(r.base?.baseId).toBe(pkg.baseId);
    expect(r.base?.bytes).toBe(fs.statSync(pkg.packageFile).size);
    expect(s.progress?.done.some((d) => /^base sent: [0-9.]+ MB/.test(d))).toBe(true);
    expect(r.destination.hostId).toBe(wn);
    expect((await new GuestAppClient(Number(r.destination.appEndpoint.split(':')[1])).state()).token).toBe('tok-base');
    // The destination cluster lists the base on that host now (a second handoff there sends none),
    // and the package it received is gone.
    expect((await westCloud.listBases()).find((b) => b.id === pkg.baseId)?.hostIds).toContain(wn);
    const wnDir = path.join(west.config.varDir, 'hosts', wn);
    expect(!fs.existsSync(path.join(wnDir, 'handoffs')) || fs.readdirSync(path.join(wnDir, 'handoffs')).length === 0).toBe(true);
  });

  it('the CLI hands an instance off through the API and shows every round', async () => {
    const inst = await runningInstance('cli');
    const stdout = new Capture();
    const stderr = new Capture();
    const code = await runCli(['--json', 'instance', 'handoff', inst.id, '--to', westApi.url, '--to-host', west.hosts[0] ?? ''], {
      stdout,
      stderr,
      env: { CLOUDLET_API_URL: eastApi.url, CLOUDLET_API_TOKEN: eastToken, CLOUDLET_DESTINATION_TOKEN: westToken },
    });
    expect(stderr.text).toMatch(/round 1: [0-9.]+ MB sent/);
    expect(stderr.text).toMatch(/last round: [0-9.]+ MB sent/);
    expect(code).toBe(0);
    const out = JSON.parse(stdout.text) as { instanceId: string; rounds: number; destination: { appEndpoint: string } };
    expect(out.instanceId).toBe(inst.id);
    expect((await new GuestAppClient(Number(out.destination.appEndpoint.split(':')[1])).state()).token).toBe('tok-cli');
    // Without credentials for the destination the CLI says what to pass, and nothing starts.
    const none = await runCli(['--json', 'instance', 'handoff', 'i-whatever', '--to', westApi.url], { stdout: new Capture(), stderr: new Capture(), env: { CLOUDLET_API_URL: eastApi.url, CLOUDLET_API_TOKEN: eastToken } });
    expect(none).not.toBe(0);
  });

  it('refuses a missing, forged or used ticket; nothing is received', async () => {
    const t = await fetch(`${westApi.url}/v1/handoffs`, {
      method: 'POST',
      headers: { authorization: `Bearer ${westToken}`, 'content-type': 'application/json' },
      body: JSON.stringify({ instanceId: `probe-${west.suffix}`, baseId: pkg.baseId, hostId: west.hosts[0] }),
    });
    expect(t.status).toBe(201);
    const ticket = (await t.json()) as { handoffId: string; ticket: string; receiverUrl: string };
    // Wrong credentials for a ticket.
    const noCred = await fetch(`${westApi.url}/v1/handoffs`, { method: 'POST', headers: { authorization: 'Bearer wrong-token-0123456789', 'content-type': 'application/json' }, body: JSON.stringify({ instanceId: 'x', baseId: pkg.baseId }) });
    expect(noCred.status).toBe(401);
    // Forged ticket at the receiver and at the API.
    const forged = `${ticket.ticket.split('.')[0]}.${Buffer.alloc(32, 1).toString('base64url')}`;
    const put = (bearer: string) => fetch(`${ticket.receiverUrl}/rounds/1`, { method: 'PUT', headers: { authorization: `Bearer ${bearer}`, 'content-type': 'application/octet-stream', 'upload-offset': '0' }, body: Buffer.alloc(1000, 7) });
    expect((await put(forged)).status).toBe(401);
    expect((await fetch(`${westApi.url}/v1/handoffs/${ticket.handoffId}`, { headers: { authorization: `Bearer ${forged}` } })).status).toBe(401);
    // Abort with the good ticket; afterwards the same ticket is refused (used up) and nothing was kept.
    const aborted = await fetch(`${westApi.url}/v1/handoffs/${ticket.handoffId}`, { method: 'DELETE', headers: { authorization: `Bearer ${ticket.ticket}` } });
    expect(aborted.status).toBe(200);
    expect(((await aborted.json()) as { phase: string }).phase).toBe('aborted');
    expect((await put(ticket.ticket)).status).toBe(403);
    const round = await fetch(`${westApi.url}/v1/handoffs/${ticket.handoffId}/rounds`, { method: 'POST', headers: { authorization: `Bearer ${ticket.ticket}`, 'content-type': 'application/json' }, body: JSON.stringify({ round: 1, final: false }) });
    expect(round.status).toBe(403);
    expect(fs.existsSync(path.join(west.config.varDir, 'hosts', west.hosts[0] ?? '', 'handoffs', ticket.handoffId))).toBe(false);
    expect((await listTickets()).find((x) => x.handoffId === ticket.handoffId)).toMatchObject({ state: 'aborted' });

    // A ticket is a catalog record, like a token: listed (never in clear), and an admin revokes it
    // without a restart. The revoked ticket is refused by the API (401) and by the receiving host
    // (its handoff is aborted: 403), and the host keeps nothing.
    const t2res = await fetch(`${westApi.url}/v1/handoffs`, {
      method: 'POST',
      headers: { authorization: `Bearer ${westToken}`, 'content-type': 'application/json' },
      body: JSON.stringify({ instanceId: `probe2-${west.suffix}`, baseId: pkg.baseId, hostId: west.hosts[0], tenant: 'acme' }),
    });
    expect(t2res.status).toBe(201);
    const t2 = (await t2res.json()) as { handoffId: string; ticket: string; receiverUrl: string };
    const listed = await fetch(`${westApi.url}/v1/handoff-tickets`, { headers: { authorization: `Bearer ${westToken}` } }).then((x) => x.text());
    expect(listed).not.toContain(t2.ticket);
    expect((await listTickets()).find((x) => x.handoffId === t2.handoffId)).toMatchObject({ state: 'live', instanceId: `probe2-${west.suffix}`, hostId: west.hosts[0] });
    const put2 = () => fetch(`${t2.receiverUrl}/rounds/1`, { method: 'PUT', headers: { authorization: `Bearer ${t2.ticket}`, 'content-type': 'application/octet-stream', 'upload-offset': '0' }, body: Buffer.alloc(1000, 7) });
    expect((await put2()).status).toBe(200);
    const revoke = () => fetch(`${westApi.url}/v1/handoff-tickets/${t2.handoffId}`, { method: 'DELETE', headers: { authorization: `Bearer ${westToken}` } });
    const revoked = await revoke();
    expect(revoked.status).toBe(200);
    expect(await revoked.json()).toMatchObject({ handoffId: t2.handoffId, state: 'revoked', tenant: 'acme' });
    expect((await fetch(`${westApi.url}/v1/handoffs/${t2.handoffId}`, { headers: { authorization: `Bearer ${t2.ticket}` } })).status).toBe(401);
    expect((await put2()).status).toBe(403);
    expect(fs.existsSync(path.join(west.config.varDir, 'hosts', west.hosts[0] ?? '', 'handoffs', t2.handoffId))).toBe(false);
    expect(((await (await revoke()).json()) as { state: string }).state).toBe('revoked');
    expect((await fetch(`${westApi.url}/v1/handoff-tickets/ho-never-issued`, { method: 'DELETE', headers: { authorization: `Bearer ${westToken}` } })).status).toBe(404);
  });

  it('a cancelled handoff resumes the source, which keeps serving, and leaves nothing at the destination', async () => {
    const inst = await runningInstance('cancel');
    const op = await eastCloud.handoffInstance(inst.id, handoffBody({ hostId: west.hosts[0] ?? '', policy: { maxRounds: 50, targetFinalMs: 0 } }));
    await waitFor('round 2 to begin', async () => ((await eastCloud.getOperation(op.id))?.progress?.done ?? []).some((d) => /^round 1:/.test(d)), 5 * 60_000);
    await east.client.workflow.getHandle(op.id).cancel();
    const s = await ended(op.id);
    expect(s.state).toBe('cancelled');
    const app = new GuestAppClient(inst.port);
    expect((await app.state()).token).toBe('tok-cancel');
    const seq = Number(await guestExec(inst.port, 'cat /run/seq'));
    await waitFor('the source to keep writing', async () => Number(await guestExec(inst.port, 'cat /run/seq')) > seq, 60_000);
    const westHost = path.join(west.config.varDir, 'hosts', west.hosts[0] ?? '');
    await waitFor('the destination to remove the handoff', async () => !fs.existsSync(path.join(westHost, 'handoffs')) || fs.readdirSync(path.join(westHost, 'handoffs')).length === 0, 120_000);
    expect(fs.existsSync(path.join(westHost, 'instances', inst.id))).toBe(false);
    // The admission the destination took for the VM went with the rest.
    expect(fs.existsSync(path.join(westHost, 'admitted', `${inst.id}.json`))).toBe(false);
  });

  it('a destination host without room for the VM refuses it: the source keeps serving, nothing is left there', async () => {
    const inst = await runningInstance('full');
    // The west host's memory is all taken (an admission as large as any host), for this test only.
    const westHost = path.join(west.config.varDir, 'hosts', west.hosts[0] ?? '');
    const hog = path.join(westHost, 'admitted', 'i-hog.json');
    fs.mkdirSync(path.dirname(hog), { recursive: true });
    fs.writeFileSync(hog, JSON.stringify({ instanceId: 'i-hog', memoryBytes: 2 ** 50, at: new Date().toISOString() }));
    try {
      // The destination has the base, so it admits the VM before it issues the ticket: the request
      // for the handoff is refused, and no handoff starts.
      await expect(eastCloud.handoffInstance(inst.id, handoffBody({ hostId: west.hosts[0] ?? '' }))).rejects.toThrow(/no room for instance/);
    } finally {
      fs.rmSync(hog, { force: true });
    }
    const app = new GuestAppClient(inst.port);
    expect((await app.state()).token).toBe('tok-full');
    const seq = Number(await guestExec(inst.port, 'cat /run/seq'));
    await waitFor('the source to keep writing', async () => Number(await guestExec(inst.port, 'cat /run/seq')) > seq, 60_000);
    await waitFor('the destination to remove the handoff', async () => !fs.existsSync(path.join(westHost, 'handoffs')) || fs.readdirSync(path.join(westHost, 'handoffs')).length === 0, 120_000);
    expect(fs.existsSync(path.join(westHost, 'instances', inst.id))).toBe(false);
    expect(fs.existsSync(path.join(westHost, 'admitted', `${inst.id}.json`))).toBe(false);
  });

  it('a destination killed mid-handoff leaves the source running and serving; back again, it removes what it had', async () => {
    const inst = await runningInstance('killed');
    const op = await eastCloud.handoffInstance(inst.id, handoffBody({ hostId: wb, policy: { maxRounds: 50, targetFinalMs: 0 } }));
    const wbDir = path.join(REPO, 'var', 'hosts', wb);
    await waitFor('round 1 to be applied at the destination', async () => ((await eastCloud.getOperation(op.id))?.progress?.done ?? []).some((d) => /^round 1:/.test(d)), 5 * 60_000);
    wbWorker?.kill('SIGKILL');
    const s = await ended(op.id);
    expect(s.state).toBe('failed');
    expect(s.error?.type).toBe('DESTINATION_UNAVAILABLE');
    const app = new GuestAppClient(inst.port);
    expect((await app.state()).token).toBe('tok-killed');
    const seq = Number(await guestExec(inst.port, 'cat /run/seq'));
    await waitFor('the source to keep writing', async () => Number(await guestExec(inst.port, 'cat /run/seq')) > seq, 60_000);
    // The destination comes back and removes what it had (the source's abort, or its idle timeout).
    startWb();
    await waitFor('the destination to remove the handoff', async () => !fs.existsSync(path.join(wbDir, 'handoffs')) || fs.readdirSync(path.join(wbDir, 'handoffs')).length === 0, 5 * 60_000);
    expect(fs.existsSync(path.join(wbDir, 'instances', inst.id))).toBe(false);
    expect(fs.existsSync(path.join(wbDir, 'admitted', `${inst.id}.json`))).toBe(false);
    // Its receiving run ends failed (listed as provisioning until then, not at all after).
    await waitFor('the receiving run to end', async () => (await westCloud.listInstances()).find((i) => i.id === inst.id) === undefined, 120_000);
  });
});

function startWorkerProcess(hostId: string, namespace: string, queue: string): ChildProcess {
  return spawn(process.execPath, ['--import', 'tsx', path.join(REPO, 'src', 'workers', 'main.ts'), '--host', hostId], {
    stdio: 'ignore',
    env: { ...process.env, CLOUDLET_NAMESPACE: namespace, CLOUDLET_WORKFLOW_QUEUE: queue, CLOUDLET_LOG_LEVEL: 'warn' },
  });
}
