/** A stream that can hold writes back (`net.Socket`, or the replica server's output). */
export interface Corkable {
  cork(): void;
  uncork(): void;
}

/**
 * Writes made in one turn of the event loop leave together, in one writev:
 * the stream is corked at the first and uncorked once the turn is over.
 * (NBD replies, replica requests and replica replies all batch this way.)
 */
export class TurnBatch {
  #corked = false;
  readonly #out: Corkable;

  constructor(out: Corkable) {
    this.#out = out;
  }

  /** Call before each write of the turn. */
  hold(): void {
    if (this.#corked) return;
    this.#corked = true;
    this.#out.cork();
    setImmediate(() => {
      this.#corked = false;
      this.#out.uncork();
    });
  }
}
