import { TurnBatch, type Corkable } from '../common/turn-batch.ts';
import { BufferPool } from '../common/buffer-pool.ts';
import { CorralError } from '../common/errors.ts';
import { MAX_REQUEST_BYTES } from './block-device.ts';
import type { Replica } from './replica.ts';
import {
  decodeParts,
  errorPayload,
  Flag,
  FrameReader,
  layerReadParts,
  Op,
  parseRequest,
  replyHeader,
  type Request,
} from './wire.ts';

export interface StreamOut extends Corkable {
  /** `done` once the chunk has left (handed to the kernel), never after a failed write. */
  write(chunk: Buffer, done?: () => void): void;
}

/** An answer whose last part is a buffer of the session's pool, lent until it has been sent. */
interface Lent {
  parts: readonly Uint8Array[];
  lent: Buffer;
}
type Answer = Buffer | readonly Uint8Array[] | Lent;

/**
 * The replica side of one engine's I/O stream (replication/wire.ts): parses
 * requests as they arrive, runs them on the local replica concurrently, and
 * writes the replies of one event-loop turn together.
 */
export class ReplicaSession {
  readonly #replica: Replica;
  readonly #out: StreamOut;
  readonly #batch: TurnBatch;
  readonly #reader = new FrameReader();
  readonly #onFatal: (err: Error) => void;
  #closed = false;
  /** Large frames are assembled into reused buffers, given back once their request is done. */
  readonly #pool = new BufferPool(64 * 1024 * 1024);

  constructor(replica: Replica, out: StreamOut, onFatal: (err: Error) => void) {
    this.#replica = replica;
    this.#out = out;
    this.#batch = new TurnBatch(out);
    this.#onFatal = onFatal;
  }

  /** Bytes as they came off the connection ('data' events). */
  push(chunk: Buffer): void {
    if (this.#closed) return;
    this.#reader.push(chunk);
    try {
      const acquire = (n: number) => this.#pool.acquire(n);
      for (let frame = this.#reader.next(acquire); frame; frame = this.#reader.next(acquire)) {
        this.frame(frame, this.#reader.assembled);
      }
    } catch (err) {
      this.fail(err instanceof Error ? err : new Error(String(err)));
    }
  }

  /**
   * A whole request frame; `pooled` when its buffer came from this session's
   * pool (see `acquire`), which gets it back once the request is done.
   */
  frame(frame: Buffer, pooled: boolean): void {
    if (this.#closed) return;
    try {
      this.#handle(parseRequest(frame), pooled ? frame : undefined);
    } catch (err) {
      this.fail(err instanceof Error ? err : new Error(String(err)));
    }
  }

  /** Buffers for frames read in place (replication/wire.ts DirectFrameReader). */
  readonly acquire = (n: number): Buffer => this.#pool.acquire(n);

  /** A bad frame means the stream can no longer be trusted: end it, the engine sees a lost replica. */
  fail(err: Error): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#onFatal(err);
  }

  close(): void {
    this.#closed = true;
  }

  #reply(id: number, ok: boolean, answer: Answer): void {
    if (this.#closed) return;
    const [payload, lent] = 'lent' in answer ? [answer.parts, answer.lent] : [answer, undefined];
    this.#batch.hold();
    this.#out.write(replyHeader(id, ok, this.#replica.revision(), payload));
    const parts = payload instanceof Uint8Array ? [payload] : payload;
    parts.forEach((part, i) => {
      if (part.length === 0) return;
      const done = lent && i === parts.length - 1 ? () => this.#pool.release(lent) : undefined;
      this.#out.write(Buffer.from(part.buffer, part.byteOffset, part.length), done);
    });
    // No data to send (a mask that selected none): nothing holds the lent buffer.
    if (lent && parts.at(-1)?.length === 0) this.#pool.release(lent);
  }

  #handle(req: Request, pooled: Buffer | undefined): void {
    this.#run(req).then(
      (payload) => {
        // Done with the request's bytes (a write is on disk, or in the page cache).
        if (pooled) this.#pool.release(pooled);
        this.#reply(req.id, true, payload);
      },
      (err: unknown) => this.#reply(req.id, false, errorPayload(err)),
    );
  }

