import type { Clock } from './clock.ts';
import { CorralError } from './errors.ts';

interface Waiter {
  what: string;
  start: () => void;
}

interface Lane {
  /** What holds the lane now, and since when. */
  what: string;
  sinceMs: number;
  queue: Waiter[];
}

/**
 * One operation at a time per key (a volume's name), in arrival order. A
 * caller waits its turn for at most `waitMs` and then gets BUSY naming what
 * holds the lane: control operations on one volume (snapshot, delete,
 * revert, clone, attach, detach, rm, rebuild, verify) never interleave, and
 * a slow one (merging a large snapshot) makes the others fail clearly
 * instead of hanging.
 */
export class Lanes {
  readonly #clock: Clock;
  readonly #waitMs: number;
  readonly #lanes = new Map<string, Lane>();

  constructor(options: { clock: Clock; waitMs: number }) {
    this.#clock = options.clock;
    this.#waitMs = options.waitMs;
  }

  /** What holds `key`'s lane, if anything. */
  holder(key: string): string | undefined {
    return this.#lanes.get(key)?.what;
  }

  /**
   * Runs `fn` alone in `key`'s lane. `waitMs: 0` gives up at once if the
   * lane is taken (for background work that will try again).
   */
  async run<T>(
    key: string,
    what: string,
    fn: () => Promise<T>,
    options: { waitMs?: number } = {},
  ): Promise<T> {
    await this.#acquire(key, what, options.waitMs ?? this.#waitMs);
    try {
      return await fn();
    } finally {
      this.#release(key);
    }
  }

  #acquire(key: string, what: string, waitMs: number): Promise<void> {
    const lane = this.#lanes.get(key);
    if (!lane) {
      this.#lanes.set(key, { what, sinceMs: this.#clock.nowMs(), queue: [] });
      return Promise.resolve();
    }
    const busy = () =>
      new CorralError(
        'BUSY',
        `Cannot ${what}: volume ${key} is busy (${lane.what}, for ${Math.round((this.#clock.nowMs() - lane.sinceMs) / 1000)} s); try again later`,
      );
    if (waitMs <= 0) return Promise.reject(busy());
    return new Promise<void>((resolve, reject) => {
      const waiter: Waiter = {
        what,
        start: () => {
          timer.cancel();
          resolve();
        },
      };
      // The clock has no one-shot timer: an interval cancelled at its first tick.
      const timer = this.#clock.setInterval(() => {
        timer.cancel();
        const i = lane.queue.indexOf(waiter);
        if (i < 0) return; // started meanwhile
        lane.queue.splice(i, 1);
        reject(busy());
      }, waitMs);
      lane.queue.push(waiter);
    });
  }

  #release(key: string): void {
    const lane = this.#lanes.get(key);
    if (!lane) return;
    const next = lane.queue.shift();
    if (!next) {
      this.#lanes.delete(key);
      return;
    }
    lane.what = next.what;
    lane.sinceMs = this.#clock.nowMs();
    next.start();
  }
}
