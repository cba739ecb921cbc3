import type { Socket } from 'node:net';
import {
  deviceErrno,
  MAX_REQUEST_BYTES,
  type BlockDevice,
  type Extent,
} from '../replication/block-device.ts';
import { assert } from '../common/assert.ts';
import type { BufferPool } from '../common/buffer-pool.ts';
import { TurnBatch } from '../common/turn-batch.ts';
import type { ByteQueue } from './byte-queue.ts';
import type { Negotiated } from './handshake.ts';
import * as P from './protocol.ts';

/** Requests one connection may have in flight, and the bytes they may hold. */
const MAX_INFLIGHT = 128;
const MAX_INFLIGHT_BYTES = 128 * 1024 * 1024;
// One request of the largest size must always be admitted.
assert(MAX_INFLIGHT_BYTES >= MAX_REQUEST_BYTES, 'MAX_INFLIGHT_BYTES below one request');
/** Replies waiting in the socket beyond this stop us reading new requests. */
const MAX_UNSENT_REPLY_BYTES = 64 * 1024 * 1024;
/** A BLOCK_STATUS reply lists at most this many extents. */
const MAX_EXTENTS = 64 * 1024;

const FLAGS_BY_COMMAND: Record<number, number> = {
  [P.CMD_READ]: P.CMD_FLAG_FUA | P.CMD_FLAG_DF,
  [P.CMD_WRITE]: P.CMD_FLAG_FUA,
  [P.CMD_DISC]: 0,
  [P.CMD_FLUSH]: 0,
  [P.CMD_TRIM]: P.CMD_FLAG_FUA,
  [P.CMD_CACHE]: 0,
  [P.CMD_WRITE_ZEROES]: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE,
  [P.CMD_BLOCK_STATUS]: P.CMD_FLAG_REQ_ONE,
};

class NbdRequestError extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
  }
}

/** Maps a device error to the errno the spec names for it (one table: `deviceErrno`). */
function errnoOf(err: unknown, command: number): number {
  if (err instanceof NbdRequestError) return err.errno;
  return P[deviceErrno(err, command === P.CMD_WRITE || command === P.CMD_WRITE_ZEROES)];
}

export interface ConnectionLog {
  warn(message: string): void;
}

/**
 * The transmission phase of one client: requests are read in order,
 * served concurrently, and answered as they finish (out of order), each reply
 * written in one piece. Bad requests get the spec's errno; only a request
 * we cannot frame (bad magic) ends the connection.
 */
export class NbdConnection {
  readonly #socket: Socket;
  readonly #batch: TurnBatch;
  readonly #queue: ByteQueue;
  readonly #device: BlockDevice;
  readonly #structured: boolean;
  readonly #metaContext: boolean;
  readonly #log: ConnectionLog;
  readonly name: string;
  #inflight = 0;
  #inflightBytes = 0;
  #wakeReader: (() => void) | undefined;
  #stopping = false;

  readonly #pool: BufferPool;

  constructor(
    socket: Socket,
    queue: ByteQueue,
    negotiated: Negotiated,
    log: ConnectionLog,
    pool: BufferPool,
  ) {
    this.#pool = pool;
    this.#socket = socket;
    this.#batch = new TurnBatch(socket);
    this.#queue = queue;
    this.#device = negotiated.device;
    this.#structured = negotiated.structured;
    this.#metaContext = negotiated.metaContext;
    this.name = negotiated.name;
    this.#log = log;
    socket.on('drain', () => this.#wake());
  }

  /** Stops taking requests; resolves once those in flight have been answered. */
  quiesce(): Promise<void> {
    this.#stopping = true;
    this.#wake();
    return this.#drain();
  }

  #wake(): void {
    const wake = this.#wakeReader;
    this.#wakeReader = undefined;
    wake?.();
  }

