/**
 * Runs `fn(i, worker)` for i in 0..count-1, at most `concurrency` at a time;
 * `worker` (0..concurrency-1) lets a caller keep per-worker state such as a
 * reused buffer. The first failure stops the others from taking new items.
 */
export async function concurrently(
  count: number,
  concurrency: number,
  fn: (i: number, worker: number) => Promise<void>,
  /**
   * Asked before a worker takes an item: a promise holds it back until it
   * settles (then it asks again), undefined lets it go on. Lets a job run
   * fewer at a time for a while (a rebuild yielding to clients).
   */
  hold?: (worker: number) => Promise<void> | undefined,
): Promise<void> {
  let next = 0;
  let failed = false;
  const run = async (worker: number): Promise<void> => {
    while (!failed && next < count) {
      const held = hold?.(worker);
      if (held) {
        await held;
        continue;
      }
      const i = next++;
      try {
        await fn(i, worker);
      } catch (err) {
        failed = true;
        throw err;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, (_, w) => run(w)));
}
