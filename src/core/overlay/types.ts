import type { ChunkIndex } from '../chunk';
import type { OnProgress } from '../progress';
import type { MemoryImageInput, SaveTee, TeeOptions } from '../snapshot';

/** A base as stored on a host; memory as the memory image of its save file. */
export interface BaseRef {
  id: string;
  /** Raw disk image. */
  diskPath: string;
  diskIndex: ChunkIndex;
  /** Memory image (splitSnapshot output) of the base's save file. */
  memImagePath: string;
  memIndex: ChunkIndex;
}

/**
 * What applying an overlay needs of a base: its id, files and sizes. Not its chunk indexes (32 MB
 * for a 4 GiB disk): application reads base chunks by position, never by content.
 */
export interface BaseFiles {
  id: string;
  diskPath: string;
  diskSize: number;
  memImagePath: string;
  memImageSize: number;
}

/** The BaseFiles view of an opened base. */
export function baseFilesOf(b: BaseRef): BaseFiles {
  return { id: b.id, diskPath: b.diskPath, diskSize: b.diskIndex.byteLength, memImagePath: b.memImagePath, memImageSize: b.memIndex.byteLength };
}

export interface CreateOverlayOptions {
  /** LZMA preset 0-9 (default 6). */
  lzmaLevel?: number;
  /**
   * xdelta3 stage against the base chunk at the same place (default true: on the customized test
   * guest it made the overlay 42% smaller and creation 2.7x faster, since less data goes to LZMA;
   * see bench/overlay.ts).
   */
  delta?: boolean;
  /** Bytes of encoded input per segment (default 4 MiB). */
  segmentSize?: number;
  /** Segments compressed at once (default: available cores). */
  concurrency?: number;
}

/** The launch VM's memory snapshot, already split by the codec into a memory image + skeleton. */
export interface LaunchMemory {
  memImagePath: string;
  skeleton: Buffer;
  mode: 'parsed' | 'opaque';
  domainXml: string;
  cpuModel: string | undefined;
  saveFileSize: number;
  saveFileSha256: string;
}

/** Rebuilds the save file from a skeleton and a memory image (the codec's joinSnapshot). */
export type JoinSnapshot = (skeleton: Buffer, image: MemoryImageInput, outSavePath: string, opts?: Partial<TeeOptions>) => Promise<{ size: number; sha256: string; teeDropped?: number }>;

/**
 * A consumer of the save file as the apply rebuilds it (early start): `tee` gets the file in order,
 * less the page records of RAM block `prefilled.block` that hold the base's page, when the
 * consumer's copy of that block already is the base's memory image from `imageOffset`.
 */
export interface SaveFileTee {
  tee: SaveTee;
  prefilled?: { block: string; imageOffset: number; size: number };
}

export type { OnProgress };
