import net from 'node:net';
import { performance } from 'node:perf_hooks';
import { CloudletError } from '../../src/core/errors';
import { formatDeviceAddress, measureDeviceRtt, median, parseDeviceAddress, startRttResponder, type DeviceAddress, type RttResponder } from '../../src/core/mobility/rtt';

/** A TCP server on 127.0.0.1 whose connections `onConnection` handles; closed after each test. */
const servers: net.Server[] = [];
const openSockets = new Set<net.Socket>();
async function tcpServer(onConnection: (socket: net.Socket) => void): Promise<DeviceAddress> {
  const server = net.createServer((socket) => {
    openSockets.add(socket);
    socket.on('close', () => openSockets.delete(socket));
    socket.on('error', () => socket.destroy());
    onConnection(socket);
  });
  servers.push(server);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const a = server.address() as net.AddressInfo;
  return { host: '127.0.0.1', port: a.port };
}

/** Lines received on a socket, one call per complete line. */
function onLines(socket: net.Socket, handle: (line: string) => void): void {
  let buffered = '';
  socket.setEncoding('utf8');
  socket.on('data', (chunk: string) => {
    buffered += chunk;
    let nl: number;
    while ((nl = buffered.indexOf('\n')) >= 0) {
      const line = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      handle(line);
    }
  });
}

let responder: RttResponder | undefined;

afterEach(async () => {
  await responder?.close();
  responder = undefined;
  for (const s of openSockets) s.destroy();
  await Promise.all(servers.splice(0).map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
});

async function measureError(address: DeviceAddress, options: Parameters<typeof measureDeviceRtt>[1] = {}): Promise<CloudletError> {
  const err: unknown = await measureDeviceRtt(address, options).then(
    (m) => m,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(CloudletError);
  return err as CloudletError;
}

describe('parseDeviceAddress', () => {
  test('host:port and [v6]:port are accepted', () => {
    expect(parseDeviceAddress('10.0.0.7:7070')).toEqual({ host: '10.0.0.7', port: 7070 });
    expect(parseDeviceAddress('phone.lan:1')).toEqual({ host: 'phone.lan', port: 1 });
    expect(parseDeviceAddress('h:65535')).toEqual({ host: 'h', port: 65535 });
    expect(parseDeviceAddress('[::1]:80')).toEqual({ host: '::1', port: 80 });
    expect(parseDeviceAddress('[fd00::7]:7070')).toEqual({ host: 'fd00::7', port: 7070 });
    expect(parseDeviceAddress('  west:9  ')).toEqual({ host: 'west', port: 9 });
  });

  test.each(['nohost', 'h:0', 'h:70000', 'h:65536', '', ':80', 'h:', '::1:80', '[::1]', 'h:80:80', 'h :80', 'a/b:80', 'h:123456', 'h:-1'])('"%s" is refused with BAD_INPUT', (text) => {
    let caught: unknown;
    try {
      parseDeviceAddress(text);
    } catch (e) {
      caught = e;
    }
    expect(caught).toBeInstanceOf(CloudletError);
    expect((caught as CloudletError).code).toBe('BAD_INPUT');
    expect((caught as CloudletError).message).toContain(`device address "${text}" is not host:port`);
    expect((caught as CloudletError).fix).toContain('RTT responder');
  });

  test('formatDeviceAddress gives back what parses to the same address', () => {
    for (const text of ['10.0.0.7:7070', '[fd00::7]:7070', 'phone.lan:9']) {
      const a = parseDeviceAddress(text);
      expect(formatDeviceAddress(a)).toBe(text);
      expect(parseDeviceAddress(formatDeviceAddress(a))).toEqual(a);
    }
  });

  test('median of odd and even counts', () => {
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 3, 2])).toBe(2.5);
    expect(median([])).toBeNaN();
  });
});

