/**
 * Zstandard through the `zstd` binary (Debian's zstd package; Node 20's zlib has no zstd). A
 * handoff round is bound by the link or by compression: on this 2-core machine under TCG, `xz -1`
 * packs guest memory at ~5 MB/s per core, `zstd -3` at ~90 MB/s for ~20% more bytes, so at edge
 * link rates zstd ships a round sooner (docs/handoff.md, "Compression"). One child per call, fed
 * the whole input on stdin; decompression stops the child once its output passes the size the
 * caller declares (a bomb never fills memory).
 */
import { spawn } from 'node:child_process';
import { CloudletError } from './errors';

function run(args: string[], input: Buffer, what: string, limit?: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const child = spawn('zstd', args, { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, ZSTD_CLEVEL: '', ZSTD_NBTHREADS: '' } });
    const chunks: Buffer[] = [];
    let got = 0;
    let stderr = '';
    let failed: Error | undefined;
    child.on('error', (e: NodeJS.ErrnoException) => {
      failed ??= new CloudletError('BAD_INPUT', `zstd could not run for ${what}: ${e.message}`, {
        fix: e.code === 'ENOENT' ? 'install it: apt-get install zstd (npm run setup does)' : 'check the zstd installation',
      });
    });
    child.stdin?.on('error', () => undefined); // EPIPE when zstd stops early; its exit status says why
    child.stderr?.on('data', (d: Buffer) => {
      if (stderr.length < 4096) stderr += d.toString();
    });
    child.stdout?.on('data', (d: Buffer) => {
      if (failed) return;
      got += d.length;
      if (limit !== undefined && got > limit) {
        failed = new CloudletError('CORRUPT', `${what} inflates past the ${limit} bytes declared for it`, { fix: 'the data is damaged or not what its meta says; send it again' });
        child.kill('SIGKILL');
        return;
      }
      chunks.push(d);
    });
    child.on('close', (code, signal) => {
      if (failed) return reject(failed);
      if (code !== 0) {
        return reject(new CloudletError('CORRUPT', `zstd ${args[0] === '-d' ? 'could not decompress' : 'could not compress'} ${what} (${signal ?? `exit ${code}`}): ${stderr.trim() || 'no message'}`, { fix: 'the data is damaged; send it again' }));
      }
      resolve(Buffer.concat(chunks, got));
    });
    child.stdin?.end(input);
  });
}

/** One zstd frame of `data` at `level` (1..19), single-threaded (callers run several at once). */
export function zstdCompress(data: Buffer, level: number): Promise<Buffer> {
  if (!Number.isInteger(level) || level < 1 || level > 19) {
    return Promise.reject(new CloudletError('BAD_INPUT', `zstd level ${level} is not 1..19`, { fix: 'pick a level from 1 (fast) to 19 (small)' }));
  }
  return run([`-${level}`, '-q', '-c', '-T1', '--no-progress'], data, `${data.length} bytes`);
}

/** Decompresses zstd frames; output longer than `expectedLength` is CORRUPT. */
export function zstdDecompress(data: Buffer, expectedLength?: number): Promise<Buffer> {
  return run(['-d', '-q', '-c', '--no-progress'], data, `a zstd blob of ${data.length} bytes`, expectedLength);
}
