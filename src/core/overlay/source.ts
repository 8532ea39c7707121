/**
 * Where overlay bytes come from: a local file or an http(s) URL read with Range requests. A broken
 * download is resumed from the last byte received (a new Range request), a few times. Under a
 * fetch policy (a host's workers), URLs and paths are checked first (core/fetch).
 */
import { open, type FileHandle } from 'node:fs/promises';
import { CloudletError } from '../errors';
import { guardedFetch } from '../fetch/guarded-fetch';
import { resolveImportPath } from '../fetch/import-path';
import type { FetchPolicy } from '../fetch/policy';

export interface OverlaySource {
  readonly name: string;
  /** The most bytes the overlay may have (a fetch policy's limit); the reader refuses a meta that declares more. */
  readonly maxBytes?: number;
  /** Exactly `length` bytes at `offset`, or a CORRUPT "truncated" error. */
  read(offset: number, length: number): Promise<Buffer>;
  /**
   * `length` bytes from `offset`, in pieces, in order. `stop`: the reader no longer wants them;
   * once it is aborted the stream ends at once (a download in flight is cancelled, not retried).
   */
  stream(offset: number, length: number, stop?: AbortSignal): AsyncIterable<Buffer>;
  close(): Promise<void>;
}

export function isUrl(s: string): boolean {
  return /^https?:\/\//i.test(s);
}

export interface SourceOptions {
  /** Download attempts after a broken one (http). */
  retries?: number;
  /** Aborts a download in progress (http): reads then fail with the signal's reason, no retry. */
  signal?: AbortSignal;
  /** Check the source against this policy (a host's workers; the CLI on its own machine has none). */
  policy?: FetchPolicy;
  /** Directories the host writes itself that local paths may also be under (its deployments' copies). */
  extraDirs?: readonly string[];
}

export async function openOverlaySource(pathOrUrl: string, opts: SourceOptions = {}): Promise<OverlaySource> {
  if (isUrl(pathOrUrl)) return new HttpSource(pathOrUrl, opts.retries ?? 5, opts.signal, opts.policy);
  if (!opts.policy) return FileSource.open(pathOrUrl);
  const real = await resolveImportPath('overlay', pathOrUrl, opts.policy, { maxBytes: opts.policy.limits.maxOverlayBytes, limitSetting: 'CLOUDLET_MAX_OVERLAY_BYTES', ...(opts.extraDirs ? { extraDirs: opts.extraDirs } : {}) });
  return FileSource.open(real, opts.policy.limits.maxOverlayBytes);
}

function truncated(name: string, offset: number, length: number, got: number): CloudletError {
  return new CloudletError('CORRUPT', `overlay ${name} is truncated: wanted ${length} bytes at offset ${offset}, got ${got}`, {
    fix: 'fetch the overlay again or rebuild it',
    details: { where: name, part: 'data', offset, length, got },
  });
}

const PIECE = 1 << 20;

class FileSource implements OverlaySource {
  private constructor(
    readonly name: string,
    private readonly fh: FileHandle,
    readonly maxBytes?: number,
  ) {}

