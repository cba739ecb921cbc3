import * as net from 'node:net';
import * as tls from 'node:tls';
import { systemClock, type Clock } from '../common/clock.ts';
import { BufferPool } from '../common/buffer-pool.ts';
import { DIRECT_READS } from '../common/direct-socket.ts';
import { CorralError } from '../common/errors.ts';
import { TurnBatch } from '../common/turn-batch.ts';
import type { Extent, WriteOptions, ZeroOptions } from './block-device.ts';
import type { BadBlock, Replica, SnapshotInfo } from './replica.ts';
import type { RemoteInfo } from './replica-server.ts';
import {
  decodeError,
  parseUpgradeAnswer,
  upgradeRequest,
  decodeParts,
  encodeParts,
  Flag,
  layerWriteParts,
  FrameReader,
  Op,
  parseReply,
  DirectFrameReader,
  requestHeader,
  type OpCode,
} from './wire.ts';

export interface RemoteReplicaOptions {
  /** The peer daemon's API URL, e.g. http://127.0.0.2:9500. */
  url: string;
  id: string;
  /** The cluster secret, sent as a bearer token. */
  secret: string;
  /** The engine's epoch: the replica refuses streams from an older engine. */
  epoch: number;
  /** A request unanswered for this long fails the replica (ERR). */
  timeoutMs: number;
  /** For an `https://` peer: the CA that signed it and this node's certificate to show. */
  tls?: { cert: Buffer; key: Buffer; ca: Buffer | undefined };
  /** Timers and time for the timeouts (the system's by default). */
  clock?: Clock;
}

/** Payloads up to this size are copied behind their header: one write instead of two. */
const SMALL_PAYLOAD = 64 * 1024;

/** A request may take this many ping timeouts before the replica is failed. */
const REQUEST_TIMEOUT_FACTOR = 6;

/** A request sent and not yet answered. */
interface Pending {
  /** `pooled`: the frame's buffer came from the pool; whoever copies the payload out gives it back. */
  resolve: (payload: Buffer, pooled?: Buffer) => void;
  reject: (err: Error) => void;
  /** When it was sent (the clock's elapsedMs): the pinger's sweep fails requests out too long. */
  sentAt: number;
}

/**
 * A replica on another host, reached over one long-lived connection: an
 * HTTP/1.1 Upgrade on the peer's API port, then binary frames both ways
 * (replication/wire.ts). The first failure of any kind — an error reply, a
 * timeout, a lost connection — makes it fail every request from then on:
 * the engine sets it to ERR and a rebuild replaces it, never a silent resume.
 */
export class RemoteReplica implements Replica {
  readonly id: string;
  readonly location: string;
  sizeBytes = 0;
  readonly #o: RemoteReplicaOptions;
  #socket: net.Socket | undefined;
  #batch: TurnBatch | undefined;
  #pingOut = false;
  readonly #pending = new Map<number, Pending>();
  readonly #reader = new FrameReader();
  #nextId = 1;
  #revision = 0n;
  #snapshots: SnapshotInfo[] = [];
  #dead: CorralError | undefined;
  #closing: Promise<void> | undefined;
  #pinger: { cancel(): void } | undefined;
  readonly #clock: Clock;
  /** Large replies are assembled into reused buffers (reads copy out and give them back). */
  readonly #pool = new BufferPool(64 * 1024 * 1024);

  private constructor(options: RemoteReplicaOptions) {
    this.#o = options;
    this.#clock = options.clock ?? systemClock;
    this.id = options.id;
    this.location = options.url;
  }

