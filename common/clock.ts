/**
 * Time is passed in, never read directly by the engine or replicas, so that
 * a simulation can drive it (docs/CONTRIBUTING.md, after TigerBeetle).
 */
export interface Clock {
  /** Wall-clock time: for what is recorded (dates, ages across restarts). */
  nowMs(): number;
  /** Monotonic milliseconds from an arbitrary start: for timeouts, which a clock step must not fire. */
  elapsedMs(): number;
  setInterval(fn: () => void, intervalMs: number): { cancel(): void };
  /** Calls `fn` once after `ms`, unless cancelled first. */
  after(ms: number, fn: () => void): { cancel(): void };
  sleep(ms: number): Promise<void>;
}

export const systemClock: Clock = {
  nowMs: () => Date.now(),
  elapsedMs: () => performance.now(),
  setInterval(fn, intervalMs) {
    const handle = setInterval(fn, intervalMs);
    handle.unref();
    return { cancel: () => clearInterval(handle) };
  },
  after(ms, fn) {
    const handle = setTimeout(fn, ms);
    handle.unref();
    return { cancel: () => clearTimeout(handle) };
  },
  sleep: (ms) => new Promise((resolve) => setTimeout(resolve, ms)),
};