  async #waitFor(ready: () => boolean): Promise<void> {
    while (!ready() && !this.#socket.destroyed && !this.#stopping) {
      await new Promise<void>((resolve) => (this.#wakeReader = resolve));
    }
  }

  /** Serves requests until DISC, a protocol error, or the connection ends. */
  async run(): Promise<void> {
    for (;;) {
      await this.#waitFor(
        () => this.#inflight < MAX_INFLIGHT && this.#socket.writableLength < MAX_UNSENT_REPLY_BYTES,
      );
      if (this.#stopping || this.#socket.destroyed) break;
      let header: Buffer;
      try {
        header = await this.#queue.read(P.REQUEST_HEADER_BYTES);
      } catch {
        break; // the client went away; in-flight work still completes
      }
      if (header.readUInt32BE(0) !== P.REQUEST_MAGIC) {
        this.#log.warn(`NBD ${this.name}: bad request magic, closing the connection`);
        this.#socket.destroy();
        break;
      }
      const flags = header.readUInt16BE(4);
      const command = header.readUInt16BE(6);
      // A view into the socket's chunk, which is never reused.
      const cookie = header.subarray(8, 16);
      const offset64 = header.readBigUInt64BE(16);
      const length = header.readUInt32BE(24);
      // Past 2^53 no volume can reach; the range check below rejects it.
      const offset =
        offset64 > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(offset64);

      if (command === P.CMD_DISC) break;

      let payload: Buffer | undefined;
      if (command === P.CMD_WRITE) {
        if (length > MAX_REQUEST_BYTES) {
          // The payload must still be consumed to stay in step with the client.
          try {
            await this.#queue.skip(length);
          } catch {
            break;
          }
          this.#replyError(
            command,
            cookie,
            P.EINVAL,
            `write of ${length} bytes exceeds the maximum of ${MAX_REQUEST_BYTES}`,
          );
          continue;
        }
        await this.#waitFor(
          () => this.#inflightBytes === 0 || this.#inflightBytes + length <= MAX_INFLIGHT_BYTES,
        );
        try {
          payload = await this.#queue.read(length, (n) => this.#pool.acquire(n));
        } catch {
          break; // disconnected mid-write: the partial request is dropped
        }
      } else if (command === P.CMD_READ) {
        await this.#waitFor(
          () => this.#inflightBytes === 0 || this.#inflightBytes + length <= MAX_INFLIGHT_BYTES,
        );
      }

      const bytes = command === P.CMD_WRITE || command === P.CMD_READ ? length : 0;
      this.#inflight++;
      this.#inflightBytes += bytes;
      this.#serve(flags, command, cookie, offset, length, payload)
        .catch((err: unknown) => this.#log.warn(`NBD ${this.name}: reply failed: ${String(err)}`))
        .finally(() => {
          this.#inflight--;
          this.#inflightBytes -= bytes;
          this.#wake();
          if (this.#inflight === 0) for (const w of this.#drainWaiters.splice(0)) w();
        });
    }
    await this.#drain();
    if (!this.#socket.destroyed) {
      // A clean disconnect: make what the client wrote durable before saying goodbye.
      await this.#device
        .flush()
        .catch((err: unknown) =>
          this.#log.warn(`NBD ${this.name}: flush at disconnect failed: ${String(err)}`),
        );
      this.#socket.end();
    }
  }

  readonly #drainWaiters: Array<() => void> = [];

