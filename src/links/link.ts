/**
 * An emulated edge link between a client on this machine and a TCP server on 127.0.0.1, with a
 * bandwidth limit and a round-trip delay (docs/links.md):
 *
 *   client → 127.0.0.1:port ─accepted by─▶ client relay in namespace cl-link-<id>-c (holds requests rtt/2)
 *          → TCP over a veth pair, tbf-shaped at both ends
 *          → server relay in namespace cl-link-<id>-s (holds replies rtt/2) → the target 127.0.0.1:targetPort
 *
 * The listening socket on 127.0.0.1 and each connection to the target are made in the root
 * namespace by a third relay that moves no data, and reach the relays inside the namespaces as
 * file descriptors over Node's IPC channel. No address is ever put on an interface of the root
 * namespace; the veth's addresses exist only inside the link's own two namespaces. Needs root and
 * iproute2 (`ip`, `tc`).
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { CloudletError } from '../core/errors';
import { processAlive } from '../common/process';
import {
  linkIdOfNamespace,
  linkNames,
  parseOpenLinkOptions,
  parseRttMs,
  profileWithRtt,
  relayBufferBytes,
  relayDelays,
  SERVER_RELAY_PORT,
  tbfArgs,
  tbfParams,
  VETH_ADDRESSES,
  type LinkNames,
  type LinkProfile,
  type OpenLinkOptions,
  type TbfParams,
} from './profiles';

/** Counters of one direction's tbf qdisc (`tc -s qdisc`). */
export interface DirectionStats {
  bytes: number;
  packets: number;
  drops: number;
  overlimits: number;
  backlogBytes: number;
}

export interface LinkStats {
  /** client → server (the tbf on the client namespace's veth end). */
  up: DirectionStats;
  /** server → client (the tbf on the server namespace's veth end). */
  down: DirectionStats;
}

export interface Link {
  readonly id: string;
  /** Always 127.0.0.1: clients connect here instead of the target. */
  readonly host: string;
  readonly port: number;
  readonly target: { host: string; port: number };
  /** The profile as it is now: after setDelay, its rttMs (and name, `custom-<rate>mbit-<rtt>ms`) follow. */
  readonly profile: LinkProfile;
  readonly tbf: TbfParams;
  readonly namespaces: { client: string; server: string };
  /** `http://127.0.0.1:<port><path>`. */
  url(pathname?: string): string;
  stats(): Promise<LinkStats>;
  /**
   * Changes the round-trip delay while the link runs (0..10000 ms): rtt/2 each way and rtt for a
   * new connection's handshake, for every byte the relays read from when it resolves, on open
   * connections too. Bytes already held keep their release time and nothing is reordered, so a
   * shorter delay takes effect once what was held under the longer one has gone. The rate stays.
   */
  setDelay(rttMs: number): Promise<void>;
  /** Stops the relays and deletes the namespaces (with the veth pair). Idempotent. */
  close(): Promise<void>;
}

/** Where each link keeps its owner file (who opened it, for removeStaleLinks): <tmpdir>/cloudlet-links/<id>/. */
export const LINKS_DIR = path.join(os.tmpdir(), 'cloudlet-links');

const RELAY_READY_MS = 15_000;
const RELAY_STOP_MS = 3_000;
/** How long the relays have to acknowledge a new delay. */
const SET_DELAY_MS = 5_000;

interface Owner {
  pid: number;
  relayPid: number | undefined;
  profile: LinkProfile;
  target: { host: string; port: number };
  createdAt: string;
}

interface RootRelay {
  child: ChildProcess;
  ready: Promise<{ port: number; pids: { client: number; server: number } }>;
  exited: Promise<void>;
  /** Called with every JSON line the root relay prints after its ready line (acks of setDelay). */
  lines: Set<(line: RelayLine) => void>;
  /** The root relay's last stderr output, for error messages. */
  stderr(): string;
}

/** What the root relay prints after its ready line (relay.mjs). */
interface RelayLine {
  ack?: { seq: number; relay: 'client' | 'server' };
  error?: { seq: number | null; message: string };
}

function linkDir(id: string): string {
  return path.join(LINKS_DIR, id);
}

/** The relay script next to this module (src/links), or in the source tree when run from dist/. */
function relayScript(): string {
  const here = path.join(__dirname, 'relay.mjs');
  return existsSync(here) ? here : path.resolve(__dirname, '..', '..', 'src', 'links', 'relay.mjs');
}

const IPROUTE_FIX = 'apt-get install iproute2';

