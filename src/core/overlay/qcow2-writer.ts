/**
 * A minimal streaming qcow2 (version 3) writer: a new image over a raw backing file, holding only
 * the chunks we write. Cost is proportional to what is written, not to the virtual size (apart
 * from the L1 table: 8 bytes per 2 MiB of virtual disk).
 *
 * Layout: cluster 0 = header + backing-format extension + backing file name; data clusters are
 * appended as chunks arrive (4 KiB clusters, so one overlay chunk = one cluster and no partial
 * cluster ever needs data from the backing file); `finish()` appends the L2 tables, the L1 table,
 * the refcount table and refcount blocks, and rewrites the header. All-zero chunks use the v3
 * "reads as zero" L2 flag and take no space. Every cluster has refcount 1.
 */
import { closeSync, fsyncSync, openSync, readSync, writeSync } from 'node:fs';
import { CloudletError } from '../errors';

const CLUSTER_BITS = 12;
const CLUSTER = 1 << CLUSTER_BITS;
const L2_ENTRIES = CLUSTER / 8;
const REFCOUNT_ORDER = 4; // 16-bit refcounts
const REFCOUNTS_PER_BLOCK = (CLUSTER * 8) / (1 << REFCOUNT_ORDER);
const HEADER_LENGTH = 104;
const QCOW_MAGIC = 0x514649fb;
const EXT_BACKING_FORMAT = 0xe2792aca;
const COPIED = 1n << 63n;
const ZERO_FLAG = 1n;

export const QCOW2_CLUSTER_SIZE = CLUSTER;

export class Qcow2Writer {
  private readonly fd: number;
  private nextCluster = 1;
  /** virtual chunk -> host cluster number (0 = reads as zero). */
  private readonly map = new Map<number, number>();
  private finished = false;

  constructor(
    readonly path: string,
    readonly virtualSize: number,
    readonly backingFile: string,
    readonly backingFormat = 'raw',
    /** Rewrite an existing file in place (same inode: a process holding it open sees the new content). */
    options: { overwrite?: boolean } = {},
  ) {
    const name = Buffer.from(backingFile, 'utf8');
    if (name.length > 1023 || HEADER_LENGTH + 8 + 8 + 8 + name.length > CLUSTER) {
      throw new CloudletError('BAD_INPUT', `backing file path is too long for a qcow2 header: ${backingFile}`, { fix: 'use a shorter store path' });
    }
    this.fd = openSync(path, options.overwrite ? 'w+' : 'wx+');
    this.writeHeader(0, 0, 0, 0);
  }

  get virtualChunks(): number {
    return Math.ceil(this.virtualSize / CLUSTER);
  }

  has(chunk: number): boolean {
    return this.map.has(chunk);
  }

  /** Write `data.length / 4096` chunks starting at virtual chunk `chunk` (each chunk once). */
  writeChunks(chunk: number, data: Buffer): void {
    const n = data.length / CLUSTER;
    const host = this.nextCluster;
    for (let i = 0; i < n; i++) this.claim(chunk + i, host + i);
    this.nextCluster += n;
    let done = 0;
    while (done < data.length) done += writeSync(this.fd, data, done, data.length - done, host * CLUSTER + done);
  }

  writeZero(chunk: number, count: number): void {
    for (let i = 0; i < count; i++) this.claim(chunk + i, 0);
  }

  /** Read back a chunk written earlier into `out` (4096 bytes). */
  readChunk(chunk: number, out: Buffer): void {
    const host = this.map.get(chunk);
    if (host === undefined) throw new Error(`qcow2 writer: chunk ${chunk} was not written`);
    if (host === 0) {
      out.fill(0, 0, CLUSTER);
      return;
    }
    let done = 0;
    while (done < CLUSTER) {
      const n = readSync(this.fd, out, done, CLUSTER - done, host * CLUSTER + done);
      if (n === 0) throw new Error(`qcow2 writer: short read of cluster ${host}`);
      done += n;
    }
  }

  private claim(chunk: number, host: number): void {
    if (chunk < 0 || chunk >= this.virtualChunks) throw new Error(`qcow2 writer: chunk ${chunk} outside the ${this.virtualSize}-byte disk`);
    if (this.map.has(chunk)) throw new Error(`qcow2 writer: chunk ${chunk} written twice`);
    this.map.set(chunk, host);
  }