  #drain(): Promise<void> {
    if (this.#inflight === 0) return Promise.resolve();
    return new Promise((resolve) => this.#drainWaiters.push(resolve));
  }

  async #serve(
    flags: number,
    command: number,
    cookie: Buffer,
    offset: number,
    length: number,
    payload: Buffer | undefined,
  ): Promise<void> {
    try {
      const allowed = FLAGS_BY_COMMAND[command];
      if (allowed === undefined) throw new NbdRequestError(P.EINVAL, `unknown command ${command}`);
      if ((flags & ~allowed) !== 0)
        throw new NbdRequestError(
          P.EINVAL,
          `flags 0x${flags.toString(16)} not valid for command ${command}`,
        );
      if (flags & P.CMD_FLAG_DF && !this.#structured)
        throw new NbdRequestError(P.EINVAL, 'DF needs structured replies');
      const fua = (flags & P.CMD_FLAG_FUA) !== 0;
      const size = this.#device.sizeBytes;
      const outOfRange = offset + length > size;
      const rangeMessage = `${length} bytes at offset ${offset} exceed the export size ${size}`;
      switch (command) {
        case P.CMD_READ: {
          if (length > MAX_REQUEST_BYTES)
            throw new NbdRequestError(P.EINVAL, `read of ${length} bytes exceeds the maximum`);
          if (outOfRange) throw new NbdRequestError(P.EINVAL, rangeMessage);
          if (length === 0) {
            this.#replyRead(cookie, offset, Buffer.alloc(0));
            return;
          }
          const buf = this.#pool.acquire(length);
          const data = await this.#device.read(offset, length, buf);
          // Back to the pool once the socket has taken the bytes, and only if the read succeeded.
          this.#replyRead(cookie, offset, data, () => this.#pool.release(buf));
          return;
        }
        case P.CMD_WRITE:
          if (outOfRange) throw new NbdRequestError(P.ENOSPC, rangeMessage);
          await this.#device.write(offset, payload!, { fua });
          this.#pool.release(payload!);
          break;
        case P.CMD_FLUSH:
          await this.#device.flush();
          break;
        case P.CMD_TRIM:
          if (outOfRange) throw new NbdRequestError(P.EINVAL, rangeMessage);
          await this.#device.trim(offset, length, { fua });
          break;
        case P.CMD_WRITE_ZEROES:
          if (outOfRange) throw new NbdRequestError(P.ENOSPC, rangeMessage);
          await this.#device.zero(offset, length, {
            fua,
            noHole: (flags & P.CMD_FLAG_NO_HOLE) !== 0,
          });
          break;
        case P.CMD_CACHE:
          // Replicas are on local disks or reached per request; there is no cache to warm.
          if (outOfRange) throw new NbdRequestError(P.EINVAL, rangeMessage);
          break;
        case P.CMD_BLOCK_STATUS: {
          if (!this.#structured || !this.#metaContext)
            throw new NbdRequestError(P.EINVAL, 'no metadata context was negotiated');
          if (length === 0) throw new NbdRequestError(P.EINVAL, 'block status of zero bytes');
          if (outOfRange) throw new NbdRequestError(P.EINVAL, rangeMessage);
          const extents = await this.#device.extents(offset, length);
          this.#replyBlockStatus(cookie, extents, (flags & P.CMD_FLAG_REQ_ONE) !== 0);
          return;
        }
      }
      this.#replySimple(cookie, 0);
    } catch (err) {
      const errno = errnoOf(err, command);
      if (errno === P.EIO)
        this.#log.warn(
          `NBD ${this.name}: command ${command} failed: ${err instanceof Error ? err.message : String(err)}`,
        );
      this.#replyError(command, cookie, errno, err instanceof Error ? err.message : String(err));
    }
  }

  /**
   * Replies finished in the same turn of the event loop leave together in
   * one writev: the socket is corked at the first and uncorked once the turn
   * is over. Parts of one reply are written back to back, never interleaved.
   */
  #send(parts: Uint8Array[], written?: () => void): void {
    const socket = this.#socket;
    if (socket.destroyed || !socket.writable) return;
    this.#batch.hold();
    const last = parts.length - 1;
    parts.forEach((p, i) => {
      if (i === last && written) socket.write(p, (err) => (err ? undefined : written()));
      else socket.write(p);
    });
  }

  #replySimple(cookie: Buffer, errno: number, data?: Uint8Array, written?: () => void): void {
    const header = Buffer.allocUnsafe(16);
    header.writeUInt32BE(P.SIMPLE_REPLY_MAGIC, 0);
    header.writeUInt32BE(errno, 4);
    cookie.copy(header, 8);
    if (data && data.length > 0) this.#send([header, data], written);
    else this.#send([header]);
  }

  #chunkHeader(cookie: Buffer, flags: number, type: number, length: number): Buffer {
    const header = Buffer.allocUnsafe(20);
    header.writeUInt32BE(P.STRUCTURED_REPLY_MAGIC, 0);
    header.writeUInt16BE(flags, 4);
    header.writeUInt16BE(type, 6);
    cookie.copy(header, 8);
    header.writeUInt32BE(length, 16);
    return header;
  }

  #replyRead(cookie: Buffer, offset: number, data: Uint8Array, written?: () => void): void {
    if (!this.#structured) {
      this.#replySimple(cookie, 0, data, written);
      return;
    }
    if (data.length === 0) {
      this.#send([this.#chunkHeader(cookie, P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, 0)]);
      return;
    }
    const header = this.#chunkHeader(
      cookie,
      P.REPLY_FLAG_DONE,
      P.REPLY_TYPE_OFFSET_DATA,
      8 + data.length,
    );
    const off = Buffer.allocUnsafe(8);
    off.writeBigUInt64BE(BigInt(offset));
    this.#send([header, off, data], written);
  }

  #replyBlockStatus(cookie: Buffer, extents: Extent[], one: boolean): void {
    const list = extents.slice(0, one ? 1 : MAX_EXTENTS);
    const payload = Buffer.allocUnsafe(4 + 8 * list.length);
    payload.writeUInt32BE(P.BASE_ALLOCATION_ID, 0);
    list.forEach((e, i) => {
      payload.writeUInt32BE(Math.min(e.lengthBytes, 0xffffffff), 4 + 8 * i);
      payload.writeUInt32BE((e.hole ? P.STATE_HOLE : 0) | (e.zero ? P.STATE_ZERO : 0), 8 + 8 * i);
    });
    this.#send([
      this.#chunkHeader(cookie, P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS, payload.length),
      payload,
    ]);
  }

  #replyError(command: number, cookie: Buffer, errno: number, message: string): void {
    if (!this.#structured || (command !== P.CMD_READ && command !== P.CMD_BLOCK_STATUS)) {
      this.#replySimple(cookie, errno);
      return;
    }
    const text = Buffer.from(message.slice(0, 1024));
    const payload = Buffer.allocUnsafe(6 + text.length);
    payload.writeUInt32BE(errno, 0);
    payload.writeUInt16BE(text.length, 4);
    text.copy(payload, 6);
    this.#send([
      this.#chunkHeader(cookie, P.REPLY_FLAG_DONE, P.REPLY_TYPE_ERROR, payload.length),
      payload,
    ]);
  }
}