  async #run(req: Request): Promise<Answer> {
    const r = this.#replica;
    const fua = (req.flags & Flag.FUA) !== 0;
    switch (req.op) {
      case Op.READ: {
        const data = await r.read(req.offset, req.count);
        return Buffer.from(data.buffer, data.byteOffset, data.length);
      }
      case Op.WRITE:
        // The payload is a view of the received chunk: the replica writes it before we return.
        await r.write(req.offset, req.payload, req.hashes ? { fua, hashes: req.hashes } : { fua });
        return EMPTY;
      case Op.PING:
        return EMPTY;
      case Op.FLUSH:
        await r.flush();
        return EMPTY;
      case Op.TRIM:
        await r.trim(req.offset, req.count, { fua });
        return EMPTY;
      case Op.ZERO:
        await r.zero(req.offset, req.count, { fua, noHole: (req.flags & Flag.NO_HOLE) !== 0 });
        return EMPTY;
      case Op.EXTENTS:
        return json(await r.extents(req.offset, req.count));
      case Op.READ_SNAPSHOT: {
        const name = req.payload.toString('utf8');
        const data = await r.readSnapshot(name, req.offset, req.count);
        return Buffer.from(data.buffer, data.byteOffset, data.length);
      }
      case Op.READ_LAYER: {
        const [name, mask] = decodeParts(req.payload) as [Buffer, Buffer];
        // Read into a pooled buffer, back once the reply has left: a fresh 1 MiB per granule
        // had the garbage collector at 12 % of a rebuild source's CPU.
        const lent = req.count <= MAX_REQUEST_BYTES ? this.#pool.acquire(req.count) : undefined;
        const { states, data } = await r.readLayerChunk(
          name.toString('utf8'),
          req.offset,
          req.count,
          mask.length > 0 ? mask : undefined,
          lent,
        );
        const parts = layerReadParts(states, data);
        return lent && data.buffer === lent.buffer ? { parts, lent } : parts;
      }
      case Op.WRITE_LAYER: {
        // layerWriteParts: name, states, mask, padding, data.
        const [name, states, mask, , data] = decodeParts(req.payload) as [
          Buffer,
          Buffer,
          Buffer,
          Buffer,
          Buffer,
        ];
        await r.writeLayerChunk(
          name.toString('utf8'),
          req.offset,
          states,
          data,
          mask.length > 0 ? mask : undefined,
        );
        return EMPTY;
      }
      case Op.LAYER_BLOCK_DIGESTS: {
        const digests = await r.layerBlockDigests(
          req.payload.toString('utf8'),
          req.offset,
          req.count,
        );
        return Buffer.from(digests.buffer, digests.byteOffset, digests.length);
      }
      case Op.LAYER_SUMS: {
        const sums = await r.layerSums(req.payload.toString('utf8'), req.offset, req.count);
        return Buffer.from(sums.buffer, sums.byteOffset, sums.length);
      }
      case Op.CONTROL:
        return json(await this.#control(JSON.parse(req.payload.toString('utf8')) as Call));
      default:
        throw new CorralError('INVALID_ARGUMENT', `Replica stream: unknown op ${String(req.op)}`);
    }
  }

  async #control(call: Call): Promise<unknown> {
    const r = this.#replica;
    const a = call.args ?? {};
    const str = (k: string): string => {
      const v = a[k];
      if (typeof v !== 'string') throw new CorralError('INVALID_ARGUMENT', `${call.method}: ${k}`);
      return v;
    };
    switch (call.method) {
      case 'info':
        break;
      case 'snapshot':
        await r.snapshot(
          str('name'),
          new Date(str('now')),
          typeof a.sizeBytes === 'number' ? a.sizeBytes : undefined,
        );
        break;
      case 'expand':
        if (!Number.isSafeInteger(a.sizeBytes))
          throw new CorralError('INVALID_ARGUMENT', 'expand: sizeBytes');
        await r.expand(a.sizeBytes as number);
        break;
      case 'deleteSnapshot':
        await r.deleteSnapshot(str('name'));
        break;
      case 'revert': {
        const removed = await r.revert(str('name'), new Date(str('now')), {
          discardNewer: a.discardNewer === true,
        });
        return { ...this.#info(), removed };
      }
      case 'extentsSnapshot':
        return r.extentsSnapshot(str('name'), Number(a.offset), Number(a.length));
      case 'touchedBlocks':
        return [
          ...(await r.touchedBlocks(
            typeof a.base === 'string' ? a.base : undefined,
            str('top'),
            Number(a.granule),
          )),
        ];
      case 'setRevision':
        await r.setRevision(BigInt(str('revision')));
        break;
      case 'layerDigests':
        return r.layerDigests(str('name'), Number(a.offset), Number(a.length), Number(a.granule));
      case 'checkBlocks':
        return r.checkBlocks(Number(a.offset), Number(a.length));
      case 'viewDigests':
        return r.viewDigests(
          typeof a.snapshot === 'string' ? a.snapshot : undefined,
          Number(a.offset),
          Number(a.length),
          Number(a.granule),
        );
      default:
        throw new CorralError('INVALID_ARGUMENT', `Replica stream: unknown call ${call.method}`);
    }
    return this.#info();
  }

  #info(): RemoteInfo {
    return {
      sizeBytes: this.#replica.sizeBytes,
      revision: this.#replica.revision().toString(),
      snapshots: this.#replica.snapshots(),
    };
  }
}

interface Call {
  method: string;
  args?: Record<string, unknown>;
}

export interface RemoteInfo {
  sizeBytes: number;
  revision: string;
  snapshots: ReturnType<Replica['snapshots']>;
}

const EMPTY = Buffer.alloc(0);

function json(value: unknown): Buffer {
  return Buffer.from(JSON.stringify(value));
}
