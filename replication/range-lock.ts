/**
 * Serialises operations over overlapping block ranges. Used only by
 * read-modify-write: two sub-block writes into one 4 KiB block must not both
 * read the old block and lose one another's bytes.
 */
export class RangeLock {
  readonly #held = new Set<{ start: number; end: number; done: Promise<void> }>();

  async acquire(start: number, end: number): Promise<() => void> {
    for (;;) {
      let conflict: Promise<void> | undefined;
      for (const h of this.#held) {
        if (h.start < end && start < h.end) {
          conflict = h.done;
          break;
        }
      }
      if (!conflict) break;
      await conflict;
    }
    let release!: () => void;
    const done = new Promise<void>((resolve) => (release = resolve));
    const entry = { start, end, done };
    this.#held.add(entry);
    return () => {
      this.#held.delete(entry);
      release();
    };
  }
}
