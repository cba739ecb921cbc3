import * as zlib from 'node:zlib';
import { joined, Slab, type DirectReader } from '../common/direct-socket.ts';
import { assert } from '../common/assert.ts';
import { BLOCK_SIZE, MAX_REQUEST_BYTES } from './block-device.ts';
import { hashBlocks } from './block-hash.ts';
import { CorralError, type ErrorCode } from '../common/errors.ts';

/**
 * The data path between an engine and a replica on another host, in one
 * place: length-prefixed binary frames on one long-lived connection per
 * replica, opened as an HTTP/1.1 Upgrade on the peer's API port (so the
 * cluster secret and the engine's epoch are checked there, by the API).
 * Measured here: one HTTP/2 stream carried ~300 MB/s of 1 MiB writes with
 * both ends mostly idle (its framing and flow control); the upgraded TCP
 * connection carries the same frames without them.
 * Many requests are in flight; replies carry the request's id and come in
 * any order. Every payload carries its checksum (`crc` below), checked on arrival, so that
 * corruption in transit is caught (an error, never bad data acknowledged).
 *
 * Request:  u32 length | u8 op | u32 id | u8 flags | u64 offset | u32 count | u32 crc | payload
 * Reply:    u32 length | u8 0xff | u32 id | u8 status | u64 revision | u32 crc | payload
 *
 * `length` counts the bytes after itself. `count` is a byte count (READ,
 * TRIM, ZERO, EXTENTS, READ_SNAPSHOT); WRITE's data is the payload; CONTROL
 * carries a JSON call `{method, args}` and returns JSON. A failed request
 * replies status 1 and a JSON `{code, message}`. `revision` is the replica's
 * revision counter after the request.
 */
export const Op = {
  READ: 1,
  WRITE: 2,
  FLUSH: 3,
  TRIM: 4,
  ZERO: 5,
  EXTENTS: 6,
  CONTROL: 7,
  READ_SNAPSHOT: 8,
  READ_LAYER: 9,
  WRITE_LAYER: 10,
  LAYER_BLOCK_DIGESTS: 11,
  PING: 12,
  LAYER_SUMS: 13,
} as const;
export type OpCode = (typeof Op)[keyof typeof Op];

export const Flag = { FUA: 1, NO_HOLE: 2 } as const;

const REPLY = 0xff;
const REQUEST_HEADER = 4 + 1 + 4 + 1 + 8 + 4 + 4;
const REPLY_HEADER = 4 + 1 + 4 + 1 + 8 + 4;
/** Largest frame accepted: a 32 MiB write plus headers. */
export const MAX_FRAME_BYTES = 32 * 1024 * 1024 + 4096;
// The largest client write must fit one frame with its header.
assert(
  MAX_FRAME_BYTES >= MAX_REQUEST_BYTES + REQUEST_HEADER,
  'a replica frame must carry the largest request',
);

export const PATH_PREFIX = '/v1/replicas/';
export function ioPath(replicaId: string): string {
  return `${PATH_PREFIX}${encodeURIComponent(replicaId)}/io`;
}
/** Headers of the I/O stream: who may write (the cluster secret) and which engine (its epoch). */
export const EPOCH_HEADER = 'x-corral-epoch';
/**
 * 3: a rebuild's layer payloads carry their data as a part of its own after a head in whole
 * blocks; 2: payload checksums are XXH32 of its 4 KiB blocks, folded (1 was zlib's CRC-32).
 */
export const UPGRADE_PROTOCOL = 'corral-replica/3';

export function upgradeRequest(host: string, id: string, secret: string, epoch: number): string {
  return [
    `GET ${ioPath(id)} HTTP/1.1`,
    `Host: ${host}`,
    'Connection: Upgrade',
    `Upgrade: ${UPGRADE_PROTOCOL}`,
    `Authorization: Bearer ${secret}`,
    `${EPOCH_HEADER}: ${epoch}`,
    '',
    '',
  ].join('\r\n');
}

export function upgradeAccepted(): string {
  return `HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: ${UPGRADE_PROTOCOL}\r\n\r\n`;
}

export function upgradeRefused(status: number, code: string, message: string): string {
  const body = JSON.stringify({ error: { code, message } });
  return `HTTP/1.1 ${status} Refused\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`;
}

