import { BLOCK_SIZE } from './block-device.ts';
import { hashBlocks } from './block-hash.ts';

/**
 * A replica's revision counter in the block just past the volume's end of
 * its head's layer file, made durable by the same `fdatasync` as the data
 * (docs/ARCHITECTURE.md, "Crash safety"): a database's commit then costs one
 * sync, where a LevelDB batch beside it cost a second device flush.
 *
 * One whole block, so that writing it never reads the page in first:
 *   0  8 bytes  magic "CRLREV01"
 *   8  u64 BE   revision
 *  16  u32 LE   XXH32 of the block with these four bytes zero
 *  20  u8       length of the layer id, then the layer id (ASCII)
 * The layer id keeps a block copied from another file from being taken for
 * this one's.
 */
const MAGIC = Buffer.from('CRLREV01', 'latin1');
const SUM_AT = 16;
const ID_AT = 20;

export function encodeTrailer(layerId: string, revision: bigint): Buffer {
  const block = Buffer.alloc(BLOCK_SIZE);
  MAGIC.copy(block, 0);
  block.writeBigUInt64BE(revision, 8);
  block[ID_AT] = block.write(layerId, ID_AT + 1, 'latin1');
  block.writeUInt32LE(sumOf(block), SUM_AT);
  return block;
}

/** The revision a trailer block holds, or undefined if it is not this layer's trailer. */
export function decodeTrailer(block: Buffer, layerId: string): bigint | undefined {
  if (block.length !== BLOCK_SIZE || !block.subarray(0, MAGIC.length).equals(MAGIC)) return;
  const stored = block.readUInt32LE(SUM_AT);
  const copy = Buffer.from(block);
  copy.writeUInt32LE(0, SUM_AT);
  if (sumOf(copy) !== stored) return;
  const id = block.toString('latin1', ID_AT + 1, ID_AT + 1 + block[ID_AT]!);
  if (id !== layerId) return;
  return block.readBigUInt64BE(8);
}

function sumOf(block: Buffer): number {
  const out = new Uint32Array(1);
  hashBlocks(block, out);
  return out[0]!;
}
