/** A writable stream that keeps what is written to it, for the CLI's stdout and stderr in tests. */
import { Writable } from 'node:stream';

export class Capture extends Writable {
  text = '';
  /** Set to make the CLI believe it writes to a terminal. */
  isTTY?: boolean;
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: () => void): void {
    this.text += chunk.toString();
    cb();
  }
}
