import { assert } from '../common/assert.ts';

/** Buffers below this are cheap to allocate (Node's slab); above it we reuse. */
const MIN_POOLED_BYTES = 128 * 1024;

/**
 * Reuses large request buffers: a fresh 1 MiB buffer per request costs an
 * mmap, page faults, an munmap and GC pressure, measurably more than the
 * copy into it. A buffer goes back only after the operation that used it
 * succeeded (a failed or abandoned engine might still touch it).
 */
export class BufferPool {
  readonly #free = new Map<number, Buffer[]>();
  /** Memory this pool allocated: nothing else may go back (a view into a socket's slab must not). */
  readonly #owned = new WeakSet<object>();
  readonly #maxBytes: number;
  #pooledBytes = 0;

  constructor(maxBytes: number) {
    this.#maxBytes = maxBytes;
  }

  static #sizeClass(n: number): number {
    return 2 ** Math.ceil(Math.log2(n));
  }

  /** A buffer of exactly n bytes (contents undefined). */
  acquire(n: number): Buffer {
    if (n < MIN_POOLED_BYTES) return Buffer.allocUnsafe(n);
    const size = BufferPool.#sizeClass(n);
    const reused = this.#free.get(size)?.pop();
    if (reused) {
      this.#pooledBytes -= size;
      return reused.subarray(0, n);
    }
    const fresh = Buffer.allocUnsafeSlow(size);
    this.#owned.add(fresh.buffer);
    return fresh.subarray(0, n);
  }

  release(buf: Buffer): void {
    const size = buf.buffer.byteLength;
    if (!this.#owned.has(buf.buffer)) return;
    if (this.#pooledBytes + size > this.#maxBytes) return;
    assert(buf.byteOffset === 0, 'only whole pooled buffers go back');
    let list = this.#free.get(size);
    if (!list) {
      list = [];
      this.#free.set(size, list);
    }
    list.push(Buffer.from(buf.buffer, 0, size));
    this.#pooledBytes += size;
  }
}
