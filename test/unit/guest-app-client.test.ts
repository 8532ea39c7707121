import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { GuestAppClient } from '../../src/guest/app-client';
import { freeLocalPort } from '../../src/hypervisor/libvirt';

/** A stand-in for the guest's application: `handle` decides per request (1-based) what to do. */
async function fakeApp(handle: (n: number, res: http.ServerResponse) => void, port = 0): Promise<{ port: number; requests: () => number; close: () => Promise<void> }> {
  let n = 0;
  const server = http.createServer((_req, res) => handle(++n, res));
  await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    requests: () => n,
    close: () => new Promise<void>((resolve) => {
      server.closeAllConnections();
      server.close(() => resolve());
    }),
  };
}

const answer = (res: http.ServerResponse, counter: number): void => {
  res.writeHead(200, { 'Content-Type': 'application/json' });
  res.end(JSON.stringify({ token: 't', disk: 'd', counter, bootId: 'b' }));
};

describe('GuestAppClient.waitForState', () => {
  it('answers once the application starts listening on the forwarded port', async () => {
    const port = await freeLocalPort();
    const client = new GuestAppClient(port);
    let waits = 0;
    let app: Awaited<ReturnType<typeof fakeApp>> | undefined;
    const waiting = client.waitForState(10_000, () => {
      waits++;
      // The first attempts are refused; then the application comes up.
      if (waits === 3) void fakeApp((n, res) => answer(res, n), port).then((a) => (app = a));
    });
    try {
      const r = await waiting;
      expect(r.state).toEqual({ token: 't', disk: 'd', counter: 1, bootId: 'b' });
      expect(waits).toBeGreaterThanOrEqual(3);
    } finally {
      await app?.close();
    }
  });

  it('gives up on an attempt the network holds without an answer and retries at once', async () => {
    // Like QEMU's user network before the guest configured its new NIC: the first connection is
    // accepted but never answered. The retry must not wait for the full per-attempt deadline.
    const app = await fakeApp((n, res) => {
      if (n > 1) answer(res, n);
    });
    try {
      const r = await new GuestAppClient(app.port).waitForState(10_000, undefined, 3000);
      expect(r.state.counter).toBe(2);
      expect(app.requests()).toBe(2);
      expect(r.waitedMs).toBeLessThan(3000);
    } finally {
      await app.close();
    }
  });

  it('times out naming the URL and the last error', async () => {
    const app = await fakeApp(() => undefined);
    try {
      await expect(new GuestAppClient(app.port).waitForState(300)).rejects.toMatchObject({
        code: 'TIMEOUT',
        message: expect.stringContaining(`http://127.0.0.1:${app.port}/cgi-bin/state did not answer within 300 ms`),
      });
    } finally {
      await app.close();
    }
  });
});
