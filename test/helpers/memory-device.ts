import { CorralError } from '../../common/errors.ts';
import type { BlockDevice, Capabilities, Extent } from '../../replication/block-device.ts';

/**
 * A block device in a buffer, range-checked as the engine checks ranges: for
 * tests of a frontend's protocol handling apart from any storage.
 */
export class MemoryDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly bytes: Buffer;

  constructor(sizeBytes: number) {
    this.sizeBytes = sizeBytes;
    this.bytes = Buffer.alloc(sizeBytes);
  }

  capabilities(): Capabilities {
    return {
      readOnly: false,
      flush: true,
      fua: true,
      trim: true,
      zero: true,
      extents: true,
      multiConn: true,
    };
  }

  #check(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0)
      throw new CorralError('INVALID_ARGUMENT', `bad range ${offset}+${length}`);
    if (offset + length > this.sizeBytes)
      throw new CorralError('OUT_OF_RANGE', `range ${offset}+${length} past ${this.sizeBytes}`);
  }

  read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    this.#check(offset, length);
    const out = into ?? new Uint8Array(length);
    out.set(this.bytes.subarray(offset, offset + length));
    return Promise.resolve(out);
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    this.#check(offset, data.length);
    this.bytes.set(data, offset);
    return Promise.resolve();
  }

  flush(): Promise<void> {
    return Promise.resolve();
  }

  trim(offset: number, length: number): Promise<void> {
    return this.zero(offset, length);
  }

  zero(offset: number, length: number): Promise<void> {
    this.#check(offset, length);
    this.bytes.fill(0, offset, offset + length);
    return Promise.resolve();
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    this.#check(offset, length);
    return Promise.resolve([{ lengthBytes: length, hole: false, zero: false }]);
  }
}
