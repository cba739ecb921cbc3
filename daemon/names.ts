import { CorralError, quoted } from '../common/errors.ts';
import { BLOCK_SIZE } from '../replication/block-device.ts';
import { parseSize } from '../common/size.ts';
import { QOS_FIELDS, type QosLimits } from '../replication/qos.ts';

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

/**
 * I/O limits from an API body: IOPS as whole numbers, bandwidth as bytes per
 * second or a size ("100M" per second), burst as seconds' worth or "2x";
 * 0 removes a limit.
 */
export function validateQos(input: unknown): QosLimits {
  if (typeof input !== 'object' || input === null || Array.isArray(input))
    throw new CorralError('INVALID_ARGUMENT', 'qos must be an object of limits');
  const out: QosLimits = {};
  for (const [key, value] of Object.entries(input as Record<string, unknown>)) {
    if (!(QOS_FIELDS as readonly string[]).includes(key))
      throw new CorralError(
        'INVALID_ARGUMENT',
        `Unknown limit ${quoted(key)}: the limits are ${QOS_FIELDS.join(', ')}`,
      );
    const field = key as keyof QosLimits;
    let n: number;
    if (field === 'burst' && typeof value === 'string' && /^\d+(\.\d+)?x$/.test(value))
      n = Number(value.slice(0, -1));
    else if (field.endsWith('andwidth') && typeof value === 'string') n = parseSize(value);
    else n = typeof value === 'number' ? value : NaN;
    const whole = field.endsWith('ops') || field.endsWith('andwidth');
    if (!Number.isFinite(n) || n < 0 || n > 1e12 || (whole && !Number.isInteger(n)))
      throw new CorralError(
        'INVALID_ARGUMENT',
        `Invalid ${key} limit ${quoted(String(value))}: a ${whole ? 'whole number' : 'number'}, 0 for none`,
      );
    if (field === 'burst' && n > 60)
      throw new CorralError('INVALID_ARGUMENT', "burst is at most 60 seconds' worth");
    out[field] = n;
  }
  return out;
}