  /**
   * Connects and reads the replica's state. Never throws: an unreachable
   * replica comes back dead (`failure` says why), for the engine to start in ERR.
   */
  static async connect(options: RemoteReplicaOptions): Promise<RemoteReplica> {
    const r = new RemoteReplica(options);
    try {
      await r.#open();
      r.#apply(await r.#call<RemoteInfo>('info'));
    } catch (err) {
      r.#die(
        err instanceof CorralError
          ? err
          : new CorralError('IO_ERROR', `replica ${options.id} at ${options.url}: ${String(err)}`),
      );
    }
    return r;
  }

  /** Why it failed, or undefined while healthy. */
  get failure(): string | undefined {
    return this.#dead?.message;
  }

  #open(): Promise<void> {
    return new Promise((resolve, reject) => {
      const target = new URL(this.#o.url);
      const secure = target.protocol === 'https:';
      if (secure && !this.#o.tls) {
        reject(this.#err('an https peer needs this node to run TLS (--tls-cert, --tls-key)'));
        return;
      }
      const host = target.hostname.replace(/^\[|\]$/g, '');
      const endpoint = {
        host,
        port: Number(target.port || (secure ? 443 : 80)),
        // Small requests must leave at once (Nagle would hold them for the previous ACK).
        noDelay: true,
      };
      // Over plain TCP replies are read where we choose (as the replica side reads requests):
      // a large reply straight into a pooled buffer, the rest into slabs, after the upgrade
      // answer has been read into a buffer of its own. (TLS decrypts into OpenSSL's buffers.)
      let upgraded = false;
      const headSpace = Buffer.allocUnsafe(4096);
      const direct =
        secure || !DIRECT_READS
          ? undefined
          : new DirectFrameReader(
              (n) => this.#pool.acquire(n),
              (f, pooled) => this.#settle(f, pooled ? f : undefined),
              (err) => this.#die(this.#err(err.message)),
            );
      const socket = secure
        ? tls.connect({
            ...endpoint,
            ...(net.isIP(host) === 0 ? { servername: host } : {}),
            cert: this.#o.tls!.cert,
            key: this.#o.tls!.key,
            ...(this.#o.tls!.ca ? { ca: this.#o.tls!.ca } : {}),
            ALPNProtocols: ['http/1.1'],
          })
        : !direct
          ? net.connect(endpoint)
          : net.connect({
              ...endpoint,
              onread: {
                buffer: () => (upgraded ? direct.nextBuffer() : headSpace),
                callback: (bytes: number) => {
                  if (upgraded) direct.onRead(bytes);
                  else onHead(Buffer.from(headSpace.subarray(0, bytes)));
                  return true;
                },
              },
            });
      if (direct) socket.resume(); // flowing, so that 'end' and 'close' come (no 'data' events)
      this.#socket = socket;
      this.#batch = new TurnBatch(socket);
      const timer = this.#clock.after(this.#o.timeoutMs, () => {
        reject(this.#err(`no answer in ${this.#o.timeoutMs} ms`));
        this.#die(this.#err(`no answer in ${this.#o.timeoutMs} ms`));
      });
      socket.once('error', (err) => {
        timer.cancel();
        reject(this.#err(err.message));
        this.#die(this.#err(`connection failed: ${err.message}`));
      });
      socket.once('close', () => {
        timer.cancel();
        reject(this.#err('connection closed'));
        this.#die(this.#err('connection closed'));
      });
      socket.write(upgradeRequest(target.host, this.#o.id, this.#o.secret, this.#o.epoch));
      let head = Buffer.alloc(0);
      const onHead = (chunk: Buffer): void => {
        head = Buffer.concat([head, chunk]);
        const answer = parseUpgradeAnswer(head);
        if (!answer) return;
        socket.off('data', onHead);
        timer.cancel();
        if (answer.status !== 101) {
          reject(this.#err(answer.message));
          socket.destroy();
          return;
        }
        if (direct) {
          upgraded = true;
          direct.push(answer.rest);
          this.#startPings();
          resolve();
          return;
        }
        socket.on('data', (data: Buffer) => {
          this.#reader.push(data);
          try {
            const acquire = (n: number) => this.#pool.acquire(n);
            for (let f = this.#reader.next(acquire); f; f = this.#reader.next(acquire))
              this.#settle(f, this.#reader.assembled ? f : undefined);
          } catch (err) {
            this.#die(this.#err(err instanceof Error ? err.message : String(err)));
          }
        });
        if (answer.rest.length > 0) socket.emit('data', answer.rest);
        this.#startPings();
        resolve();
      };
      if (!direct) socket.on('data', onHead);
    });
  }

  /**
   * Liveness apart from the requests: a peer that does not answer a ping
   * within the timeout is gone (crashed host, partition), however long its
   * disk takes to flush.
   */
  #startPings(): void {
    this.#pinger = this.#clock.setInterval(
      () => {
        // One sweep instead of a timer per request: the oldest request is the first one left.
        const limit = this.#o.timeoutMs * REQUEST_TIMEOUT_FACTOR;
        const oldest = this.#pending.values().next().value;
        if (oldest && this.#clock.elapsedMs() - oldest.sentAt > limit) {
          this.#die(this.#err(`no answer to a request in ${limit} ms`));
          return;
        }
        if (this.#pingOut) return;
        this.#pingOut = true;
        const deadline = this.#clock.after(this.#o.timeoutMs, () =>
          this.#die(this.#err(`no answer to a ping in ${this.#o.timeoutMs} ms`)),
        );
        this.#send(Op.PING, 0, 0, 0, EMPTY).then(
          () => {
            deadline.cancel();
            this.#pingOut = false;
          },
          () => deadline.cancel(),
        );
      },
      Math.max(100, Math.floor(this.#o.timeoutMs / 3)),
    );
  }

  #err(message: string): CorralError {
    return new CorralError('IO_ERROR', `Replica ${this.#o.id} at ${this.#o.url}: ${message}`);
  }

  #settle(frame: Buffer, pooled: Buffer | undefined): void {
    const reply = parseReply(frame);
    const p = this.#pending.get(reply.id);
    if (!p) return;
    this.#pending.delete(reply.id);
    if (reply.revision > this.#revision) this.#revision = reply.revision;
    if (reply.ok) p.resolve(reply.payload, pooled);
    else p.reject(decodeError(reply.payload, `Replica ${this.#o.id} at ${this.#o.url}`));
  }

  #die(err: CorralError): void {
    if (this.#dead) return;
    this.#dead = err;
    this.#pinger?.cancel();
    for (const p of this.#pending.values()) p.reject(err);
    this.#pending.clear();
    this.#socket?.destroy();
  }

  #send(
    op: OpCode,
    flags: number,
    offset: number,
    count: number,
    payload: Uint8Array | readonly Uint8Array[],
    onPooled?: (frame: Buffer) => void,
    hashes?: Uint32Array,
  ) {
    if (this.#dead) return Promise.reject(this.#dead);
    const stream = this.#socket;
    if (!stream) return Promise.reject(this.#err('not connected'));
    const id = this.#nextId++;
    if (this.#nextId > 0xffffffff) this.#nextId = 1;
    return new Promise<Buffer>((resolve, reject) => {
      // The peer answers pings (checked apart): a request may take longer, as a flush behind
      // a slow disk does, but not forever (REQUEST_TIMEOUT_FACTOR, swept by the pinger).
      this.#pending.set(id, {
        resolve: (data, pooled) => {
          if (pooled && onPooled) onPooled(pooled);
          resolve(data);
        },
        reject,
        sentAt: this.#clock.elapsedMs(),
      });
      // Requests of one loop turn leave together: one DATA frame for many small writes.
      this.#batch!.hold();
      const header = requestHeader(op, id, flags, offset, count, payload, hashes);
      if (!(payload instanceof Uint8Array)) {
        stream.write(header);
        for (const part of payload) stream.write(part);
      } else if (payload.length === 0) stream.write(header);
      else if (payload.length <= SMALL_PAYLOAD) stream.write(Buffer.concat([header, payload]));
      else {
        stream.write(header);
        stream.write(payload);
      }
    });
  }

  /** A control call: JSON out, the replica server's JSON answer back as `T`. */
  async #call<T>(method: string, args?: Record<string, unknown>): Promise<T> {
    const body = Buffer.from(JSON.stringify({ method, ...(args ? { args } : {}) }));
    return parseJson<T>(await this.#send(Op.CONTROL, 0, 0, 0, body));
  }

  #apply(info: RemoteInfo): void {
    this.sizeBytes = info.sizeBytes;
    this.#revision = BigInt(info.revision);
    this.#snapshots = info.snapshots;
  }

  revision(): bigint {
    return this.#revision;
  }

  async read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    let pooled: Buffer | undefined;
    const data = await this.#send(Op.READ, 0, offset, length, EMPTY, (p) => (pooled = p));
    if (data.length !== length) throw this.#err(`read returned ${data.length} of ${length} bytes`);
    if (!into) return data;
    into.set(data);
    if (pooled) this.#pool.release(pooled);
    return into;
  }

  async write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    const flags = options?.fua ? Flag.FUA : 0;
    await this.#send(Op.WRITE, flags, offset, data.length, data, undefined, options?.hashes);
  }

  async flush(): Promise<void> {
    await this.#send(Op.FLUSH, 0, 0, 0, EMPTY);
  }

  async trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    await this.#send(Op.TRIM, options?.fua ? Flag.FUA : 0, offset, length, EMPTY);
  }

  async zero(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    const flags = (options?.fua ? Flag.FUA : 0) | (options?.noHole ? Flag.NO_HOLE : 0);
    await this.#send(Op.ZERO, flags, offset, length, EMPTY);
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    return parseJson<Extent[]>(await this.#send(Op.EXTENTS, 0, offset, length, EMPTY));
  }

  snapshots(): SnapshotInfo[] {
    return this.#snapshots;
  }

  async snapshot(name: string, now: Date, sizeBytes?: number): Promise<void> {
    this.#apply(
      await this.#call<RemoteInfo>('snapshot', {
        name,
        now: now.toISOString(),
        ...(sizeBytes !== undefined ? { sizeBytes } : {}),
      }),
    );
  }

  async expand(sizeBytes: number): Promise<void> {
    this.#apply(await this.#call<RemoteInfo>('expand', { sizeBytes }));
  }

  async deleteSnapshot(name: string): Promise<void> {
    this.#apply(await this.#call<RemoteInfo>('deleteSnapshot', { name }));
  }

  async revert(name: string, now: Date, options?: { discardNewer?: boolean }): Promise<string[]> {
    const out = await this.#call<RemoteInfo & { removed: string[] }>('revert', {
      name,
      now: now.toISOString(),
      discardNewer: options?.discardNewer === true,
    });
    this.#apply(out);
    return out.removed;
  }

  async readSnapshot(
    name: string,
    offset: number,
    length: number,
    into?: Uint8Array,
  ): Promise<Uint8Array> {
    const data = await this.#send(Op.READ_SNAPSHOT, 0, offset, length, Buffer.from(name));
    if (!into) return data;
    into.set(data);
    return into;
  }

  async extentsSnapshot(name: string, offset: number, length: number): Promise<Extent[]> {
    return this.#call<Extent[]>('extentsSnapshot', { name, offset, length });
  }

  async touchedBlocks(
    base: string | undefined,
    top: string,
    granuleBytes: number,
  ): Promise<Set<number>> {
    const list = await this.#call<number[]>('touchedBlocks', {
      ...(base !== undefined ? { base } : {}),
      top,
      granule: granuleBytes,
    });
    return new Set(list);
  }

  async layerDigests(
    name: string,
    offset: number,
    length: number,
    granuleBytes: number,
  ): Promise<Array<[number, string]>> {
    return this.#call<Array<[number, string]>>('layerDigests', {
      name,
      offset,
      length,
      granule: granuleBytes,
    });
  }

  async readLayerChunk(
    name: string,
    offset: number,
    length: number,
    mask?: Uint8Array,
    into?: Uint8Array,
  ): Promise<{ states: Uint8Array; data: Uint8Array }> {
    const payload = Buffer.concat(encodeParts([Buffer.from(name), mask ?? EMPTY]));
    let pooled: Buffer | undefined;
    const reply = await this.#send(Op.READ_LAYER, 0, offset, length, payload, (p) => (pooled = p));
    // layerReadParts: states, padding, data.
    const [states, , data] = decodeParts(reply) as [Buffer, Buffer, Buffer];
    if (!pooled || !into || into.length < data.length) return { states, data };
    // Copied out so that the frame's buffer goes back to the pool: a fresh 1 MiB frame per
    // granule kept an engine's garbage collector busy pulling a rebuild from another node.
    into.set(data);
    const copied = { states: Uint8Array.from(states), data: into.subarray(0, data.length) };
    this.#pool.release(pooled);
    return copied;
  }

  async writeLayerChunk(
    name: string,
    offset: number,
    states: Uint8Array,
    data: Uint8Array,
    mask?: Uint8Array,
  ): Promise<void> {
    await this.#send(
      Op.WRITE_LAYER,
      0,
      offset,
      states.length * 4096,
      layerWriteParts(name, states, data, mask),
    );
  }

  async layerBlockDigests(name: string, offset: number, length: number): Promise<Uint8Array> {
    return this.#send(Op.LAYER_BLOCK_DIGESTS, 0, offset, length, Buffer.from(name));
  }

  async layerSums(name: string, offset: number, length: number): Promise<Uint8Array> {
    return this.#send(Op.LAYER_SUMS, 0, offset, length, Buffer.from(name));
  }

  async setRevision(revision: bigint): Promise<void> {
    this.#apply(await this.#call<RemoteInfo>('setRevision', { revision: revision.toString() }));
  }

  async viewDigests(
    snapshot: string | undefined,
    offset: number,
    length: number,
    granuleBytes: number,
  ): Promise<string[]> {
    return this.#call<string[]>('viewDigests', {
      ...(snapshot !== undefined ? { snapshot } : {}),
      offset,
      length,
      granule: granuleBytes,
    });
  }

  async checkBlocks(offset: number, length: number): Promise<BadBlock[]> {
    return this.#call<BadBlock[]>('checkBlocks', { offset, length });
  }

  /** The `Replica` contract: flushes, always lets go, and rejects when the flush failed. */
  async close(): Promise<void> {
    if (this.#closing) return this.#closing;
    this.#closing = (async () => {
      try {
        await this.flush();
      } finally {
        this.abandon();
      }
    })();
    return this.#closing;
  }

  abandon(): void {
    // Requests still out fail now: nothing may wait forever on a replica let go.
    this.#die(this.#err('closed'));
  }
}

const EMPTY = Buffer.alloc(0);

function parseJson<T>(frame: Buffer): T {
  return JSON.parse(frame.toString('utf8')) as T;
}
