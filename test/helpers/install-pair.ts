/**
 * A generated base/launch pair that models what VM overlays contain in practice: a developer
 * resumes a base VM, installs a back-end application (runtime, libraries, the app's code and data),
 * starts it, and saves the VM. Deterministic from a seed; images are streamed, never held in memory.
 *
 * The base disk is laid out like a small ext4 file system: block groups (metadata at their start:
 * descriptors, bitmaps, inode tables), a journal in the middle group, files in the first half of
 * each group's data area, free (zero) blocks after. The base memory holds a kernel (code and data),
 * the page cache of base files (copies of base disk chunks), process heaps and slab (sparse
 * structures), a little incompressible state, and free pages (zero).
 *
 * Content is generated to compress like the real thing: "binary" (ELF-like code, symbol and
 * relocation tables, string tables) and "text" (source, configuration, prose) were calibrated so
 * that `xz -6` over 4 MiB compresses them about as well as this machine's /usr/bin + shared
 * libraries (≈ 0.26) and its Python/Perl/JS sources and /etc (≈ 0.16–0.24); "archive" is a keystream
 * (compressed files, incompressible).
 */
import { execFileSync } from 'node:child_process';
import { createCipheriv, createHash, type Cipher } from 'node:crypto';
import { closeSync, copyFileSync, mkdirSync, openSync, readSync, writeSync } from 'node:fs';
import path from 'node:path';
import { prng, type GeneratedPair } from '../unit/overlay-fixture';

export const CHUNK = 4096;

/**
 * What changes, as shares of the changed chunks of each image. The kinds are the redundancy that
 * Ha et al., "Just-in-Time Provisioning for Cyber Foraging" (MobiSys 2013) found in VM
 * overlays and exploit to shrink them: memory pages that hold disk content (the guest's page cache
 * of files just written, and of base files read), pages found in the base VM, self-duplicates,
 * zero pages, and freed disk blocks / free memory pages that need not be shipped at all (their
 * "semantic gap" optimisation). The paper measures these per application; the shares below are
 * not its figures but a model of one install, chosen from what each step of it writes:
 *
 * Disk (an `apt-get install` of a server, a language runtime and libraries, then the app):
 * - binary 30%: executables and shared libraries make up most of a server package's bytes.
 * - text 20%: scripts, configuration, the app's sources, documentation.
 * - archive 15%: compressed files: downloaded .deb/.whl/.tar.gz kept in package caches, gzipped
 *   man pages, compressed assets. Incompressible: neither method can shrink them.
 * - baseCopy 10%: copies of base files (cp -a of a config tree, dpkg's *-old backups, a library the
 *   app vendors that the base already has): runs of base disk chunks at new places.
 * - freed 11%: base files deleted or replaced (package lists refreshed, old versions removed,
 *   build directories), discarded (TRIM) so they read as zero.
 * - metadata 8%: small in-place edits of base chunks: bitmaps, inode tables, directory blocks,
 *   the dpkg status file.
 * - journal 6%: ext4 (data=ordered) journals metadata: copies of the edited metadata blocks with
 *   descriptor and commit blocks (self-duplicates within the disk).
 *
 * Memory (the VM after the install, with the app running):
 * - pageCacheNew 30%: the page cache of the files just written: copies of the launch disk's new
 *   chunks, in readahead runs at scattered guest-physical addresses.
 * - pageCacheBase 12%: the page cache of base files the installer read (dpkg, its database, the
 *   compiler, shared libraries): copies of base disk chunks.
 * - heap 20%: heaps, stacks and slab of the new processes: sparse structures, some strings.
 * - forkDup 5%: heap pages identical across the workers of a pre-forking server (self-duplicates).
 * - kernelEdit 10%: small edits of base kernel pages (counters, list pointers, timestamps).
 * - freed 10%: freed pages, zeroed (init_on_free / free page reporting).
 * - relocated 8%: base memory pages at new addresses (compaction, shared libraries mapped again).
 * - random 5%: incompressible state: entropy pool, TLS keys and sessions, compressed buffers.
 */
export const APP_INSTALL_MODEL = {
  disk: { binary: 0.3, text: 0.2, archive: 0.15, baseCopy: 0.1, freed: 0.11, metadata: 0.08, journal: 0.06 },
  memory: { pageCacheNew: 0.3, pageCacheBase: 0.12, heap: 0.2, forkDup: 0.05, kernelEdit: 0.1, freed: 0.1, relocated: 0.08, random: 0.05 },
} as const;

export type DiskKind = keyof typeof APP_INSTALL_MODEL.disk;
export type MemKind = keyof typeof APP_INSTALL_MODEL.memory;

export interface InstallPairOptions {
  /** Bytes, a multiple of 4096 (at least 4 MiB). */
  diskSize: number;
  /** Bytes, a multiple of 4096 (at least 2 MiB). */
  memSize: number;
  /** Fraction of the disk's chunks that change (0 < fraction ≤ 0.2). */
  fraction: number;
  /** Fraction of the memory's chunks that change (default: `fraction`). */
  memFraction?: number;
  seed: number;
}

export interface ImageChanges<K extends string> {
  chunks: number;
  /** Chunks that differ from the base: round(chunks × fraction), exactly. */
  changed: number;
  byKind: Record<K, number>;
}

export interface InstallPair extends GeneratedPair {
  model: 'app-install';
  disk: ImageChanges<DiskKind>;
  memory: ImageChanges<MemKind>;
}

