import { CorralError } from '../common/errors.ts';

/**
 * Every record carries a format version so that a later Corral can read an
 * older record or refuse it with a clear error, never misread it.
 * JSON records: `{"v":1,...}`. Binary records: first byte is the version.
 */
export interface RecordCodec<T> {
  readonly name: string;
  encode(value: T): Uint8Array;
  decode(bytes: Uint8Array, key: string): T;
}

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder();

export function jsonCodec<T extends object>(
  name: string,
  version: number,
  validate: (value: Record<string, unknown>, key: string) => T,
): RecordCodec<T> {
  return {
    name,
    encode(value) {
      return textEncoder.encode(JSON.stringify({ v: version, ...value }));
    },
    decode(bytes, key) {
      let parsed: unknown;
      try {
        parsed = JSON.parse(textDecoder.decode(bytes));
      } catch (err) {
        throw new CorralError('CORRUPT_METADATA', `${name} record ${key} is not valid JSON`, {
          cause: err,
        });
      }
      if (typeof parsed !== 'object' || parsed === null) {
        throw new CorralError('CORRUPT_METADATA', `${name} record ${key} is not an object`);
      }
      const record = parsed as Record<string, unknown>;
      if (record.v !== version) {
        throw new CorralError(
          'UNSUPPORTED_FORMAT',
          `${name} record ${key} has format version ${String(record.v)}; this Corral reads version ${version}`,
        );
      }
      return validate(record, key);
    },
  };
}

export function binaryCodec(name: string, version: number): RecordCodec<Uint8Array> {
  return {
    name,
    encode(value) {
      const out = new Uint8Array(value.length + 1);
      out[0] = version;
      out.set(value, 1);
      return out;
    },
    decode(bytes, key) {
      if (bytes[0] !== version) {
        throw new CorralError(
          'UNSUPPORTED_FORMAT',
          `${name} record ${key} has format version ${String(bytes[0])}; this Corral reads version ${version}`,
        );
      }
      // Copy: the caller keeps and mutates it, LevelDB's buffer is not ours.
      return bytes.slice(1);
    },
  };
}

/** Field readers for validators: fail with the record and field named. */
export function field<T>(
  record: Record<string, unknown>,
  key: string,
  name: string,
  type: 'string' | 'number' | 'boolean' | 'object',
): T {
  const value = record[name];
  if (typeof value !== type || value === null) {
    throw new CorralError('CORRUPT_METADATA', `record ${key}: field "${name}" is not a ${type}`);
  }
  return value as T;
}