  static async open(path: string, maxBytes?: number): Promise<FileSource> {
    try {
      return new FileSource(path, await open(path, 'r'), maxBytes);
    } catch (e) {
      throw new CloudletError('NOT_FOUND', `cannot open overlay ${path}: ${(e as Error).message}`, { cause: e, fix: 'check the overlay path' });
    }
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.fh.read(buf, done, length - done, offset + done);
      if (bytesRead === 0) throw truncated(this.name, offset, length, done);
      done += bytesRead;
    }
    return buf;
  }

  async *stream(offset: number, length: number, stop?: AbortSignal): AsyncIterable<Buffer> {
    for (let at = 0; at < length && !stop?.aborted; at += PIECE) yield await this.read(offset + at, Math.min(PIECE, length - at));
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

class HttpSource implements OverlaySource {
  constructor(
    readonly name: string,
    private readonly retries: number,
    private readonly signal: AbortSignal | undefined,
    private readonly policy: FetchPolicy | undefined,
  ) {}

  get maxBytes(): number | undefined {
    return this.policy?.limits.maxOverlayBytes;
  }

  /** Throws the abort reason once the caller has aborted: an abort is not a broken download. */
  private checkAborted(): void {
    if (this.signal?.aborted) throw this.signal.reason ?? new Error(`download of overlay ${this.name} aborted`);
  }

  private async request(from: number, to: number, stop?: AbortSignal): Promise<Response> {
    let res: Response;
    const signals = [this.signal, stop].filter((x): x is AbortSignal => x !== undefined);
    const signal = signals.length > 1 ? AbortSignal.any(signals) : signals[0];
    const init = { headers: { Range: `bytes=${from}-${to}` }, ...(signal ? { signal } : {}) };
    try {
      res = this.policy ? ((await guardedFetch('overlay', this.name, this.policy, init)) as unknown as Response) : await fetch(this.name, init);
    } catch (e) {
      this.checkAborted();
      if (e instanceof CloudletError) throw e;
      throw new CloudletError('TIMEOUT', `cannot fetch overlay ${this.name}: ${(e as Error).message}`, { cause: e, fix: 'check the URL and that the server is up' });
    }
    // An answer that is not used: its body goes, so its connection does not stay blocked.
    if (res.status !== 206 && !(res.status === 200 && from === 0)) await res.body?.cancel().catch(() => undefined);
    if (res.status === 416) throw truncated(this.name, from, to - from + 1, 0);
    if (res.status === 404) throw new CloudletError('NOT_FOUND', `overlay ${this.name} not found (HTTP 404)`, { fix: 'check the URL' });
    if (res.status !== 206 && !(res.status === 200 && from === 0)) {
      throw new CloudletError('BAD_INPUT', `overlay server answered HTTP ${res.status} to a Range request for ${this.name}`, { fix: 'serve overlays from a server that supports Range requests' });
    }
    return res;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const parts: Buffer[] = [];
    let got = 0;
    for await (const piece of this.stream(offset, length)) {
      parts.push(piece);
      got += piece.length;
    }
    if (got !== length) throw truncated(this.name, offset, length, got);
    return Buffer.concat(parts, length);
  }

  async *stream(offset: number, length: number, stop?: AbortSignal): AsyncIterable<Buffer> {
    let done = 0;
    let failures = 0;
    while (done < length) {
      if (stop?.aborted) return;
      let res: Response;
      try {
        res = await this.request(offset + done, offset + length - 1, stop);
      } catch (e) {
        if (stop?.aborted) return;
        throw e;
      }
      const body = res.body;
      if (!body) throw truncated(this.name, offset, length, done);
      const reader = body.getReader();
      // A 200 answer to a request from 0 holds the whole file: skip nothing, stop at length.
      try {
        for (;;) {
          const { done: eof, value } = await reader.read();
          if (eof) break;
          const piece = Buffer.from(value.buffer, value.byteOffset, Math.min(value.byteLength, length - done));
          if (piece.length > 0) {
            done += piece.length;
            yield piece;
          }
          if (done >= length) break;
        }
      } catch (e) {
        this.checkAborted();
        if (stop?.aborted) return;
        failures += 1;
        if (failures > this.retries) {
          throw new CloudletError('TIMEOUT', `download of overlay ${this.name} failed ${failures} times (last at byte ${offset + done}): ${(e as Error).message}`, {
            cause: e,
            fix: 'check the network and retry',
          });
        }
        continue; // resume with a new Range request from offset + done
      } finally {
        await reader.cancel().catch(() => undefined);
      }
      if (done < length) {
        // The server closed the body early without an error: the file is shorter than the meta says.
        failures += 1;
        if (failures > this.retries) throw truncated(this.name, offset, length, done);
      }
    }
  }

  async close(): Promise<void> {
    /* nothing held between requests */
  }
}