// ---------------------------------------------------------------------------------------------
// Content

type Rnd = () => number;

function gauss(rnd: Rnd): number {
  return Math.sqrt(-2 * Math.log(1 - rnd())) * Math.cos(2 * Math.PI * rnd());
}

/**
 * Deterministic bytes from an AES-256-CTR keystream keyed by the seed: incompressible data, and
 * the many cheap random numbers the content generators need (a PRNG call per byte would be slow).
 */
class Keystream {
  private readonly cipher: Cipher;
  private pool = Buffer.alloc(0);
  private at = 0;
  constructor(seed: number) {
    const key = createHash('sha256').update(`install-pair keystream ${seed}`).digest();
    this.cipher = createCipheriv('aes-256-ctr', key, Buffer.alloc(16));
  }
  /** A new chunk of incompressible bytes. */
  chunk(): Buffer {
    return this.cipher.update(Buffer.alloc(CHUNK));
  }
  u8(): number {
    if (this.at >= this.pool.length) this.refill();
    return this.pool[this.at++] ?? 0;
  }
  u16(): number {
    if (this.at + 2 > this.pool.length) this.refill();
    const v = this.pool.readUInt16LE(this.at);
    this.at += 2;
    return v;
  }
  private refill(): void {
    this.pool = this.cipher.update(Buffer.alloc(1 << 16));
    this.at = 0;
  }
}

/** A dictionary of byte strings picked with a power-law skew (a few are common, most are rare). */
class Phrases {
  private readonly bytes: Buffer;
  private readonly start: Uint32Array;
  private readonly len: Uint8Array;
  /** 16-bit random number -> phrase index. */
  private readonly pick: Uint16Array;
  constructor(list: Buffer[], skew: number) {
    this.bytes = Buffer.concat(list);
    this.start = new Uint32Array(list.length);
    this.len = new Uint8Array(list.length);
    let at = 0;
    list.forEach((b, i) => {
      this.start[i] = at;
      this.len[i] = b.length;
      at += b.length;
    });
    this.pick = new Uint16Array(65536);
    for (let u = 0; u < 65536; u++) this.pick[u] = Math.floor(list.length * (u / 65536) ** skew);
  }
  get count(): number {
    return this.start.length;
  }
  choose(ks: Keystream): number {
    return this.pick[ks.u16()] ?? 0;
  }
  /** Copy phrase `i` into `out` at `at` (clipped at `end`); returns the new position. */
  put(i: number, out: Buffer, at: number, end: number): number {
    const s = this.start[i] ?? 0;
    const n = Math.min(this.len[i] ?? 0, end - at);
    // A byte loop: Buffer.copy costs more than the copy itself for strings this short.
    for (let k = 0; k < n; k++) out[at + k] = this.bytes[s + k] ?? 0;
    return at + n;
  }
}

/** Text: words of a shared vocabulary (a few dozen of them local to the file), punctuation, lines, indentation. */
class TextStream {
  private readonly local: Uint16Array;
  private readonly indent: number;
  private depth = 0;
  constructor(private readonly c: Content) {
    this.local = new Uint16Array(24 + (c.ks.u8() % 48));
    for (let i = 0; i < this.local.length; i++) this.local[i] = c.words.choose(c.ks);
    this.indent = [2, 4, 4, 8][c.ks.u8() & 3] ?? 4;
  }
  /** The next chunk of text. */
  chunk(): Buffer {
    const b = Buffer.alloc(CHUNK);
    this.fill(b, 0, CHUNK);
    return b;
  }
  /** Fill `out[at, end)`. */
  fill(out: Buffer, at: number, end: number): void {
    const ks = this.c.ks;
    const words = this.c.words;
    while (at < end) {
      const d = ks.u8();
      if (d < REPEAT_TEXT && at - 256 > 0) {
        // a phrase used earlier in the file (idioms, repeated names and calls)
        at = repeat(ks, out, at, end);
        continue;
      }
      const w = d < 110 ? (this.local[ks.u8() % this.local.length] ?? 0) : words.choose(ks);
      at = words.put(w, out, at, end);
      if (d >= 245) {
        // a number
        const digits = 1 + (ks.u8() % 6);
        for (let k = 0; k < digits && at < end; k++) out[at++] = 0x30 + (ks.u8() % 10);
      }
      const s = ks.u8();
      if (s < 36) {
        const move = ks.u8();
        this.depth = Math.max(0, Math.min(5, this.depth + (move < 80 ? 1 : move < 150 ? -1 : 0)));
        if (at < end) out[at++] = s < 8 ? 0x3a : s < 16 ? 0x3b : 0x29; // ':' ';' ')'
        if (at < end) out[at++] = 0x0a;
        for (let k = 0; k < this.depth * this.indent && at < end; k++) out[at++] = 0x20;
      } else at = this.c.separators.put(this.c.separators.choose(ks), out, at, end);
    }
  }
}

/** Calibration: out of 256, how often text and code repeat a recent span of the same chunk. */
const REPEAT_TEXT = 64;
const REPEAT_CODE = 30;

/** Copy 8–71 bytes from up to 2 KiB back in `out` to `at`; returns the new position. */
function repeat(ks: Keystream, out: Buffer, at: number, end: number): number {
  const from = at - 64 - (ks.u16() % Math.min(2048, at - 64));
  const n = Math.min(8 + (ks.u8() & 63), end - at);
  for (let k = 0; k < n; k++) out[at + k] = out[from + k] ?? 0;
  return at + n;
}

