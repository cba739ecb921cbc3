import * as net from 'node:net';

/**
 * A small NBD client for the tests that real clients cannot express: bad
 * handshakes, unknown commands, oversized requests, a disconnect mid-write,
 * and a SIGKILL while a connection is still open after FLUSH.
 */
export class RawNbd {
  readonly socket: net.Socket;
  #buffer = Buffer.alloc(0);
  #waiters: Array<() => void> = [];
  closed = false;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (d: Buffer) => {
      this.#buffer = Buffer.concat([this.#buffer, d]);
      this.#wake();
    });
    const end = (): void => {
      this.closed = true;
      this.#wake();
    };
    socket.on('close', end);
    socket.on('error', end);
  }

  #wake(): void {
    for (const w of this.#waiters.splice(0)) w();
  }

  static connect(target: { port: number; host?: string } | { path: string }): Promise<RawNbd> {
    return new Promise((resolve, reject) => {
      const socket =
        'path' in target
          ? net.connect(target.path)
          : net.connect(target.port, target.host ?? '127.0.0.1');
      socket.once('connect', () => resolve(new RawNbd(socket)));
      socket.once('error', reject);
    });
  }

  /** Reads exactly n bytes; rejects if the server closes first or after timeoutMs. */
  async read(n: number, timeoutMs = 10_000): Promise<Buffer> {
    const until = Date.now() + timeoutMs;
    while (this.#buffer.length < n) {
      if (this.closed) throw new Error(`connection closed with ${this.#buffer.length}/${n} bytes`);
      const left = until - Date.now();
      if (left <= 0) throw new Error(`timed out reading ${n} bytes`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.#waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    const out = this.#buffer.subarray(0, n);
    this.#buffer = this.#buffer.subarray(n);
    return Buffer.from(out);
  }

  /** Resolves when the server has closed the connection. */
  async waitClosed(timeoutMs = 10_000): Promise<void> {
    const until = Date.now() + timeoutMs;
    while (!this.closed) {
      if (Date.now() > until) throw new Error('server did not close the connection');
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 100);
        this.#waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  write(data: Buffer): void {
    this.socket.write(data);
  }

  /** Reads the server greeting and sends client flags (fixed newstyle, no zeroes). */
  async greet(clientFlags = 3): Promise<void> {
    const greeting = await this.read(18);
    if (greeting.readBigUInt64BE(0) !== 0x4e42444d41474943n) throw new Error('bad NBDMAGIC');
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(clientFlags);
    this.write(flags);
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0), magic = 0x49484156454f5054n): void {
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(magic, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(data.length, 12);
    this.write(Buffer.concat([header, data]));
  }

  async readOptionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const header = await this.read(20);
    const length = header.readUInt32BE(16);
    return {
      option: header.readUInt32BE(8),
      type: header.readUInt32BE(12),
      data: await this.read(length),
    };
  }

  /** Negotiates structured replies, base:allocation and GO; returns the export size. */
  async go(name: string, options: { structured?: boolean } = {}): Promise<bigint> {
    const nameBytes = Buffer.from(name);
    if (options.structured ?? true) {
      this.sendOption(8);
      const r = await this.readOptionReply();
      if (r.type !== 1) throw new Error(`structured reply refused: ${r.type}`);
      const query = Buffer.from('base:allocation');
      const meta = Buffer.alloc(4 + nameBytes.length + 4 + 4 + query.length);
      meta.writeUInt32BE(nameBytes.length, 0);
      nameBytes.copy(meta, 4);
      meta.writeUInt32BE(1, 4 + nameBytes.length);
      meta.writeUInt32BE(query.length, 8 + nameBytes.length);
      query.copy(meta, 12 + nameBytes.length);
      this.sendOption(10, meta);
      for (;;) {
        const m = await this.readOptionReply();
        if (m.type === 1) break;
        if (m.type !== 4) throw new Error(`meta context failed: ${m.type}`);
      }
    }
    const data = Buffer.alloc(4 + nameBytes.length + 2);
    data.writeUInt32BE(nameBytes.length, 0);
    nameBytes.copy(data, 4);
    this.sendOption(7, data);
    let size = -1n;
    for (;;) {
      const r = await this.readOptionReply();
      if (r.type === 1) break;
      if (r.type & 0x80000000)
        throw new Error(`GO refused: 0x${r.type.toString(16)} ${r.data.toString()}`);
      if (r.type === 3 && r.data.readUInt16BE(0) === 0) size = r.data.readBigUInt64BE(2);
    }
    return size;
  }

  #cookie = 1n;

  /** Sends one request; returns its cookie. */
  request(
    command: number,
    offset: bigint | number,
    length: number,
    options: { flags?: number; payload?: Buffer; magic?: number } = {},
  ): bigint {
    const header = Buffer.alloc(28);
    header.writeUInt32BE(options.magic ?? 0x25609513, 0);
    header.writeUInt16BE(options.flags ?? 0, 4);
    header.writeUInt16BE(command, 6);
    const cookie = this.#cookie++;
    header.writeBigUInt64BE(cookie, 8);
    header.writeBigUInt64BE(BigInt(offset), 16);
    header.writeUInt32BE(length, 24);
    this.write(options.payload ? Buffer.concat([header, options.payload]) : header);
    return cookie;
  }

  /** Reads one reply (simple or one structured chunk); structured replies here are always single-chunk. */
  async reply(
    readLength = 0,
    timeoutMs = 10_000,
  ): Promise<{ cookie: bigint; error: number; data: Buffer; type?: number }> {
    const magic = (await this.read(4, timeoutMs)).readUInt32BE(0);
    if (magic === 0x67446698) {
      const rest = await this.read(12);
      const error = rest.readUInt32BE(0);
      return {
        cookie: rest.readBigUInt64BE(4),
        error,
        data: error === 0 && readLength > 0 ? await this.read(readLength) : Buffer.alloc(0),
      };
    }
    if (magic !== 0x668e33ef) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
    const rest = await this.read(16);
    const type = rest.readUInt16BE(2);
    const cookie = rest.readBigUInt64BE(4);
    const payload = await this.read(rest.readUInt32BE(12));
    if (type & 0x8000)
      return { cookie, error: payload.readUInt32BE(0), data: payload.subarray(6), type };
    if (type === 1) return { cookie, error: 0, data: payload.subarray(8), type };
    return { cookie, error: 0, data: payload, type };
  }

  close(): void {
    this.socket.destroy();
  }
}

export const CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
