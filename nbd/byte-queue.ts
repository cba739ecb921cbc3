import type { Socket } from 'node:net';

/**
 * Incoming bytes of one connection, read by exact lengths. It pauses the
 * socket while more than `highWaterBytes` wait unread, so a client that sends
 * faster than we serve cannot make us buffer without bound.
 */
export class ByteQueue {
  readonly #socket: Socket;
  readonly #highWaterBytes: number;
  #chunks: Buffer[] = [];
  #head = 0; // read offset into #chunks[0]
  #length = 0;
  #waiter: { need: number; resolve: () => void; reject: (err: Error) => void } | undefined;
  #ended: Error | undefined;
  #paused = false;

  constructor(socket: Socket, highWaterBytes: number) {
    this.#socket = socket;
    this.#highWaterBytes = highWaterBytes;
    socket.on('data', (chunk: Buffer) => {
      this.#chunks.push(chunk);
      this.#length += chunk.length;
      if (this.#length > this.#highWaterBytes && !this.#paused) {
        this.#paused = true;
        socket.pause();
      }
      this.#wake();
    });
    const end = (): void => {
      this.#ended ??= new Error('connection closed');
      this.#wake();
    };
    socket.on('end', end);
    socket.on('close', end);
    socket.on('error', end);
  }

  get buffered(): number {
    return this.#length;
  }

  #wake(): void {
    const w = this.#waiter;
    if (!w) return;
    if (this.#length >= w.need) {
      this.#waiter = undefined;
      w.resolve();
    } else if (this.#ended) {
      this.#waiter = undefined;
      w.reject(this.#ended);
    }
  }

  async #wait(need: number): Promise<void> {
    if (this.#length >= need) return;
    if (this.#ended) throw this.#ended;
    if (this.#paused && need > this.#length) {
      this.#paused = false;
      this.#socket.resume();
    }
    await new Promise<void>((resolve, reject) => (this.#waiter = { need, resolve, reject }));
  }

  /**
   * Exactly `n` bytes; a view into the socket's chunk where possible (chunks
   * are never reused), else a buffer from `allocate`.
   */
  async read(
    n: number,
    allocate: (n: number) => Buffer = (size) => Buffer.allocUnsafe(size),
  ): Promise<Buffer> {
    await this.#wait(n);
    const first = this.#chunks[0]!;
    let out: Buffer;
    if (first.length - this.#head >= n) {
      out = first.subarray(this.#head, this.#head + n);
      this.#consume(n);
    } else {
      out = allocate(n);
      let filled = 0;
      while (filled < n) {
        const chunk = this.#chunks[0]!;
        const take = Math.min(chunk.length - this.#head, n - filled);
        chunk.copy(out, filled, this.#head, this.#head + take);
        filled += take;
        this.#consume(take);
      }
    }
    this.#maybeResume();
    return out;
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
    if (this.#paused && this.#length < this.#highWaterBytes / 2) {
      this.#paused = false;
      this.#socket.resume();
    }
  }
}
