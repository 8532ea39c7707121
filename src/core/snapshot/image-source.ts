/**
 * Where joinSnapshot reads page payloads from: a memory image file, or any view that presents the
 * same bytes (synthesis lays the chunks an overlay changed over the base's memory image without
 * copying the base; see src/core/overlay/patched-image.ts).
 */
import { open, type FileHandle } from 'node:fs/promises';
import { CloudletError } from '../errors';

export interface MemoryImageSource {
  /** Names the image in errors. */
  readonly name: string;
  readonly size: number;
  /** Fills buf[0, len) with the image's bytes at [position, position + len). */
  read(buf: Buffer, len: number, position: number): Promise<void>;
}

/** Reads exactly len bytes at position into buf[offset, offset + len) or throws CORRUPT naming `what`. */
async function readFullyAt(fh: FileHandle, buf: Buffer, offset: number, len: number, position: number, what: string): Promise<void> {
  for (let got = 0; got < len; ) {
    const { bytesRead } = await fh.read(buf, offset + got, len - got, position + got);
    if (bytesRead === 0) {
      throw new CloudletError('CORRUPT', `${what} is truncated: nothing to read at offset ${position + got}`, {
        fix: 'rebuild the memory image (applyOverlay / splitSnapshot)',
        details: { offset: position + got },
      });
    }
    got += bytesRead;
  }
}

/** A memory image file as a source; close() releases it. */
export async function openImageFile(p: string): Promise<MemoryImageSource & { close(): Promise<void> }> {
  const name = `memory image ${p}`;
  const fh = await open(p, 'r').catch((e: unknown) => {
    throw new CloudletError('NOT_FOUND', `cannot open ${name}: ${(e as Error).message}`, { fix: 'check the path', cause: e });
  });
  const { size } = await fh.stat().catch(async (e: unknown) => {
    await fh.close();
    throw e;
  });
  return {
    name,
    size,
    read: (buf, len, position) => readFullyAt(fh, buf, 0, len, position, name),
    close: () => fh.close(),
  };
}
