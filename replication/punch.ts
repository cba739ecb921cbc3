import { createRequire } from 'node:module';

/**
 * `fallocate(PUNCH_HOLE | KEEP_SIZE)` for batches of byte ranges of an open
 * file, from the small N-API addon in `native/` (built by node-gyp at setup):
 * Node has no fallocate. Measured against spawning util-linux's
 * `fallocate(1)` per range (docs/ARCHITECTURE.md, "Trim returns space"):
 * equal on a 1 GiB range, 30× cheaper on scattered 4 KiB ones.
 * Undefined when the addon is not built (or under a runtime that cannot load
 * it): trimmed blocks still read as zeros, their space is not returned.
 */
export type PunchHoles = (fd: number, ranges: Float64Array) => Promise<void>;

export const punchHoles: PunchHoles | undefined = load();

function load(): PunchHoles | undefined {
  if (process.env.CORRAL_PUNCH === 'off') return undefined;
  const require = createRequire(import.meta.url);
  // From the sources (replication/) and from the build (dist/replication/).
  for (const candidate of [
    '../native/build/Release/punch.node',
    '../../native/build/Release/punch.node',
  ]) {
    try {
      return (require(candidate) as { punchHoles: PunchHoles }).punchHoles;
    } catch {
      // not there: the next place, or none
    }
  }
  return undefined;
}
