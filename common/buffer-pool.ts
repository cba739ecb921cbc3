import { assert } from './assert.ts';
import { collectGarbage } from './gc.ts';

/** Buffers below this are cheap to allocate (Node's slab); above it we reuse. */
const MIN_POOLED_BYTES = 128 * 1024;

/** Free buffers not asked for in this long go back to the system. */
const IDLE_TRIM_MS = 10_000;

/** A trim that frees at least this much also runs the garbage collector (common/gc.ts). */
const COLLECT_MIN_BYTES = 16 * 1024 * 1024;

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
  #usedSinceTrim = false;
  #trimTimer: ReturnType<typeof setInterval> | undefined;

  constructor(maxBytes: number) {
    this.#maxBytes = maxBytes;
  }

  /**
   * Drops the free buffers if none was asked for since the last call: a
   * burst of large requests must not keep its buffers for ever (an NBD fuzz
   * once left the daemon 265 MB above its baseline). Runs every
   * IDLE_TRIM_MS while the pool holds anything.
   */
  trim(): void {
    if (this.#usedSinceTrim) {
      this.#usedSinceTrim = false;
      return;
    }
    const freed = this.#pooledBytes;
    this.#free.clear();
    this.#pooledBytes = 0;
    if (this.#trimTimer) clearInterval(this.#trimTimer);
    this.#trimTimer = undefined;
    if (freed >= COLLECT_MIN_BYTES) collectGarbage();
  }

  static #sizeClass(n: number): number {
    return 2 ** Math.ceil(Math.log2(n));
  }

  /** A buffer of exactly n bytes (contents undefined). */
  acquire(n: number): Buffer {
    if (n < MIN_POOLED_BYTES) return Buffer.allocUnsafe(n);
    this.#usedSinceTrim = true;
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
    if (!this.#trimTimer) {
      this.#trimTimer = setInterval(() => this.trim(), IDLE_TRIM_MS);
      this.#trimTimer.unref();
    }
  }
}
