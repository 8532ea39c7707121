/**
 * An overlay server for fault tests: serves `bytes` with Range support; the first request for the
 * data area (from past the header and meta to the end) gets half its bytes, then nothing until
 * release(); later requests are served whole. With `stallFirst`, the first request of all is the
 * one held (a base package, fetched in one request).
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';

export interface StallingServer {
  url: string;
  /** True once the data-area request is being held. */
  holding(): boolean;
  /** Breaks the held request (the client resumes with a new Range request). */
  release(): void;
  close(): Promise<void>;
}

export async function startStallingServer(bytes: Buffer, name = 'stalling.overlay', options: { stallFirst?: boolean } = {}): Promise<StallingServer> {
  let held: http.ServerResponse | undefined;
  let stalled = false;
  const server = http.createServer((req, res) => {
    const m = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
    const from = m ? Number(m[1]) : 0;
    const to = m && m[2] ? Math.min(Number(m[2]), bytes.length - 1) : bytes.length - 1;
    res.writeHead(m ? 206 : 200, { 'Content-Length': to - from + 1, ...(m ? { 'Content-Range': `bytes ${from}-${to}/${bytes.length}` } : {}) });
    if (!stalled && (options.stallFirst === true || from > 0) && to === bytes.length - 1) {
      stalled = true;
      held = res;
      res.write(bytes.subarray(from, from + Math.floor((to - from + 1) / 2)));
      return;
    }
    res.end(bytes.subarray(from, to + 1));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/${name}`,
    holding: () => held !== undefined,
    release: () => held?.destroy(),
    close: () =>
      new Promise<void>((resolve) => {
        held?.destroy();
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
