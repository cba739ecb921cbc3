import { assert, fail } from '../common/assert.ts';

/** What one layer says about one block. */
export const ABSENT = 0; // look in the layer below
export const DATA = 1; // the layer file holds the block
export const ZERO = 2; // the block reads as zeros (trim, write-zeroes), hiding layers below
export type BlockState = typeof ABSENT | typeof DATA | typeof ZERO;

/** Blocks per bitmap chunk: the unit stored in LevelDB (2 × 4 KiB of bits = 128 MiB of volume). */
export const BLOCKS_PER_CHUNK = 32768;
const BITMAP_BYTES = BLOCKS_PER_CHUNK / 8;

/**
 * The allocation state of one layer: two bitmaps (data, zero) per chunk,
 * allocated only where the layer has been touched. Chunks changed since the
 * last flush are remembered so that a flush persists only those.
 */
export class LayerMap {
  readonly #chunks: Array<Uint8Array | undefined>;
  readonly #dirty = new Set<number>();
  blockCount: number;

  constructor(blockCount: number) {
    this.blockCount = blockCount;
    this.#chunks = new Array<Uint8Array | undefined>(Math.ceil(blockCount / BLOCKS_PER_CHUNK));
  }

  /** An expanded volume: the blocks added are absent. */
  grow(blockCount: number): void {
    assert(blockCount >= this.blockCount, 'a layer map never shrinks');
    this.blockCount = blockCount;
    this.#chunks.length = Math.ceil(blockCount / BLOCKS_PER_CHUNK);
  }

  state(block: number): BlockState {
    const chunk = this.#chunks[Math.floor(block / BLOCKS_PER_CHUNK)];
    if (!chunk) return ABSENT;
    const bit = block % BLOCKS_PER_CHUNK;
    const byte = bit >> 3;
    const mask = 1 << (bit & 7);
    if ((chunk[byte]! & mask) !== 0) return DATA;
    if ((chunk[BITMAP_BYTES + byte]! & mask) !== 0) return ZERO;
    return ABSENT;
  }

  set(block: number, state: BlockState): void {
    if (!(block >= 0 && block < this.blockCount))
      fail(`block ${block} outside layer of ${this.blockCount}`);
    const index = Math.floor(block / BLOCKS_PER_CHUNK);
    let chunk = this.#chunks[index];
    if (!chunk) {
      if (state === ABSENT) return;
      chunk = new Uint8Array(2 * BITMAP_BYTES);
      this.#chunks[index] = chunk;
    }
    const bit = block % BLOCKS_PER_CHUNK;
    const byte = bit >> 3;
    const mask = 1 << (bit & 7);
    const data = state === DATA ? chunk[byte]! | mask : chunk[byte]! & ~mask;
    const zero =
      state === ZERO ? chunk[BITMAP_BYTES + byte]! | mask : chunk[BITMAP_BYTES + byte]! & ~mask;
    // An overwrite changes no bit: its chunk need not be written again at the next flush.
    if (data === chunk[byte] && zero === chunk[BITMAP_BYTES + byte]) return;
    chunk[byte] = data;
    chunk[BITMAP_BYTES + byte] = zero;
    this.#dirty.add(index);
  }

  load(chunkIndex: number, bytes: Uint8Array): void {
    assert(bytes.length === 2 * BITMAP_BYTES, `bitmap chunk of ${bytes.length} bytes`);
    assert(chunkIndex < this.#chunks.length, `bitmap chunk ${chunkIndex} beyond layer`);
    this.#chunks[chunkIndex] = bytes;
  }

  /**
   * Copies of the chunks changed since the last call. Copied now, before the
   * data files are synced, so that no bit reaches LevelDB ahead of its data.
   */
  takeDirty(): Array<[number, Uint8Array]> {
    const out: Array<[number, Uint8Array]> = [];
    for (const index of this.#dirty) {
      const chunk = this.#chunks[index];
      assert(chunk, `dirty chunk ${index} has no bitmap`);
      out.push([index, chunk.slice()]);
    }
    this.#dirty.clear();
    return out;
  }

  /** Puts chunks back on the dirty list after a failed flush. */
  markDirty(indexes: Iterable<number>): void {
    for (const i of indexes) this.#dirty.add(i);
  }

  /** Calls `fn` for every block of chunk `index` that is DATA or ZERO, with its bit index in the chunk. */
  forEachSet(index: number, fn: (bit: number, state: typeof DATA | typeof ZERO) => void): void {
    const chunk = this.#chunks[index];
    if (!chunk) return;
    for (let byte = 0; byte < BITMAP_BYTES; byte++) {
      const data = chunk[byte]!;
      const zero = chunk[BITMAP_BYTES + byte]!;
      if ((data | zero) === 0) continue;
      for (let bit = 0; bit < 8; bit++) {
        const mask = 1 << bit;
        if (data & mask) fn(byte * 8 + bit, DATA);
        else if (zero & mask) fn(byte * 8 + bit, ZERO);
      }
    }
  }

  hasChunk(index: number): boolean {
    return this.#chunks[index] !== undefined;
  }

  /** Whether any block in [start, end) is DATA or ZERO. */
  anyIn(start: number, end: number): boolean {
    for (let b = start; b < end; b++) if (this.state(b) !== ABSENT) return true;
    return false;
  }

  /** Number of blocks this layer holds data for. */
  countData(): number {
    let count = 0;
    for (const chunk of this.#chunks) {
      if (!chunk) continue;
      for (let i = 0; i < BITMAP_BYTES; i++) {
        let byte = chunk[i]!;
        while (byte) {
          byte &= byte - 1;
          count++;
        }
      }
    }
    return count;
  }
}

/** Read-index values: 0 = not resolved yet, ZERO_SOURCE = reads as zeros, else layer index + 1. */
export const UNRESOLVED = 0;
export const ZERO_SOURCE = 0xffff;
/** The read index stores layer index + 1 in 16 bits, below ZERO_SOURCE. */
export const MAX_LAYERS = 0xfffe;

/**
 * Maps a block to the newest layer holding it, so that a read costs the same
 * however long the chain. A region (128 MiB of volume) is resolved whole on
 * its first read, by sweeping each layer's bitmap chunk once, bottom to top;
 * afterwards writes, merges and reverts keep it exact.
 */
export class ReadIndex {
  readonly #regions: Array<Uint16Array | undefined>;

  constructor(blockCount: number) {
    this.#regions = new Array<Uint16Array | undefined>(Math.ceil(blockCount / BLOCKS_PER_CHUNK));
  }

  /** An expanded volume: everything is resolved again, at the new length. */
  grow(blockCount: number): void {
    this.#regions.length = Math.ceil(blockCount / BLOCKS_PER_CHUNK);
    this.clear();
  }

  get(block: number): number {
    const region = this.#regions[Math.floor(block / BLOCKS_PER_CHUNK)];
    return region ? region[block % BLOCKS_PER_CHUNK]! : UNRESOLVED;
  }

  /** Updates a resolved region; an unresolved one is computed whole on its first read. */
  set(block: number, source: number): void {
    const region = this.#regions[Math.floor(block / BLOCKS_PER_CHUNK)];
    if (region) region[block % BLOCKS_PER_CHUNK] = source;
  }

  /** Installs a fully resolved region (every entry a layer or ZERO_SOURCE). */
  setRegion(index: number, region: Uint16Array): void {
    this.#regions[index] = region;
  }

  clear(): void {
    this.#regions.fill(undefined);
  }
}
