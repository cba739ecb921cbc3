import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { deviceErrno, type BlockDevice, type DeviceErrno } from '../replication/block-device.ts';
import { FuseChannel, type FuseRequest } from './channel.ts';
import {
  attrOut,
  DT_DIR,
  DT_REG,
  dirents,
  entryOut,
  Fallocate,
  FUSE_KERNEL_MINOR,
  FUSE_KERNEL_VERSION,
  InitFlag,
  initOut,
  invalInodeOut,
  Notify,
  NO_REPLY,
  Opcode,
  OpenFlag,
  openOut,
  REFUSED_OPCODES,
  SetattrValid,
  statfsOut,
  writeOut,
  type Attr,
} from './kernel.ts';

/** What the FUSE frontend serves: the volumes attached with the FUSE frontend. */
export interface FuseVolumes {
  names(): string[];
  /** Undefined unless `name` is attached with the FUSE frontend (asked on every request). */
  device(name: string): BlockDevice | undefined;
}

export interface FuseLog {
  warn(message: string): void;
}

const E = os.constants.errno;
const IMAGE = /^([a-z0-9][a-z0-9._-]{0,62})\.img$/;
/** The largest request: the kernel's 256-page limit (FUSE_MAX_PAGES), as large as a loop device sends. */
const MAX_REQUEST_BYTES = 1024 * 1024;
const ROOT = 1n;
/** Seconds the kernel may cache names and attributes: volumes come and go with attach and detach. */
const CACHE_SECONDS = 1;

/**
 * One FUSE mount per daemon showing `<volume>.img` for every volume
 * attached with the FUSE frontend. Reads and writes go straight to the
 * engine (direct I/O: the page cache must not hide what the engine holds);
 * fsync and flush are the engine's flush, fallocate's punch-hole and
 * zero-range its write-zeroes. The image has a fixed size: truncate, rename,
 * unlink and writes past the end are refused.
 */
export class FuseFrontend {
  readonly mountpoint: string;
  readonly #volumes: FuseVolumes;
  readonly #log: FuseLog;
  readonly #openCounts = new Map<string, number>();
  /** Open file handles: which volume each one is on (it may be detached meanwhile). */
  readonly #handles = new Map<bigint, string>();
  #nextHandle = 1n;
  /** Node ids: stable per volume name for the mount's lifetime. */
  readonly #inoOf = new Map<string, bigint>();
  readonly #nameOf = new Map<bigint, string>();
  #channel: FuseChannel | undefined;
  readonly #mountedAt = Date.now();
  #ready: (() => void) | undefined;

  private constructor(mountpoint: string, volumes: FuseVolumes, log: FuseLog) {
    this.mountpoint = mountpoint;
    this.#volumes = volumes;
    this.#log = log;
  }

  static async mount(options: {
    mountpoint: string;
    volumes: FuseVolumes;
    log: FuseLog;
  }): Promise<FuseFrontend> {
    const frontend = new FuseFrontend(
      path.resolve(options.mountpoint),
      options.volumes,
      options.log,
    );
    await frontend.#mount();
    return frontend;
  }