/** The peer's answer to the upgrade, once its head (and body, if refused) is complete. */
export function parseUpgradeAnswer(
  bytes: Buffer,
): { status: number; message: string; rest: Buffer } | undefined {
  const end = bytes.indexOf('\r\n\r\n');
  if (end < 0) return undefined;
  const head = bytes.subarray(0, end).toString('latin1');
  const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(head)?.[1] ?? 0);
  const rest = bytes.subarray(end + 4);
  if (status === 101) return { status, message: '', rest };
  const length = Number(/content-length: *(\d+)/i.exec(head)?.[1] ?? 0);
  if (rest.length < length) return undefined;
  let message = `HTTP ${status}`;
  try {
    message = (
      JSON.parse(rest.subarray(0, length).toString('utf8')) as { error: { message: string } }
    ).error.message;
  } catch {
    // keep the status line
  }
  return { status, message, rest: Buffer.alloc(0) };
}

export interface Request {
  op: OpCode;
  id: number;
  flags: number;
  offset: number;
  count: number;
  payload: Buffer;
  /**
   * A large WRITE's payload in whole blocks: the XXH32 of each block, which
   * checking the payload computed (`crc`) — the replica's block checksums,
   * so that they are not computed a second time.
   */
  hashes?: Uint32Array;
}

export interface Reply {
  id: number;
  ok: boolean;
  revision: bigint;
  payload: Buffer;
}

const blockSums = new Uint32Array(MAX_FRAME_BYTES / BLOCK_SIZE + 1);

/**
 * A payload's checksum: the XXH32 of each whole 4 KiB block (`block-hash.ts`,
 * WebAssembly SIMD, ~4× faster here than zlib's CRC-32, which has no
 * carry-less-multiply path in Node's build), folded in order with the
 * length, and zlib's CRC-32 of a shorter tail. It catches what a CRC
 * would in transit (flipped bits, a block lost, two blocks swapped).
 */
function crc(data: Uint8Array): number {
  return data.length === 0 ? 0 : crcFold(crcStart(data.length), data, true) >>> 0;
}

/**
 * `crc` of the parts' concatenation, without making it: every part but the
 * last is whole blocks, so block boundaries fall where they would.
 */
function crcOfParts(parts: readonly Uint8Array[], length: number): number {
  let acc = crcStart(length);
  for (let p = 0; p < parts.length; p++) acc = crcFold(acc, parts[p]!, p === parts.length - 1);
  return acc >>> 0;
}

/**
 * `crc` of a payload of whole blocks from the XXH32 of each block, computed
 * already (`WriteOptions.hashes`): the same value, without hashing again.
 */
function crcOfHashes(length: number, hashes: Uint32Array): number {
  assert(length === hashes.length * BLOCK_SIZE, 'one hash per block of the payload');
  return foldHashes(crcStart(length), hashes, hashes.length) >>> 0;
}

/** Folds the first `count` block hashes into `acc`, in order. */
function foldHashes(acc: number, hashes: Uint32Array, count: number): number {
  for (let i = 0; i < count; i++) {
    acc = Math.imul(acc ^ hashes[i]!, 0x85ebca77);
    acc = (acc << 13) | (acc >>> 19);
  }
  return acc;
}

function crcStart(length: number): number {
  return Math.imul(length ^ 0x165667b1, 0x9e3779b1);
}

/** Folds `data`'s blocks into `acc`; only the `last` part may end mid-block (its tail's CRC-32). */
function crcFold(acc: number, data: Uint8Array, last: boolean): number {
  const whole = data.length - (data.length % BLOCK_SIZE);
  assert(whole === data.length || last, 'only the last part may end mid-block');
  if (whole > 0) {
    hashBlocks(data.subarray(0, whole), blockSums);
    acc = foldHashes(acc, blockSums, whole / BLOCK_SIZE);
  }
  if (whole < data.length) acc ^= zlib.crc32(data.subarray(whole));
  return acc;
}

/** Below this a payload's CRC costs less than looking it up. */
const CRC_MEMO_MIN = 64 * 1024;
let crcMemo: { data: Uint8Array; crc: number } | undefined;

/**
 * The CRC of a request payload, computed once for the engine's sends of one write to every
 * remote replica: those happen in one synchronous turn over the same buffer. The memo is
 * dropped when the turn's microtasks run, before any socket read or pool reuse could change
 * the buffer's bytes.
 */
