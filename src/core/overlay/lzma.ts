/**
 * Typed access to lzma-native (it ships no type declarations). `compress`/`decompress` run on
 * libuv's thread pool, so several calls in flight use several cores (measured: 2 segments at once
 * decompress in half the time on 2 cores).
 */
interface LzmaNative {
  compress(data: Buffer, options: { preset: number; threads?: number }): Promise<Buffer>;
  decompress(data: Buffer, options?: Record<string, unknown>): Promise<Buffer>;
}

// eslint-disable-next-line @typescript-eslint/no-require-imports
const lzma = require('lzma-native') as LzmaNative;

export function xzCompress(data: Buffer, level: number): Promise<Buffer> {
  return lzma.compress(data, { preset: level });
}

export function xzDecompress(data: Buffer): Promise<Buffer> {
  return lzma.decompress(data);
}
