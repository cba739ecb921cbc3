import type { BlockDevice, BlockOps } from './block-device.ts';

/**
 * Copies the allocated ranges of `source` into `target` (a clone), 1 MiB at
 * a time, then flushes. Holes are skipped: the target reads zeros there.
 */
export async function copyAllocated(source: BlockDevice, target: BlockOps): Promise<void> {
  const windowBytes = 256 * 1024 * 1024;
  const pieceBytes = 1024 * 1024;
  for (let window = 0; window < source.sizeBytes; window += windowBytes) {
    let at = window;
    for (const extent of await source.extents(
      window,
      Math.min(windowBytes, source.sizeBytes - window),
    )) {
      if (!extent.hole) {
        for (let off = at; off < at + extent.lengthBytes; off += pieceBytes) {
          const length = Math.min(pieceBytes, at + extent.lengthBytes - off);
          await target.write(off, await source.read(off, length));
        }
      }
      at += extent.lengthBytes;
    }
  }
  await target.flush();
}