type Section = 'code' | 'table' | 'strings';

/** ELF-like binary content: code (compiler idioms with displacements), relocation/symbol tables, string tables. */
class BinaryStream {
  private section: Section = 'table';
  private addr: number;
  private readonly strings: TextStream;
  constructor(private readonly c: Content) {
    this.addr = c.ks.u16() * 0x1000;
    this.strings = new TextStream(c);
  }

  chunk(): Buffer {
    const ks = this.c.ks;
    if (ks.u8() < 38) {
      const r = ks.u8();
      this.section = r < 180 ? 'code' : r < 218 ? 'table' : 'strings';
    }
    const b = Buffer.alloc(CHUNK);
    if (this.section === 'code') this.code(b);
    else if (this.section === 'table') this.table(b);
    else {
      this.strings.fill(b, 0, CHUNK);
      for (let i = 0; i < CHUNK; i++) if (b[i] === 0x0a) b[i] = 0;
    }
    return b;
  }

  private code(b: Buffer): void {
    const ks = this.c.ks;
    const idioms = this.c.idioms;
    let i = 0;
    while (i < CHUNK) {
      const d = ks.u8();
      if (d < 4) {
        // padding between functions, to a 16-byte boundary
        const fill = d < 2 ? 0xcc : 0x90;
        const end = Math.min(CHUNK, (i + 16) & ~15);
        while (i < end) b[i++] = fill;
        continue;
      }
      if (d < 4 + REPEAT_CODE && i > 256) {
        i = repeat(ks, b, i, CHUNK);
        continue;
      }
      i = idioms.put(idioms.choose(ks), b, i, CHUNK);
      if (d < 90 && i < CHUNK) b[i++] = ks.u8() & (d < 50 ? 0x3f : 0xff);
      else if (d < 130) {
        // rel32: a small signed displacement, high bytes 0x00 or 0xff
        const neg = d & 1;
        const v = [ks.u8(), ks.u8() & (d < 110 ? 0x0f : 0xff), neg ? 0xff : 0, neg ? 0xff : 0];
        for (let k = 0; k < 4 && i < CHUNK; k++) b[i++] = neg ? 0xff - (v[k] ?? 0) : (v[k] ?? 0);
      }
    }
  }

  private table(b: Buffer): void {
    // Elf64_Rela-like 24-byte records: increasing offsets, a few relocation types, small symbol indices.
    const ks = this.c.ks;
    for (let i = 0; i + 24 <= CHUNK; i += 24) {
      const step = ks.u8();
      this.addr += 8 * (step < 200 ? 1 : 1 + (ks.u8() & 63));
      b.writeUInt32LE(this.addr >>> 0, i);
      b.writeUInt32LE(Math.floor(this.addr / 2 ** 32), i + 4);
      b.writeUInt32LE(step & 1 ? 8 : 6, i + 8);
      b.writeUInt16LE(ks.u8() < 100 ? ks.u16() & 0x7ff : 0, i + 12);
      if (step < 60) b.writeUInt32LE(ks.u16(), i + 16);
    }
  }
}

/**
 * Sparse structures (heaps, slab, inode tables, databases): 8-byte slots, about a third in use,
 * holding pointers into a few regions, small integers, or arbitrary 32-bit values.
 */
const STRUCT_USED = 120; // of 256: slots in use (xz -6 then compresses heaps to ≈ 0.23)
function structChunk(ks: Keystream): Buffer {
  const b = Buffer.alloc(CHUNK);
  for (let i = 0; i < CHUNK; i += 8) {
    const d = ks.u8();
    if (d >= STRUCT_USED) continue;
    if (d < 36) {
      // pointer: 0x0000_55xx_xxxx_xxx0 or 0x0000_7fxx_...
      b.writeUInt32LE(((ks.u16() << 16) | (ks.u16() & 0xfff0)) >>> 0, i);
      b.writeUInt32LE(d < 18 ? 0x5555 : 0x7ffd, i + 4);
    } else if (d < 72) b[i] = ks.u8() & (d < 54 ? 0x0f : 0xff);
    else b.writeUInt32LE(ks.u16() * 65536 + ks.u16(), i);
  }
  return b;
}

const LETTERS = 'etaoinshrdlcumwfgypbvkjxqz_';

/** Shared dictionaries (vocabulary, compiler idioms) and the keystream, from one seed. */
class Content {
  readonly rnd: Rnd;
  readonly ks: Keystream;
  readonly words: Phrases;
  readonly separators: Phrases;
  readonly idioms: Phrases;
  constructor(seed: number) {
    this.rnd = prng(seed);
    this.ks = new Keystream(seed);
    const rnd = this.rnd;
    const word = (): Buffer => {
      const n = 2 + Math.floor(rnd() * rnd() * 12);
      let w = '';
      for (let i = 0; i < n; i++) w += LETTERS[Math.floor(rnd() * rnd() * LETTERS.length)] ?? 'e';
      return Buffer.from(w, 'latin1');
    };
    this.words = new Phrases(Array.from({ length: 6000 }, word), 2.5);
    this.separators = new Phrases([' ', ' ', ' ', ' ', '.', '(', ', ', ' = ', '_', '"', ' == ', '->', '[', '] ', ' {', '/', '-'].map((s) => Buffer.from(s, 'latin1')), 1.5);
    this.idioms = new Phrases(
      Array.from({ length: 3000 }, () => Buffer.from(Array.from({ length: 2 + Math.floor(rnd() * rnd() * 14) }, () => Math.floor(rnd() * 256)))),
      2.5,
    );
  }

