/**
 * xz (LZMA2) for overlay segments. Compression: lzma-native, on libuv's thread pool (several
 * calls in flight use several cores). Decompression, on the synthesis path: the system's `xz -d`
 * (XZ Utils, installed by infra/setup.sh) in a child process, measured 2-2.7x faster here than the
 * liblzma 5.2.3 that lzma-native bundles (a 16 MB text segment: 190 ms vs 400-590 ms); each call
 * is its own process, so segments decompress in parallel beside this process's threads. Without
 * an `xz` binary it falls back to lzma-native.
 */
import { spawn } from 'node:child_process';

interface LzmaNative {
  compress(data: Buffer, options: { preset: number; threads?: number }): Promise<Buffer>;
  decompress(data: Buffer, options?: Record<string, unknown>): Promise<Buffer>;
  createDecompressor(options?: { memlimit?: number }): NodeJS.ReadWriteStream & { destroy(): void };
}

// eslint-disable-next-line @typescript-eslint/no-require-imports
const lzma = require('lzma-native') as LzmaNative;

/** Our segments use presets up to 9 (64 MiB dictionary); anything asking for more is refused. */
const XZ_MEMLIMIT = '256MiB';

export function xzCompress(data: Buffer, level: number): Promise<Buffer> {
  return lzma.compress(data, { preset: level });
}

/**
 * Decompresses with lzma-native (in-process). With `expectedLength`, output past it stops the
 * decoder at once and rejects, as the binary path does (an xz bomb never fills memory).
 */
export function xzDecompressNative(data: Buffer, expectedLength?: number): Promise<Buffer> {
  if (expectedLength === undefined) return lzma.decompress(data);
  return new Promise((resolve, reject) => {
    const decoder = lzma.createDecompressor({ memlimit: 256 * 1024 * 1024 });
    const chunks: Buffer[] = [];
    let got = 0;
    let settled = false;
    const settle = (f: () => void): void => {
      if (settled) return;
      settled = true;
      f();
    };
    decoder.on('data', (c: Buffer) => {
      if (settled) return;
      got += c.length;
      if (got > expectedLength) {
        settle(() => reject(new Error(`it inflates past the ${expectedLength} bytes the meta declares`)));
        decoder.destroy();
        return;
      }
      chunks.push(c);
    });
    decoder.on('error', (e: Error) => settle(() => reject(e)));
    decoder.on('end', () => settle(() => resolve(Buffer.concat(chunks, got))));
    decoder.end(data);
  });
}

/** `xz` could not run or was stopped from outside: the input is not to blame; decode in-process. */
class XzUnavailable extends Error {}

/**
 * Decompresses one xz stream with the `xz` binary. With `expectedLength`, output past it stops
 * the child at once and rejects (an xz bomb never fills memory); shorter output resolves short.
 */
export function xzDecompressWithBinary(data: Buffer, expectedLength?: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    // XZ_DEFAULTS / XZ_OPT from the environment must not change what a segment means.
    const child = spawn('xz', ['--decompress', '--format=xz', '--stdout', '--quiet', '--threads=1', `--memlimit-decompress=${XZ_MEMLIMIT}`], {
      stdio: ['pipe', 'pipe', 'pipe'],
      env: { ...process.env, XZ_DEFAULTS: '', XZ_OPT: '' },
    });
    if (child.pid === undefined || !child.stdin || !child.stdout || !child.stderr) {
      // No process (ENOENT, EMFILE, EAGAIN...): the 'error' event says why; nothing to read from.
      child.once('error', (e) => reject(new XzUnavailable(`xz could not run: ${e.message}`)));
      return;
    }
    const fixed = expectedLength === undefined ? undefined : Buffer.allocUnsafe(expectedLength);
    const chunks: Buffer[] = [];
    let got = 0;
    let stderr = '';
    let failed: Error | undefined;
    let killedByUs = false;
    const fail = (e: Error): void => {
      failed ??= e;
      killedByUs = true;
      child.kill('SIGKILL');
    };
    child.on('error', (e: NodeJS.ErrnoException) => {
      failed ??= new XzUnavailable(`xz could not run: ${e.message}`);
    });
    child.stdin.on('error', () => undefined); // EPIPE when xz stops early; its exit status says why
    child.stderr.on('data', (d: Buffer) => {
      if (stderr.length < 4096) stderr += d.toString();
    });
    child.stdout.on('data', (d: Buffer) => {
      if (failed) return;
      if (fixed) {
        if (got + d.length > fixed.length) {
          fail(new Error(`it inflates past the ${fixed.length} bytes the meta declares`));
          return;
        }
        d.copy(fixed, got);
      } else chunks.push(d);
      got += d.length;
    });
    child.on('close', (code, signal) => {
      if (failed) return reject(failed);
      if (signal !== null && !killedByUs) return reject(new XzUnavailable(`xz was stopped by ${signal}`));
      if (code !== 0) return reject(new Error(`xz -d failed (${signal ?? `exit ${code}`}): ${stderr.trim().replace(/^xz: \(stdin\): /, '') || 'no message'}`));
      resolve(fixed ? fixed.subarray(0, got) : Buffer.concat(chunks, got));
    });
    child.stdin.end(data);
  });
}

let binaryMissing = false;

/**
 * Decompresses one xz stream: the `xz` binary when it runs, else lzma-native (for this call, or
 * from now on when there is no `xz` at all). Only what xz says of the data is an error here.
 */
export async function xzDecompress(data: Buffer, expectedLength?: number): Promise<Buffer> {
  if (!binaryMissing) {
    try {
      return await xzDecompressWithBinary(data, expectedLength);
    } catch (e) {
      if (!(e instanceof XzUnavailable)) throw e;
      if (/ENOENT/.test(e.message)) binaryMissing = true;
    }
  }
  return xzDecompressNative(data, expectedLength);
}