function requestCrc(data: Uint8Array): number {
  if (data.length < CRC_MEMO_MIN) return crc(data);
  const m = crcMemo;
  if (
    m !== undefined &&
    m.data.buffer === data.buffer &&
    m.data.byteOffset === data.byteOffset &&
    m.data.length === data.length
  )
    return m.crc;
  const value = crc(data);
  if (m === undefined) queueMicrotask(() => (crcMemo = undefined));
  crcMemo = { data, crc: value };
  return value;
}

/**
 * A request's header; send it followed by the payload (not copied). A payload
 * in parts (sent one after the other, never joined) has every part but the last
 * in whole blocks (see `crcOfParts`); `hashes`, when given, are a whole-block
 * payload's block XXH32s, folded instead of hashing it again.
 */
export function requestHeader(
  op: OpCode,
  id: number,
  flags: number,
  offset: number,
  count: number,
  payload: Uint8Array | readonly Uint8Array[],
  hashes?: Uint32Array,
): Buffer {
  const length = payloadLength(payload);
  const h = Buffer.allocUnsafe(REQUEST_HEADER);
  h.writeUInt32BE(REQUEST_HEADER - 4 + length, 0);
  h.writeUInt8(op, 4);
  h.writeUInt32BE(id, 5);
  h.writeUInt8(flags, 9);
  h.writeBigUInt64BE(BigInt(offset), 10);
  h.writeUInt32BE(count, 18);
  h.writeUInt32BE(
    hashes && length > 0
      ? crcOfHashes(length, hashes)
      : payload instanceof Uint8Array
        ? requestCrc(payload)
        : crcOfParts(payload, length),
    22,
  );
  return h;
}

export function payloadLength(payload: Uint8Array | readonly Uint8Array[]): number {
  return payload instanceof Uint8Array
    ? payload.length
    : payload.reduce((sum, part) => sum + part.length, 0);
}

/** A reply's header; a payload in parts as for `requestHeader`. */
export function replyHeader(
  id: number,
  ok: boolean,
  revision: bigint,
  payload: Uint8Array | readonly Uint8Array[],
): Buffer {
  const length = payloadLength(payload);
  const h = Buffer.allocUnsafe(REPLY_HEADER);
  h.writeUInt32BE(REPLY_HEADER - 4 + length, 0);
  h.writeUInt8(REPLY, 4);
  h.writeUInt32BE(id, 5);
  h.writeUInt8(ok ? 0 : 1, 9);
  h.writeBigUInt64BE(revision, 10);
  h.writeUInt32BE(
    payload instanceof Uint8Array ? crc(payload) : length === 0 ? 0 : crcOfParts(payload, length),
    18,
  );
  return h;
}

export function errorPayload(err: unknown): Buffer {
  const code = err instanceof CorralError ? err.code : 'IO_ERROR';
  const message = err instanceof Error ? err.message : String(err);
  return Buffer.from(JSON.stringify({ code, message }));
}

export function decodeError(payload: Buffer, where: string): CorralError {
  try {
    const e = JSON.parse(payload.toString('utf8')) as { code: ErrorCode; message: string };
    return new CorralError(e.code, `${where}: ${e.message}`);
  } catch {
    return new CorralError('IO_ERROR', `${where}: unreadable error reply`);
  }
}

/**
 * Splits a byte stream into frames. Chunks are kept as they came; a frame is
 * copied only when it straddles chunks.
 */
export class FrameReader {
  readonly #chunks: Buffer[] = [];
  #length = 0;

  push(chunk: Buffer): void {
    const last = this.#chunks[this.#chunks.length - 1];
    const both = last && joined(last, chunk);
    if (both) this.#chunks[this.#chunks.length - 1] = both;
    else this.#chunks.push(chunk);
    this.#length += chunk.length;
  }

