/**
 * The memory snapshot codec: splits a libvirt save file (QEMU 7.2 migration stream) into a flat
 * memory image, chunked like a disk, and a compact skeleton; joins them back byte for byte.
 * Format notes: docs/memory-snapshot.md.
 */
export { splitSnapshot, type RamBlockLayout, type SnapshotLayout, type SplitOptions, type SplitStats } from './split';
export { joinSnapshot, prewarmJoin, verifySnapshot, type MemoryImageInput, type SaveTee, type TeeOptions } from './join';
export { openImageFile, type MemoryImageSource } from './image-source';
export { readSaveHeader, rewriteSaveHeaderXml, cpuModelOf, type SaveHeader } from './header';
export { decodeSkeleton, SKELETON_VERSION, type SkeletonHeader, type DecodedSkeleton } from './skeleton';