describe('measureDeviceRtt against the responder', () => {
  test('counts the requested samples; median and minimum agree with them', async () => {
    responder = await startRttResponder();
    expect(responder.address.host).toBe('127.0.0.1');
    expect(responder.address.port).toBeGreaterThan(0);
    const m = await measureDeviceRtt(responder.address, { samples: 7 });
    expect(m.samples).toHaveLength(7);
    for (const s of m.samples) {
      expect(s).toBeGreaterThanOrEqual(0);
      expect(s).toBeLessThan(5000);
    }
    // Rounding is monotonic, so with an odd count the rounded median is the median of the rounded samples.
    expect(m.medianMs).toBe(median(m.samples));
    expect(m.minMs).toBe(Math.min(...m.samples));
    expect(m.minMs).toBeLessThanOrEqual(m.medianMs);
    expect(m.warmupMs).toBeGreaterThanOrEqual(0);
  });

  test('five samples by default, an even count gives the mean of the middle two', async () => {
    responder = await startRttResponder();
    expect((await measureDeviceRtt(responder.address)).samples).toHaveLength(5);
    const even = await measureDeviceRtt(responder.address, { samples: 4 });
    expect(even.samples).toHaveLength(4);
    expect(even.medianMs).toBeCloseTo(median(even.samples), 1);
  });

  test('the responder serves several measurements at once', async () => {
    responder = await startRttResponder();
    const address = responder.address;
    const all = await Promise.all([1, 2, 3].map(() => measureDeviceRtt(address, { samples: 3 })));
    expect(all.map((m) => m.samples.length)).toEqual([3, 3, 3]);
  });

  test('the responder sends each PING back as its PONG and hangs up on anything else', async () => {
    responder = await startRttResponder();
    const socket = net.connect(responder.address);
    openSockets.add(socket);
    const lines: string[] = [];
    onLines(socket, (l) => lines.push(l));
    const closed = new Promise<void>((resolve) => socket.on('close', () => resolve()));
    socket.write('PING 7\nPING 123456789012\n');
    socket.write('HELLO\n');
    await closed;
    expect(lines).toEqual(['PONG 7', 'PONG 123456789012']);
  });

  test('the pings are numbered from 1 (warm-up) and the samples follow', async () => {
    const seen: string[] = [];
    const address = await tcpServer((socket) =>
      onLines(socket, (line) => {
        seen.push(line);
        socket.write(`${line.replace('PING', 'PONG')}\n`);
      }),
    );
    const m = await measureDeviceRtt(address, { samples: 3 });
    expect(seen).toEqual(['PING 1', 'PING 2', 'PING 3', 'PING 4']);
    expect(m.samples).toHaveLength(3);
  });

  test('an added delay of 30 ms per PONG shows in every sample and the median', async () => {
    const DELAY_MS = 30;
    const address = await tcpServer((socket) => {
      socket.setNoDelay(true);
      onLines(socket, (line) => {
        const received = performance.now();
        // Timers may fire a fraction of a millisecond early: wait until 30 ms have really passed.
        const answer = (): void => {
          const left = DELAY_MS - (performance.now() - received);
          if (left > 0) setTimeout(answer, Math.ceil(left));
          else socket.write(`${line.replace('PING', 'PONG')}\n`);
        };
        setTimeout(answer, DELAY_MS);
      });
    });
    const m = await measureDeviceRtt(address, { samples: 5, timeoutMs: 10_000 });
    expect(m.samples).toHaveLength(5);
    expect(m.medianMs).toBeGreaterThanOrEqual(DELAY_MS);
    expect(m.minMs).toBeGreaterThanOrEqual(DELAY_MS);
    expect(m.warmupMs).toBeGreaterThanOrEqual(DELAY_MS);
    for (const s of m.samples) expect(s).toBeGreaterThanOrEqual(DELAY_MS);
  });
});

describe('measureDeviceRtt failures are DESTINATION_UNAVAILABLE', () => {
  test('nothing listens on the port', async () => {
    // A port that was free a moment ago: listen, note it, close.
    const address = await tcpServer(() => undefined);
    await new Promise<void>((resolve) => servers.pop()?.close(() => resolve()));
    const err = await measureError(address, { timeoutMs: 5000 });
    expect(err.code).toBe('DESTINATION_UNAVAILABLE');
    expect(err.message).toContain(`cannot measure the RTT to device 127.0.0.1:${address.port}`);
    expect(err.message).toMatch(/ECONNREFUSED/);
    expect(err.fix).toContain('cloudlet probe --serve');
  });

  test('a responder that answers garbage', async () => {
    const address = await tcpServer((socket) => onLines(socket, () => socket.write('HELLO THERE\n')));
    const err = await measureError(address);
    expect(err.code).toBe('DESTINATION_UNAVAILABLE');
    expect(err.message).toContain('the responder answered "HELLO THERE", not "PONG 1"');
  });

  test('a responder that answers the wrong sequence number', async () => {
    const address = await tcpServer((socket) => onLines(socket, () => socket.write('PONG 99\n')));
    const err = await measureError(address);
    expect(err.code).toBe('DESTINATION_UNAVAILABLE');
    expect(err.message).toContain('the responder answered "PONG 99", not "PONG 1"');
  });

  test('a responder that streams bytes without a line end', async () => {
    const address = await tcpServer((socket) => socket.write('x'.repeat(5000)));
    const err = await measureError(address);
    expect(err.code).toBe('DESTINATION_UNAVAILABLE');
    expect(err.message).toContain('not a PONG line');
  });

  test('a responder that hangs up', async () => {
    const address = await tcpServer((socket) => onLines(socket, () => socket.end()));
    const err = await measureError(address);
    expect(err.code).toBe('DESTINATION_UNAVAILABLE');
    expect(err.message).toContain('the responder closed the connection');
  });

  test('a responder that never answers times out after timeoutMs', async () => {
    let connected = false;
    const address = await tcpServer(() => {
      connected = true;
    });
    const t0 = performance.now();
    const err = await measureError(address, { timeoutMs: 150 });
    const took = performance.now() - t0;
    expect(connected).toBe(true);
    expect(err.code).toBe('DESTINATION_UNAVAILABLE');
    expect(err.message).toContain('no answer within 150 ms (0 of 5 pings answered)');
    expect(took).toBeGreaterThanOrEqual(140);
    expect(took).toBeLessThan(5000);
  });

  test('a responder that stops answering half way says how many pings it answered', async () => {
    let answered = 0;
    const address = await tcpServer((socket) =>
      onLines(socket, (line) => {
        // The warm-up and two counted pings, then silence.
        if (answered++ < 3) socket.write(`${line.replace('PING', 'PONG')}\n`);
      }),
    );
    const err = await measureError(address, { samples: 5, timeoutMs: 200 });
    expect(err.message).toContain('no answer within 200 ms (2 of 5 pings answered)');
  });
});