  struct(): Buffer {
    return structChunk(this.ks);
  }
}

type FileKind = 'binary' | 'text' | 'archive' | 'data';

/** The chunks of one file of `bytes` bytes (the last chunk zero-padded, as on disk and in the page cache). */
function* fileChunks(c: Content, kind: FileKind, bytes: number): Generator<Buffer> {
  const n = Math.ceil(bytes / CHUNK);
  const bin = kind === 'binary' ? new BinaryStream(c) : undefined;
  const text = kind === 'text' ? new TextStream(c) : undefined;
  for (let i = 0; i < n; i++) {
    let b: Buffer;
    if (bin) b = bin.chunk();
    else if (text) b = text.chunk();
    else if (kind === 'archive') b = c.ks.chunk();
    else b = c.struct();
    if (i === n - 1 && bytes % CHUNK !== 0) b.fill(0, bytes % CHUNK);
    yield b;
  }
}

/** File sizes: log-normal, median 4 KiB, capped at 16 MiB. */
function fileBytes(rnd: Rnd): number {
  return Math.max(64, Math.min(16 << 20, Math.floor(Math.exp(8.3 + 2 * gauss(rnd)))));
}

function pickWeighted<K extends string>(rnd: Rnd, weights: Record<K, number>): K {
  const keys = Object.keys(weights) as K[];
  const total = keys.reduce((a, k) => a + weights[k], 0);
  let x = rnd() * total;
  for (const k of keys) {
    x -= weights[k];
    if (x < 0) return k;
  }
  return keys[keys.length - 1] as K;
}

/** Split `total` into integer budgets by `shares` (largest remainder), summing exactly to `total`. */
export function budgets<K extends string>(total: number, shares: Record<K, number>): Record<K, number> {
  const keys = Object.keys(shares) as K[];
  const sum = keys.reduce((a, k) => a + shares[k], 0);
  const exact = keys.map((k) => (total * shares[k]) / sum);
  const out = Object.fromEntries(keys.map((k, i) => [k, Math.floor(exact[i] ?? 0)])) as Record<K, number>;
  let left = total - keys.reduce((a, k) => a + out[k], 0);
  const order = keys.map((k, i) => ({ k, frac: (exact[i] ?? 0) - out[k] })).sort((a, b) => b.frac - a.frac);
  for (const { k } of order) {
    if (left <= 0) break;
    out[k] += 1;
    left -= 1;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Writing images

/** Writes 4 KiB chunks sequentially in 1 MiB blocks. */
class SequentialWriter {
  private readonly fd: number;
  private readonly block = Buffer.alloc(256 * CHUNK);
  private used = 0;
  private pos = 0;
  constructor(p: string) {
    this.fd = openSync(p, 'w');
  }
  put(b: Buffer): void {
    b.copy(this.block, this.used, 0, CHUNK);
    this.used += CHUNK;
    if (this.used === this.block.length) this.flush();
  }
  zeros(n: number): void {
    for (let i = 0; i < n; i++) {
      this.block.fill(0, this.used, this.used + CHUNK);
      this.used += CHUNK;
      if (this.used === this.block.length) this.flush();
    }
  }
  private flush(): void {
    if (this.used > 0) writeSync(this.fd, this.block, 0, this.used, this.pos);
    this.pos += this.used;
    this.used = 0;
  }
  close(): void {
    this.flush();
    closeSync(this.fd);
  }
}

function readChunkAt(fd: number, chunk: number, out = Buffer.alloc(CHUNK)): Buffer {
  let done = 0;
  while (done < CHUNK) {
    const n = readSync(fd, out, done, CHUNK - done, chunk * CHUNK + done);
    if (n === 0) break;
    done += n;
  }
  out.fill(0, done);
  return out;
}

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i += 8) if (b.readBigUInt64LE(i) !== 0n) return false;
  return true;
}

// Base disk chunk roles.
const D_FREE = 0;
const D_META = 1;
const D_JOURNAL = 2;
const D_FILE = 3;

interface Extent {
  start: number;
  length: number;
  kind: FileKind;
}

interface DiskLayout {
  chunks: number;
  role: Uint8Array;
  files: Extent[];
  /** Block groups: metadata chunks [start, start + meta), free area [freeStart, end). */
  groups: Array<{ start: number; meta: number; freeStart: number; end: number }>;
  journal: { start: number; length: number };
}

/** Base files by chunks: a server distribution's /usr is mostly binaries, then text; databases, locales, fonts as data. */
const BASE_FILE_SHARES: Record<FileKind, number> = { binary: 0.4, text: 0.25, archive: 0.1, data: 0.25 };

