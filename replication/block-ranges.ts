/**
 * A set of block numbers kept as sorted, disjoint, non-touching runs
 * [start, end): what a trim leaves to punch out of a layer file, coalesced so
 * that one syscall covers each run however many requests made it.
 */
export class BlockRanges {
  /** start, end, start, end, ... */
  #runs: number[] = [];

  get empty(): boolean {
    return this.#runs.length === 0;
  }

  get runCount(): number {
    return this.#runs.length / 2;
  }

  /** Index of the first run whose end is at or after `block`. */
  #firstEndingAtOrAfter(block: number): number {
    let lo = 0;
    let hi = this.#runs.length / 2;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.#runs[2 * mid + 1]! < block) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  add(start: number, end: number): void {
    if (start >= end) return;
    const i = this.#firstEndingAtOrAfter(start);
    let j = i;
    let s = start;
    let e = end;
    // Runs that overlap or touch [start, end) merge into one.
    while (j < this.#runs.length / 2 && this.#runs[2 * j]! <= end) {
      s = Math.min(s, this.#runs[2 * j]!);
      e = Math.max(e, this.#runs[2 * j + 1]!);
      j++;
    }
    this.#runs.splice(2 * i, 2 * (j - i), s, e);
  }

  subtract(start: number, end: number): void {
    if (start >= end || this.#runs.length === 0) return;
    const i = this.#firstEndingAtOrAfter(start + 1);
    const kept: number[] = [];
    let j = i;
    while (j < this.#runs.length / 2 && this.#runs[2 * j]! < end) {
      const s = this.#runs[2 * j]!;
      const e = this.#runs[2 * j + 1]!;
      if (s < start) kept.push(s, start);
      if (e > end) kept.push(end, e);
      j++;
    }
    if (j > i) this.#runs.splice(2 * i, 2 * (j - i), ...kept);
  }

  /** The runs, clipped to [start, end). */
  within(start: number, end: number): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    if (start >= end) return out;
    for (let i = this.#firstEndingAtOrAfter(start + 1); i < this.#runs.length / 2; i++) {
      const s = this.#runs[2 * i]!;
      if (s >= end) break;
      out.push([Math.max(s, start), Math.min(this.#runs[2 * i + 1]!, end)]);
    }
    return out;
  }

  /** Consecutive windows of at most `blocks` blocks that together cover every run. */
  windows(blocks: number): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    for (let i = 0; i < this.#runs.length; i += 2) {
      for (let s = this.#runs[i]!; s < this.#runs[i + 1]!; s += blocks)
        out.push([s, Math.min(s + blocks, this.#runs[i + 1]!)]);
    }
    return out;
  }

  addAll(other: BlockRanges): void {
    for (let i = 0; i < other.#runs.length; i += 2) this.add(other.#runs[i]!, other.#runs[i + 1]!);
  }
}
