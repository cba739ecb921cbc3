import { CorralError } from './errors.ts';

const UNITS: Record<string, number> = {
  '': 1,
  B: 1,
  K: 1024,
  KB: 1024,
  KIB: 1024,
  M: 1024 ** 2,
  MB: 1024 ** 2,
  MIB: 1024 ** 2,
  G: 1024 ** 3,
  GB: 1024 ** 3,
  GIB: 1024 ** 3,
  T: 1024 ** 4,
  TB: 1024 ** 4,
  TIB: 1024 ** 4,
};

/**
 * Parses `10G`, `512M`, `4096`, `1.5GiB` into bytes. Units are binary, as in
 * qemu-img and losetup: storage users expect 10G to be 10 GiB.
 */
export function parseSize(input: string | number): number {
  if (typeof input === 'number') {
    if (!Number.isSafeInteger(input) || input < 0) {
      throw new CorralError(
        'INVALID_SIZE',
        `Invalid size ${input}: must be a whole number of bytes`,
      );
    }
    return input;
  }
  const match = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(input);
  const unit = match?.[2]?.toUpperCase() ?? '';
  const factor = UNITS[unit];
  if (!match || factor === undefined) {
    throw new CorralError(
      'INVALID_SIZE',
      `Invalid size "${input}": use bytes or a number with K, M, G or T (binary units)`,
    );
  }
  const bytes = Number(match[1]) * factor;
  if (!Number.isSafeInteger(bytes)) {
    throw new CorralError('INVALID_SIZE', `Invalid size "${input}": not a whole number of bytes`);
  }
  return bytes;
}

export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let i = 0;
  while (value >= 1024 && i < units.length - 1) {
    value /= 1024;
    i++;
  }
  return `${Number.isInteger(value) ? value : value.toFixed(1)}${units[i] ?? 'B'}`;
}
