/**
 * The FUSE kernel protocol (Linux `include/uapi/linux/fuse.h`), the part we
 * speak: numbers, and encoders for the replies. Little-endian, as the kernel
 * lays the structs out on x86-64 and arm64.
 */

export const FUSE_KERNEL_VERSION = 7;
/** The struct layouts below are those of 7.38; a newer kernel speaks 7.38 to us. */
export const FUSE_KERNEL_MINOR = 38;

export const IN_HEADER = 40;
export const OUT_HEADER = 16;

export const Opcode = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  FSYNCDIR: 30,
  ACCESS: 34,
  INTERRUPT: 36,
  DESTROY: 38,
  BATCH_FORGET: 42,
  FALLOCATE: 43,
} as const;

/** Operations that change the namespace or a file's identity: an image is the volume, so no. */
export const REFUSED_OPCODES = new Set([
  5, // READLINK
  6, // SYMLINK
  8, // MKNOD
  9, // MKDIR
  10, // UNLINK
  11, // RMDIR
  12, // RENAME
  13, // LINK
  35, // CREATE
  45, // RENAME2
  51, // TMPFILE
]);

/** Requests the kernel sends without waiting for an answer. */
export const NO_REPLY = new Set<number>([Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT]);

export const InitFlag = {
  ASYNC_READ: 1 << 0,
  BIG_WRITES: 1 << 5,
  ASYNC_DIO: 1 << 15,
  PARALLEL_DIROPS: 1 << 18,
  MAX_PAGES: 1 << 22,
} as const;

export const OpenFlag = {
  DIRECT_IO: 1 << 0,
  PARALLEL_DIRECT_WRITES: 1 << 6,
} as const;

export const SetattrValid = {
  MODE: 1 << 0,
  UID: 1 << 1,
  GID: 1 << 2,
  SIZE: 1 << 3,
} as const;

export const Fallocate = {
  KEEP_SIZE: 0x01,
  PUNCH_HOLE: 0x02,
  ZERO_RANGE: 0x10,
} as const;

/** Unsolicited messages to the kernel (fuse_notify_code). */
export const Notify = {
  INVAL_INODE: 2,
} as const;

/** fuse_notify_inval_inode_out: a negative offset drops the cached attributes only. */
export function invalInodeOut(ino: bigint): Buffer {
  const b = Buffer.alloc(24);
  b.writeBigUInt64LE(ino, 0);
  b.writeBigInt64LE(-1n, 8);
  b.writeBigInt64LE(0n, 16);
  return b;
}

export const DT_DIR = 4;
export const DT_REG = 8;

export interface InitReply {
  minor: number;
  maxReadahead: number;
  flags: number;
  maxBackground: number;
  congestionThreshold: number;
  maxWrite: number;
  maxPages: number;
}

export function initOut(r: InitReply): Buffer {
  const b = Buffer.alloc(64);
  b.writeUInt32LE(FUSE_KERNEL_VERSION, 0);
  b.writeUInt32LE(r.minor, 4);
  b.writeUInt32LE(r.maxReadahead, 8);
  b.writeUInt32LE(r.flags >>> 0, 12);
  b.writeUInt16LE(r.maxBackground, 16);
  b.writeUInt16LE(r.congestionThreshold, 18);
  b.writeUInt32LE(r.maxWrite, 20);
  b.writeUInt32LE(1, 24); // time_gran: nanoseconds
  b.writeUInt16LE(r.maxPages, 28);
  return b;
}

export interface Attr {
  ino: bigint;
  size: number;
  blocks: number;
  mtimeMs: number;
  mode: number;
  nlink: number;
}

const ATTR_BYTES = 88;

function writeAttr(b: Buffer, at: number, a: Attr): void {
  const sec = BigInt(Math.floor(a.mtimeMs / 1000));
  const nsec = Math.floor((a.mtimeMs % 1000) * 1e6);
  b.writeBigUInt64LE(a.ino, at);
  b.writeBigUInt64LE(BigInt(a.size), at + 8);
  b.writeBigUInt64LE(BigInt(a.blocks), at + 16);
  for (const off of [24, 32, 40]) b.writeBigUInt64LE(sec, at + off); // atime, mtime, ctime
  for (const off of [48, 52, 56]) b.writeUInt32LE(nsec, at + off);
  b.writeUInt32LE(a.mode, at + 60);
  b.writeUInt32LE(a.nlink, at + 64);
  // uid, gid, rdev: 0 (root, as the daemon runs); blksize 4096; flags 0
  b.writeUInt32LE(4096, at + 80);
}

/** fuse_attr_out: how long the kernel may keep the attributes, and them. */
export function attrOut(a: Attr, validSeconds: number): Buffer {
  const b = Buffer.alloc(16 + ATTR_BYTES);
  b.writeBigUInt64LE(BigInt(validSeconds), 0);
  writeAttr(b, 16, a);
  return b;
}

/** fuse_entry_out: a name resolved to a node, with its attributes. */
export function entryOut(a: Attr, validSeconds: number): Buffer {
  const b = Buffer.alloc(40 + ATTR_BYTES);
  b.writeBigUInt64LE(a.ino, 0);
  b.writeBigUInt64LE(BigInt(validSeconds), 16); // entry_valid
  b.writeBigUInt64LE(BigInt(validSeconds), 24); // attr_valid
  writeAttr(b, 40, a);
  return b;
}

export function openOut(fh: bigint, flags: number): Buffer {
  const b = Buffer.alloc(16);
  b.writeBigUInt64LE(fh, 0);
  b.writeUInt32LE(flags, 8);
  return b;
}

export function writeOut(size: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(size, 0);
  return b;
}

export function statfsOut(): Buffer {
  const b = Buffer.alloc(80);
  b.writeUInt32LE(4096, 40); // bsize
  b.writeUInt32LE(255, 44); // namelen
  b.writeUInt32LE(4096, 48); // frsize
  return b;
}

/** Directory entries from `from` on that fit in `size` bytes (fuse_dirent, 8-byte aligned). */
export function dirents(
  entries: { ino: bigint; name: string; type: number }[],
  from: number,
  size: number,
): Buffer {
  const parts: Buffer[] = [];
  let used = 0;
  for (let i = from; i < entries.length; i++) {
    const e = entries[i]!;
    const name = Buffer.from(e.name);
    const len = (24 + name.length + 7) & ~7;
    if (used + len > size) break;
    const d = Buffer.alloc(len);
    d.writeBigUInt64LE(e.ino, 0);
    d.writeBigUInt64LE(BigInt(i + 1), 8); // the offset of the next entry
    d.writeUInt32LE(name.length, 16);
    d.writeUInt32LE(e.type, 20);
    name.copy(d, 24);
    parts.push(d);
    used += len;
  }
  return Buffer.concat(parts);
}
