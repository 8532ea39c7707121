// @ts-check
/**
 * The relay processes of an emulated edge link (docs/links.md). Plain JavaScript on purpose: each
 * link starts three of them, and plain Node starts in ~0.15 s where Node with tsx takes ~1 s here.
 *
 *   node relay.mjs '<json config>'    (config.mode: "root", "client" or "server")
 *
 * root    (root network namespace, started by openLink): listens on 127.0.0.1:<port>, starts the
 *         client and server relays with `ip netns exec`, hands the listening socket to the client
 *         relay, and for every connection the server relay accepts, connects to the target
 *         (127.0.0.1:<targetPort>) and hands that socket over. It never touches a byte of data.
 *         Prints `{"ready":{"host","port"},"pids":{"client","server"}}` once both relays are up.
 * client  (namespace cl-link-<id>-c): accepts the clients' connections on the handed-over socket
 *         and connects each to the server relay over the veth pair; holds client→server bytes
 *         upDelayMs, and a new connection's first bytes until handshakeMs after it was accepted
 *         (a TCP handshake over the emulated link costs one round trip).
 * server  (namespace cl-link-<id>-s): accepts on the veth address and pairs each connection
 *         with a target socket from the root relay; holds server→client bytes downDelayMs.
 *
 * Sockets cross namespaces as file descriptors over Node's IPC channel (a unix socketpair), so no
 * address is ever put on an interface of the root namespace, and data crosses two relays only.
 * Held bytes keep their order; a direction that holds more than bufferBytes (queued plus unsent)
 * stops reading its source until half of that has gone out, so TCP flow control slows the sender.
 *
 * The delays change while the link runs (Link.setDelay): the root relay reads JSON lines on its
 * stdin,
 *   {"setDelay":{"seq":1,"upDelayMs":50,"downDelayMs":50,"handshakeMs":100,"bufferBytes":262144}}
 * passes each to the client and server relays over IPC, and prints their acknowledgements on stdout
 * once they apply it: {"ack":{"seq":1,"relay":"client"}} and {"ack":{"seq":1,"relay":"server"}}
 * (or {"error":{"seq":1,"message":"..."}} for a line it cannot use). A new delay holds every chunk
 * read after it arrived, on open connections too; chunks already held keep their release time,
 * and a chunk is never released before one held earlier, so a shorter delay overtakes nothing.
 *
 * The root relay exits on SIGTERM/SIGINT or when its stdin closes (openLink's process went away),
 * stopping the other two; they also exit when their IPC channel to the root relay closes.
 */
import { spawn } from 'node:child_process';
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import process from 'node:process';
import { clearTimeout, setTimeout } from 'node:timers';

/** @typedef {{ host: string, port: number }} TcpAddress */
/**
 * @typedef {{ mode: 'root', listen: TcpAddress, target: TcpAddress, clientNs: string, serverNs: string,
 *   serverRelay: TcpAddress, upDelayMs: number, downDelayMs: number, handshakeMs: number, bufferBytes: number }} RootConfig
 * @typedef {{ mode: 'client', serverRelay: TcpAddress, upDelayMs: number, handshakeMs: number, bufferBytes: number }} ClientConfig
 * @typedef {{ mode: 'server', serverRelay: TcpAddress, downDelayMs: number, bufferBytes: number }} ServerConfig
 * @typedef {{ type: string, id?: number, message?: string, seq?: number,
 *   upDelayMs?: number, downDelayMs?: number, handshakeMs?: number, bufferBytes?: number }} Message
 * How one direction holds its bytes; shared by all connections of a relay and changed in place
 * by setDelay, so every chunk is held by the settings current when it was read.
 * @typedef {{ delayMs: number, bufferBytes: number }} Hold
 */

const SCRIPT = process.argv[1] ?? '';

/** @type {Set<net.Socket>} */
const sockets = new Set();
/** @type {Array<() => void>} */
const onStop = [];
let stopping = false;

/** @param {number} code */
function stop(code) {
  if (stopping) return;
  stopping = true;
  for (const f of onStop) f();
  for (const s of sockets) s.destroy();
  process.exitCode = code;
  // Give the root relay's children their SIGTERM before the process goes.
  setTimeout(() => process.exit(code), 50).unref();
}

/** @param {string} text */
function warn(text) {
  process.stderr.write(`relay ${process.pid}: ${text}\n`);
}

