import { randomBytes } from 'node:crypto';
import { xzCompress, xzDecompress, xzDecompressNative, xzDecompressWithBinary } from '../../src/core/overlay/lzma';

const text = Buffer.from('cloudlet overlay segment '.repeat(40_000) + randomBytes(3000).toString('hex'));

describe('xz decompression', () => {
  it('the xz binary and lzma-native give the same bytes', async () => {
    const xz = await xzCompress(text, 6);
    const a = await xzDecompressWithBinary(xz, text.length);
    const b = await xzDecompressNative(xz);
    expect(a.equals(text)).toBe(true);
    expect(b.equals(text)).toBe(true);
    expect((await xzDecompressWithBinary(xz)).equals(text)).toBe(true);
  });

  it('stops a stream that inflates past its declared size, and returns short output as it is', async () => {
    const xz = await xzCompress(Buffer.alloc(64 * 1024 * 1024), 9);
    await expect(xzDecompressWithBinary(xz, 1024 * 1024)).rejects.toThrow(/inflates past the 1048576 bytes/);
    const short = await xzDecompressWithBinary(await xzCompress(text, 1), text.length + 10);
    expect(short.length).toBe(text.length);
  });

  it('lzma-native, the fallback, stops past the declared size too, and gives short output as it is', async () => {
    const xz = await xzCompress(Buffer.alloc(16 * 1024 * 1024), 1);
    await expect(xzDecompressNative(xz, 1024 * 1024)).rejects.toThrow(/inflates past the 1048576 bytes/);
    const small = await xzCompress(text, 1);
    expect((await xzDecompressNative(small, text.length)).equals(text)).toBe(true);
    expect((await xzDecompressNative(small, text.length + 10)).length).toBe(text.length);
    await expect(xzDecompressNative(Buffer.from('not xz at all'), 10)).rejects.toThrow();
  });

  it('a damaged stream is an error that says what xz found', async () => {
    const xz = await xzCompress(text, 6);
    const mid = Math.floor(xz.length / 2);
    xz[mid] = (xz[mid] ?? 0) ^ 0xff;
    await expect(xzDecompressWithBinary(xz, text.length)).rejects.toThrow(/xz -d failed \(exit 1\): .+/);
    await expect(xzDecompressWithBinary(Buffer.from('not xz at all'), 10)).rejects.toThrow(/format/i);
  });

  it('falls back to lzma-native when there is no xz binary', async () => {
    const xz = await xzCompress(text, 6);
    const path = process.env.PATH;
    process.env.PATH = '/nonexistent';
    try {
      expect((await xzDecompress(xz, text.length)).equals(text)).toBe(true);
    } finally {
      process.env.PATH = path;
    }
  });
});
