import * as fs from 'node:fs';

/*
 * Callback fs wrapped by hand: the FileHandle promise API costs noticeably
 * more per call, and the block path makes tens of thousands of calls a second.
 */

/**
 * Reads up to this size are done synchronously on the event loop. A small
 * pread that hits the page cache takes a few microseconds; sending it to
 * libuv's thread pool costs a queue, a thread wake-up and a completion
 * wake-up, which on two cores cut 4 KiB random I/O by more than half
 * (docs/PERFORMANCE.md). The price: a read that misses the page cache stalls
 * the loop for one disk access. 0 turns it off. 128 KiB was chosen when
 * FUSE requests stopped at 128 KiB (libfuse2): going synchronous there took
 * a loop device's 1M reads from ~820 to ~1100 MiB/s.
 */
export const SYNC_IO_MAX_BYTES = Number(process.env.CORRAL_SYNC_IO_MAX_BYTES ?? 128 * 1024);

/**
 * Writes up to this size are done synchronously on the event loop. A write
 * only copies into the page cache, so unlike a read it does not wait on the
 * disk; up to 1 MiB (~0.25 ms of copy) it costs less on the loop than the
 * pool's two wake-ups, and the bytes are copied while the core that just
 * received them still has them in its cache: one daemon, 1M writes QD8,
 * 0.44 → 0.31–0.36 CPU-s per GB and faster. 0 turns it off.
 */
export const SYNC_WRITE_MAX_BYTES = Number(process.env.CORRAL_SYNC_WRITE_MAX_BYTES ?? 1024 * 1024);

/**
 * What a write can still wait on is the kernel's dirty-page throttling (up to
 * 200 ms a call when the disk falls behind), a frozen filesystem, a lock. Two
 * synchronous writes that each took longer than `slowMs`, less than
 * `windowMs` apart, send the writes of the next back-off to the thread pool.
 * A back-off that trips again before the disk has been calm for as long as
 * it lasted doubles (up to `maxBackoffMs`); after such a calm it starts
 * over. So a disk that stays slow stalls the event loop (every volume, the
 * API, the replica streams) for two writes, then ever more rarely, not for
 * every write.
 *
 * Two slow writes over 20 ms, not one over 5: a slow write is most often
 * this thread preempted on a busy machine (three daemons and fio on two
 * cores: one 1 MiB write in ~60 took over 5 ms, nearly all under 15), and a
 * second of pool writes for each gave away what writing on the loop is
 * for. Within a window, not in a row: the kernel throttles a writer every
 * so many dirtied pages, not necessarily on every write, and writes to
 * other disks come in between.
 */
export class SyncWriteGate {
  #asyncUntil = -Infinity;
  #lastSlowAt = -Infinity;
  /** How long the last back-off lasted: the next one doubles it unless the disk was calm as long. */
  #lastBackoffMs = 0;
  /** Back-offs so far. */
  backoffs = 0;
  /** Told of each back-off: how long the write that tripped it took, and how long it lasts. */
  onBackoff: ((tookMs: number, backoffMs: number) => void) | undefined;

  constructor(
    readonly maxBytes: number,
    readonly slowMs = 20,
    readonly windowMs = 1000,
    readonly backoffMs = 1000,
    readonly maxBackoffMs = 60_000,
    readonly now: () => number = () => performance.now(),
  ) {}

  /** Whether a write of `bytes` goes on the loop now. */
  allows(bytes: number): boolean {
    return bytes <= this.maxBytes && this.now() >= this.#asyncUntil;
  }

  /** Runs a synchronous write, timing it. */
  run<T>(write: () => T): T {
    const start = this.now();
    try {
      return write();
    } finally {
      const end = this.now();
      if (end - start > this.slowMs) this.#slow(end, end - start);
    }
  }

