/**
 * What an overlay is made of: per target (memory, disk) the chunks of each kind and the share of
 * the compressed bytes their records take; optionally writes the raw payloads (memory, disk) to
 * files so that other compressors can be tried on them.
 *
 *   npx tsx bench/overlay-anatomy.ts FILE.overlay [--dump DIR]
 */
import fs from 'node:fs';
import path from 'node:path';
import { decodeHeader, decodeMeta, HEADER_SIZE, Kind, KIND_NAMES, RECORD_HEADER_SIZE, CHUNK, Target } from '../src/core/overlay/format';
import { xzDecompress } from '../src/core/overlay/lzma';

async function main(): Promise<void> {
  const file = process.argv[2];
  if (!file) throw new Error('usage: overlay-anatomy FILE.overlay [--dump DIR]');
  const di = process.argv.indexOf('--dump');
  const dumpDir = di > 0 ? process.argv[di + 1] : undefined;
  const fd = fs.openSync(file, 'r');
  const read = (at: number, len: number): Buffer => {
    const b = Buffer.alloc(len);
    fs.readSync(fd, b, 0, len, at);
    return b;
  };
  const header = decodeHeader(read(0, HEADER_SIZE), file);
  const meta = decodeMeta(read(HEADER_SIZE, header.metaLength), header, file);
  const dataAt = HEADER_SIZE + header.metaLength;
  const dumps = dumpDir ? { [Target.Memory]: fs.openSync(path.join(dumpDir, 'memory.raw'), 'w'), [Target.Disk]: fs.openSync(path.join(dumpDir, 'disk.raw'), 'w') } : undefined;
  const chunks: Record<string, number> = {};
  const share: Record<string, number> = {};
  for (const seg of meta.segments) {
    const raw = await xzDecompress(read(dataAt + seg.offset, seg.length), seg.rawLength);
    let at = 0;
    while (at < raw.length) {
      const kind = (raw[at] ?? 0) & 0x0f;
      const target = ((raw[at] ?? 0) >> 4) as Target;
      const count = raw.readUInt32LE(at + 7);
      let len = RECORD_HEADER_SIZE;
      if (kind === Kind.Raw) len += count * CHUNK;
      else if (kind === Kind.Delta) len += 4 + raw.readUInt32LE(at + RECORD_HEADER_SIZE);
      else if (kind !== Kind.Zero) len += 6;
      const key = `${target === Target.Memory ? 'memory' : 'disk'}.${KIND_NAMES[kind as Kind]}`;
      chunks[key] = (chunks[key] ?? 0) + count;
      share[key] = (share[key] ?? 0) + (len / raw.length) * seg.length;
      if (dumps && kind === Kind.Raw) fs.writeSync(dumps[target], raw, at + RECORD_HEADER_SIZE, count * CHUNK);
      at += len;
    }
  }
  const total = meta.segments.reduce((s, x) => s + x.length, 0);
  process.stdout.write(`${JSON.stringify({ file, bytes: fs.statSync(file).size, segments: meta.segments.length, options: meta.options, stats: meta.stats, segmentBytes: total, skeletonBytes: meta.launch.memory.skeleton.length })}\n`);
  for (const k of Object.keys(chunks).sort()) process.stdout.write(`${k.padEnd(16)} chunks ${String(chunks[k]).padStart(8)} (${((chunks[k] ?? 0) * CHUNK / 1048576).toFixed(1)} MiB)  ~compressed ${((share[k] ?? 0) / 1e6).toFixed(2)} MB\n`);
}
main().catch((e: unknown) => {
  process.stderr.write(`${String(e instanceof Error ? e.stack : e)}\n`);
  process.exit(1);
});
