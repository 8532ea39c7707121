/** Measures what each compression setting does to a sample of a round's payload. */
import { xzCompress } from '../overlay/lzma';
import { zstdCompress } from '../zstd';
import type { CompressionSample } from './policy';
import type { Compression } from './round';

export const CANDIDATES: readonly Compression[] = [
  { codec: 'none' },
  { codec: 'zstd', level: 1 },
  { codec: 'zstd', level: 3 },
  { codec: 'zstd', level: 9 },
  { codec: 'xz', level: 0 },
  { codec: 'xz', level: 1 },
  { codec: 'xz', level: 3 },
  { codec: 'xz', level: 6 },
];

export async function probeCompression(sample: Buffer, candidates: readonly Compression[] = CANDIDATES): Promise<CompressionSample[]> {
  const out: CompressionSample[] = [];
  for (const c of candidates) {
    if (c.codec === 'none' || sample.length === 0) {
      out.push({ compression: c, ratio: 1, bytesPerSec: Number.POSITIVE_INFINITY });
      continue;
    }
    const t0 = performance.now();
    const packed = c.codec === 'zstd' ? await zstdCompress(sample, c.level) : await xzCompress(sample, c.level);
    const ms = Math.max(1, performance.now() - t0);
    out.push({ compression: c, ratio: packed.length / sample.length, bytesPerSec: (sample.length / ms) * 1000 });
  }
  return out;
}
