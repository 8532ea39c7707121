/**
 * Register a base made from a booted-and-saved VM: copy its raw disk and libvirt save file into
 * the store, split the save file into memory image + skeleton, index both, write the manifest and
 * move the whole directory into place.
 */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { buildChunkIndex, writeChunkIndex } from '../chunk';
import { CloudletError } from '../errors';
import type { CloudletErrorOptions } from '../errors';
import type { OnProgress } from '../progress';
import { splitSnapshot } from '../snapshot';
import { copySparse } from '../sparse';
import { BASE_FILES, Store } from '../store';
import { copyFileAtomic, fsyncFile, sha256File, writeFileSynced } from '../store/files';
import type { BaseManifest, Member } from './manifest';
import { PACKAGE_FORMAT_VERSION, canonicalJson, computeBaseId, parseManifest } from './manifest';
import { readStoredManifest, registerBase } from './stored';

export interface CreateBaseInput {
  /** Raw disk image of the saved VM. */
  diskPath: string;
  /** Its libvirt save file (`virsh save`). */
  savePath: string;
  storeRoot: string;
  onProgress?: OnProgress;
}

export async function createBase(input: CreateBaseInput): Promise<BaseManifest> {
  const diskStat = await statFile(input.diskPath, 'disk image');
  await statFile(input.savePath, 'save file');
  if (diskStat.size === 0) throw new CloudletError('BAD_INPUT', `disk image ${input.diskPath} is empty`, { fix: 'pass the raw disk of the saved VM' });
  await assertRawDisk(input.diskPath);

  const store = await Store.open(input.storeRoot);
  let tmp: string | undefined;
  try {
    tmp = await store.makeTempDir('create');
    const p = (name: string): string => path.join(tmp as string, name);
    const progress = (stage: string) => (d: number, t: number) => input.onProgress?.(d, t, stage);

    // The disk is copied sparse (its holes are neither read nor written) so that indexing it, here
    // and on every host that imports it, skips them; copyFileAtomic would write every zero.
    const disk = await copySparse(input.diskPath, p(BASE_FILES.disk), progress('copy disk'));
    const save = await copyFileAtomic(input.savePath, p(BASE_FILES.memorySave), { onProgress: progress('copy memory') });
    const baseId = computeBaseId(disk, save);
    if (await store.hasBaseDir(baseId)) {
      const existing = await readStoredManifest(store, baseId);
      if (!store.catalog.getBase(baseId)) registerBase(store, existing);
      return existing;
    }

    const layout = await splitSnapshot(p(BASE_FILES.memorySave), p(BASE_FILES.memoryImage), { onProgress: progress('split memory') }).catch((e: unknown) => {
      throw nameInput(e, p(BASE_FILES.memorySave), input.savePath);
    });
    await fsyncFile(p(BASE_FILES.memoryImage));
    await writeFileSynced(p(BASE_FILES.memorySkeleton), layout.skeleton);
    const diskIndex = await buildChunkIndex(p(BASE_FILES.disk), { onProgress: progress('index disk') });
    await writeChunkIndex(diskIndex, p(BASE_FILES.diskIndex));
    const memIndex = await buildChunkIndex(p(BASE_FILES.memoryImage), { onProgress: progress('index memory') });
    await writeChunkIndex(memIndex, p(BASE_FILES.memoryIndex));
    await fsyncFile(p(BASE_FILES.diskIndex));
    await fsyncFile(p(BASE_FILES.memoryIndex));
    const diskIdx = await sha256File(p(BASE_FILES.diskIndex));
    const memIdx = await sha256File(p(BASE_FILES.memoryIndex));

    const members: Member[] = [
      { name: 'disk.raw', size: disk.size, sha256: disk.sha256 },
      { name: 'memory.sav', size: save.size, sha256: save.sha256 },
      { name: 'disk.idx', size: diskIdx.size, sha256: diskIdx.sha256 },
      { name: 'memory.idx', size: memIdx.size, sha256: memIdx.sha256 },
    ];
    const manifest = parseManifest(
      {
        format: 'cloudlet-base',
        formatVersion: PACKAGE_FORMAT_VERSION,
        baseId,
        chunkSize: 4096,
        disk: { size: disk.size, sha256: disk.sha256, chunkCount: diskIndex.chunkCount },
        memory: {
          saveFileSize: save.size,
          saveFileSha256: save.sha256,
          imageSize: layout.memImageSize,
          chunkCount: memIndex.chunkCount,
          mode: layout.mode,
          blocks: layout.blocks.map((b) => ({ name: b.name, size: b.size, imageOffset: b.imageOffset })),
        },
        domainXml: layout.domainXml,
        cpuModel: layout.cpuModel,
        members,
      },
      'new base',
    );
    await writeFileSynced(p(BASE_FILES.manifest), canonicalJson(manifest) + '\n');
    const moved = await store.commitBaseDir(tmp, baseId);
    tmp = undefined;
    const result = moved ? manifest : await readStoredManifest(store, baseId);
    registerBase(store, result);
    return result;
  } finally {
    if (tmp !== undefined) await fsp.rm(tmp, { recursive: true, force: true });
    store.close();
  }
}

/** The codec names the store's temporary copy; tell the user about their own file instead. */
function nameInput(e: unknown, copy: string, original: string): unknown {
  if (!(e instanceof CloudletError) || !e.message.includes(copy)) return e;
  const message = e.fix !== undefined && e.message.endsWith(`. Fix: ${e.fix}`) ? e.message.slice(0, -`. Fix: ${e.fix}`.length) : e.message;
  const options: CloudletErrorOptions = { details: e.details, cause: e };
  if (e.fix !== undefined) options.fix = e.fix;
  return new CloudletError(e.code, message.split(copy).join(original), options);
}

async function statFile(file: string, what: string): Promise<{ size: number }> {
  try {
    const st = await fsp.stat(file);
    if (!st.isFile()) throw new CloudletError('BAD_INPUT', `${what} ${file} is not a regular file`, { fix: `pass the ${what} itself` });
    return st;
  } catch (e) {
    if (e instanceof CloudletError) throw e;
    throw new CloudletError('NOT_FOUND', `${what} ${file} does not exist or cannot be read`, { fix: 'check the path', cause: e });
  }
}

/** A base disk must be raw: refuse qcow2 (a common mistake) with a clear message. */
async function assertRawDisk(file: string): Promise<void> {
  const fh = await fsp.open(file, 'r');
  try {
    const head = Buffer.alloc(4);
    await fh.read(head, 0, 4, 0);
    if (head.equals(Buffer.from([0x51, 0x46, 0x49, 0xfb]))) {
      throw new CloudletError('BAD_INPUT', `${file} is a qcow2 image; a base disk must be raw`, {
        fix: `convert it first: qemu-img convert -O raw ${file} disk.raw`,
      });
    }
  } finally {
    await fh.close();
  }
}
