/**
 * A deployment's copy of its overlay on one host (docs/deployments.md): the host fetches the
 * overlay once, and every VM the deployment synthesizes there reads that file instead of the URL,
 * so the overlay crosses the network once per host, not once per VM. The copy lives under
 * `<host>/deployments/<deploymentId>/` and goes when the deployment ends.
 */
import { createHash } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { Readable, Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { ReadableStream as WebReadableStream } from 'node:stream/web';
import { CloudletError } from '../core/errors';
import { isUrl } from '../core/overlay/source';
import { bodyError, guardedFetch, type Response } from '../core/fetch/guarded-fetch';
import { tooLarge, type FetchPolicy } from '../core/fetch/policy';
import { cancellationSignal, heartbeat } from './heartbeat';

export interface CachedOverlay {
  /** What the deployment's VMs on this host synthesize from. */
  path: string;
  bytes: number;
  /** 0 when the copy was there already (a retried step). */
  fetchMs: number;
  sha256: string;
}

const DEPLOYMENT_ID = /^d-[a-z0-9-]{1,60}$/;

export function createOverlayCacheActivities(deps: { dataDir: string; fetchPolicy: FetchPolicy }) {
  const limit = deps.fetchPolicy.limits.maxOverlayBytes;
  const dirOf = (deploymentId: string): string => {
    if (!DEPLOYMENT_ID.test(deploymentId)) throw new CloudletError('BAD_INPUT', `"${deploymentId}" is not a deployment id`, { fix: 'use the id the deployment was started with (d-...)' });
    return path.join(deps.dataDir, 'deployments', deploymentId);
  };
  return {
    /** Fetch the overlay into this host's deployment directory (once); checks its sha256 when the URL names it. */
    async cacheOverlay(input: { deploymentId: string; overlayUrl: string }): Promise<CachedOverlay> {
      const dir = dirOf(input.deploymentId);
      const file = path.join(dir, 'overlay');
      const known = /\/([0-9a-f]{64})(?:\.overlay|\/content)?\/?$/.exec(new URL(input.overlayUrl, 'file:///').pathname)?.[1];
      if (!isUrl(input.overlayUrl)) throw new CloudletError('BAD_INPUT', `overlay ${input.overlayUrl} is not an http(s) URL`, { fix: 'a deployment fetches its overlay by URL (GET /v1/overlays lists them)' });
      const done = await fs.readFile(`${file}.sha256`, 'utf8').catch(() => undefined);
      if (done) return { path: file, bytes: (await fs.stat(file)).size, fetchMs: 0, sha256: done.trim() };
      await fs.mkdir(dir, { recursive: true });
      const t0 = Date.now();
      const tmp = `${file}.part`;
      let res: Response;
      try {
        const signal = cancellationSignal();
        res = await guardedFetch('overlay', input.overlayUrl, deps.fetchPolicy, signal ? { signal } : {});
      } catch (e) {
        if (e instanceof CloudletError) throw e;
        throw new CloudletError('SERVICE_UNAVAILABLE', `cannot fetch overlay ${input.overlayUrl}: ${(e as Error).message}`, { fix: 'check that the overlay server answers from this host', cause: e });
      }
      if (!res.ok || !res.body) await res.body?.cancel().catch(() => undefined);
      if (!res.ok || !res.body) throw new CloudletError(res.status === 404 ? 'NOT_FOUND' : 'SERVICE_UNAVAILABLE', `overlay ${input.overlayUrl} answered ${res.status}`, { fix: 'check the overlay URL (GET /v1/overlays)' });
      const total = Number(res.headers.get('content-length') ?? 0);
      if (total > limit) {
        await res.body.cancel().catch(() => undefined);
        throw tooLarge('overlay', input.overlayUrl, total, limit, 'CLOUDLET_MAX_OVERLAY_BYTES');
      }
      const hash = createHash('sha256');
      let bytes = 0;
      let beat = 0;
      const count = new Transform({
        transform(chunk: Buffer, _enc, cb) {
          bytes += chunk.length;
          // A server that sends more than it declared (or declared nothing) stops at the limit.
          if (bytes > limit) return cb(tooLarge('overlay', input.overlayUrl, bytes, limit, 'CLOUDLET_MAX_OVERLAY_BYTES'));
          hash.update(chunk);
          if (Date.now() - beat > 1000) {
            beat = Date.now();
            heartbeat({ stage: 'fetch overlay', bytesDone: bytes, bytesTotal: total });
          }
          cb(null, chunk);
        },
      });
      try {
        await pipeline(Readable.fromWeb(res.body as unknown as WebReadableStream<Uint8Array>), count, createWriteStream(tmp));
      } catch (e) {
        await fs.rm(tmp, { force: true });
        if (e instanceof CloudletError) throw e;
        const timeout = bodyError(e, 'overlay', input.overlayUrl, deps.fetchPolicy);
        if (timeout instanceof CloudletError) throw timeout;
        throw new CloudletError('SERVICE_UNAVAILABLE', `fetching overlay ${input.overlayUrl} broke after ${bytes} bytes: ${(e as Error).message}`, { fix: 'the step is retried; check the overlay server', cause: e });
      }
      const sha256 = hash.digest('hex');
      if (known && known !== sha256) {
        await fs.rm(tmp, { force: true });
        throw new CloudletError('DIGEST_MISMATCH', `overlay ${input.overlayUrl} has sha256 ${sha256}, not the ${known} its URL names`, { fix: 'publish the overlay again' });
      }
      await fs.rename(tmp, file);
      await fs.writeFile(`${file}.sha256`, sha256);
      return { path: file, bytes, fetchMs: Date.now() - t0, sha256 };
    },

    /** The deployment has ended: its copy goes. */
    async dropCachedOverlay(input: { deploymentId: string }): Promise<void> {
      await fs.rm(dirOf(input.deploymentId), { recursive: true, force: true });
    },
  };
}

export type OverlayCacheActivities = ReturnType<typeof createOverlayCacheActivities>;