  /**
   * After an expand: the kernel drops the image's cached attributes, and a
   * stat (answered by us, on this event loop) loads the new size into the
   * inode, where a loop device's `losetup -c` reads it.
   */
  async resized(volume: string): Promise<void> {
    const ino = this.#inoOf.get(volume);
    if (ino === undefined || !this.#channel) return;
    const err = this.#channel.notify(Notify.INVAL_INODE, invalInodeOut(ino));
    if (err && err.code !== 'ENOENT')
      this.#log.warn(`FUSE size notice for ${volume}: ${err.message}`);
    await fs.promises.stat(path.join(this.mountpoint, `${volume}.img`)).catch(() => undefined);
  }

  /** Open handles on a volume's image (a loop device attached to it holds one). */
  openCount(volume: string): number {
    return this.#openCounts.get(volume) ?? 0;
  }

  /** Who holds an image open: loop devices backed by it, and processes with it open. */
  async holders(volume: string): Promise<string[]> {
    const image = path.join(this.mountpoint, `${volume}.img`);
    const out: string[] = [];
    for (const dev of await fs.promises.readdir('/sys/block').catch(() => [] as string[])) {
      if (!dev.startsWith('loop')) continue;
      const backing = await fs.promises
        .readFile(`/sys/block/${dev}/loop/backing_file`, 'utf8')
        .catch(() => '');
      if (backing.trim() === image) out.push(`/dev/${dev}`);
    }
    for (const pid of await fs.promises.readdir('/proc').catch(() => [] as string[])) {
      if (!/^\d+$/.test(pid) || Number(pid) === process.pid) continue;
      const fds = await fs.promises.readdir(`/proc/${pid}/fd`).catch(() => [] as string[]);
      for (const fd of fds) {
        if ((await fs.promises.readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')) === image) {
          const comm = (
            await fs.promises.readFile(`/proc/${pid}/comm`, 'utf8').catch(() => '?')
          ).trim();
          out.push(`process ${pid} (${comm})`);
          break;
        }
      }
    }
    return out;
  }

  async #mount(): Promise<void> {
    // A daemon killed earlier leaves a dead mount ("Transport endpoint is not connected").
    await FuseChannel.clearStale(this.mountpoint);
    await fs.promises.mkdir(this.mountpoint, { recursive: true });
    const initialised = new Promise<void>((resolve) => (this.#ready = resolve));
    this.#channel = await FuseChannel.open({
      mountpoint: this.mountpoint,
      maxWrite: MAX_REQUEST_BYTES,
      onRequest: (req) => this.#serve(req),
      warn: (message) => this.#log.warn(message),
      onClose: (err) => {
        if (err) this.#log.warn(`FUSE device of ${this.mountpoint} closed: ${err.message}`);
        this.#channel = undefined;
      },
    });
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error('the kernel sent no FUSE INIT')), 10_000);
    });
    try {
      await Promise.race([initialised, timeout]);
    } catch (err) {
      await this.unmount();
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  #ino(name: string): bigint {
    let ino = this.#inoOf.get(name);
    if (ino === undefined) {
      ino = BigInt(this.#inoOf.size + 2);
      this.#inoOf.set(name, ino);
      this.#nameOf.set(ino, name);
    }
    return ino;
  }

  /** The attached volume behind a node id, if it is still attached with FUSE. */
  #volume(nodeid: bigint): { name: string; device: BlockDevice } | undefined {
    const name = this.#nameOf.get(nodeid);
    if (name === undefined) return undefined;
    const device = this.#volumes.device(name);
    return device ? { name, device } : undefined;
  }

  #rootAttr(): Attr {
    return { ino: ROOT, size: 4096, blocks: 8, mtimeMs: this.#mountedAt, mode: 0o40755, nlink: 2 };
  }

  #imageAttr(ino: bigint, device: BlockDevice): Attr {
    return {
      ino,
      size: device.sizeBytes,
      blocks: Math.ceil(device.sizeBytes / 512),
      mtimeMs: this.#mountedAt,
      mode: 0o100600,
      nlink: 1,
    };
  }

  #serve(req: FuseRequest): void {
    const ch = this.#channel;
    if (!ch) return;
    const { opcode, unique, nodeid, body } = req;
    if (NO_REPLY.has(opcode)) return;
    if (REFUSED_OPCODES.has(opcode)) return ch.error(unique, E.EPERM);
    switch (opcode) {
      case Opcode.INIT:
        return this.#init(ch, unique, body);
      case Opcode.LOOKUP: {
        const name = IMAGE.exec(body.toString('utf8', 0, body.indexOf(0)))?.[1];
        if (nodeid !== ROOT || name === undefined) return ch.error(unique, E.ENOENT);
        const ino = this.#ino(name);
        const v = this.#volume(ino);
        if (!v) return ch.error(unique, E.ENOENT);
        return ch.reply(unique, entryOut(this.#imageAttr(ino, v.device), CACHE_SECONDS));
      }
      case Opcode.GETATTR:
      case Opcode.SETATTR: {
        let attr: Attr;
        if (nodeid === ROOT) attr = this.#rootAttr();
        else {
          const v = this.#volume(nodeid);
          if (!v) return ch.error(unique, E.ENOENT);
          attr = this.#imageAttr(nodeid, v.device);
        }
        if (opcode === Opcode.SETATTR) {
          const valid = body.readUInt32LE(0);
          // The image is the volume: its size changes with the volume, not with truncate.
          if (valid & SetattrValid.SIZE && Number(body.readBigUInt64LE(16)) !== attr.size)
            return ch.error(unique, E.EPERM);
          if (valid & (SetattrValid.MODE | SetattrValid.UID | SetattrValid.GID))
            return ch.error(unique, E.EPERM);
          // Times are accepted and not kept (touch works).
        }
        return ch.reply(unique, attrOut(attr, CACHE_SECONDS));
      }
      case Opcode.OPEN: {
        const v = this.#volume(nodeid);
        if (!v) return ch.error(unique, E.ENOENT);
        const fh = this.#nextHandle++;
        this.#handles.set(fh, v.name);
        this.#openCounts.set(v.name, this.openCount(v.name) + 1);
        return ch.reply(unique, openOut(fh, OpenFlag.DIRECT_IO | OpenFlag.PARALLEL_DIRECT_WRITES));
      }
      case Opcode.RELEASE: {
        const fh = body.readBigUInt64LE(0);
        const name = this.#handles.get(fh);
        this.#handles.delete(fh);
        if (name !== undefined) this.#openCounts.set(name, Math.max(0, this.openCount(name) - 1));
        return ch.error(unique, 0);
      }
      case Opcode.READ:
        return this.#read(ch, req);
      case Opcode.WRITE:
        return this.#write(ch, req);
      case Opcode.FLUSH:
      case Opcode.FSYNC: {
        const v = this.#volume(nodeid);
        if (!v) return ch.error(unique, E.ENOENT);
        return this.#settle(ch, unique, v.device.flush(), 'flush', v.name);
      }
      case Opcode.FALLOCATE:
        return this.#fallocate(ch, req);
      case Opcode.OPENDIR:
        if (nodeid !== ROOT) return ch.error(unique, E.ENOTDIR);
        return ch.reply(unique, openOut(0n, 0));
      case Opcode.READDIR: {
        if (nodeid !== ROOT) return ch.error(unique, E.ENOTDIR);
        const entries = [
          { ino: ROOT, name: '.', type: DT_DIR },
          { ino: ROOT, name: '..', type: DT_DIR },
          ...this.#volumes
            .names()
            .map((n) => ({ ino: this.#ino(n), name: `${n}.img`, type: DT_REG })),
        ];
        const from = Number(body.readBigUInt64LE(8));
        return ch.reply(unique, dirents(entries, from, body.readUInt32LE(16)));
      }
      case Opcode.RELEASEDIR:
      case Opcode.FSYNCDIR:
      case Opcode.ACCESS:
      case Opcode.DESTROY:
        return ch.error(unique, 0);
      case Opcode.STATFS:
        return ch.reply(unique, statfsOut());
      default:
        // xattrs, locks, ioctl, poll, lseek, copy_file_range...: the kernel falls back or says so.
        return ch.error(unique, E.ENOSYS);
    }
  }

  #init(ch: FuseChannel, unique: bigint, body: Buffer): void {
    const major = body.readUInt32LE(0);
    const minor = body.readUInt32LE(4);
    // A newer major asks us to answer with ours, and the kernel asks again.
    if (major < FUSE_KERNEL_VERSION || (major === FUSE_KERNEL_VERSION && minor < 31)) {
      this.#log.warn(`FUSE: kernel protocol ${major}.${minor} is too old (need 7.31)`);
      return ch.error(unique, E.EPROTO);
    }
    const offered = body.readUInt32LE(12);
    const wanted =
      InitFlag.ASYNC_READ |
      InitFlag.BIG_WRITES |
      InitFlag.ASYNC_DIO |
      InitFlag.PARALLEL_DIROPS |
      InitFlag.MAX_PAGES;
    ch.reply(
      unique,
      initOut({
        minor: Math.min(minor, FUSE_KERNEL_MINOR),
        maxReadahead: body.readUInt32LE(8),
        flags: offered & wanted,
        // Requests the kernel keeps in flight to us: a loop device queues up to 128.
        maxBackground: 128,
        congestionThreshold: 96,
        maxWrite: MAX_REQUEST_BYTES,
        maxPages: MAX_REQUEST_BYTES / 4096,
      }),
    );
    this.#ready?.();
  }

  #read(ch: FuseChannel, req: FuseRequest): void {
    const { unique, nodeid, body } = req;
    const v = this.#volume(nodeid);
    if (!v) return ch.error(unique, E.ENOENT);
    const pos = Number(body.readBigUInt64LE(8));
    const n = Math.max(0, Math.min(body.readUInt32LE(16), v.device.sizeBytes - pos));
    const reply = ch.replyBuffer(n);
    if (n === 0) return ch.replyIn(unique, reply);
    const into = reply.subarray(16);
    v.device.read(pos, n, into).then(
      (data) => {
        if (data.buffer !== into.buffer || data.byteOffset !== into.byteOffset)
          into.set(data.subarray(0, n));
        ch.replyIn(unique, reply);
        ch.release(reply);
      },
      (err: unknown) => this.#fail(ch, unique, err, `read ${v.name}`, false),
    );
  }

  #write(ch: FuseChannel, req: FuseRequest): void {
    const { unique, nodeid, body } = req;
    const v = this.#volume(nodeid);
    if (!v) return ch.error(unique, E.ENOENT);
    const pos = Number(body.readBigUInt64LE(8));
    const size = body.readUInt32LE(16);
    // Like a block device: what fits is written, past the end is "no space".
    const n = Math.max(0, Math.min(size, v.device.sizeBytes - pos));
    if (n === 0) return ch.error(unique, E.ENOSPC);
    let payload = body.subarray(40, 40 + n);
    let held: Buffer | undefined;
    // Large payloads stay where the kernel put them; small ones are copied so the buffer is reused.
    if (n >= 128 * 1024) held = req.retain();
    else payload = Buffer.from(payload);
    v.device.write(pos, payload).then(
      () => {
        ch.reply(unique, writeOut(n));
        if (held) ch.release(held);
      },
      (err: unknown) => this.#fail(ch, unique, err, `write ${v.name}`, true),
    );
  }

  #fallocate(ch: FuseChannel, req: FuseRequest): void {
    const { unique, nodeid, body } = req;
    const v = this.#volume(nodeid);
    if (!v) return ch.error(unique, E.ENOENT);
    const offset = Number(body.readBigUInt64LE(8));
    const length = Number(body.readBigUInt64LE(16));
    const mode = body.readUInt32LE(24);
    const end = offset + length;
    if (end > v.device.sizeBytes)
      return ch.error(unique, mode & Fallocate.KEEP_SIZE ? E.ENOSPC : E.EPERM);
    if (mode & Fallocate.PUNCH_HOLE) {
      if (!(mode & Fallocate.KEEP_SIZE)) return ch.error(unique, E.EINVAL);
      // A punched range reads as zeros: write-zeroes that may free the blocks (a discard).
      return this.#settle(ch, unique, v.device.zero(offset, length), 'punch hole', v.name);
    }
    if (mode & Fallocate.ZERO_RANGE)
      return this.#settle(
        ch,
        unique,
        v.device.zero(offset, length, { noHole: true }),
        'zero range',
        v.name,
      );
    if ((mode & ~Fallocate.KEEP_SIZE) !== 0) return ch.error(unique, E.EOPNOTSUPP);
    // Plain allocation inside the image: every block of a volume can be written already.
    return ch.error(unique, 0);
  }

  /** Answers `op`'s outcome (flush, punch hole, zero range: all but flush write). */
  #settle(ch: FuseChannel, unique: bigint, op: Promise<void>, what: string, name: string): void {
    op.then(
      () => ch.error(unique, 0),
      (err: unknown) => this.#fail(ch, unique, err, `${what} ${name}`, what !== 'flush'),
    );
  }

  #fail(ch: FuseChannel, unique: bigint, err: unknown, what: string, writes: boolean): void {
    this.#log.warn(`FUSE ${what}: ${err instanceof Error ? err.message : String(err)}`);
    ch.error(unique, errnoOf(err, writes));
  }

  async unmount(): Promise<void> {
    const ch = this.#channel;
    if (!ch) return;
    // Requests keep being served while umount runs: umount(8) itself stats the mountpoint.
    const problem = await ch.unmount();
    this.#channel = undefined;
    if (problem !== undefined) this.#log.warn(`FUSE unmount of ${this.mountpoint}: ${problem}`);
  }
}

/** The kernel's numbers; a volume going away is an I/O error to whatever uses the image. */
const FUSE_ERRNO: Record<DeviceErrno, number> = {
  EIO: E.EIO,
  EINVAL: E.EINVAL,
  ENOSPC: E.ENOSPC,
  EPERM: E.EPERM,
  ESHUTDOWN: E.EIO,
};

/** The errno for a device error (one table for every frontend: `deviceErrno`). */
function errnoOf(err: unknown, writes: boolean): number {
  return FUSE_ERRNO[deviceErrno(err, writes)];
}
