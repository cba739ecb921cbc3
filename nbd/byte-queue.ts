import type { Socket } from 'node:net';
import { adoptDirect, joined, Slab, type DirectReader } from '../common/direct-socket.ts';

/** Reads at least this large are filled in place: the kernel copies straight into the caller's buffer. */
const IN_PLACE_MIN_BYTES = 64 * 1024;

interface InPlace {
  buf: Buffer;
  filled: number;
  resolve: (buf: Buffer) => void;
  reject: (err: Error) => void;
}

/**
 * Incoming bytes of one connection, read by exact lengths. It pauses the
 * socket while more than `highWaterBytes` wait unread, so a client that sends
 * faster than we serve cannot make us buffer without bound.
 *
 * Where the runtime allows (common/direct-socket.ts), the queue decides where
 * each read lands: a large read (a WRITE's payload) is filled in place in the
 * caller's buffer, everything else lands in a slab and is handed out as views.
 * Elsewhere it collects the socket's 'data' chunks.
 */
export class ByteQueue implements DirectReader {
  readonly #highWaterBytes: number;
  #socket!: Socket;
  #chunks: Buffer[] = [];
  #head = 0; // read offset into #chunks[0]
  #length = 0;
  #waiter: { need: number; resolve: () => void; reject: (err: Error) => void } | undefined;
  #inPlace: InPlace | undefined;
  /** Whether the buffer handed out last by nextBuffer() was the in-place target's. */
  #lastInPlace = false;
  readonly #slab = new Slab();
  #direct = false;
  #ended: Error | undefined;
  #paused = false;

  private constructor(highWaterBytes: number) {
    this.#highWaterBytes = highWaterBytes;
  }

  /**
   * Reads `raw` (accepted with `pauseOnConnect`) through a new queue; use the
   * returned socket from then on (it may be a new object for the same connection).
   */
  static attach(
    raw: Socket,
    highWaterBytes: number,
    options: { direct?: boolean } = {},
  ): { socket: Socket; queue: ByteQueue } {
    const queue = new ByteQueue(highWaterBytes);
    const direct = options.direct === false ? undefined : adoptDirect(raw, queue);
    const socket = direct ?? raw;
    queue.#socket = socket;
    queue.#direct = direct !== undefined;
    if (!direct) {
      socket.on('data', (chunk: Buffer) => queue.#append(chunk));
      socket.resume();
    }
    const end = (): void => {
      queue.#ended ??= new Error('connection closed');
      queue.#wake();
    };
    socket.on('end', end);
    socket.on('close', end);
    socket.on('error', end);
    return { socket, queue };
  }

  get buffered(): number {
    return this.#length;
  }

  /** Bytes that landed in slabs rather than in place (of a large payload, they are copied once more). */
  slabBytes = 0;

  /** DirectReader: where the next read lands. */
  nextBuffer(): Uint8Array {
    const target = this.#inPlace;
    if (target) {
      this.#lastInPlace = true;
      return target.buf.subarray(target.filled);
    }
    this.#lastInPlace = false;
    return this.#slab.space();
  }

  /** DirectReader: `bytes` landed in the buffer nextBuffer() gave last. */
  onRead(bytes: number): void {
    if (this.#lastInPlace) {
      const target = this.#inPlace!;
      target.filled += bytes;
      if (target.filled === target.buf.length) {
        this.#inPlace = undefined;
        // Two: where the next read lands is decided as soon as this one is handled, before
        // the consumer has parsed the header it brings and asked for its payload in place.
        this.#slab.afterInPlace(2);
        target.resolve(target.buf);
      }
      return;
    }
    this.slabBytes += bytes;
    let chunk = this.#slab.take(bytes);
    const target = this.#inPlace;
    if (target) {
      // The read was handed out before the in-place read began: move its share over.
      const take = Math.min(bytes, target.buf.length - target.filled);
      chunk.copy(target.buf, target.filled, 0, take);
      target.filled += take;
      if (target.filled === target.buf.length) {
        this.#inPlace = undefined;
        target.resolve(target.buf);
      }
      chunk = chunk.subarray(take);
      if (chunk.length === 0) return;
    }
    this.#append(chunk);
  }

  #append(chunk: Buffer): void {
    const last = this.#chunks[this.#chunks.length - 1];
    // Adjacent in the same slab: one view, so a payload that came in several reads is not copied.
    const both = last && joined(last, chunk);
    if (both) this.#chunks[this.#chunks.length - 1] = both;
    else this.#chunks.push(chunk);
    this.#length += chunk.length;
    if (this.#length > this.#highWaterBytes && !this.#paused) {
      this.#paused = true;
      this.#socket.pause();
    }
    this.#wake();
  }