function run(cmd: 'ip' | 'tc', args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: 30_000 }, (err, stdout, stderr) => {
      if (!err) return resolve(stdout);
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        return reject(new CloudletError('LINK_UNAVAILABLE', `\`${cmd}\` is not installed, so no emulated link can be built`, { fix: IPROUTE_FIX, cause: err }));
      }
      reject(
        new CloudletError('LINK_UNAVAILABLE', `\`${cmd} ${args.join(' ')}\` failed (${(stderr || err.message).trim()})`, {
          fix: 'links need root and a kernel with network namespaces, veth and the tbf qdisc; check `ip netns list` and `tc -s qdisc`',
          cause: err,
          details: { cmd, args },
        }),
      );
    });
  });
}

/** Fails with a clear error when links cannot work here: not root, or iproute2 missing. */
export async function checkLinkTools(): Promise<void> {
  if (typeof process.getuid === 'function' && process.getuid() !== 0) {
    throw new CloudletError('LINK_UNAVAILABLE', 'emulated links need root (network namespaces, veth pairs and tc qdiscs)', {
      fix: 'run as root',
    });
  }
  await run('ip', ['-V']);
  await run('tc', ['-V']);
}

async function listNamespaces(): Promise<string[]> {
  const out = await run('ip', ['netns', 'list']);
  return out
    .split('\n')
    .map((l) => l.trim().split(/\s+/)[0] ?? '')
    .filter(Boolean);
}

/** Starts the root relay, which starts the other two inside the namespaces (relay.mjs). */
function startRootRelay(config: Record<string, unknown>): RootRelay {
  const child = spawn(process.execPath, [relayScript(), JSON.stringify({ mode: 'root', ...config })], { stdio: ['pipe', 'pipe', 'pipe'] });
  // A write after the relay died fails with EPIPE; the exit is what reports it.
  child.stdin?.on('error', () => undefined);
  const lines = new Set<(line: RelayLine) => void>();
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (d: string) => {
    stderr = (stderr + d).slice(-2000);
  });
  const exited = new Promise<void>((resolve) => {
    child.once('exit', () => resolve());
    child.once('error', () => resolve());
  });
  const ready = new Promise<{ port: number; pids: { client: number; server: number } }>((resolve, reject) => {
    let out = '';
    let first = true;
    const timer = setTimeout(() => {
      reject(new CloudletError('TIMEOUT', `the link's relays did not start within ${RELAY_READY_MS} ms (${stderr.trim() || 'no output'})`, { fix: 'check the load of this machine and retry' }));
    }, RELAY_READY_MS);
    child.stdout?.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      for (let nl = out.indexOf('\n'); nl >= 0; nl = out.indexOf('\n')) {
        const text = out.slice(0, nl);
        out = out.slice(nl + 1);
        if (first) {
          first = false;
          clearTimeout(timer);
          try {
            const line = JSON.parse(text) as { ready: { port: number }; pids: { client: number; server: number } };
            resolve({ port: line.ready.port, pids: line.pids });
          } catch (e) {
            reject(new CloudletError('LINK_UNAVAILABLE', `the link's root relay printed ${JSON.stringify(text.slice(0, 200))} instead of its ready line`, { cause: e }));
          }
          continue;
        }
        let line: RelayLine;
        try {
          line = JSON.parse(text) as RelayLine;
        } catch {
          continue;
        }
        for (const f of lines) f(line);
      }
    });
    child.once('error', (e) => {
      clearTimeout(timer);
      reject(new CloudletError('LINK_UNAVAILABLE', `the link's root relay could not be started (${e.message})`, { cause: e }));
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(
        new CloudletError('LINK_UNAVAILABLE', `the link's relays exited (${signal ?? `code ${code}`}) before they were ready: ${stderr.trim() || 'no output'}`, {
          fix: 'run `ip netns list` and `tc -s qdisc`; remove leftovers with removeStaleLinks()',
        }),
      );
    });
  });
  // The caller may give up on `ready` (building the namespaces failed); the rejection is reported there.
  ready.catch(() => undefined);
  return { child, ready, exited, lines, stderr: () => stderr.trim() };
}

async function stopRelay(r: RootRelay): Promise<void> {
  if (r.child.pid === undefined || r.child.exitCode !== null || r.child.signalCode !== null) return;
  r.child.stdin?.end();
  r.child.kill('SIGTERM');
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<'late'>((resolve) => {
    timer = setTimeout(() => resolve('late'), RELAY_STOP_MS);
  });
  if ((await Promise.race([r.exited, late])) === 'late') {
    r.child.kill('SIGKILL');
    await r.exited;
  }
  clearTimeout(timer);
}