/** @param {net.Socket} s */
function track(s) {
  sockets.add(s);
  s.on('close', () => sockets.delete(s));
}

/**
 * Copy `src` to `dst`, holding each chunk `hold.delayMs` (as it is when the chunk arrives; never
 * less) after it arrived or after `notBefore` (performance.now() time), whichever is later, and
 * never before a chunk that arrived earlier; ending `dst` after the last chunk. Reading from `src`
 * pauses while more than `hold.bufferBytes` wait. `hold` null: a plain pipe, for the direction a
 * relay never delays.
 * @param {net.Socket} src
 * @param {net.Socket} dst
 * @param {Hold | null} hold
 * @param {number} [notBefore]
 */
function forward(src, dst, hold, notBefore = 0) {
  if (hold === null) {
    src.pipe(dst);
    src.resume();
    return;
  }
  /** @type {Array<{ due: number, chunk: Buffer | null }>} */
  const queue = [];
  let queued = 0;
  let paused = false;
  /** @type {NodeJS.Timeout | undefined} */
  let timer;
  const backlog = () => queued + dst.writableLength;
  const maybeResume = () => {
    if (paused && backlog() <= hold.bufferBytes / 2) {
      paused = false;
      src.resume();
    }
  };
  const flush = () => {
    timer = undefined;
    if (dst.destroyed) {
      queue.length = 0;
      return;
    }
    const now = performance.now();
    for (let head = queue[0]; head !== undefined && head.due <= now; head = queue[0]) {
      queue.shift();
      if (head.chunk === null) {
        dst.end();
        return;
      }
      queued -= head.chunk.length;
      dst.write(head.chunk);
    }
    // Node's timers count whole milliseconds of loop time, so one may fire a little early: the
    // head is checked against the clock and waited for again (never sent before it is due).
    const next = queue[0];
    if (next !== undefined) timer = setTimeout(flush, Math.max(1, Math.ceil(next.due - now)));
    maybeResume();
  };
  /** @param {Buffer | null} chunk */
  const push = (chunk) => {
    if (dst.destroyed) return;
    const now = performance.now();
    const tail = queue[queue.length - 1];
    // After a shorter new delay, a chunk waits for those held before it: never reordered.
    const due = Math.max(Math.max(now, notBefore) + hold.delayMs, tail?.due ?? 0);
    if (tail === undefined && due <= now) {
      // No delay and nothing held: straight through.
      if (chunk === null) dst.end();
      else dst.write(chunk);
    } else {
      queue.push({ due, chunk });
      if (chunk !== null) queued += chunk.length;
      // A pending timer serves the head, which is due no later than this chunk.
      if (timer === undefined) timer = setTimeout(flush, Math.max(1, Math.ceil(due - now)));
    }
    if (chunk !== null && !paused && backlog() > hold.bufferBytes) {
      paused = true;
      src.pause();
    }
  };
  src.on('data', (/** @type {Buffer} */ chunk) => push(chunk));
  src.on('end', () => push(null));
  dst.on('drain', maybeResume);
  dst.on('close', () => clearTimeout(timer));
  src.resume();
}

/**
 * Join two sockets: `a` is the side towards the client. An error on either side (refused, reset)
 * ends both, so the client sees its connection fail. Client bytes are held until `upNotBefore`
 * at least (see runClient). A null hold passes that direction straight through.
 * @param {net.Socket} a
 * @param {net.Socket} b
 * @param {Hold | null} up
 * @param {Hold | null} down
 * @param {number} [upNotBefore]
 */
function join(a, b, up, down, upNotBefore = 0) {
  for (const s of [a, b]) {
    track(s);
    s.allowHalfOpen = true;
    s.setNoDelay(true);
  }
  const fail = (/** @type {Error} */ e) => {
    if (!a.destroyed || !b.destroyed) warn(e.message);
    a.destroy();
    b.destroy();
  };
  a.on('error', fail);
  b.on('error', fail);
  forward(a, b, up, upNotBefore);
  forward(b, a, down);
}

/**
 * Apply a setDelay message to `hold` (and return true), or leave it as it is when a field is not
 * a finite number >= 0 (the root relay checks lines before passing them on).
 * @param {Hold} hold
 * @param {unknown} delayMs
 * @param {unknown} bufferBytes
 */
function setHold(hold, delayMs, bufferBytes) {
  if (!isDelay(delayMs) || !isDelay(bufferBytes)) return false;
  hold.delayMs = delayMs;
  hold.bufferBytes = bufferBytes;
  return true;
}

