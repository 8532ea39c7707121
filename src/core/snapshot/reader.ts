/**
 * Sequential reader over a file with large reads: every byte is read once, in order, and hashed as
 * it is read, so the caller gets the file's sha256 for free. `peek` exposes buffered bytes without
 * consuming them (the buffer grows on demand for long look-aheads).
 */
import type { FileHandle } from 'node:fs/promises';
import { CloudletError } from '../errors';
import { createStreamHasher, type StreamHasher } from './hasher';

const NO_HASH: StreamHasher = { update: () => undefined, digest: () => Promise.resolve(''), close: () => undefined };

const READ_SIZE = 8 * 1024 * 1024;
const MAX_BUFFER = 256 * 1024 * 1024;

export class StreamReader {
  private buf: Buffer = Buffer.allocUnsafe(2 * READ_SIZE);
  /** Absolute file offset of buf[0]. */
  private base = 0;
  /** Next unread byte in buf. */
  private at = 0;
  /** End of valid data in buf. */
  private end = 0;
  private readonly hash: StreamHasher;
  private eofReached = false;

  constructor(
    private readonly fh: FileHandle,
    readonly size: number,
    private readonly what: string,
    private readonly onRead?: (done: number, total: number) => void,
    /** false: the caller hashes the file another way (finish() then returns ''). */
    hash = true,
  ) {
    this.hash = hash ? createStreamHasher(size) : NO_HASH;
  }

  /** Absolute offset of the next byte. */
  get pos(): number {
    return this.base + this.at;
  }

  get remaining(): number {
    return this.size - this.pos;
  }

  /** Makes up to n bytes available; returns how many are (fewer only at end of file). */
  async ensure(n: number): Promise<number> {
    while (this.end - this.at < n && !this.eofReached) {
      if (this.at > 0) {
        // Move the unread tail (shorter than n) to the front.
        this.buf.copy(this.buf, 0, this.at, this.end);
        this.base += this.at;
        this.end -= this.at;
        this.at = 0;
      }
      if (this.buf.length < n) {
        if (n > MAX_BUFFER) throw new CloudletError('BAD_INPUT', `${this.what}: a look-ahead of ${n} bytes at offset ${this.pos} exceeds the reader's limit`);
        const bigger = Buffer.allocUnsafe(Math.min(MAX_BUFFER, Math.max(this.buf.length * 2, n)));
        this.buf.copy(bigger, 0, 0, this.end);
        this.buf = bigger;
      }
      const fileAt = this.base + this.end;
      const len = Math.min(this.buf.length - this.end, READ_SIZE, this.size - fileAt);
      const { bytesRead } = len > 0 ? await this.fh.read(this.buf, this.end, len, fileAt) : { bytesRead: 0 };
      if (bytesRead === 0) {
        if (fileAt < this.size) throw new CloudletError('CORRUPT', `${this.what} shrank while being read (at offset ${fileAt})`);
        this.eofReached = true;
        break;
      }
      const pending = this.hash.update(this.buf.subarray(this.end, this.end + bytesRead));
      if (pending) await pending;
      this.end += bytesRead;
      if (this.base + this.end >= this.size) this.eofReached = true;
      this.onRead?.(this.base + this.end, this.size);
    }
    return Math.min(n, this.end - this.at);
  }

  /** Ensures n bytes or throws CORRUPT ("truncated") naming `what` and the offset. */
  async need(n: number, what: string): Promise<void> {
    if ((await this.ensure(n)) < n) {
      throw new CloudletError('CORRUPT', `${this.what} is truncated: ${what} at offset ${this.pos} needs ${n} bytes, only ${this.end - this.at} remain`, {
        fix: 'the save file is incomplete; save the VM again',
        details: { offset: this.pos },
      });
    }
  }

  /** View of the next n buffered bytes (call ensure/need first); valid until the next ensure. */
  peek(n: number, skip = 0): Buffer {
    return this.buf.subarray(this.at + skip, this.at + skip + n);
  }

  available(): number {
    return this.end - this.at;
  }

  u8(skip = 0): number {
    return this.buf[this.at + skip] as number;
  }

  be32(skip = 0): number {
    return this.buf.readUInt32BE(this.at + skip);
  }

  /** Consumes n buffered bytes without looking at them. */
  skip(n: number): void {
    this.at += n;
  }

  /** Consumes n buffered bytes, copying them into target at targetStart. */
  copyTo(n: number, target: Buffer, targetStart: number): void {
    this.buf.copy(target, targetStart, this.at, this.at + n);
    this.at += n;
  }

  /** Consumes n buffered bytes and returns a view of them (valid until the next ensure). */
  take(n: number): Buffer {
    const v = this.buf.subarray(this.at, this.at + n);
    this.at += n;
    return v;
  }

  /** Reads and hashes the rest of the file; returns its sha256 (hex; '' when not hashing). Call once, at the end. */
  async finish(): Promise<string> {
    while (!this.eofReached) {
      this.at = this.end;
      await this.ensure(READ_SIZE);
    }
    return this.hash.digest();
  }

  /** Releases the hashing thread (error paths). */
  close(): void {
    this.hash.close();
  }
}