function writeBaseDisk(p: string, chunks: number, c: Content): DiskLayout {
  const rnd = c.rnd;
  const groupChunks = Math.min(32768, Math.max(64, 2 ** Math.floor(Math.log2(chunks / 8))));
  const nGroups = Math.ceil(chunks / groupChunks);
  const inodeTable = Math.max(4, groupChunks / 64);
  const journalGroup = Math.floor(nGroups / 2);
  const journalLength = Math.max(16, Math.min(8192, Math.floor(chunks / 32)));
  const role = new Uint8Array(chunks);
  const files: Extent[] = [];
  const groups: DiskLayout['groups'] = [];
  let journal = { start: 0, length: 0 };
  const w = new SequentialWriter(p);
  for (let g = 0; g < nGroups; g++) {
    const start = g * groupChunks;
    const end = Math.min(chunks, start + groupChunks);
    // Descriptors, block bitmap, inode bitmap, inode table (40% of inodes in use).
    const meta = Math.min(end - start, 3 + inodeTable);
    for (let i = 0; i < meta; i++) {
      let b: Buffer;
      if (i === 1 || i === 2) {
        b = Buffer.alloc(CHUNK);
        b.fill(0xff, 0, Math.floor(CHUNK * (i === 1 ? 0.5 : 0.4)));
      } else if (i === 0 || i - 3 < inodeTable * 0.4) b = c.struct();
      else b = Buffer.alloc(CHUNK);
      role[start + i] = D_META;
      w.put(b);
    }
    let at = start + meta;
    if (g === journalGroup && end - at > journalLength * 2) {
      journal = { start: at, length: journalLength };
      for (let i = 0; i < journalLength; i++) {
        role[at + i] = D_JOURNAL;
        if (i < journalLength * 0.3) w.put(c.struct());
        else w.zeros(1);
      }
      at += journalLength;
    }
    const usedEnd = at + Math.floor((end - at) * 0.5);
    while (at < usedEnd) {
      const kind = pickWeighted(rnd, BASE_FILE_SHARES);
      const bytes = Math.min(fileBytes(rnd), (usedEnd - at) * CHUNK);
      const ext: Extent = { start: at, length: Math.ceil(bytes / CHUNK), kind };
      for (const b of fileChunks(c, kind, bytes)) {
        role[at++] = D_FILE;
        w.put(b);
      }
      files.push(ext);
    }
    w.zeros(end - at);
    groups.push({ start, meta, freeStart: usedEnd, end });
  }
  w.close();
  return { chunks, role, files, groups, journal };
}

// Base memory page roles.
const M_FREE = 0;
const M_KERNEL = 1;
const M_CACHE = 2;
const M_ANON = 3;
const M_SLAB = 4;
const M_RANDOM = 5;

/** A base VM resumed idle, with its services up: much memory free, page cache, process memory, slab. */
const BASE_MEM_SHARES = { free: 0.45, cache: 0.25, anon: 0.18, slab: 0.1, random: 0.02 };

function writeBaseMemory(p: string, pages: number, c: Content, disk: DiskLayout, diskFd: number): Uint8Array {
  const rnd = c.rnd;
  const role = new Uint8Array(pages);
  const w = new SequentialWriter(p);
  const kernel = Math.max(16, Math.min(4096, Math.floor(pages / 32)));
  const kcode = new BinaryStream(c);
  for (let i = 0; i < kernel; i++) {
    role[i] = M_KERNEL;
    w.put(i < kernel * 0.6 ? kcode.chunk() : c.struct());
  }
  let at = kernel;
  const buf = Buffer.alloc(CHUNK);
  while (at < pages) {
    const kind = pickWeighted(rnd, BASE_MEM_SHARES);
    const run = Math.min(pages - at, 1 + Math.floor(rnd() * 64));
    if (kind === 'free') {
      w.zeros(run);
      at += run;
      continue;
    }
    if (kind === 'cache') {
      const f = disk.files[Math.floor(rnd() * disk.files.length)];
      const from = f ? f.start + Math.floor(rnd() * f.length) : 0;
      const n = f ? Math.min(run, f.start + f.length - from) : run;
      for (let i = 0; i < n; i++) {
        role[at++] = M_CACHE;
        w.put(readChunkAt(diskFd, from + i, buf));
      }
      continue;
    }
    const text = kind === 'anon' && rnd() < 0.2 ? new TextStream(c) : undefined;
    for (let i = 0; i < run; i++) {
      role[at++] = kind === 'anon' ? M_ANON : kind === 'slab' ? M_SLAB : M_RANDOM;
      w.put(kind === 'random' ? c.ks.chunk() : text ? text.chunk() : c.struct());
    }
  }
  w.close();
  return role;
}

// ---------------------------------------------------------------------------------------------
// Changing the launch images

/** The launch image being changed: writes chunk by chunk, counts only chunks that end up differing from the base. */
class LaunchImage<K extends string> {
  readonly taken: Uint8Array;
  readonly byKind: Record<K, number>;
  changed = 0;
  private readonly fd: number;
  private readonly baseFd: number;
  private readonly scratch = Buffer.alloc(CHUNK);
  constructor(
    readonly path: string,
    basePath: string,
    readonly chunks: number,
    readonly role: Uint8Array,
    kinds: readonly K[],
  ) {
    this.fd = openSync(path, 'r+');
    this.baseFd = openSync(basePath, 'r');
    this.taken = new Uint8Array(chunks);
    this.byKind = Object.fromEntries(kinds.map((k) => [k, 0])) as Record<K, number>;
  }

  base(chunk: number): Buffer {
    return readChunkAt(this.baseFd, chunk);
  }

  current(chunk: number): Buffer {
    return readChunkAt(this.fd, chunk);
  }