/**
 * @param {unknown} x
 * @returns {x is number}
 */
function isDelay(x) {
  return typeof x === 'number' && Number.isFinite(x) && x >= 0;
}

/** @param {ClientConfig} config */
function runClient(config) {
  /** @type {Hold} */
  const up = { delayMs: config.upDelayMs, bufferBytes: config.bufferBytes };
  let handshakeMs = config.handshakeMs;
  process.on('message', (/** @type {Message} */ m, /** @type {unknown} */ handle) => {
    if (m.type === 'setDelay') {
      if (setHold(up, m.upDelayMs, m.bufferBytes) && isDelay(m.handshakeMs)) handshakeMs = m.handshakeMs;
      process.send?.({ type: 'setDelayAck', seq: m.seq });
      return;
    }
    if (m.type !== 'listen' || !(handle instanceof net.Server)) return;
    onStop.push(() => handle.close());
    handle.on('connection', (/** @type {net.Socket} */ client) => {
      // The kernel completed the client's handshake on 127.0.0.1 at once; over the emulated link
      // it takes one round trip, so the client's first bytes leave one RTT after it connected.
      const handshakeDone = performance.now() + handshakeMs;
      const onward = net.connect({ ...config.serverRelay, allowHalfOpen: true, noDelay: true });
      join(client, onward, up, null, handshakeDone);
    });
    process.send?.({ type: 'ready' });
  });
}

/** @param {ServerConfig} config */
function runServer(config) {
  /** @type {Hold} */
  const down = { delayMs: config.downDelayMs, bufferBytes: config.bufferBytes };
  /** @type {Map<number, net.Socket>} */
  const waiting = new Map();
  let next = 0;
  const server = net.createServer({ allowHalfOpen: true, noDelay: true, pauseOnConnect: true }, (s) => {
    const id = ++next;
    waiting.set(id, s);
    track(s);
    s.on('close', () => waiting.delete(id));
    s.on('error', () => s.destroy());
    process.send?.({ type: 'connect', id });
  });
  onStop.push(() => server.close());
  process.on('message', (/** @type {Message} */ m, /** @type {unknown} */ handle) => {
    if (m.type === 'setDelay') {
      setHold(down, m.downDelayMs, m.bufferBytes);
      process.send?.({ type: 'setDelayAck', seq: m.seq });
      return;
    }
    const s = waiting.get(m.id ?? 0);
    waiting.delete(m.id ?? 0);
    if (m.type === 'connected' && handle instanceof net.Socket) {
      if (!s || s.destroyed) handle.destroy();
      else join(s, handle, null, down);
    } else if (m.type === 'refused') {
      warn(`the target refused connection ${m.id}: ${m.message}`);
      s?.destroy();
    }
  });
  server.once('error', (e) => {
    warn(`cannot listen on ${config.serverRelay.host}:${config.serverRelay.port}: ${e.message}`);
    stop(1);
  });
  server.listen(config.serverRelay.port, config.serverRelay.host, () => process.send?.({ type: 'ready' }));
}

