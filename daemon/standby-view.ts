import { CorralError } from '../common/errors.ts';
import { readOnlyDevice, type BlockDevice } from '../replication/block-device.ts';

/**
 * What a standby volume's readers pass: while a backup is applied they wait
 * (a standby shows one backup whole, never a mix of two), and once an apply
 * was cut off they are refused until a later one completes.
 */
export class StandbyGate {
  readonly #volume: string;
  #applying: { done: Promise<void>; release: () => void } | undefined;
  #mixed: boolean;

  constructor(volume: string, mixed: boolean) {
    this.#volume = volume;
    this.#mixed = mixed;
  }

  /** An apply starts: readers wait from now on. */
  close(): void {
    let release = (): void => undefined;
    const done = new Promise<void>((resolve) => (release = resolve));
    this.#applying = { done, release };
  }

  /** The apply ended: whole (`mixed` false) or cut off. */
  open(mixed: boolean): void {
    this.#mixed = mixed;
    const applying = this.#applying;
    this.#applying = undefined;
    applying?.release();
  }

  async pass(): Promise<void> {
    while (this.#applying) await this.#applying.done;
    if (this.#mixed)
      throw new CorralError(
        'UNAVAILABLE',
        `Standby volume ${this.#volume} holds part of a backup (its apply was cut off): it is served again once a poll applies a backup whole`,
      );
  }
}

/** A standby volume as its frontends see it: read-only, behind its gate. */
export function standbyView(volume: string, device: BlockDevice, gate: StandbyGate): BlockDevice {
  return readOnlyDevice(`standby volume ${volume} (activate it to write)`, {
    get sizeBytes() {
      return device.sizeBytes;
    },
    capabilities: () => device.capabilities(),
    read: async (offset, length, into) => {
      await gate.pass();
      return device.read(offset, length, into);
    },
    extents: async (offset, length) => {
      await gate.pass();
      return device.extents(offset, length);
    },
  });
}