  #wake(): void {
    const w = this.#waiter;
    if (w) {
      if (this.#length >= w.need) {
        this.#waiter = undefined;
        w.resolve();
      } else if (this.#ended) {
        this.#waiter = undefined;
        w.reject(this.#ended);
      }
    }
    if (this.#ended && this.#inPlace) {
      const target = this.#inPlace;
      this.#inPlace = undefined;
      target.reject(this.#ended);
    }
  }

  async #wait(need: number): Promise<void> {
    if (this.#length >= need) return;
    if (this.#ended) throw this.#ended;
    this.#resume();
    await new Promise<void>((resolve, reject) => (this.#waiter = { need, resolve, reject }));
  }

  #resume(): void {
    if (this.#paused) {
      this.#paused = false;
      this.#socket.resume();
    }
  }

  /**
   * Exactly `n` bytes: a view into a chunk or slab where they arrived in one
   * piece (never reused), else a buffer from `allocate` — filled in place by
   * the socket when the queue reads directly and `n` is large.
   */
  async read(
    n: number,
    allocate: (n: number) => Buffer = (size) => Buffer.allocUnsafe(size),
  ): Promise<Buffer> {
    if (this.#direct && n >= IN_PLACE_MIN_BYTES && this.#length < n)
      return this.#readInPlace(n, allocate);
    await this.#wait(n);
    const first = this.#chunks[0]!;
    let out: Buffer;
    if (first.length - this.#head >= n) {
      out = first.subarray(this.#head, this.#head + n);
      this.#consume(n);
    } else {
      out = allocate(n);
      this.#copyOut(out, 0, n);
    }
    this.#maybeResume();
    return out;
  }

  async #readInPlace(n: number, allocate: (n: number) => Buffer): Promise<Buffer> {
    if (this.#ended) throw this.#ended;
    const buf = allocate(n);
    const present = this.#length;
    this.#copyOut(buf, 0, present);
    this.#resume();
    return new Promise<Buffer>((resolve, reject) => {
      this.#inPlace = { buf, filled: present, resolve, reject };
    });
  }

  #copyOut(out: Buffer, at: number, n: number): void {
    let filled = 0;
    while (filled < n) {
      const chunk = this.#chunks[0]!;
      const take = Math.min(chunk.length - this.#head, n - filled);
      chunk.copy(out, at + filled, this.#head, this.#head + take);
      filled += take;
      this.#consume(take);
    }
  }

  /** Throws `n` bytes away as they arrive, without holding them. */
  async skip(n: number): Promise<void> {
    let left = n;
    while (left > 0) {
      await this.#wait(1);
      const chunk = this.#chunks[0]!;
      const take = Math.min(chunk.length - this.#head, left);
      this.#consume(take);
      left -= take;
      this.#maybeResume();
    }
  }

  #consume(n: number): void {
    this.#head += n;
    this.#length -= n;
    while (this.#chunks.length > 0 && this.#head >= this.#chunks[0]!.length) {
      this.#head -= this.#chunks[0]!.length;
      this.#chunks.shift();
    }
  }

  #maybeResume(): void {
    if (this.#paused && this.#length < this.#highWaterBytes / 2) this.#resume();
  }
}
