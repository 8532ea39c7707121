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
 * @typedef {{ type: string, id?: number, message?: string }} Message
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
 * Copy `src` to `dst`, holding each chunk `delayMs` (never less) after it arrived or after
 * `notBefore` (performance.now() time), whichever is later, in order, ending `dst` after the last
 * chunk. Reading from `src` pauses while more than `bufferBytes` wait.
 * @param {net.Socket} src
 * @param {net.Socket} dst
 * @param {number} delayMs
 * @param {number} bufferBytes
 * @param {number} [notBefore]
 */
function forward(src, dst, delayMs, bufferBytes, notBefore = 0) {
  if (delayMs <= 0) {
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
    if (paused && backlog() <= bufferBytes / 2) {
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
    const due = Math.max(performance.now(), notBefore) + delayMs;
    queue.push({ due, chunk });
    if (chunk !== null) {
      queued += chunk.length;
      if (!paused && backlog() > bufferBytes) {
        paused = true;
        src.pause();
      }
    }
    // A pending timer serves the head, which is due before this chunk.
    if (timer === undefined) timer = setTimeout(flush, Math.max(1, Math.ceil(due - performance.now())));
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
 * at least (see runClient).
 * @param {net.Socket} a
 * @param {net.Socket} b
 * @param {number} upDelayMs
 * @param {number} downDelayMs
 * @param {number} bufferBytes
 * @param {number} [upNotBefore]
 */
function join(a, b, upDelayMs, downDelayMs, bufferBytes, upNotBefore = 0) {
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
  forward(a, b, upDelayMs, bufferBytes, upNotBefore);
  forward(b, a, downDelayMs, bufferBytes);
}

/** @param {ClientConfig} config */
function runClient(config) {
  process.on('message', (/** @type {Message} */ m, /** @type {unknown} */ handle) => {
    if (m.type !== 'listen' || !(handle instanceof net.Server)) return;
    onStop.push(() => handle.close());
    handle.on('connection', (/** @type {net.Socket} */ client) => {
      // The kernel completed the client's handshake on 127.0.0.1 at once; over the emulated link
      // it takes one round trip, so the client's first bytes leave one RTT after it connected.
      const handshakeDone = performance.now() + config.handshakeMs;
      const onward = net.connect({ ...config.serverRelay, allowHalfOpen: true, noDelay: true });
      join(client, onward, config.upDelayMs, 0, config.bufferBytes, handshakeDone);
    });
    process.send?.({ type: 'ready' });
  });
}

/** @param {ServerConfig} config */
function runServer(config) {
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
    const s = waiting.get(m.id ?? 0);
    waiting.delete(m.id ?? 0);
    if (m.type === 'connected' && handle instanceof net.Socket) {
      if (!s || s.destroyed) handle.destroy();
      else join(s, handle, 0, config.downDelayMs, config.bufferBytes);
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
      process.stdout.write(`${JSON.stringify({ ready: { host: bound.address, port: bound.port }, pids: { client: client.pid, server: server.pid } })}\n`);
    });
  });
}

/** @type {RootConfig | ClientConfig | ServerConfig} */
const config = JSON.parse(process.argv[2] ?? '{}');
process.on('SIGTERM', () => stop(0));
process.on('SIGINT', () => stop(0));
if (config.mode === 'root') {
  process.stdin.on('end', () => stop(0));
  process.stdin.on('error', () => stop(0));
  process.stdin.resume();
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
