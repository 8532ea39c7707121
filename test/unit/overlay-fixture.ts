/**
 * Generated base/launch pairs for overlay tests and the benchmark: a base disk + memory image and
 * a launch disk (qcow2 over the base, made by `qemu-img convert -B`) + memory image with a
 * fraction of chunks changed in realistic ways (new compressible data, small edits of the base,
 * copies of base chunks, zeroed chunks, duplicates, incompressible data).
 */
import { execFileSync } from 'node:child_process';
import { createHash, randomFillSync } from 'node:crypto';
import { closeSync, openSync, readSync, writeSync, ftruncateSync, copyFileSync } from 'node:fs';
import path from 'node:path';
import { openImageFile, type MemoryImageInput } from '../../src/core/snapshot';

const CHUNK = 4096;

export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const WORDS = 'the quick brown fox jumps over lazy dog kernel page cache inode buffer socket thread mutex server client request response header payload json http config user data log error warn info debug'.split(' ');

function textChunk(rnd: () => number): Buffer {
  const parts: string[] = [];
  let len = 0;
  while (len < CHUNK) {
    const w = WORDS[Math.floor(rnd() * WORDS.length)] ?? 'x';
    const s = rnd() < 0.1 ? `${w}=${Math.floor(rnd() * 1e6)}\n` : `${w} `;
    parts.push(s);
    len += s.length;
  }
  return Buffer.from(parts.join('').slice(0, CHUNK), 'latin1');
}

function structChunk(rnd: () => number): Buffer {
  // Sparse binary structures: mostly zero with small integers and pointers.
  const b = Buffer.alloc(CHUNK);
  for (let i = 0; i < CHUNK; i += 8) if (rnd() < 0.35) b.writeUInt32LE(Math.floor(rnd() * (rnd() < 0.5 ? 256 : 0xffffffff)), i);
  return b;
}

function baseChunk(rnd: () => number): Buffer {
  const r = rnd();
  if (r < 0.45) return Buffer.alloc(CHUNK);
  if (r < 0.7) return textChunk(rnd);
  if (r < 0.85) return structChunk(rnd);
  return randomFillSync(Buffer.alloc(CHUNK));
}

function writeImage(p: string, size: number, rnd: () => number): void {
  const fd = openSync(p, 'w');
  const block = Buffer.alloc(256 * CHUNK);
  for (let pos = 0; pos < size; pos += block.length) {
    const n = Math.min(block.length, size - pos);
    for (let i = 0; i < n; i += CHUNK) baseChunk(rnd).copy(block, i);
    writeSync(fd, block, 0, n, pos);
  }
  closeSync(fd);
}

function readChunk(fd: number, chunk: number): Buffer {
  const b = Buffer.alloc(CHUNK);
  readSync(fd, b, 0, CHUNK, chunk * CHUNK);
  return b;
}

/** Change `fraction` of the chunks of `target` (a copy of its base) in mixed ways. */
function mutate(target: string, size: number, fraction: number, rnd: () => number, others: { diskFd: number; diskChunks: number; memFd: number; memChunks: number }): number {
  const fd = openSync(target, 'r+');
  const chunks = Math.ceil(size / CHUNK);
  const changed = Math.floor(chunks * fraction);
  const written: number[] = [];
  // Changes come in runs (files, heaps), like real workloads.
  let c = 0;
  let n = 0;
  while (n < changed) {
    c = Math.floor(rnd() * chunks);
    const run = 1 + Math.floor(rnd() * 16);
    const r = rnd();
    for (let i = 0; i < run && n < changed && c + i < chunks; i++, n++) {
      const at = c + i;
      let data: Buffer;
      if (r < 0.3) data = textChunk(rnd);
      else if (r < 0.5) {
        data = readChunk(fd, at);
        for (let k = 0; k < 1 + Math.floor(rnd() * 8); k++) data[Math.floor(rnd() * CHUNK)] = Math.floor(rnd() * 256);
      } else if (r < 0.6) data = readChunk(others.memFd, Math.floor(rnd() * others.memChunks));
      else if (r < 0.7) data = readChunk(others.diskFd, Math.floor(rnd() * others.diskChunks));
      else if (r < 0.8) data = Buffer.alloc(CHUNK);
      else if (r < 0.87 && written.length > 0) data = readChunk(fd, written[Math.floor(rnd() * written.length)] ?? 0);
      else if (r < 0.93) data = structChunk(rnd);
      else data = randomFillSync(Buffer.alloc(CHUNK));
      writeSync(fd, data, 0, Math.min(CHUNK, size - at * CHUNK), at * CHUNK);
      written.push(at);
    }
  }
  closeSync(fd);
  return n;
}