/** @param {RootConfig} config */
function runRoot(config) {
  const listener = net.createServer();
  /** @type {import('node:child_process').ChildProcess[]} */
  const children = [];
  /** @type {{ client: import('node:child_process').ChildProcess, server: import('node:child_process').ChildProcess } | undefined} */
  let relays;
  /** @param {Record<string, unknown>} line */
  const print = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);
  readLines(process.stdin, (text) => {
    /** @type {unknown} */
    let line;
    try {
      line = JSON.parse(text);
    } catch {
      line = undefined;
    }
    const d = /** @type {{ setDelay?: Record<string, unknown> } | undefined} */ (line)?.setDelay;
    const seq = typeof d?.seq === 'number' ? d.seq : null;
    /** @param {string} message */
    const refuse = (message) => print({ error: { seq, message } });
    if (d === undefined || seq === null) return refuse(`not a setDelay line with a seq: ${text.slice(0, 200)}`);
    const bad = ['upDelayMs', 'downDelayMs', 'handshakeMs', 'bufferBytes'].filter((k) => !isDelay(d[k]));
    if (bad.length > 0) return refuse(`setDelay needs finite numbers >= 0 for ${bad.join(', ')}`);
    if (relays === undefined || stopping || !relays.client.connected || !relays.server.connected) return refuse('the relays are not running');
    relays.client.send({ type: 'setDelay', seq, upDelayMs: d.upDelayMs, handshakeMs: d.handshakeMs, bufferBytes: d.bufferBytes });
    relays.server.send({ type: 'setDelay', seq, downDelayMs: d.downDelayMs, bufferBytes: d.bufferBytes });
  });
  onStop.push(() => {
    listener.close();
    for (const c of children) c.kill('SIGTERM');
  });
  /**
   * @param {string} ns
   * @param {ClientConfig | ServerConfig} childConfig
   */
  const start = (ns, childConfig) => {
    const child = spawn('ip', ['netns', 'exec', ns, process.execPath, SCRIPT, JSON.stringify(childConfig)], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
    children.push(child);
    child.on('message', (/** @type {Message} */ m) => {
      if (m.type === 'setDelayAck') print({ ack: { seq: m.seq, relay: childConfig.mode } });
    });
    child.on('exit', (code, signal) => {
      if (!stopping) {
        warn(`the ${childConfig.mode} relay in ${ns} exited (${signal ?? `code ${code}`})`);
        stop(1);
      }
    });
    child.on('error', (e) => {
      warn(`cannot start the ${childConfig.mode} relay in ${ns}: ${e.message}`);
      stop(1);
    });
    return child;
  };
  const readyOf = (/** @type {import('node:child_process').ChildProcess} */ c) =>
    new Promise((resolve) => c.on('message', (/** @type {Message} */ m) => m.type === 'ready' && resolve(undefined)));

  listener.once('error', (e) => {
    warn(`cannot listen on ${config.listen.host}:${config.listen.port}: ${e.message}`);
    stop(1);
  });
  listener.listen(config.listen.port, config.listen.host, () => {
    const bound = /** @type {net.AddressInfo} */ (listener.address());
    const client = start(config.clientNs, {
      mode: 'client',
      serverRelay: config.serverRelay,
      upDelayMs: config.upDelayMs,
      handshakeMs: config.handshakeMs,
      bufferBytes: config.bufferBytes,
    });
    const server = start(config.serverNs, { mode: 'server', serverRelay: config.serverRelay, downDelayMs: config.downDelayMs, bufferBytes: config.bufferBytes });
    server.on('message', (/** @type {Message} */ m) => {
      if (m.type !== 'connect') return;
      const target = net.connect(config.target);
      // Not a byte is read here: the socket goes to the server relay with its data unread.
      target.pause();
      target.once('connect', () => server.send({ type: 'connected', id: m.id }, target, (e) => e && target.destroy()));
      target.once('error', (e) => server.connected && server.send({ type: 'refused', id: m.id, message: e.message }));
    });
    // The listening socket goes to the client relay, which accepts from then on; ours closes.
    client.send({ type: 'listen' }, listener, () => listener.close());
    Promise.all([readyOf(client), readyOf(server)]).then(() => {
      relays = { client, server };
      print({ ready: { host: bound.address, port: bound.port }, pids: { client: client.pid, server: server.pid } });
    });
  });
}

/**
 * Call `onLine` with each line of `stream` (a line longer than 64 KiB is dropped).
 * @param {NodeJS.ReadableStream} stream
 * @param {(line: string) => void} onLine
 */
function readLines(stream, onLine) {
  let buffered = '';
  stream.setEncoding('utf8');
  stream.on('data', (/** @type {string} */ d) => {
    buffered += d;
    for (let nl = buffered.indexOf('\n'); nl >= 0; nl = buffered.indexOf('\n')) {
      const line = buffered.slice(0, nl).trim();
      buffered = buffered.slice(nl + 1);
      if (line !== '') onLine(line);
    }
    if (buffered.length > 64 * 1024) buffered = '';
  });
}

/** @type {RootConfig | ClientConfig | ServerConfig} */
const config = JSON.parse(process.argv[2] ?? '{}');
process.on('SIGTERM', () => stop(0));
process.on('SIGINT', () => stop(0));
if (config.mode === 'root') {
  process.stdin.on('end', () => stop(0));
  process.stdin.on('error', () => stop(0));
  runRoot(config);
} else {
  process.on('disconnect', () => stop(0));
  if (config.mode === 'client') runClient(config);
  else if (config.mode === 'server') runServer(config);
  else {
    warn(`unknown mode in ${process.argv[2]}`);
    stop(2);
  }
}