  #take(n: number, acquire?: (n: number) => Buffer): Buffer {
    const first = this.#chunks[0]!;
    let out: Buffer;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(n);
    } else {
      out = acquire ? acquire(n) : Buffer.allocUnsafe(n);
      this.assembled = true;
      let at = 0;
      while (at < n) {
        const c = this.#chunks[0]!;
        const k = Math.min(c.length, n - at);
        c.copy(out, at, 0, k);
        at += k;
        if (k === c.length) this.#chunks.shift();
        else this.#chunks[0] = c.subarray(k);
      }
    }
    this.#length -= n;
    return out;
  }

  #peekLength(): number | undefined {
    if (this.#length < 4) return undefined;
    const first = this.#chunks[0]!;
    if (first.length >= 4) return first.readUInt32BE(0);
    const head = Buffer.concat(this.#chunks.slice(0, 4)).subarray(0, 4);
    return head.readUInt32BE(0);
  }

  /** Whether the last frame was assembled from several chunks (into a buffer from `acquire`). */
  assembled = false;

  /**
   * The next whole frame (without its length prefix), or undefined until more
   * bytes come. A frame spread over chunks is copied into `acquire(n)` when
   * given (a pool: fresh large buffers cost more in page faults than the copy).
   */
  next(acquire?: (n: number) => Buffer): Buffer | undefined {
    const length = this.#peekLength();
    if (length === undefined) return undefined;
    if (length > MAX_FRAME_BYTES)
      throw new CorralError('IO_ERROR', `Replica stream: frame of ${length} bytes is too large`);
    if (this.#length < 4 + length) return undefined;
    this.#take(4);
    this.assembled = false;
    return this.#take(length, acquire);
  }

  /**
   * When the next frame is incomplete and at least `minBytes` long: takes it
   * out, its present bytes copied into `acquire(length)`, for the rest to be
   * read in place. The reader is empty afterwards.
   */
  takePartial(
    minBytes: number,
    acquire: (n: number) => Buffer,
  ): { buf: Buffer; filled: number } | undefined {
    const length = this.#peekLength();
    if (length === undefined || length < minBytes || this.#length >= 4 + length) return undefined;
    if (length > MAX_FRAME_BYTES)
      throw new CorralError('IO_ERROR', `Replica stream: frame of ${length} bytes is too large`);
    this.#take(4);
    const buf = acquire(length);
    let filled = 0;
    for (const c of this.#chunks) filled += c.copy(buf, filled);
    this.#chunks.length = 0;
    this.#length = 0;
    return { buf, filled };
  }
}

/** Frames at least this large are read in place, straight into a pooled buffer. */
const IN_PLACE_MIN_BYTES = 64 * 1024;

/**
 * Frames of a connection whose reads land where we choose
 * (common/direct-socket.ts): small frames arrive in slabs and are handed out
 * as views; the rest of a large frame (a 1 MiB write) is read straight into
 * a buffer from `acquire`, so the kernel's copy is the only one.
 * `onFrame(frame, pooled)`: `pooled` when the frame's buffer came from `acquire`.
 */
export class DirectFrameReader implements DirectReader {
  readonly #reader = new FrameReader();
  readonly #slab = new Slab();
  readonly #acquire: (n: number) => Buffer;
  readonly #onFrame: (frame: Buffer, pooled: boolean) => void;
  readonly #onError: (err: Error) => void;
  #inPlace: { buf: Buffer; filled: number } | undefined;
  #lastInPlace = false;
  #failed = false;
  /** Bytes that landed in slabs rather than in place (of a large frame, they are copied once more). */
  slabBytes = 0;

  constructor(
    acquire: (n: number) => Buffer,
    onFrame: (frame: Buffer, pooled: boolean) => void,
    onError: (err: Error) => void,
  ) {
    this.#acquire = acquire;
    this.#onFrame = onFrame;
    this.#onError = onError;
  }

  nextBuffer(): Uint8Array {
    const target = this.#inPlace;
    this.#lastInPlace = target !== undefined;
    return target ? target.buf.subarray(target.filled) : this.#slab.space();
  }

  onRead(bytes: number): void {
    if (this.#failed) return;
    const target = this.#inPlace;
    if (target && this.#lastInPlace) {
      target.filled += bytes;
      if (target.filled === target.buf.length) {
        this.#inPlace = undefined;
        // One: the next frame's header is parsed, and its payload placed, as that read lands.
        this.#slab.afterInPlace(1);
        this.#onFrame(target.buf, true);
      }
      return;
    }
    // nextBuffer() runs after every read, so a read lands in the slab only while no frame is in place.
    assert(!target, 'a read landed in the slab while a frame was being read in place');
    this.slabBytes += bytes;
    this.#consume(this.#slab.take(bytes));
  }

  /** Bytes received before reading in place began (after a connection's HTTP upgrade answer). */
  push(bytes: Buffer): void {
    if (this.#failed || bytes.length === 0) return;
    assert(!this.#inPlace, 'bytes pushed while a frame was being read in place');
    this.#consume(bytes);
  }

  #consume(bytes: Buffer): void {
    this.#reader.push(bytes);
    try {
      const acquire = this.#acquire;
      for (let f = this.#reader.next(acquire); f; f = this.#reader.next(acquire)) {
        this.#onFrame(f, this.#reader.assembled);
      }
      this.#inPlace = this.#reader.takePartial(IN_PLACE_MIN_BYTES, acquire);
    } catch (err) {
      this.#failed = true;
      this.#onError(err instanceof Error ? err : new Error(String(err)));
    }
  }
}

export function parseRequest(frame: Buffer): Request {
  if (frame.length < REQUEST_HEADER - 4)
    throw new CorralError('IO_ERROR', 'Replica stream: short request frame');
  const payload = frame.subarray(REQUEST_HEADER - 4);
  if (crc(payload) !== frame.readUInt32BE(18))
    throw new CorralError('IO_ERROR', 'Replica stream: request payload fails its checksum');
  const op = frame.readUInt8(0) as OpCode;
  return {
    op,
    id: frame.readUInt32BE(1),
    flags: frame.readUInt8(5),
    offset: Number(frame.readBigUInt64BE(6)),
    count: frame.readUInt32BE(14),
    payload,
    // `crc` left them in blockSums: kept for every whole-block write (a 4 KiB one's copy of
    // 4 bytes costs less than hashing its block again for the replica's checksums).
    ...(op === Op.WRITE && payload.length > 0 && payload.length % BLOCK_SIZE === 0
      ? { hashes: blockSums.slice(0, payload.length / BLOCK_SIZE) }
      : {}),
  };
}

export function parseReply(frame: Buffer): Reply {
  if (frame.length < REPLY_HEADER - 4 || frame.readUInt8(0) !== REPLY)
    throw new CorralError('IO_ERROR', 'Replica stream: bad reply frame');
  const payload = frame.subarray(REPLY_HEADER - 4);
  if (crc(payload) !== frame.readUInt32BE(14))
    throw new CorralError('IO_ERROR', 'Replica stream: reply payload fails its checksum');
  return {
    id: frame.readUInt32BE(1),
    ok: frame.readUInt8(5) === 0,
    revision: frame.readBigUInt64BE(6),
    payload,
  };
}

/**
 * A rebuild's WRITE_LAYER payload: name, block states and mask, padded to
 * whole blocks, then the data as a part of its own — sent as it is, not
 * copied into one buffer with the rest (`requestHeader`'s parts).
 */
export function layerWriteParts(
  name: string,
  states: Uint8Array,
  data: Uint8Array,
  mask: Uint8Array | undefined,
): [Buffer, Uint8Array] {
  return blockAlignedParts([Buffer.from(name), states, mask ?? new Uint8Array(0)], data);
}

/** A READ_LAYER reply's payload the same way: states, padding, then the data. */
export function layerReadParts(states: Uint8Array, data: Uint8Array): [Buffer, Uint8Array] {
  return blockAlignedParts([states], data);
}

/** encodeParts of `small`, a padding part, and `data`: all before `data` joined, in whole blocks. */
function blockAlignedParts(small: Uint8Array[], data: Uint8Array): [Buffer, Uint8Array] {
  const before = 2 + 4 * (small.length + 2) + small.reduce((n, p) => n + p.length, 0);
  const pad = new Uint8Array((BLOCK_SIZE - (before % BLOCK_SIZE)) % BLOCK_SIZE);
  const encoded = encodeParts([...small, pad, data]);
  return [Buffer.concat(encoded.slice(0, -1)), data];
}

/**
 * Rebuild payloads, as a list of parts: u16 count, then per part u32 length
 * and bytes. READ_LAYER: [name, mask]; its reply `layerReadParts`;
 * WRITE_LAYER `layerWriteParts`. An empty mask selects every block.
 */
export function encodeParts(parts: Uint8Array[]): Buffer[] {
  const head = Buffer.allocUnsafe(2 + 4 * parts.length);
  head.writeUInt16BE(parts.length, 0);
  parts.forEach((p, i) => head.writeUInt32BE(p.length, 2 + 4 * i));
  return [head, ...parts.map((p) => Buffer.from(p.buffer, p.byteOffset, p.length))];
}

export function decodeParts(payload: Buffer): Buffer[] {
  const count = payload.readUInt16BE(0);
  let at = 2 + 4 * count;
  const out: Buffer[] = [];
  for (let i = 0; i < count; i++) {
    const n = payload.readUInt32BE(2 + 4 * i);
    out.push(payload.subarray(at, at + n));
    at += n;
  }
  return out;
}