export interface GeneratedPair {
  baseDisk: string;
  baseMem: string;
  launchRaw: string;
  launchQcow2: string;
  launchMem: string;
}

export function generatePair(dir: string, opts: { diskSize: number; memSize: number; launchMemSize?: number; fraction: number; seed: number }): GeneratedPair {
  const rnd = prng(opts.seed);
  const p: GeneratedPair = {
    baseDisk: path.join(dir, 'base.raw'),
    baseMem: path.join(dir, 'base.mem'),
    launchRaw: path.join(dir, 'launch.raw'),
    launchQcow2: path.join(dir, 'launch.qcow2'),
    launchMem: path.join(dir, 'launch.mem'),
  };
  writeImage(p.baseDisk, opts.diskSize, rnd);
  writeImage(p.baseMem, opts.memSize, rnd);
  copyFileSync(p.baseDisk, p.launchRaw);
  copyFileSync(p.baseMem, p.launchMem);
  const launchMemSize = opts.launchMemSize ?? opts.memSize;
  if (launchMemSize !== opts.memSize) {
    const fd = openSync(p.launchMem, 'r+');
    ftruncateSync(fd, launchMemSize);
    closeSync(fd);
  }
  const diskFd = openSync(p.baseDisk, 'r');
  const memFd = openSync(p.baseMem, 'r');
  const others = { diskFd, diskChunks: opts.diskSize / CHUNK, memFd, memChunks: opts.memSize / CHUNK };
  mutate(p.launchRaw, opts.diskSize, opts.fraction, rnd, others);
  mutate(p.launchMem, launchMemSize, opts.fraction, rnd, others);
  closeSync(diskFd);
  closeSync(memFd);
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-B', p.baseDisk, '-F', 'raw', p.launchRaw, p.launchQcow2]);
  return p;
}

export function sha256File(p: string): string {
  const h = createHash('sha256');
  const fd = openSync(p, 'r');
  const b = Buffer.alloc(4 << 20);
  for (;;) {
    const n = readSync(fd, b, 0, b.length, null);
    if (n === 0) break;
    h.update(b.subarray(0, n));
  }
  closeSync(fd);
  return h.digest('hex');
}

/** A stand-in for the snapshot codec: the "save file" is the skeleton followed by the memory image. */
export async function fakeJoin(skeleton: Buffer, image: MemoryImageInput, outSavePath: string): Promise<{ size: number; sha256: string }> {
  if (typeof image === 'string') {
    const file = await openImageFile(image);
    try {
      return await fakeJoin(skeleton, file, outSavePath);
    } finally {
      await file.close();
    }
  }
  const h = createHash('sha256');
  const out = openSync(outSavePath, 'wx');
  try {
    writeSync(out, skeleton);
    h.update(skeleton);
    const b = Buffer.alloc(4 << 20);
    for (let pos = 0; pos < image.size; ) {
      const n = Math.min(b.length, image.size - pos);
      await image.read(b, n, pos);
      writeSync(out, b, 0, n);
      h.update(b.subarray(0, n));
      pos += n;
    }
  } finally {
    closeSync(out);
  }
  return { size: skeleton.length + image.size, sha256: h.digest('hex') };
}
