/**
 * The second output of a join (early start): the save file as it is rebuilt, for a VM that loads
 * it as it comes, less the page records the VM holds already. See joinSnapshot.
 */
/**
 * A consumer of the save file as it is rebuilt: called with every part, in order from the file's
 * first byte, before the part's buffer is reused (so it must be done with the bytes when its
 * promise settles). A VM that loads the stream as it comes is one (early start).
 */
export type SaveTee = (part: Buffer, opts?: { last?: boolean }) => Promise<void>;

/**
 * What a join's tee receives, and which page records it may leave out: those of RAM block `block`
 * whose page the receiver holds already. The receiver's copy of the block is the base's memory
 * image from `imageOffset` (`size` bytes); `isBase(imageOffset)` says whether the page at that
 * offset of the image being joined is the base's and final (a patched memory image knows).
 */
export interface TeeOptions {
  tee: SaveTee;
  prefilled?: { block: string; imageOffset: number; size: number; isBase: (imageOffset: number) => boolean };
}

/** Bytes the tee gets at a time. */
const TEE_SIZE = 1024 * 1024;

/**
 * The stream a tee gets: buffered and in order. A page record it gets names its block whenever
 * the record before it (in what it got) was of another block, since records may be left out.
 */
export class TeeOut {
  private readonly buf = Buffer.allocUnsafe(TEE_SIZE);
  private len = 0;
  /** Block of the last page record sent (-1: none yet). */
  lastBlock = -1;
  dropped = 0;

  constructor(private readonly tee: SaveTee) {}

  async write(data: Buffer): Promise<void> {
    for (let off = 0; off < data.length; ) {
      if (this.len === this.buf.length) await this.flush();
      const n = data.copy(this.buf, this.len, off);
      this.len += n;
      off += n;
    }
  }

  /** A page record: `flags` without CONTINUE plus the block's name, or as given with CONTINUE. */
  async record(addr: number, flags: number, name: Buffer | undefined, payload: Buffer): Promise<void> {
    const len = 8 + (name ? 1 + name.length : 0) + payload.length;
    if (this.len + len > this.buf.length) await this.flush();
    const at = this.len;
    this.buf.writeUInt32BE(Math.floor(addr / 2 ** 32), at);
    this.buf.writeUInt32BE((addr % 2 ** 32) + flags, at + 4);
    let p = at + 8;
    if (name) {
      this.buf[p++] = name.length;
      p += name.copy(this.buf, p);
    }
    payload.copy(this.buf, p);
    this.len += len;
  }

  async flush(): Promise<void> {
    if (this.len === 0) return;
    await this.tee(this.buf.subarray(0, this.len));
    this.len = 0;
  }

  /** The file's last literal (the device state, QEMU's end marker and what follows), marked as such. */
  async last(data: Buffer): Promise<void> {
    await this.flush();
    await this.tee(data, { last: true });
  }
}