  /** Write `data` at `chunk` as a change of kind `kind`; false (nothing written) if taken or equal to the base. */
  put(kind: K, chunk: number, data: Buffer): boolean {
    if (chunk < 0 || chunk >= this.chunks || this.taken[chunk]) return false;
    const base = readChunkAt(this.baseFd, chunk, this.scratch);
    if (base.equals(data.subarray(0, CHUNK))) return false;
    writeSync(this.fd, data, 0, CHUNK, chunk * CHUNK);
    this.taken[chunk] = 1;
    this.changed += 1;
    this.byKind[kind] += 1;
    return true;
  }

  close(): void {
    closeSync(this.fd);
    closeSync(this.baseFd);
  }
}

function noRoom(what: string, image: string): Error {
  return new Error(`install-pair: no room for ${what} in the ${image} image; lower the changed fraction or enlarge the image`);
}

/** Free blocks for new files: per block group, allocated first-fit from the group's free area. */
class Allocator {
  private readonly cursor: number[];
  constructor(
    private readonly disk: DiskLayout,
    private readonly img: LaunchImage<DiskKind>,
  ) {
    this.cursor = disk.groups.map((g) => g.freeStart);
  }
  /** The next free block in group `g`, or another group's if `g` is full. */
  next(g: number): number {
    const n = this.disk.groups.length;
    for (let k = 0; k < n; k++) {
      const gi = (g + k) % n;
      const grp = this.disk.groups[gi];
      if (!grp) continue;
      let c = this.cursor[gi] ?? grp.end;
      while (c < grp.end && (this.img.taken[c] || this.disk.role[c] !== D_FREE)) c++;
      this.cursor[gi] = c;
      if (c < grp.end) return c;
    }
    throw noRoom('new files', 'disk');
  }
}

/** Apply the disk part of the model; returns the new files' chunk positions (for their page cache). */
function changeDisk(c: Content, disk: DiskLayout, img: LaunchImage<DiskKind>, budget: Record<DiskKind, number>): number[][] {
  const rnd = c.rnd;
  const alloc = new Allocator(disk, img);
  const newFiles: number[][] = [];
  const count = (k: DiskKind): number => img.byKind[k];
  const left = (k: DiskKind): number => budget[k] - count(k);
  // New files and copies of base files, package by package (a package's files share a block group).
  const written = ['binary', 'text', 'archive', 'baseCopy'] as const;
  while (written.some((k) => left(k) > 0)) {
    const group = Math.floor(rnd() * disk.groups.length);
    const files = 1 + Math.floor(rnd() * 20);
    for (let f = 0; f < files; f++) {
      const weights = Object.fromEntries(written.map((k) => [k, Math.max(0, left(k))])) as Record<(typeof written)[number], number>;
      if (written.every((k) => weights[k] === 0)) break;
      const kind = pickWeighted(rnd, weights);
      const positions: number[] = [];
      let g = group;
      const place = (b: Buffer): void => {
        const at = alloc.next(g);
        g = disk.groups.findIndex((x) => at >= x.start && at < x.end);
        if (!img.put(kind, at, b)) throw new Error(`install-pair: a new chunk at ${at} equals the base chunk`);
        positions.push(at);
      };
      if (kind === 'baseCopy') {
        const src = disk.files[Math.floor(rnd() * disk.files.length)];
        if (!src) throw noRoom('copies of base files', 'disk');
        const n = Math.min(src.length, left(kind));
        for (let i = 0; i < n; i++) place(img.base(src.start + i));
      } else {
        const bytes = Math.min(fileBytes(rnd), left(kind) * CHUNK);
        for (const b of fileChunks(c, kind, bytes)) place(b);
        newFiles.push(positions);
      }
    }
  }
  // Freed (deleted, discarded) base files.
  for (let tries = 0; left('freed') > 0; tries++) {
    if (tries > 100000) throw noRoom('freed files', 'disk');
    const f = disk.files[Math.floor(rnd() * disk.files.length)];
    if (!f) continue;
    const zero = Buffer.alloc(CHUNK);
    for (let i = 0; i < f.length && left('freed') > 0; i++) img.put('freed', f.start + i, zero);
  }
  // Metadata: small edits in place, of group metadata (bitmaps, inode tables) and of text-file blocks (directories, dpkg status).
  const edited: number[] = [];
  const textFiles = disk.files.filter((f) => f.kind === 'text');
  for (let tries = 0; left('metadata') > 0; tries++) {
    if (tries > 100000) throw noRoom('metadata edits', 'disk');
    let at: number;
    if (rnd() < 0.6 || textFiles.length === 0) {
      const g = disk.groups[Math.floor(rnd() * disk.groups.length)];
      if (!g) continue;
      at = g.start + Math.floor(rnd() * g.meta);
    } else {
      const f = textFiles[Math.floor(rnd() * textFiles.length)];
      if (!f) continue;
      at = f.start + Math.floor(rnd() * f.length);
    }
    if (img.taken[at]) continue;
    const b = img.current(at);
    const edits = 1 + Math.floor(rnd() * 12);
    for (let e = 0; e < edits; e++) {
      const len = 1 + Math.floor(rnd() * 8);
      const off = Math.floor(rnd() * (CHUNK / 8)) * 8;
      for (let k = 0; k < len; k++) b[off + k] = Math.floor(rnd() * 256);
    }
    if (img.put('metadata', at, b)) edited.push(at);
  }
  // Journal: transactions of descriptor block, copies of edited metadata blocks, commit block.
  const j = disk.journal;
  if (budget.journal > 0 && (j.length < budget.journal || edited.length === 0)) throw noRoom('journal blocks', 'disk');
  let pos = Math.floor(rnd() * j.length);
  let seq = 1 + Math.floor(rnd() * 1e6);
  const header = (type: number): Buffer => {
    const b = Buffer.alloc(CHUNK);
    b.writeUInt32BE(0xc03b3998, 0); // jbd2 magic
    b.writeUInt32BE(type, 4);
    b.writeUInt32BE(seq, 8);
    return b;
  };
  for (let tries = 0; left('journal') > 0; tries++) {
    if (tries > j.length * 4) throw noRoom('journal blocks', 'disk');
    const n = 1 + Math.floor(rnd() * 8);
    const blocks: Buffer[] = [header(1)];
    for (let i = 0; i < n; i++) {
      const src = edited[Math.floor(rnd() * edited.length)] ?? 0;
      const d = blocks[0];
      if (d) d.writeUInt32BE(src, 12 + i * 16);
      blocks.push(img.current(src));
    }
    blocks.push(header(2));
    for (const b of blocks) {
      if (left('journal') <= 0) break;
      img.put('journal', j.start + (pos++ % j.length), b);
    }
    seq += 1;
  }
  return newFiles;
}

