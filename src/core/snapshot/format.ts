/**
 * Constants of the two layers of a libvirt save file: libvirt's header (qemu_saveimage.c) and
 * QEMU's migration stream (migration/savevm.c, migration/ram.c, QEMU 7.2). See docs/memory-snapshot.md.
 */

/** `LibvirtQemudSave`: a complete libvirt save file. */
export const LIBVIRT_MAGIC = Buffer.from('LibvirtQemudSave', 'ascii');
/** `LibvirtQemudPart`: libvirt writes this magic first and replaces it once the save completed. */
export const LIBVIRT_PARTIAL_MAGIC = Buffer.from('LibvirtQemudPart', 'ascii');
/** magic[16] + u32 version, data_len, was_running, compressed, cookieOffset + u32 unused[14]. */
export const LIBVIRT_HEADER_SIZE = 92;
export const LIBVIRT_HEADER_VERSIONS: readonly number[] = [1, 2];

export const QEMU_VM_FILE_MAGIC = 0x5145564d; // 'QEVM'
export const QEMU_VM_FILE_VERSION = 3;

export const QEMU_VM_EOF = 0x00;
export const QEMU_VM_SECTION_START = 0x01;
export const QEMU_VM_SECTION_PART = 0x02;
export const QEMU_VM_SECTION_END = 0x03;
export const QEMU_VM_SECTION_FULL = 0x04;
export const QEMU_VM_SUBSECTION = 0x05;
export const QEMU_VM_VMDESCRIPTION = 0x06;
export const QEMU_VM_CONFIGURATION = 0x07;
export const QEMU_VM_COMMAND = 0x08;
export const QEMU_VM_SECTION_FOOTER = 0x7e;

/** Flags in the low bits of a RAM record's be64 `offset | flags` (TARGET_PAGE_BITS = 12). */
export const RAM_FLAG_FULL = 0x01; // obsolete
export const RAM_FLAG_ZERO = 0x02;
export const RAM_FLAG_MEM_SIZE = 0x04;
export const RAM_FLAG_PAGE = 0x08;
export const RAM_FLAG_EOS = 0x10;
export const RAM_FLAG_CONTINUE = 0x20;
export const RAM_FLAG_XBZRLE = 0x40;
export const RAM_FLAG_HOOK = 0x80;
export const RAM_FLAG_COMPRESS_PAGE = 0x100;
export const RAM_FLAG_MULTIFD_FLUSH = 0x200;

export const PAGE_SIZE = 4096;
export const PAGE_BITS = 12;
export const RAM_FLAGS_MASK = PAGE_SIZE - 1;
