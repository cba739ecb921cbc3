import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import { BufferPool } from '../common/buffer-pool.ts';
import { IN_HEADER, OUT_HEADER } from './kernel.ts';

/** One request as the kernel sent it; `body` is everything after the header. */
export interface FuseRequest {
  opcode: number;
  unique: bigint;
  nodeid: bigint;
  body: Buffer;
  /**
   * Keeps the buffer `body` lies in (a WRITE's payload, used after this turn);
   * give it back with `channel.release(buffer)` once done.
   */
  retain(): Buffer;
}

export interface ChannelOptions {
  mountpoint: string;
  /** The largest WRITE payload the kernel may send (fuse_init_out.max_write). */
  maxWrite: number;
  onRequest(req: FuseRequest): void;
  onClose(err: Error | undefined): void;
  warn(message: string): void;
}

interface PipeBinding {
  Pipe: new (type: number) => { open(fd: number): number };
  constants: { SOCKET: number };
}

const errno = os.constants.errno;

function run(command: string, args: string[], extraFd?: number): Promise<string | undefined> {
  return new Promise((resolve) => {
    const stdio: (string | number)[] = ['ignore', 'ignore', 'pipe'];
    if (extraFd !== undefined) stdio.push(extraFd);
    const child = spawn(command, args, { stdio: stdio as ('ignore' | 'pipe')[] });
    let stderr = '';
    child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', (err) => resolve(err.message));
    child.on('close', (code) => resolve(code === 0 ? undefined : stderr.trim() || `exit ${code}`));
  });
}

/**
 * The connection to the kernel's FUSE device for one mount, served on the
 * event loop: `/dev/fuse` is opened non-blocking and read through a libuv
 * stream handle, so requests arrive as readable events (many per wakeup),
 * each read landing one whole request in a buffer we choose, and replies are
 * single `write`s. No thread hands requests over and no semaphore waits for
 * the answer, which is what a libfuse binding costs per request.
 *
 * Mounting takes root: `mount -t fuse.corral -o fd=3,...` with our device
 * descriptor passed to mount(8) as its fd 3 (the kernel takes the connection
 * from that descriptor; fusermount's way needs a descriptor passed back over a
 * Unix socket, which Node cannot receive).
 */
export class FuseChannel {
  readonly #o: ChannelOptions;
  readonly #fd: number;
  readonly #pool = new BufferPool(64 * 1024 * 1024);
  readonly #bufferBytes: number;
  #buf: Buffer;
  #socket: net.Socket | undefined;
  #closed = false;

  private constructor(o: ChannelOptions, fd: number) {
    this.#o = o;
    this.#fd = fd;
    // The kernel refuses a read smaller than header + fuse_write_in + max_write.
    this.#bufferBytes = o.maxWrite + 8192;
    this.#buf = this.#pool.acquire(this.#bufferBytes);
  }

  /** Mounts a FUSE file system at `mountpoint` and starts serving its requests. */
  static async open(o: ChannelOptions): Promise<FuseChannel> {
    if ('deno' in process.versions) throw new Error('FUSE needs Node (libuv pipe handles)');
    const binding = (process as unknown as { binding(name: string): PipeBinding }).binding(
      'pipe_wrap',
    );
    const fd = fs.openSync('/dev/fuse', fs.constants.O_RDWR | fs.constants.O_NONBLOCK);
    const failed = await run(
      'mount',
      [
        '-i',
        '-t',
        'fuse.corral',
        '-o',
        'fd=3,rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions',
        'corral',
        o.mountpoint,
      ],
      fd,
    );
    if (failed !== undefined) {
      fs.closeSync(fd);
      throw new Error(`mount ${o.mountpoint}: ${failed}`);
    }
    const channel = new FuseChannel(o, fd);
    const pipe = new binding.Pipe(binding.constants.SOCKET);
    const err = pipe.open(fd);
    if (err !== 0) {
      await run('umount', ['-l', o.mountpoint]);
      fs.closeSync(fd);
      throw new Error(`cannot watch /dev/fuse (libuv error ${err})`);
    }
    channel.#start(pipe);
    return channel;
  }

  /** Removes what a killed daemon left at `mountpoint` ("Transport endpoint is not connected"). */
  static async clearStale(mountpoint: string): Promise<void> {
    await run('umount', ['-l', mountpoint]);
  }