  #slow(at: number, tookMs: number): void {
    if (at - this.#lastSlowAt > this.windowMs) {
      this.#lastSlowAt = at;
      return;
    }
    this.#lastSlowAt = -Infinity;
    // Calm since the last back-off for at least as long as it lasted: start over.
    this.#lastBackoffMs =
      at - this.#asyncUntil >= this.#lastBackoffMs
        ? this.backoffMs
        : Math.min(2 * this.#lastBackoffMs, this.maxBackoffMs);
    this.#asyncUntil = at + this.#lastBackoffMs;
    this.backoffs++;
    try {
      this.onBackoff?.(tookMs, this.#lastBackoffMs);
    } catch {
      // A failing listener must not change the write's outcome.
    }
  }
}

/**
 * A gate per disk (a replica root): a disk that falls behind sends its own
 * writes to the thread pool, while writes to the daemon's other disks stay
 * on the loop. The daemon logs and counts every disk's back-offs.
 */
export class SyncWriteGates {
  readonly #gates = new Map<string, SyncWriteGate>();
  /** Told of each back-off of any disk's gate. */
  onBackoff: ((root: string, tookMs: number, backoffMs: number) => void) | undefined;

  /** `make` builds each disk's gate: all alike, with the rule's settings of `SyncWriteGate`. */
  constructor(readonly make: () => SyncWriteGate) {}

  /** The gate of the disk whose replicas live under `root`. */
  for(root: string): SyncWriteGate {
    let gate = this.#gates.get(root);
    if (!gate) {
      gate = this.make();
      gate.onBackoff = (tookMs, backoffMs) => this.onBackoff?.(root, tookMs, backoffMs);
      this.#gates.set(root, gate);
    }
    return gate;
  }

  /** Back-offs so far, by replica root. */
  backoffs(): Array<[root: string, backoffs: number]> {
    return [...this.#gates].map(([root, gate]) => [root, gate.backoffs]);
  }
}

/** The process's gates: every replica's writes pass its disk's. */
export const syncWrites = new SyncWriteGates(() => new SyncWriteGate(SYNC_WRITE_MAX_BYTES));

export function pread(
  fd: number,
  buf: Uint8Array,
  bufOffset: number,
  length: number,
  position: number,
): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, bufOffset, length, position, (err, bytesRead) =>
      err ? reject(err) : resolve(bytesRead),
    );
  });
}

/** Reads exactly `length` bytes; a file shorter than that reads as zeros past its end. */
export async function preadFull(
  fd: number,
  buf: Uint8Array,
  bufOffset: number,
  length: number,
  position: number,
): Promise<void> {
  let done = 0;
  if (length <= SYNC_IO_MAX_BYTES) {
    while (done < length) {
      const n = fs.readSync(fd, buf, bufOffset + done, length - done, position + done);
      if (n === 0) {
        buf.fill(0, bufOffset + done, bufOffset + length);
        return;
      }
      done += n;
    }
    return;
  }
  while (done < length) {
    const n = await pread(fd, buf, bufOffset + done, length - done, position + done);
    if (n === 0) {
      buf.fill(0, bufOffset + done, bufOffset + length);
      return;
    }
    done += n;
  }
}

export async function pwriteFull(
  fd: number,
  buf: Uint8Array,
  position: number,
  gate: SyncWriteGate,
): Promise<void> {
  let done = 0;
  if (gate.allows(buf.length)) {
    gate.run(() => {
      while (done < buf.length)
        done += fs.writeSync(fd, buf, done, buf.length - done, position + done);
    });
    return;
  }
  while (done < buf.length) {
    done += await new Promise<number>((resolve, reject) => {
      fs.write(fd, buf, done, buf.length - done, position + done, (err, written) =>
        err ? reject(err) : resolve(written),
      );
    });
  }
}

export function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) =>
    fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())),
  );
}

export function closeFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.close(fd, (err) => (err ? reject(err) : resolve())));
}

/** Makes a directory entry (a new or removed file) durable. */
export async function fsyncDir(dir: string): Promise<void> {
  const handle = await fs.promises.open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