/** Apply the memory part of the model. `disk` is the changed launch disk (still open). */
function changeMemory(c: Content, img: LaunchImage<MemKind>, budget: Record<MemKind, number>, disk: DiskLayout, launchDisk: LaunchImage<DiskKind>, newFiles: number[][]): void {
  const rnd = c.rnd;
  const role = img.role;
  const left = (k: MemKind): number => budget[k] - img.byKind[k];
  /** Where the guest puts a newly allocated page: mostly free memory, sometimes a reclaimed page. */
  const fresh = (): number => {
    for (let t = 0; t < 100000; t++) {
      const p = Math.floor(rnd() * img.chunks);
      const r = role[p];
      if (img.taken[p] || r === M_KERNEL) continue;
      if (r === M_FREE || rnd() < 0.25) return p;
    }
    throw noRoom('new pages', 'memory');
  };
  const where = (ok: (r: number) => boolean): number => {
    for (let t = 0; t < 100000; t++) {
      const p = Math.floor(rnd() * img.chunks);
      if (!img.taken[p] && ok(role[p] ?? M_FREE)) return p;
    }
    throw noRoom('changed pages', 'memory');
  };
  /** Write up to `max` pages of `kind` from `at` on (`written(i)` after each); `data(i)` undefined ends the run. Returns pages written. */
  const run = (kind: MemKind, at: number, max: number, data: (i: number) => Buffer | undefined, written?: (i: number) => void): number => {
    let n = 0;
    for (let i = 0; i < max && left(kind) > 0; i++) {
      const b = data(i);
      if (!b || !img.put(kind, at + i, b)) break;
      written?.(i);
      n += 1;
    }
    return n;
  };
  const fill = (kind: MemKind, step: () => number): void => {
    let idle = 0;
    while (left(kind) > 0) {
      idle = step() > 0 ? 0 : idle + 1;
      if (idle > 10000) throw noRoom(kind, 'memory');
    }
  };

  // Heaps of the new processes: sparse structures, some strings; remembered for the forked workers.
  const heapRuns: Array<[number, number]> = [];
  fill('heap', () => {
    const at = fresh();
    const text = rnd() < 0.2 ? new TextStream(c) : undefined;
    const n = run('heap', at, 1 + Math.floor(rnd() * 32), () => (text ? text.chunk() : c.struct()));
    if (n > 0) heapRuns.push([at, n]);
    return n;
  });
  fill('forkDup', () => {
    const [src, len] = heapRuns[Math.floor(rnd() * heapRuns.length)] ?? [0, 0];
    if (len === 0) return 0;
    return run('forkDup', fresh(), len, (i) => img.current(src + i));
  });
  // Page cache of the files just written: readahead runs of a file's chunks at scattered addresses.
  const flat = newFiles.flat();
  const fileEnd = new Uint32Array(flat.length); // for flat[i]: the index one past its file's last chunk
  let first = 0;
  for (const f of newFiles) {
    fileEnd.fill(first + f.length, first, first + f.length);
    first += f.length;
  }
  if (budget.pageCacheNew > flat.length) throw noRoom(`the page cache of ${budget.pageCacheNew} pages of new files, which have ${flat.length} chunks`, 'memory');
  const isCached = new Uint8Array(flat.length);
  fill('pageCacheNew', () => {
    let i = Math.floor(rnd() * flat.length);
    for (let k = 0; k < flat.length && isCached[i]; k++) i = (i + 1) % flat.length;
    const end = Math.min(fileEnd[i] ?? 0, i + 1 + Math.floor(rnd() * 16));
    return run(
      'pageCacheNew',
      fresh(),
      end - i,
      (k) => (isCached[i + k] ? undefined : launchDisk.current(flat[i + k] ?? 0)),
      (k) => (isCached[i + k] = 1),
    );
  });
  // Page cache of base files the installer read.
  const cachedBase = new Set<number>();
  fill('pageCacheBase', () => {
    const f = disk.files[Math.floor(rnd() * disk.files.length)];
    if (!f) return 0;
    const from = f.start + Math.floor(rnd() * f.length);
    return run(
      'pageCacheBase',
      fresh(),
      Math.min(f.start + f.length - from, 1 + Math.floor(rnd() * 16)),
      (i) => (cachedBase.has(from + i) ? undefined : launchDisk.base(from + i)),
      (i) => cachedBase.add(from + i),
    );
  });
  // Small edits of kernel pages and slab, in place.
  fill('kernelEdit', () => {
    const at = where((r) => r === M_KERNEL || r === M_SLAB);
    const b = img.current(at);
    const edits = 1 + Math.floor(rnd() * 8);
    for (let e = 0; e < edits; e++) {
      const off = Math.floor(rnd() * (CHUNK / 8)) * 8;
      const len = 1 + Math.floor(rnd() * 8);
      for (let k = 0; k < len; k++) b[off + k] = Math.floor(rnd() * 256);
    }
    return img.put('kernelEdit', at, b) ? 1 : 0;
  });
  // Freed pages (page cache dropped, heaps freed), zeroed.
  const zero = Buffer.alloc(CHUNK);
  fill('freed', () => {
    const at = where((r) => r === M_CACHE || r === M_ANON);
    const r0 = role[at];
    return run('freed', at, 1 + Math.floor(rnd() * 16), (i) => (role[at + i] === r0 ? zero : undefined));
  });
  // Base pages at new addresses.
  fill('relocated', () => {
    const src = where((r) => r !== M_FREE && r !== M_RANDOM);
    return run('relocated', fresh(), 1 + Math.floor(rnd() * 16), (i) => {
      const b = src + i < img.chunks ? img.base(src + i) : undefined;
      return b && !isZero(b) ? b : undefined;
    });
  });
  fill('random', () => run('random', fresh(), 1 + Math.floor(rnd() * 8), () => c.ks.chunk()));
}

