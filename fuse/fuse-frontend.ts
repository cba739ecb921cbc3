import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import type { BlockDevice } from '../replication/block-device.ts';

/** What the FUSE frontend serves: the volumes attached with the FUSE frontend. */
export interface FuseVolumes {
  names(): string[];
  device(name: string): BlockDevice | undefined;
}

export interface FuseLog {
  warn(message: string): void;
}

type Cb = (code: number, ...rest: unknown[]) => void;

interface FuseInstance {
  mount(cb: (err: Error | null) => void): void;
  unmount(cb: (err: Error | null) => void): void;
  _fuseOptions(): string;
}

interface FuseModule {
  new (mnt: string, ops: Record<string, unknown>, opts: Record<string, unknown>): FuseInstance;
  ENOENT: number;
  EPERM: number;
  EIO: number;
  ENOSPC: number;
  EINVAL: number;
  EISDIR: number;
  EACCES: number;
}

const IMAGE = /^\/([a-z0-9][a-z0-9._-]{0,62})\.img$/;
/** libfuse2's largest request; fuse-native offers no option for it, so it is passed raw. */
const MAX_WRITE_BYTES = 128 * 1024;

function run(command: string, args: string[]): Promise<void> {
  return new Promise((resolve) => execFile(command, args, () => resolve()));
}

/**
 * One FUSE mount per daemon showing `<volume>.img` for every volume
 * attached with the FUSE frontend. Reads and writes go straight to the
 * engine (direct_io: the page cache must not hide what the engine holds);
 * fsync and flush are the engine's flush. The image has a fixed size:
 * truncate, rename, unlink and writes past the end are refused.
 */