  #start(pipe: unknown): void {
    const socket = new net.Socket({
      handle: pipe,
      readable: true,
      writable: false,
      onread: {
        buffer: () => this.#buf,
        callback: (n: number) => {
          this.#onRead(n);
          return true;
        },
      },
    } as unknown as net.SocketConstructorOpts);
    socket.on('error', (e) => this.#close(e));
    socket.on('close', () => this.#close(undefined));
    socket.resume();
    this.#socket = socket;
  }

  #onRead(n: number): void {
    const buf = this.#buf;
    if (n < IN_HEADER) return;
    const len = buf.readUInt32LE(0);
    let retained = false;
    this.#o.onRequest({
      opcode: buf.readUInt32LE(4),
      unique: buf.readBigUInt64LE(8),
      nodeid: buf.readBigUInt64LE(16),
      body: buf.subarray(IN_HEADER, Math.min(len, n)),
      retain: () => {
        retained = true;
        return buf;
      },
    });
    // A retained buffer belongs to its request now: the next read lands in another.
    if (retained) this.#buf = this.#pool.acquire(this.#bufferBytes);
  }

  /** A buffer for a reply of `payloadBytes`, with room for the header in front. */
  replyBuffer(payloadBytes: number): Buffer {
    return this.#pool.acquire(OUT_HEADER + payloadBytes);
  }

  release(buf: Buffer): void {
    this.#pool.release(buf);
  }

  /** Answers a request with an errno (0: success without data). */
  error(unique: bigint, code: number): void {
    this.#send(Buffer.alloc(OUT_HEADER), unique, code);
  }

  /** Answers a request with `payload` (a small struct). */
  reply(unique: bigint, payload: Buffer): void {
    const b = Buffer.allocUnsafe(OUT_HEADER + payload.length);
    payload.copy(b, OUT_HEADER);
    this.replyIn(unique, b);
  }

  /** Answers with `buf` from replyBuffer(), whose payload is already in place after the header. */
  replyIn(unique: bigint, buf: Buffer): void {
    this.#send(buf, unique, 0);
  }

  /**
   * An unsolicited message to the kernel (fuse_out_header with unique 0 and
   * the notify code where the error goes). Errors are returned, not thrown:
   * ENOENT means the kernel does not know the node, which is fine.
   */
  notify(code: number, payload: Buffer): NodeJS.ErrnoException | undefined {
    if (this.#closed) return undefined;
    const buf = Buffer.alloc(OUT_HEADER + payload.length);
    buf.writeUInt32LE(buf.length, 0);
    buf.writeInt32LE(code, 4);
    buf.writeBigUInt64LE(0n, 8);
    payload.copy(buf, OUT_HEADER);
    try {
      fs.writeSync(this.#fd, buf);
      return undefined;
    } catch (err) {
      return err as NodeJS.ErrnoException;
    }
  }

  /** Fills in fuse_out_header and writes the reply; never throws (replies go out from callbacks). */
  #send(buf: Buffer, unique: bigint, code: number): void {
    if (this.#closed) return;
    buf.writeUInt32LE(buf.length, 0);
    buf.writeInt32LE(-code, 4);
    buf.writeBigUInt64LE(unique, 8);
    try {
      // One write is one reply; the device takes it whole or not at all.
      fs.writeSync(this.#fd, buf);
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      // ENOENT: the request was interrupted and is gone; ENODEV: unmounted meanwhile.
      if (e.errno === -errno.ENOENT || e.errno === -errno.ENODEV) return;
      // The kernel refused our reply (a bug of ours): the request gets EIO, the mount goes on.
      this.#o.warn(`FUSE reply to request ${unique} refused: ${e.message}`);
      if (code === 0) this.#send(Buffer.alloc(OUT_HEADER), unique, errno.EIO);
    }
  }

  #close(err: NodeJS.ErrnoException | undefined): void {
    if (this.#closed) return;
    this.#closed = true;
    const code = err?.code;
    // ENODEV is how the device says "unmounted": the normal end.
    this.#o.onClose(code === 'ENODEV' ? undefined : err);
  }

  /** Unmounts (lazily if something still holds the mount) and closes the device. */
  async unmount(): Promise<string | undefined> {
    let problem = await run('umount', [this.#o.mountpoint]);
    if (problem !== undefined) {
      const lazy = await run('umount', ['-l', this.#o.mountpoint]);
      problem = lazy === undefined ? `busy, detached lazily (${problem})` : problem;
    }
    this.#socket?.destroy();
    this.#closed = true;
    return problem;
  }
}