/** Kills whatever still runs inside a namespace of ours and deletes the namespace (and so its veth end). */
async function deleteNamespace(ns: string): Promise<void> {
  if (!(await listNamespaces()).includes(ns)) return;
  const pids = await run('ip', ['netns', 'pids', ns]).catch(() => '');
  for (const pid of pids.split(/\s+/).filter(Boolean).map(Number)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  await run('ip', ['netns', 'del', ns]);
}

async function teardown(id: string, relay: RootRelay | undefined): Promise<void> {
  if (relay) await stopRelay(relay);
  const n = linkNames(id);
  await deleteNamespace(n.clientNs);
  await deleteNamespace(n.serverNs);
  await rm(linkDir(id), { recursive: true, force: true });
}

async function buildNamespaces(n: LinkNames, tbf: TbfParams): Promise<void> {
  await run('ip', ['netns', 'add', n.clientNs]);
  await run('ip', ['netns', 'add', n.serverNs]);
  // Both ends are created directly inside their namespaces; the root namespace never sees them.
  await run('ip', ['link', 'add', n.clientDev, 'netns', n.clientNs, 'type', 'veth', 'peer', 'name', n.serverDev, 'netns', n.serverNs]);
  for (const [ns, dev, addr] of [
    [n.clientNs, n.clientDev, VETH_ADDRESSES.client],
    [n.serverNs, n.serverDev, VETH_ADDRESSES.server],
  ] as const) {
    await run('ip', ['-n', ns, 'addr', 'add', `${addr}/${VETH_ADDRESSES.prefix}`, 'dev', dev]);
    await run('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
    await run('ip', ['-n', ns, 'link', 'set', dev, 'up']);
    await run('tc', tbfArgs(ns, dev, tbf));
  }
}

function newLinkId(): string {
  return `${process.pid.toString(36)}${randomBytes(3).toString('hex')}`.slice(-12);
}

/**
 * Opens an emulated link to `target` (a TCP server on 127.0.0.0/8) with a named profile
 * (`wifi38`, `mbit100`, `gbit1`) or `{ rateMbit, rttMs }`. Resolves once every relay listens.
 * Removes stale links of dead processes first.
 */
export async function openLink(options: OpenLinkOptions): Promise<Link> {
  const o = parseOpenLinkOptions(options);
  await checkLinkTools();
  // Best effort: a leftover that cannot be removed must not stop a new link (its id differs).
  await removeStaleLinks().catch(() => undefined);
  const id = o.id ?? newLinkId();
  const n = linkNames(id);
  const existing = await listNamespaces();
  if (existing.includes(n.clientNs) || existing.includes(n.serverNs) || existsSync(linkDir(id))) {
    throw new CloudletError('CONFLICT', `a link with id ${id} already exists (namespace ${n.clientNs} or ${linkDir(id)})`, {
      fix: 'pick another id, or close that link (removeStaleLinks({ all: true }) removes every link)',
    });
  }
  const tbf = tbfParams(o.profile);
  const bufferBytes = relayBufferBytes(o.profile);
  let relay: RootRelay | undefined;
  try {
    await mkdir(linkDir(id), { recursive: true });
    await writeOwner(id, undefined, o);
    await buildNamespaces(n, tbf);
    relay = startRootRelay({
      listen: { host: '127.0.0.1', port: o.port },
      target: o.target,
      clientNs: n.clientNs,
      serverNs: n.serverNs,
      serverRelay: { host: VETH_ADDRESSES.server, port: SERVER_RELAY_PORT },
      ...relayDelays(o.profile.rttMs),
      bufferBytes,
    });
    const { port } = await relay.ready;
    await writeOwner(id, relay.child.pid, o);
    return makeLink(id, port, o, tbf, relay);
  } catch (e) {
    await teardown(id, relay).catch(() => undefined);
    throw e;
  }
}

async function writeOwner(id: string, relayPid: number | undefined, o: { profile: LinkProfile; target: { host: string; port: number } }): Promise<void> {
  const owner: Owner = { pid: process.pid, relayPid, profile: o.profile, target: o.target, createdAt: new Date().toISOString() };
  await writeFile(path.join(linkDir(id), 'owner.json'), `${JSON.stringify(owner)}\n`);
}

function makeLink(id: string, port: number, o: { profile: LinkProfile; target: { host: string; port: number } }, tbf: TbfParams, relay: RootRelay): Link {
  const n = linkNames(id);
  let closing: Promise<void> | undefined;
  let profile = o.profile;
  let seq = 0;
  const setDelay = async (rttMs: number): Promise<void> => {
    const rtt = parseRttMs(rttMs);
    if (closing) throw new CloudletError('LINK_UNAVAILABLE', `link ${id} is closed; its delay cannot change`, { fix: 'open a new link' });
    const next = profileWithRtt(o.profile, rtt);
    await sendDelay(relay, ++seq, { ...relayDelays(rtt), bufferBytes: relayBufferBytes(next) });
    profile = next;
    if (!closing) await writeOwner(id, relay.child.pid, { profile, target: o.target }).catch(() => undefined);
  };
  return {
    id,
    host: '127.0.0.1',
    port,
    target: o.target,
    get profile() {
      return profile;
    },
    tbf,
    namespaces: { client: n.clientNs, server: n.serverNs },
    url: (pathname = '/') => `http://127.0.0.1:${port}${pathname.startsWith('/') ? '' : '/'}${pathname}`,
    stats: async () => ({ up: await qdiscStats(n.clientNs, n.clientDev), down: await qdiscStats(n.serverNs, n.serverDev) }),
    setDelay,
    close: () => (closing ??= teardown(id, relay)),
  };
}

/**
 * Sends a new delay to the root relay (a JSON line on its stdin) and waits until both the client
 * and the server relay have acknowledged it (their acks come back as lines on its stdout).
 */
function sendDelay(relay: RootRelay, seq: number, delays: ReturnType<typeof relayDelays> & { bufferBytes: number }): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const acked = new Set<string>();
    const done = (e?: CloudletError): void => {
      clearTimeout(timer);
      relay.lines.delete(onLine);
      relay.child.off('exit', onExit);
      if (e) reject(e);
      else resolve();
    };
    const onLine = (line: RelayLine): void => {
      if (line.ack?.seq === seq) {
        acked.add(line.ack.relay);
        if (acked.has('client') && acked.has('server')) done();
      } else if (line.error && line.error.seq === seq) {
        done(new CloudletError('LINK_UNAVAILABLE', `the link's root relay refused the new delay: ${line.error.message}`));
      }
    };
    const onExit = (): void => done(new CloudletError('LINK_UNAVAILABLE', `the link's relays exited before they took the new delay (${relay.stderr() || 'no output'})`, { fix: 'open a new link' }));
    const timer = setTimeout(() => {
      const missing = ['client', 'server'].filter((r) => !acked.has(r)).join(' and ');
      done(
        new CloudletError('TIMEOUT', `the ${missing} relay of the link did not acknowledge the new delay within ${SET_DELAY_MS} ms`, {
          fix: 'check the load of this machine; the link may be holding the old or the new delay, so close it and open a new one',
          details: { seq, ...delays },
        }),
      );
    }, SET_DELAY_MS);
    if (relay.child.exitCode !== null || relay.child.signalCode !== null || !relay.child.stdin?.writable) return onExit();
    relay.lines.add(onLine);
    relay.child.once('exit', onExit);
    relay.child.stdin.write(`${JSON.stringify({ setDelay: { seq, ...delays } })}\n`);
  });
}

