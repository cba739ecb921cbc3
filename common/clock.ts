/**
 * Time is passed in, never read directly by the engine or replicas, so that
 * a simulation can drive it (docs/CONTRIBUTING.md, after TigerBeetle).
 */
export interface Clock {
  nowMs(): number;
  setInterval(fn: () => void, intervalMs: number): { cancel(): void };
  sleep(ms: number): Promise<void>;
}

export const systemClock: Clock = {
  nowMs: () => Date.now(),
  setInterval(fn, intervalMs) {
    const handle = setInterval(fn, intervalMs);
    handle.unref();
    return { cancel: () => clearInterval(handle) };
  },
  sleep: (ms) => new Promise((resolve) => setTimeout(resolve, ms)),
};
