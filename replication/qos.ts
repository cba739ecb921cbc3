import type { Clock } from '../common/clock.ts';

/**
 * Per-volume I/O limits (0 or absent: unlimited). `iops`/`bandwidth` count
 * reads and writes together; the read/write ones apply to that direction on
 * top. Bandwidth is bytes per second of data read or written.
 */
// A type, not an interface: records keep it as a plain map of numbers.
export type QosLimits = {
  iops?: number;
  bandwidth?: number;
  readIops?: number;
  writeIops?: number;
  readBandwidth?: number;
  writeBandwidth?: number;
  /**
   * After an idle spell up to this many seconds' worth of the limit pass at
   * once (Ceph's burst × burst_seconds); absent: a tenth of a second's
   * worth, so that the limit holds within a few per cent over any second.
   */
  burst?: number;
};

export const QOS_FIELDS = [
  'iops',
  'bandwidth',
  'readIops',
  'writeIops',
  'readBandwidth',
  'writeBandwidth',
  'burst',
] as const;

const DEFAULT_BURST_SECONDS = 0.1;

/** A token bucket: `rate` per second, holding at most `capacity`; a request may overdraw it. */
class Bucket {
  readonly #rate: number;
  readonly #capacity: number;
  readonly #perByte: boolean;
  #tokens: number;
  #lastMs: number;

  constructor(rate: number, burstSeconds: number, perByte: boolean, nowMs: number, full: boolean) {
    this.#rate = rate;
    // At least one request's worth, or a 1 IOPS limit could never let one through.
    this.#capacity = Math.max(1, rate * burstSeconds);
    this.#perByte = perByte;
    this.#tokens = full ? this.#capacity : 0;
    this.#lastMs = nowMs;
  }

  #refill(nowMs: number): void {
    this.#tokens = Math.min(
      this.#capacity,
      this.#tokens + ((nowMs - this.#lastMs) * this.#rate) / 1000,
    );
    this.#lastMs = nowMs;
  }

  /** How long until a request may go (0: now). */
  waitMs(nowMs: number): number {
    this.#refill(nowMs);
    return this.#tokens > 0 ? 0 : ((-this.#tokens + 1e-9) * 1000) / this.#rate;
  }

  take(bytes: number): void {
    this.#tokens -= this.#perByte ? bytes : 1;
  }
}

interface Waiting {
  write: boolean;
  bytes: number;
  go: () => void;
}

/**
 * The limits of one volume: requests over them wait, in the order they
 * came, none is refused. With no limit set `admit` costs a property read.
 */
export class Qos {
  readonly #clock: Clock;
  #read: Bucket[] = [];
  #write: Bucket[] = [];
  readonly #queue: Waiting[] = [];
  #timer: { cancel(): void } | undefined;

  constructor(clock: Clock, limits: QosLimits = {}) {
    this.#clock = clock;
    this.#apply(limits, true);
  }

  get limited(): boolean {
    return this.#read.length > 0 || this.#write.length > 0;
  }

  /** New limits, live: what waits is measured against them from now on (no burst at the change). */
  set(limits: QosLimits): void {
    this.#apply(limits, false);
  }

  #apply(limits: QosLimits, full: boolean): void {
    const set: QosLimits = Object.fromEntries(
      Object.entries(limits).filter(([, v]) => typeof v === 'number' && v > 0),
    );
    const now = this.#clock.elapsedMs();
    const burst = set.burst ?? DEFAULT_BURST_SECONDS;
    const bucket = (rate: number | undefined, perByte: boolean) =>
      rate ? [new Bucket(rate, burst, perByte, now, full)] : [];
    const iops = bucket(set.iops, false);
    const bandwidth = bucket(set.bandwidth, true);
    this.#read = [
      ...iops,
      ...bandwidth,
      ...bucket(set.readIops, false),
      ...bucket(set.readBandwidth, true),
    ];
    this.#write = [
      ...iops,
      ...bandwidth,
      ...bucket(set.writeIops, false),
      ...bucket(set.writeBandwidth, true),
    ];
    this.#timer?.cancel();
    this.#timer = undefined;
    this.#drain();
  }

  /** Undefined when the request may go now; else a promise that resolves when it may. */
  admit(write: boolean, bytes: number): Promise<void> | undefined {
    const buckets = write ? this.#write : this.#read;
    if (buckets.length === 0) return undefined;
    if (this.#queue.length === 0) {
      const now = this.#clock.elapsedMs();
      if (buckets.every((b) => b.waitMs(now) === 0)) {
        for (const b of buckets) b.take(bytes);
        return undefined;
      }
    }
    return new Promise<void>((go) => {
      this.#queue.push({ write, bytes, go });
      if (this.#queue.length === 1) this.#drain();
    });
  }

  #drain(): void {
    while (this.#queue.length > 0) {
      const head = this.#queue[0]!;
      const buckets = head.write ? this.#write : this.#read;
      const now = this.#clock.elapsedMs();
      const wait = Math.max(0, ...buckets.map((b) => b.waitMs(now)));
      if (wait > 0) {
        this.#timer ??= this.#clock.after(Math.max(1, Math.ceil(wait)), () => {
          this.#timer = undefined;
          this.#drain();
        });
        return;
      }
      for (const b of buckets) b.take(head.bytes);
      this.#queue.shift();
      head.go();
    }
  }
}
