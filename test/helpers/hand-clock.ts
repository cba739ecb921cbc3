import type { Clock } from '../../common/clock.ts';

/** A Clock the test turns: timers and intervals fire only when `advance` passes their time. */
export interface HandClock extends Clock {
  /** Moves time on by `ms`, firing what falls due in order; then lets the event loop run once. */
  advance(ms: number): Promise<void>;
}

export function handClock(startMs: number): HandClock {
  let now = startMs;
  const timers: Array<{ at: number; fn: () => void; every?: number; cancelled: boolean }> = [];
  const schedule = (ms: number, fn: () => void, every?: number) => {
    const t = { at: now + ms, fn, cancelled: false, ...(every !== undefined ? { every } : {}) };
    timers.push(t);
    return { cancel: () => void (t.cancelled = true) };
  };
  return {
    nowMs: () => now,
    elapsedMs: () => now - startMs,
    after: (ms, fn) => schedule(ms, fn),
    setInterval: (fn, ms) => schedule(ms, fn, ms),
    // Sleeps are pauses in retry loops, not time a test turns: they take real time.
    sleep: (ms) => new Promise((resolve) => setTimeout(resolve, Math.min(ms, 10))),
    async advance(ms) {
      const until = now + ms;
      for (;;) {
        const due = timers
          .filter((t) => !t.cancelled && t.at <= until)
          .sort((a, b) => a.at - b.at)[0];
        if (!due) break;
        now = Math.max(now, due.at);
        if (due.every !== undefined) due.at += due.every;
        else due.cancelled = true;
        due.fn();
        await Promise.resolve();
      }
      now = until;
      await new Promise((resolve) => setImmediate(resolve));
    },
  };
}
