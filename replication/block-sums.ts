import { assert, fail } from '../common/assert.ts';
import { BLOCK_SIZE } from './block-device.ts';
import { hashBlocks } from './block-hash.ts';

/** Blocks per sum chunk: the unit stored in LevelDB (1024 × 4 bytes = 4 MiB of volume). */
export const SUMS_PER_CHUNK = 1024;

/** No checksum known (written before checksums existed, or never written). */
const UNKNOWN = 0;

/** Scratch for the sums of one request (a request is at most 32 MiB: 8192 blocks). */
let scratch = new Uint32Array(8192);

/**
 * The checksums of `data`'s blocks as stored: XXH32 (`block-hash.ts`), with
 * 0 moved to 1 so that 0 can mean "unknown". A view of a scratch array,
 * valid until the next call.
 */
function sumsOf(data: Uint8Array): Uint32Array {
  const count = data.length / BLOCK_SIZE;
  if (scratch.length < count) scratch = new Uint32Array(count);
  hashBlocks(data, scratch);
  const out = scratch.subarray(0, count);
  for (let i = 0; i < count; i++) if (out[i] === UNKNOWN) out[i] = 1;
  return out;
}

/** `hashes` as stored: 0 moved to 1 (in a copy: the caller's may serve others too). */
function storedForm(hashes: Uint32Array): Uint32Array {
  return hashes.includes(UNKNOWN) ? hashes.map((h) => (h === UNKNOWN ? 1 : h)) : hashes;
}

/**
 * The checksums of one layer's blocks, in chunks allocated where the layer
 * holds data. Chunks changed since the last flush are remembered so that a
 * flush persists only those (with the bitmaps, after the data sync).
 */
export class BlockSums {
  readonly #chunks: Array<Uint32Array | undefined>;
  readonly #dirty = new Set<number>();
  blockCount: number;

  constructor(blockCount: number) {
    this.blockCount = blockCount;
    this.#chunks = new Array<Uint32Array | undefined>(Math.ceil(blockCount / SUMS_PER_CHUNK));
  }

  /** An expanded volume: the blocks added have no sum. */
  grow(blockCount: number): void {
    assert(blockCount >= this.blockCount, 'block sums never shrink');
    this.blockCount = blockCount;
    this.#chunks.length = Math.ceil(blockCount / SUMS_PER_CHUNK);
  }

  /** The stored sum of a block, or undefined when none is known. */
  get(block: number): number | undefined {
    const v = this.#chunks[Math.floor(block / SUMS_PER_CHUNK)]?.[block % SUMS_PER_CHUNK];
    return v === undefined || v === UNKNOWN ? undefined : v;
  }

  set(block: number, sum: number): void {
    if (!(block >= 0 && block < this.blockCount)) fail(`block ${block} outside layer`);
    const index = Math.floor(block / SUMS_PER_CHUNK);
    let chunk = this.#chunks[index];
    if (!chunk) {
      chunk = new Uint32Array(SUMS_PER_CHUNK);
      this.#chunks[index] = chunk;
    }
    chunk[block % SUMS_PER_CHUNK] = sum;
    this.#dirty.add(index);
  }

  /**
   * Sets the sums of `count` whole blocks laid out in `data` from `firstBlock` on;
   * `hashes`, when given, are their XXH32s computed already (`WriteOptions.hashes`).
   */
  setFrom(firstBlock: number, data: Uint8Array, count: number, hashes?: Uint32Array): void {
    assert(firstBlock >= 0 && firstBlock + count <= this.blockCount, `blocks outside layer`);
    const sums =
      hashes && hashes.length === count
        ? storedForm(hashes)
        : sumsOf(data.subarray(0, count * BLOCK_SIZE));
    for (let i = 0; i < count;) {
      const block = firstBlock + i;
      const index = Math.floor(block / SUMS_PER_CHUNK);
      let chunk = this.#chunks[index];
      if (!chunk) {
        chunk = new Uint32Array(SUMS_PER_CHUNK);
        this.#chunks[index] = chunk;
      }
      this.#dirty.add(index);
      // One chunk at a time: the lookups once per chunk, not per block.
      const upTo = Math.min(count, i + SUMS_PER_CHUNK - (block % SUMS_PER_CHUNK));
      for (; i < upTo; i++) chunk[(firstBlock + i) % SUMS_PER_CHUNK] = sums[i]!;
    }
  }

  /** True when every block in `data` matches its stored sum (or has none): the read path's check. */
  allMatch(firstBlock: number, data: Uint8Array, count: number): boolean {
    const sums = sumsOf(data.subarray(0, count * BLOCK_SIZE));
    for (let i = 0; i < count; i++) {
      const want = this.get(firstBlock + i);
      if (want !== undefined && sums[i] !== want) return false;
    }
    return true;
  }

  /**
   * Indexes (relative to `firstBlock`) of the blocks in `data` whose bytes
   * do not match their stored sum; blocks with no known sum pass.
   */
  mismatches(firstBlock: number, data: Uint8Array, count: number): number[] {
    const sums = sumsOf(data.subarray(0, count * BLOCK_SIZE));
    const bad: number[] = [];
    for (let i = 0; i < count; i++) {
      const want = this.get(firstBlock + i);
      if (want !== undefined && sums[i] !== want) bad.push(i);
    }
    return bad;
  }

  chunkIndexes(): number[] {
    const out: number[] = [];
    this.#chunks.forEach((c, i) => c && out.push(i));
    return out;
  }

  load(chunkIndex: number, bytes: Uint8Array): void {
    assert(bytes.length === SUMS_PER_CHUNK * 4, `sum chunk of ${bytes.length} bytes`);
    const chunk = new Uint32Array(SUMS_PER_CHUNK);
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
    for (let i = 0; i < SUMS_PER_CHUNK; i++) chunk[i] = view.getUint32(i * 4, true);
    this.#chunks[chunkIndex] = chunk;
  }

  /**
   * The chunks changed since the last call (those `wanted` accepts, if given), copied
   * (little-endian u32s), and forgets them; the others stay changed.
   */
  takeDirty(wanted?: (chunkIndex: number) => boolean): Array<[number, Uint8Array]> {
    const out: Array<[number, Uint8Array]> = [];
    for (const index of this.#dirty) {
      if (wanted && !wanted(index)) continue;
      this.#dirty.delete(index);
      const chunk = this.#chunks[index];
      if (!chunk) continue;
      const bytes = new Uint8Array(SUMS_PER_CHUNK * 4);
      const view = new DataView(bytes.buffer);
      for (let i = 0; i < SUMS_PER_CHUNK; i++) view.setUint32(i * 4, chunk[i]!, true);
      out.push([index, bytes]);
    }
    return out;
  }

  /** After a failed flush: these chunks are persisted by the next one. */
  markDirty(indexes: number[]): void {
    for (const i of indexes) this.#dirty.add(i);
  }
}
