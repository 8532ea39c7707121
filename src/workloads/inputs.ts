/**
 * The workloads' inputs, made on the host from Debian packages' tools and data (nothing is
 * downloaded from elsewhere): text images rendered by ImageMagick, speech synthesized by
 * espeak-ng and resampled by sox to what PocketSphinx expects, and a photograph with faces from
 * scikit-image's sample data (NASA's public-domain portrait of Eileen Collins), fetched as the
 * python3-skimage .deb and extracted without installing it. Cached in a directory; each file is
 * made once (to a temporary name, then renamed).
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { CloudletError } from '../core/errors';

const run = promisify(execFile);

export type InputName = 'ocr-sample' | 'ocr-request' | 'speech-sample' | 'speech-request' | 'face-sample' | 'face-request';

/** What each input says or shows: the answers the workloads' checks expect. */
export const INPUT_CONTENT = {
  ocrSample: 'CLOUDLET 2026',
  ocrRequest: 'EDGE SYNTHESIS 38',
  /** Digit sequences PocketSphinx recognizes in order from this voice (extra words may appear between). */
  speechSample: ['one', 'two', 'three', 'four'],
  speechRequest: ['one', 'two', 'three', 'four'],
  faceSample: 1,
  faceRequest: 2,
} as const;

const ESPEAK = ['-v', 'en-us+m3', '-s', '100', '-g', '15'];

async function tool(cmd: string, args: string[], cwd?: string): Promise<void> {
  try {
    await run(cmd, args, { maxBuffer: 16 * 1024 * 1024, ...(cwd ? { cwd } : {}) });
  } catch (e) {
    const err = e as NodeJS.ErrnoException & { stderr?: string };
    throw new CloudletError('BAD_INPUT', `${cmd} could not make a workload input: ${err.code === 'ENOENT' ? `${cmd} is not installed` : String(err.stderr ?? err.message).trim().slice(0, 300)}`, {
      fix: 'install the workload tools (bash infra/setup.sh installs imagemagick, espeak-ng, sox)',
      cause: e,
    });
  }
}

async function once(file: string, make: (tmp: string) => Promise<void>): Promise<string> {
  if (fs.existsSync(file)) return file;
  await fs.promises.mkdir(path.dirname(file), { recursive: true });
  const tmp = `${file}.tmp-${process.pid}${path.extname(file)}`;
  await make(tmp);
  await fs.promises.rename(tmp, file);
  return file;
}

const textImage = (text: string) => (tmp: string) =>
  tool('convert', ['-size', '900x160', 'xc:white', '-fill', 'black', '-font', 'DejaVu-Sans', '-pointsize', '56', '-annotate', '+30+105', text, tmp]);

const speech = (words: readonly string[]) => async (tmp: string) => {
  const raw = `${tmp}.22k.wav`;
  await tool('espeak-ng', [...ESPEAK, '-w', raw, words.join(' ')]);
  await tool('sox', [raw, '-r', '16000', '-b', '16', '-c', '1', tmp]);
  await fs.promises.rm(raw, { force: true });
};

/** The portrait from python3-skimage's .deb (apt-get download; dpkg-deb -x; nothing installed). */
async function astronaut(dir: string): Promise<string> {
  return once(path.join(dir, 'astronaut.png'), async (tmp) => {
    const work = `${tmp}.d`;
    await fs.promises.mkdir(work, { recursive: true });
    try {
      await tool('apt-get', ['download', '-q', '-o', 'APT::Sandbox::User=root', 'python3-skimage'], work);
      const deb = (await fs.promises.readdir(work)).find((f) => f.endsWith('.deb'));
      if (!deb) throw new CloudletError('PACKAGES_UNAVAILABLE', 'apt-get download python3-skimage left no .deb', { fix: 'run apt-get update and retry' });
      await tool('dpkg-deb', ['-x', deb, 'x'], work);
      await fs.promises.copyFile(path.join(work, 'x/usr/lib/python3/dist-packages/skimage/data/astronaut.png'), tmp);
    } finally {
      await fs.promises.rm(work, { recursive: true, force: true });
    }
  });
}

/** Makes (once) and returns the path of every input. */
export async function workloadInputs(dir: string): Promise<Record<InputName, string>> {
  const portrait = await astronaut(dir);
  return {
    'ocr-sample': await once(path.join(dir, 'ocr-sample.png'), textImage(INPUT_CONTENT.ocrSample)),
    'ocr-request': await once(path.join(dir, 'ocr-request.png'), textImage(INPUT_CONTENT.ocrRequest)),
    'speech-sample': await once(path.join(dir, 'speech-sample.wav'), speech(INPUT_CONTENT.speechSample)),
    'speech-request': await once(path.join(dir, 'speech-request.wav'), speech(INPUT_CONTENT.speechRequest)),
    // JPEG keeps them small enough to travel inside a recipe (files of at most 256 KiB of text).
    'face-sample': await once(path.join(dir, 'face-sample.jpg'), (tmp) => tool('convert', [portrait, '-resize', '384x384', '-quality', '85', tmp])),
    'face-request': await once(path.join(dir, 'face-request.jpg'), (tmp) => tool('convert', [portrait, portrait, '+append', '-resize', '768x384', '-quality', '85', tmp])),
  };
}