async function qdiscStats(ns: string, dev: string): Promise<DirectionStats> {
  const out = await run('tc', ['-s', '-j', '-n', ns, 'qdisc', 'show', 'dev', dev]);
  const q = (JSON.parse(out) as Array<Record<string, unknown>>).find((x) => x.kind === 'tbf');
  if (!q) throw new CloudletError('NOT_FOUND', `no tbf qdisc on ${dev} in namespace ${ns}`, { fix: 'the link was changed or closed; open a new one' });
  const num = (k: string): number => (typeof q[k] === 'number' ? q[k] : 0);
  return { bytes: num('bytes'), packets: num('packets'), drops: num('drops'), overlimits: num('overlimits'), backlogBytes: num('backlog') };
}

/**
 * Removes links left behind by processes that died without `close()`: their namespaces (with
 * whatever still runs in them), veth pairs, its owner directory and root relay. Links of live processes
 * stay unless `all` is set. Returns the ids removed.
 */
export async function removeStaleLinks(options: { all?: boolean } = {}): Promise<string[]> {
  await checkLinkTools();
  const ids = new Set<string>();
  for (const ns of await listNamespaces()) {
    const id = linkIdOfNamespace(ns);
    if (id) ids.add(id);
  }
  for (const entry of await readdir(LINKS_DIR).catch(() => [] as string[])) ids.add(entry);
  const removed: string[] = [];
  for (const id of ids) {
    const owner = await readOwner(id);
    if (!options.all && (owner ? processAlive(owner.pid) : await beingCreated(id))) continue;
    if (owner?.relayPid !== undefined && (await isRelayOf(owner.relayPid, id))) {
      try {
        process.kill(owner.relayPid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
    await teardown(id, undefined);
    removed.push(id);
  }
  return removed;
}

/** A link directory without its owner file yet, made in the last minute: another process is opening it. */
async function beingCreated(id: string): Promise<boolean> {
  try {
    return Date.now() - (await stat(linkDir(id))).mtimeMs < 60_000;
  } catch {
    return false;
  }
}

async function readOwner(id: string): Promise<Owner | undefined> {
  try {
    return JSON.parse(await readFile(path.join(linkDir(id), 'owner.json'), 'utf8')) as Owner;
  } catch {
    return undefined;
  }
}

/** True when `pid` is still the root relay of link `id` (and not a reused pid). */
async function isRelayOf(pid: number, id: string): Promise<boolean> {
  try {
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8');
    return cmdline.includes('relay.mjs') && cmdline.includes(linkNames(id).clientNs);
  } catch {
    return false;
  }
}