/**
 * Generate the base and launch images under `dir` (base.raw, base.mem, launch.raw, launch.mem) and
 * launch.qcow2: a qcow2 over base.raw holding only the clusters that changed, as a launch VM's disk
 * would (made by qemu-img rebase of an empty qcow2 over launch.raw onto base.raw).
 */
export function generateInstallPair(dir: string, opts: InstallPairOptions): InstallPair {
  const memFraction = opts.memFraction ?? opts.fraction;
  for (const [name, v, min] of [['diskSize', opts.diskSize, 4 << 20], ['memSize', opts.memSize, 2 << 20]] as const) {
    if (!Number.isInteger(v) || v % CHUNK !== 0 || v < min) throw new Error(`install-pair: ${name} must be a multiple of 4096 and at least ${min}, got ${v}`);
  }
  for (const [name, v] of [['fraction', opts.fraction], ['memFraction', memFraction]] as const) {
    if (!(v > 0 && v <= 0.2)) throw new Error(`install-pair: ${name} must be in (0, 0.2], got ${v}`);
  }
  const root = path.resolve(dir);
  mkdirSync(root, { recursive: true });
  const p: GeneratedPair = {
    baseDisk: path.join(root, 'base.raw'),
    baseMem: path.join(root, 'base.mem'),
    launchRaw: path.join(root, 'launch.raw'),
    launchQcow2: path.join(root, 'launch.qcow2'),
    launchMem: path.join(root, 'launch.mem'),
  };
  const c = new Content(opts.seed);
  const diskChunks = opts.diskSize / CHUNK;
  const pages = opts.memSize / CHUNK;
  const layout = writeBaseDisk(p.baseDisk, diskChunks, c);
  const baseDiskFd = openSync(p.baseDisk, 'r');
  let memRole: Uint8Array;
  try {
    memRole = writeBaseMemory(p.baseMem, pages, c, layout, baseDiskFd);
  } finally {
    closeSync(baseDiskFd);
  }
  copyFileSync(p.baseDisk, p.launchRaw);
  copyFileSync(p.baseMem, p.launchMem);
  const diskImg = new LaunchImage<DiskKind>(p.launchRaw, p.baseDisk, diskChunks, layout.role, Object.keys(APP_INSTALL_MODEL.disk) as DiskKind[]);
  const memImg = new LaunchImage<MemKind>(p.launchMem, p.baseMem, pages, memRole, Object.keys(APP_INSTALL_MODEL.memory) as MemKind[]);
  try {
    const newFiles = changeDisk(c, layout, diskImg, budgets(Math.round(diskChunks * opts.fraction), APP_INSTALL_MODEL.disk));
    changeMemory(c, memImg, budgets(Math.round(pages * memFraction), APP_INSTALL_MODEL.memory), layout, diskImg, newFiles);
  } finally {
    diskImg.close();
    memImg.close();
  }
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', p.launchRaw, '-F', 'raw', p.launchQcow2]);
  execFileSync('qemu-img', ['rebase', '-q', '-f', 'qcow2', '-b', p.baseDisk, '-F', 'raw', p.launchQcow2]);
  return {
    ...p,
    model: 'app-install',
    disk: { chunks: diskChunks, changed: diskImg.changed, byKind: diskImg.byKind },
    memory: { chunks: pages, changed: memImg.changed, byKind: memImg.byKind },
  };
}

/** `chunks` chunks of one content kind as the generator makes them (to check their compressibility against real files). */
export function sampleContent(kind: FileKind | 'heap', chunks: number, seed: number): Buffer {
  const c = new Content(seed);
  const out: Buffer[] = [];
  while (out.length < chunks) {
    if (kind === 'heap') out.push(c.struct());
    else for (const b of fileChunks(c, kind, Math.min(chunks - out.length, 1 + Math.floor(c.rnd() * 64)) * CHUNK)) out.push(b);
  }
  return Buffer.concat(out);
}