  /** Append the metadata and close the file. */
  finish(sync = true): void {
    if (this.finished) return;
    this.finished = true;
    const l1Size = Math.ceil(this.virtualSize / (CLUSTER * L2_ENTRIES));
    // Group chunks by L2 table.
    const l2s = new Map<number, Array<[number, number]>>();
    for (const [chunk, host] of this.map) {
      const l1i = Math.floor(chunk / L2_ENTRIES);
      let list = l2s.get(l1i);
      if (!list) l2s.set(l1i, (list = []));
      list.push([chunk % L2_ENTRIES, host]);
    }
    const l1 = Buffer.alloc(Math.max(1, Math.ceil((l1Size * 8) / CLUSTER)) * CLUSTER);
    const l1Indexes = [...l2s.keys()].sort((a, b) => a - b);
    const l2Start = this.nextCluster;
    const l2Buf = Buffer.alloc(l1Indexes.length * CLUSTER);
    l1Indexes.forEach((l1i, k) => {
      const table = l2Buf.subarray(k * CLUSTER, (k + 1) * CLUSTER);
      for (const [l2i, host] of l2s.get(l1i) ?? []) {
        table.writeBigUInt64BE(host === 0 ? ZERO_FLAG : COPIED | BigInt(host * CLUSTER), l2i * 8);
      }
      l1.writeBigUInt64BE(COPIED | BigInt((l2Start + k) * CLUSTER), l1i * 8);
    });
    const l1Start = l2Start + l1Indexes.length;
    const l1Clusters = l1.length / CLUSTER;
    const rtStart = l1Start + l1Clusters;
    // Refcount table + blocks must cover every cluster including themselves.
    let rtClusters = 1;
    let rbCount = 1;
    for (;;) {
      const total = rtStart + rtClusters + rbCount;
      const needRb = Math.ceil(total / REFCOUNTS_PER_BLOCK);
      const needRt = Math.max(1, Math.ceil((needRb * 8) / CLUSTER));
      if (needRb === rbCount && needRt === rtClusters) break;
      rbCount = needRb;
      rtClusters = needRt;
    }
    const rbStart = rtStart + rtClusters;
    const total = rbStart + rbCount;
    const rt = Buffer.alloc(rtClusters * CLUSTER);
    const rb = Buffer.alloc(rbCount * CLUSTER);
    for (let b = 0; b < rbCount; b++) rt.writeBigUInt64BE(BigInt((rbStart + b) * CLUSTER), b * 8);
    for (let c = 0; c < total; c++) rb.writeUInt16BE(1, c * 2);
    this.pwrite(l2Buf, l2Start * CLUSTER);
    this.pwrite(l1, l1Start * CLUSTER);
    this.pwrite(rt, rtStart * CLUSTER);
    this.pwrite(rb, rbStart * CLUSTER);
    this.writeHeader(l1Size, l1Start * CLUSTER, rtStart * CLUSTER, rtClusters);
    if (sync) fsyncSync(this.fd);
    closeSync(this.fd);
  }

  /** Close without finishing (on error; the caller removes the file). */
  abort(): void {
    if (this.finished) return;
    this.finished = true;
    try {
      closeSync(this.fd);
    } catch {
      /* already closed */
    }
  }

  private pwrite(buf: Buffer, pos: number): void {
    let done = 0;
    while (done < buf.length) done += writeSync(this.fd, buf, done, buf.length - done, pos + done);
  }

  private writeHeader(l1Size: number, l1Offset: number, rtOffset: number, rtClusters: number): void {
    const h = Buffer.alloc(CLUSTER);
    h.writeUInt32BE(QCOW_MAGIC, 0);
    h.writeUInt32BE(3, 4);
    h.writeUInt32BE(CLUSTER_BITS, 20);
    h.writeBigUInt64BE(BigInt(this.virtualSize), 24);
    h.writeUInt32BE(0, 32); // no encryption
    h.writeUInt32BE(l1Size, 36);
    h.writeBigUInt64BE(BigInt(l1Offset), 40);
    h.writeBigUInt64BE(BigInt(rtOffset), 48);
    h.writeUInt32BE(rtClusters, 56);
    h.writeUInt32BE(REFCOUNT_ORDER, 96);
    h.writeUInt32BE(HEADER_LENGTH, 100);
    // Header extensions: backing format, then end.
    let at = HEADER_LENGTH;
    const fmt = Buffer.from(this.backingFormat, 'latin1');
    h.writeUInt32BE(EXT_BACKING_FORMAT, at);
    h.writeUInt32BE(fmt.length, at + 4);
    fmt.copy(h, at + 8);
    at += 8 + Math.ceil(fmt.length / 8) * 8;
    at += 8; // end-of-extensions (type 0, length 0)
    const name = Buffer.from(this.backingFile, 'utf8');
    name.copy(h, at);
    h.writeBigUInt64BE(BigInt(at), 8);
    h.writeUInt32BE(name.length, 16);
    this.pwrite(h, 0);
  }
}
