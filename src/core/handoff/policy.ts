/**
 * How to compress a handoff round for the measured link and CPU (the original system's adaptive
 * mode selection: pick the compression that makes "compress, then send" fastest,
 * re-measured as the handoff goes). When to stop the live rounds is the workflow's decision
 * (src/workflows/handoff-policy.ts).
 */
import type { Compression } from './round';

/** What compressing a sample at one setting cost and gave. */
export interface CompressionSample {
  compression: Compression;
  /** Output bytes / input bytes. */
  ratio: number;
  /** Input bytes per second on one core. */
  bytesPerSec: number;
}

/**
 * The setting with the least expected time to ship `rawBytes`: compression (on `cores` cores)
 * then sending, one after the other as a round is built and then uploaded; ties to the smaller
 * output.
 */
export function chooseCompression(samples: readonly CompressionSample[], linkBytesPerSec: number, cores: number, rawBytes = 64 * 1024 * 1024): { choice: Compression; expectedMs: number } {
  let best: { choice: Compression; expectedMs: number; out: number } | undefined;
  for (const s of samples) {
    const compressMs = s.compression.codec === 'none' ? 0 : (rawBytes / (s.bytesPerSec * Math.max(1, cores))) * 1000;
    const out = rawBytes * s.ratio;
    const sendMs = (out / Math.max(1, linkBytesPerSec)) * 1000;
    const expectedMs = compressMs + sendMs;
    if (!best || expectedMs < best.expectedMs * 0.97 || (expectedMs <= best.expectedMs * 1.03 && out < best.out)) best = { choice: s.compression, expectedMs, out };
  }
  if (!best) return { choice: { codec: 'xz', level: 1 }, expectedMs: 0 };
  return { choice: best.choice, expectedMs: Math.round(best.expectedMs) };
}
