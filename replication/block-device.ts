import { CorralError, isCorralError } from '../common/errors.ts';

/**
 * The one narrow interface under every frontend (nbd/, fuse/), after
 * nbdkit's backend: frontends see this and nothing about replicas.
 * Offsets and lengths are bytes; the engine validates them once at the edge.
 */
export interface WriteOptions {
  /** Force unit access: durable before the promise resolves. */
  fua?: boolean;
  /**
   * The XXH32 of each 4 KiB piece of the data (`block-hash.ts`), when the
   * caller computed them already (a replica stream's check of the payload):
   * a replica's block checksums of an aligned write are these.
   */
  hashes?: Uint32Array;
}

export interface ZeroOptions extends WriteOptions {
  /** The range must stay allocated (NBD_CMD_FLAG_NO_HOLE). */
  noHole?: boolean;
}

/** One run of the base:allocation map. */
export interface Extent {
  lengthBytes: number;
  /** Not allocated in any layer (reads as zero). */
  hole: boolean;
  /** Known to read as zeros. */
  zero: boolean;
}

export interface Capabilities {
  readOnly: boolean;
  flush: boolean;
  fua: boolean;
  trim: boolean;
  zero: boolean;
  extents: boolean;
  /** A flush on any connection covers writes completed on all of them. */
  multiConn: boolean;
}

export interface BlockOps {
  /**
   * Reads `length` bytes. With `into` (exactly `length` bytes long) the data
   * lands there and `into` is returned: frontends reuse large buffers.
   */
  read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array>;
  write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void>;
  flush(): Promise<void>;
  trim(offset: number, length: number, options?: WriteOptions): Promise<void>;
  zero(offset: number, length: number, options?: ZeroOptions): Promise<void>;
  extents(offset: number, length: number): Promise<Extent[]>;
}

export interface BlockDevice extends BlockOps {
  readonly sizeBytes: number;
  capabilities(): Capabilities;
}

export const BLOCK_SIZE = 4096;
/** NBD_INFO_BLOCK_SIZE maximum payload; also the largest read or write we accept. */
export const MAX_REQUEST_BYTES = 32 * 1024 * 1024;

/**
 * A read-only device from its reads and map: writes, trims and zeroes are
 * refused with READ_ONLY naming `label`, a flush has nothing to do. (A
 * filter that overrides only what it needs, after nbdkit's.)
 */
export function readOnlyDevice(
  label: string,
  device: Pick<BlockDevice, 'sizeBytes' | 'capabilities' | 'read' | 'extents'>,
): BlockDevice {
  const refuse = (what: string) => () =>
    Promise.reject(new CorralError('READ_ONLY', `Cannot ${what}: ${label} is read-only`));
  return {
    // Read through: a standby volume grows under its read-only view.
    get sizeBytes() {
      return device.sizeBytes;
    },
    capabilities: () => ({ ...device.capabilities(), readOnly: true }),
    read: (offset, length, into) => device.read(offset, length, into),
    extents: (offset, length) => device.extents(offset, length),
    write: refuse('write'),
    trim: refuse('trim'),
    zero: refuse('write zeroes'),
    flush: () => Promise.resolve(),
  };
}

/**
 * A filter after nbdkit's (`server/filters.c`): the methods `over` names
 * replace `next`'s (or add to them), every other one falls through to
 * `next`, called on it.
 * For control and test paths: the Proxy costs a lookup per call, so the
 * data path's layers are written out by hand.
 */
export function filter<T extends object, X extends object = object>(
  next: T,
  over: Partial<T> & X,
): T & X {
  return new Proxy(next, {
    get(target, key) {
      if (Object.hasOwn(over, key)) return (over as Record<PropertyKey, unknown>)[key];
      const value: unknown = Reflect.get(target, key, target);
      return typeof value === 'function'
        ? (value as (...a: unknown[]) => unknown).bind(target)
        : value;
    },
  }) as T & X;
}

/** The errno a frontend answers for a failed BlockDevice request. */
export type DeviceErrno = 'EIO' | 'EINVAL' | 'ENOSPC' | 'EPERM' | 'ESHUTDOWN';

/**
 * One table for every frontend (NBD and FUSE answered INVALID_ARGUMENT
 * differently): a range past the end is ENOSPC for what writes and EINVAL
 * for the rest, as the NBD spec names them; anything unclassified is EIO.
 */
export function deviceErrno(err: unknown, writes: boolean): DeviceErrno {
  if (!isCorralError(err)) return 'EIO';
  switch (err.code) {
    case 'OUT_OF_RANGE':
      return writes ? 'ENOSPC' : 'EINVAL';
    case 'INVALID_ARGUMENT':
      return 'EINVAL';
    case 'NO_SPACE':
      return 'ENOSPC';
    case 'READ_ONLY':
      return 'EPERM';
    case 'SHUTTING_DOWN':
      return 'ESHUTDOWN';
    default:
      return 'EIO';
  }
}
