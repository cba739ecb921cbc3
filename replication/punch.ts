import { loadNative } from './native.ts';

/**
 * `fallocate(PUNCH_HOLE | KEEP_SIZE)` for batches of byte ranges of an open
 * file, from `native/punch.c`: Node has no fallocate. Measured against
 * spawning util-linux's `fallocate(1)` per range (docs/ARCHITECTURE.md,
 * "Trim returns space"): equal on a 1 GiB range, 30× cheaper on scattered
 * 4 KiB ones. Undefined without the addon: trimmed blocks still read as
 * zeros, their space is not returned.
 */
export type PunchHoles = (fd: number, ranges: Float64Array) => Promise<void>;

export const punchHoles: PunchHoles | undefined =
  process.env.CORRAL_PUNCH === 'off'
    ? undefined
    : loadNative<{ punchHoles: PunchHoles }>('punch')?.punchHoles;