export class FuseFrontend {
  readonly mountpoint: string;
  readonly #volumes: FuseVolumes;
  readonly #log: FuseLog;
  readonly #openCounts = new Map<string, number>();
  #fuse: FuseInstance | undefined;
  readonly #mountedAt = new Date();

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
    await run('fusermount', ['-uz', this.mountpoint]);
    await fs.promises.mkdir(this.mountpoint, { recursive: true });
    const require = createRequire(import.meta.url);
    const Fuse = require('fuse-native') as FuseModule;
    const fuse = new Fuse(this.mountpoint, this.#ops(Fuse), {
      force: true,
      mkdir: true,
      fsname: 'corral',
      subtype: 'corral',
    });
    const base = fuse._fuseOptions.bind(fuse);
    // fuse-native has no switch for these: without big_writes the kernel sends 4 KiB writes.
    fuse._fuseOptions = () => {
      const extra = `big_writes,max_write=${MAX_WRITE_BYTES},max_read=${MAX_WRITE_BYTES},direct_io`;
      const opts = base();
      return opts ? `${opts},${extra}` : `-o${extra}`;
    };
    await new Promise<void>((resolve, reject) =>
      fuse.mount((err) => (err ? reject(err) : resolve())),
    );
    this.#fuse = fuse;
  }

  #volumeOf(p: string): string | undefined {
    const name = IMAGE.exec(p)?.[1];
    return name !== undefined && this.#volumes.names().includes(name) ? name : undefined;
  }

  #ops(Fuse: FuseModule): Record<string, unknown> {
    const mtime = this.#mountedAt;
    const fail = (cb: Cb, err: unknown, what: string): void => {
      this.#log.warn(`FUSE ${what}: ${err instanceof Error ? err.message : String(err)}`);
      cb(errnoOf(Fuse, err));
    };
    return {
      readdir: (p: string, cb: Cb) => {
        if (p !== '/') return cb(Fuse.ENOENT);
        cb(
          0,
          this.#volumes.names().map((n) => `${n}.img`),
        );
      },
      getattr: (p: string, cb: Cb) => {
        if (p === '/') {
          return cb(0, {
            mtime,
            atime: mtime,
            ctime: mtime,
            nlink: 2,
            size: 4096,
            mode: 0o40755,
            uid: 0,
            gid: 0,
          });
        }
        const name = this.#volumeOf(p);
        const device = name === undefined ? undefined : this.#volumes.device(name);
        if (!device) return cb(Fuse.ENOENT);
        cb(0, {
          mtime,
          atime: mtime,
          ctime: mtime,
          nlink: 1,
          size: device.sizeBytes,
          blocks: Math.ceil(device.sizeBytes / 512),
          blksize: 4096,
          mode: 0o100600,
          uid: 0,
          gid: 0,
        });
      },
      open: (p: string, _flags: number, cb: Cb) => {
        const name = this.#volumeOf(p);
        if (name === undefined) return cb(Fuse.ENOENT);
        this.#openCounts.set(name, this.openCount(name) + 1);
        cb(0, 0);
      },
      release: (p: string, _fd: number, cb: Cb) => {
        const name = IMAGE.exec(p)?.[1];
        if (name !== undefined) this.#openCounts.set(name, Math.max(0, this.openCount(name) - 1));
        cb(0);
      },
      read: (p: string, _fd: number, buf: Buffer, len: number, pos: number, cb: Cb) => {
        const name = this.#volumeOf(p);
        const device = name === undefined ? undefined : this.#volumes.device(name);
        if (!device) return cb(Fuse.ENOENT);
        const n = Math.max(0, Math.min(len, device.sizeBytes - pos));
        if (n === 0) return cb(0);
        device.read(pos, n, buf.subarray(0, n)).then(
          (data) => {
            if (data.buffer !== buf.buffer || data.byteOffset !== buf.byteOffset)
              buf.set(data.subarray(0, n));
            cb(n);
          },
          (err: unknown) => fail(cb, err, `read ${p}`),
        );
      },
      write: (p: string, _fd: number, buf: Buffer, len: number, pos: number, cb: Cb) => {
        const name = this.#volumeOf(p);
        const device = name === undefined ? undefined : this.#volumes.device(name);
        if (!device) return cb(Fuse.ENOENT);
        // Like a block device: what fits is written, past the end is "no space".
        const n = Math.max(0, Math.min(len, device.sizeBytes - pos));
        if (n === 0) return cb(Fuse.ENOSPC);
        device.write(pos, buf.subarray(0, n)).then(
          () => cb(n),
          (err: unknown) => fail(cb, err, `write ${p}`),
        );
      },
      fsync: (p: string, _datasync: boolean, _fd: number, cb: Cb) => this.#flush(Fuse, p, cb, fail),
      flush: (p: string, _fd: number, cb: Cb) => this.#flush(Fuse, p, cb, fail),
      truncate: (p: string, size: number, cb: Cb) => this.#truncate(Fuse, p, size, cb),
      ftruncate: (p: string, _fd: number, size: number, cb: Cb) =>
        this.#truncate(Fuse, p, size, cb),
      utimens: (_p: string, _atime: unknown, _mtime: unknown, cb: Cb) => cb(0),
      unlink: (_p: string, cb: Cb) => cb(Fuse.EPERM),
      rename: (_src: string, _dest: string, cb: Cb) => cb(Fuse.EPERM),
      create: (_p: string, _mode: number, cb: Cb) => cb(Fuse.EPERM),
      mkdir: (_p: string, _mode: number, cb: Cb) => cb(Fuse.EPERM),
      rmdir: (_p: string, cb: Cb) => cb(Fuse.EPERM),
      chmod: (_p: string, _mode: number, cb: Cb) => cb(Fuse.EPERM),
      chown: (_p: string, _uid: number, _gid: number, cb: Cb) => cb(Fuse.EPERM),
      link: (_src: string, _dest: string, cb: Cb) => cb(Fuse.EPERM),
      symlink: (_src: string, _dest: string, cb: Cb) => cb(Fuse.EPERM),
      statfs: (_p: string, cb: Cb) => {
        cb(0, {
          bsize: 4096,
          frsize: 4096,
          blocks: 0,
          bfree: 0,
          bavail: 0,
          files: 0,
          ffree: 0,
          favail: 0,
          fsid: 0,
          flag: 0,
          namemax: 255,
        });
      },
    };
  }

  #flush(
    Fuse: FuseModule,
    p: string,
    cb: Cb,
    fail: (cb: Cb, err: unknown, what: string) => void,
  ): void {
    const name = this.#volumeOf(p);
    const device = name === undefined ? undefined : this.#volumes.device(name);
    if (!device) return cb(Fuse.ENOENT);
    device.flush().then(
      () => cb(0),
      (err: unknown) => fail(cb, err, `flush ${p}`),
    );
  }

  #truncate(Fuse: FuseModule, p: string, size: number, cb: Cb): void {
    const name = this.#volumeOf(p);
    const device = name === undefined ? undefined : this.#volumes.device(name);
    if (!device) return cb(Fuse.ENOENT);
    // The image is the volume: its size changes with `volume expand`, not with truncate.
    cb(size === device.sizeBytes ? 0 : Fuse.EPERM);
  }

  async unmount(): Promise<void> {
    const fuse = this.#fuse;
    this.#fuse = undefined;
    if (!fuse) return;
    await new Promise<void>((resolve) =>
      fuse.unmount((err) => {
        if (err) this.#log.warn(`FUSE unmount of ${this.mountpoint} failed: ${err.message}`);
        resolve();
      }),
    );
  }
}

function errnoOf(Fuse: FuseModule, err: unknown): number {
  const code = typeof err === 'object' && err !== null && 'code' in err ? err.code : undefined;
  if (code === 'NO_SPACE' || code === 'OUT_OF_RANGE') return Fuse.ENOSPC;
  if (code === 'READ_ONLY') return Fuse.EPERM;
  return Fuse.EIO;
}
