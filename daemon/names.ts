import { CorralError, quoted } from '../common/errors.ts';
import { BLOCK_SIZE } from '../replication/block-device.ts';
import { parseSize } from '../common/size.ts';

/** Volume names are NBD export names and file names: keep them plain. '@' is kept for snapshots. */
const NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;

function validateName(kind: 'volume' | 'snapshot', name: unknown): string {
  if (typeof name !== 'string' || !NAME.test(name)) {
    throw new CorralError(
      'INVALID_NAME',
      `Invalid ${kind} name ${quoted(name)}: use 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit`,
    );
  }
  return name;
}

export function validateVolumeName(name: unknown): string {
  return validateName('volume', name);
}

export function validateSnapshotName(name: unknown): string {
  return validateName('snapshot', name);
}

/** `VOLUME@SNAPSHOT`, as in exports and clone sources. */
export function parseSnapshotRef(ref: unknown): { volume: string; snapshot: string } {
  if (typeof ref !== 'string' || ref.split('@').length !== 2) {
    throw new CorralError(
      'INVALID_ARGUMENT',
      `Invalid snapshot reference ${quoted(ref)}: use VOLUME@SNAPSHOT`,
    );
  }
  const [volume, snapshot] = ref.split('@') as [string, string];
  return { volume: validateVolumeName(volume), snapshot: validateSnapshotName(snapshot) };
}

/** Largest volume: offsets stay exact in a double, and the read index stays addressable. */
export const MAX_VOLUME_BYTES = 64 * 1024 ** 4;

export function validateVolumeSize(input: unknown): number {
  if (typeof input !== 'string' && typeof input !== 'number') {
    throw new CorralError('INVALID_SIZE', 'A volume needs a size, such as "10G"');
  }
  const bytes = parseSize(input);
  if (bytes <= 0 || bytes % BLOCK_SIZE !== 0) {
    throw new CorralError(
      'INVALID_SIZE',
      `Invalid volume size ${bytes} bytes: must be a positive multiple of ${BLOCK_SIZE}`,
    );
  }
  if (bytes > MAX_VOLUME_BYTES) {
    throw new CorralError(
      'INVALID_SIZE',
      `Invalid volume size ${bytes} bytes: the maximum is ${MAX_VOLUME_BYTES} (64 TiB)`,
    );
  }
  return bytes;
}

/** The name of a snapshot taken without one: `snap-YYYYMMDD-HHMMSS-xxxx`. */
export function autoSnapshotName(now: Date): string {
  const stamp = now.toISOString().replace(/[-:]/g, '').replace('T', '-').slice(0, 15);
  return `snap-${stamp}-${Math.random().toString(36).slice(2, 6)}`;
}
