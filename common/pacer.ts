import type { Clock } from './clock.ts';

/**
 * Keeps a long job (rebuild, snapshot merge, backup, restore) at or under a
 * rate: after each piece, `paced(bytes)` sleeps until the schedule
 * (bytes so far / rate since the start) has caught up. No rate: no wait.
 * One mechanism for the daemon's `--rebuild-rate`, `--merge-rate` and
 * `--backup-rate`, so that they mean the same thing.
 */
export class Pacer {
  readonly #clock: Clock;
  readonly #bytesPerSecond: number | undefined;
  readonly #startedMs: number;
  #bytes = 0;

  constructor(clock: Clock, bytesPerSecond: number | undefined) {
    this.#clock = clock;
    this.#bytesPerSecond = bytesPerSecond && bytesPerSecond > 0 ? bytesPerSecond : undefined;
    this.#startedMs = clock.nowMs();
  }

  async paced(bytes: number): Promise<void> {
    this.#bytes += bytes;
    if (!this.#bytesPerSecond) return;
    const due = this.#startedMs + (this.#bytes / this.#bytesPerSecond) * 1000;
    const wait = due - this.#clock.nowMs();
    if (wait > 1) await this.#clock.sleep(wait);
  }
}
