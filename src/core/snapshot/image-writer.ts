/**
 * Writer of the memory image during a split: coalesces pages that arrive in address order into
 * 8 MiB writes (double-buffered, so writing overlaps parsing) and leaves never-written zero pages
 * as holes of the sparse file.
 */
import type { FileHandle } from 'node:fs/promises';
import * as F from './format';
import type { StreamReader } from './reader';

const IO_SIZE = 8 * 1024 * 1024;

/** Zero gaps up to this many pages are written as zeros to keep one write; longer ones stay holes. */
const MAX_ZERO_GAP = 16;

/**
 * Coalescing, double-buffered writer of the memory image (pages mostly arrive in address order).
 * Never-written zero pages are left as holes of the sparse file unless a short gap is cheaper to fill.
 */
export class ImageWriter {
  private buf = Buffer.allocUnsafe(IO_SIZE);
  private spare = Buffer.allocUnsafe(IO_SIZE);
  private start = -1;
  private len = 0;
  /** Zero pages (holes) right after the buffered run. */
  private gap = 0;
  private inFlight: Promise<unknown> = Promise.resolve();

  constructor(private readonly fh: FileHandle) {}

  /** Makes `off` the next buffered page if it continues the run (filling a short hole gap). */
  private contiguous(off: number): boolean {
    if (this.start < 0) return false;
    const end = this.start + this.len;
    if (off === end && this.len + F.PAGE_SIZE <= this.buf.length) return true;
    if (this.gap > 0 && this.gap <= MAX_ZERO_GAP && off === end + this.gap * F.PAGE_SIZE && this.len + (this.gap + 1) * F.PAGE_SIZE <= this.buf.length) {
      this.buf.fill(0, this.len, this.len + this.gap * F.PAGE_SIZE);
      this.len += this.gap * F.PAGE_SIZE;
      this.gap = 0;
      return true;
    }
    return false;
  }

  private async restart(off: number): Promise<void> {
    await this.flush();
    this.start = off;
  }

  /**
   * Takes the next page of `r` (consumed now, synchronously) for image offset `off`. Returns a
   * promise to await only when a full buffer had to be flushed first.
   */
  putFrom(off: number, r: StreamReader): Promise<void> | undefined {
    if (this.contiguous(off)) {
      r.copyTo(F.PAGE_SIZE, this.buf, this.len);
      this.len += F.PAGE_SIZE;
      this.gap = 0;
      return undefined;
    }
    const page = Buffer.from(r.take(F.PAGE_SIZE)); // the reader's buffer may move while we flush
    return this.restart(off).then(() => {
      page.copy(this.buf, this.len);
      this.len += F.PAGE_SIZE;
    });
  }

  fill(off: number, byte: number): Promise<void> | undefined {
    if (!this.contiguous(off)) return this.restart(off).then(() => void this.fill(off, byte));
    this.buf.fill(byte, this.len, this.len + F.PAGE_SIZE);
    this.len += F.PAGE_SIZE;
    this.gap = 0;
    return undefined;
  }

  /** A zero page that was never written: a hole of the sparse image (nothing to write). */
  zeroHole(off: number): void {
    if (this.start >= 0 && off === this.start + this.len + this.gap * F.PAGE_SIZE) this.gap++;
  }

  async flush(): Promise<void> {
    await this.inFlight;
    if (this.len > 0 && this.start >= 0) {
      const full = this.buf;
      this.inFlight = this.fh.write(full, 0, this.len, this.start);
      this.buf = this.spare;
      this.spare = full;
    }
    this.len = 0;
    this.gap = 0;
    this.start = -1;
  }

  async close(size: number): Promise<void> {
    await this.flush();
    await this.inFlight;
    await this.fh.truncate(size);
  }
}

