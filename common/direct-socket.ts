import * as net from 'node:net';

/**
 * Receives a socket's bytes in buffers it chooses: `nextBuffer` says where
 * the next read lands (the rest of a request's payload, or free space for
 * headers), `onRead` is told how many bytes landed in the last one.
 */
export interface DirectReader {
  nextBuffer(): Uint8Array;
  onRead(bytes: number): void;
}

interface StreamHandle {
  useUserBuffer?: unknown;
}

/** Whether sockets can read into buffers of our choosing (`onread`): Deno's node:net cannot. */
export const DIRECT_READS = !('deno' in process.versions);

/**
 * Re-homes an accepted socket (from a server made with `pauseOnConnect`) so
 * that the kernel copies received bytes straight into the reader's buffers,
 * as nbdkit's `recv` into a request buffer does. Node reads a server socket
 * 64 KiB at a time into fresh buffers that we then copy into a request's
 * buffer; measured here, reading in place costs ~40 % less CPU per byte
 * received and allocates nothing (docs/PERFORMANCE.md).
 *
 * Node only offers this (`onread`) to sockets it constructs, so the accepted
 * socket's handle moves into a new `net.Socket`; the old one is destroyed
 * without closing the handle. `_handle` is not a public API: where it is
 * missing (Deno's node:net) this returns undefined and the caller reads
 * 'data' events as before.
 */
export function adoptDirect(raw: net.Socket, reader: DirectReader): net.Socket | undefined {
  if (!DIRECT_READS) return undefined;
  const holder = raw as unknown as { _handle: StreamHandle | null };
  const handle = holder._handle;
  if (!handle || typeof handle.useUserBuffer !== 'function') return undefined;
  holder._handle = null;
  raw.destroy(); // with no handle: only bookkeeping (the server's connection count), no close
  const socket = new net.Socket({
    handle,
    readable: true,
    writable: true,
    onread: {
      buffer: () => reader.nextBuffer(),
      callback: (bytes: number) => {
        reader.onRead(bytes);
        return true; // backpressure goes through socket.pause(), which stops the handle
      },
    },
  } as unknown as net.SocketConstructorOpts);
  // Flowing, so that 'end' is emitted (no 'data' events come in this mode).
  socket.resume();
  return socket;
}

/** Node's own read size, and what a slab read takes unless it follows a read in place. */
const SLAB_READ_BYTES = 64 * 1024;
/**
 * What the read just after a read in place takes: the next request's header
 * and the start of its payload, which, when that payload is read in place
 * too, is copied over. At the full 64 KiB, 1 MiB writes had 6 % of their
 * bytes copied twice and a 1 MiB slab taken every ~8 requests, whose
 * external memory kept V8's major collector busy (docs/PERFORMANCE.md).
 */
const AFTER_IN_PLACE_READ_BYTES = 4096;

/**
 * Free space for a connection's small reads. A slab is never written twice:
 * when it is full a new one is taken and the old one lives on as long as
 * views into it do, so everything handed out stays valid without copies.
 */
export class Slab {
  #buf = Buffer.allocUnsafeSlow(0);
  #used = 0;
  /** Reads still to keep small (AFTER_IN_PLACE_READ_BYTES). */
  #smallReads = 0;

  /**
   * A read in place just completed: the next `reads` reads here stay small.
   * A reader whose consumer parses only after the next read is already
   * placed (the NBD queue) needs two; one that parses as it reads, one.
   */
  afterInPlace(reads: number): void {
    this.#smallReads = reads;
  }

  /** Where the next read may land. */
  space(): Buffer {
    if (this.#buf.length - this.#used < 4096) {
      this.#buf = Buffer.allocUnsafeSlow(1024 * 1024);
      this.#used = 0;
    }
    const small = this.#smallReads > 0;
    if (small) this.#smallReads--;
    const max = small ? AFTER_IN_PLACE_READ_BYTES : SLAB_READ_BYTES;
    return this.#buf.subarray(this.#used, this.#used + max);
  }

  /** The `n` bytes that just landed in space(). */
  take(n: number): Buffer {
    const view = this.#buf.subarray(this.#used, this.#used + n);
    this.#used += n;
    return view;
  }
}

/** `a` and `b` as one view when `b` continues `a` in the same memory (consecutive reads into a slab). */
export function joined(a: Buffer, b: Buffer): Buffer | undefined {
  if (a.buffer !== b.buffer || a.byteOffset + a.length !== b.byteOffset) return undefined;
  return Buffer.from(a.buffer, a.byteOffset, a.length + b.length);
}
