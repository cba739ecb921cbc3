import type { Disks } from './disks.ts';
import type { Clock } from '../common/clock.ts';
import { CorralError } from '../common/errors.ts';
import type { HostedRecord, Spaces } from '../kv/spaces.ts';
import { LocalReplica } from '../replication/local-replica.ts';
import { ReplicaSession, type StreamOut } from '../replication/replica-server.ts';
import type { EventLog } from './events.ts';

interface Live {
  replica: LocalReplica;
  /** Ends the holder's use: a stream is closed; an engine of this node is closed under by `replica.close()`. */
  end: () => void;
}

/** One engine stream's way into a hosted replica (replication/replica-server.ts). */
export interface HostedSession {
  /** Bytes as they came off the connection. */
  push: (chunk: Buffer) => void;
  /** Or whole frames, when the connection is read in place (replication/wire.ts). */
  frame: (frame: Buffer, pooled: boolean) => void;
  acquire: (n: number) => Buffer;
  fail: (err: Error) => void;
  closed: () => Promise<void>;
}

/**
 * Replicas this host keeps for engines on other hosts. Each is served to
 * one engine stream at a time; a stream from an engine with a newer epoch
 * replaces the current one, a stream from an older epoch is refused (a stale
 * engine, cut off by a partition, must not write after its successor did).
 */
export class HostedReplicas {
  readonly #spaces: Spaces;
  readonly #root: string;
  readonly #clock: Clock;
  readonly #events: EventLog;
  readonly #live = new Map<string, Live>();
  readonly #disks: Disks | undefined;

  constructor(options: {
    spaces: Spaces;
    root: string;
    clock: Clock;
    events: EventLog;
    disks?: Disks;
  }) {
    this.#spaces = options.spaces;
    this.#root = options.root;
    this.#disks = options.disks;
    this.#clock = options.clock;
    this.#events = options.events;
  }

  async ids(): Promise<string[]> {
    return this.#spaces.hosted.keys();
  }

  /** Creates an empty replica for `volume`, whose engine runs at `engine`. */
  async create(input: {
    volume: unknown;
    sizeBytes: unknown;
    engine: unknown;
    epoch: unknown;
    /** The volume's disk tag: the replica goes to a disk with it. */
    diskTag?: unknown;
  }): Promise<{ id: string }> {
    const { volume, sizeBytes, engine, epoch, diskTag } = input;
    if (diskTag !== undefined && typeof diskTag !== 'string')
      throw new CorralError('INVALID_ARGUMENT', 'diskTag is a string');
    if (
      typeof volume !== 'string' ||
      typeof engine !== 'string' ||
      typeof sizeBytes !== 'number' ||
      typeof epoch !== 'number'
    )
      throw new CorralError('INVALID_ARGUMENT', 'volume, sizeBytes, engine and epoch are needed');
    const now = new Date(this.#clock.nowMs());
    // Replica first, then the record that keeps it: a crash between leaves an unowned
    // replica, removed at the next start.
    const disk = await this.#disks?.choose(diskTag !== undefined ? { tag: diskTag } : {});
    const replica = await LocalReplica.create({
      spaces: this.#spaces,
      root: this.#root,
      ...(disk ? { on: disk.root } : {}),
      volume,
      sizeBytes,
      now,
    });
    await replica.close();
    await this.#spaces.hosted.put(replica.id, {
      id: replica.id,
      volume,
      engine,
      epoch,
      createdAt: now.toISOString(),
    });
    this.#events.add({
      type: 'replica-hosted',
      volume,
      message: `replica ${replica.id} for the engine at ${engine}`,
    });
    return { id: replica.id };
  }

  async remove(id: string): Promise<void> {
    const record = await this.#spaces.hosted.get(id);
    if (!record) throw new CorralError('NOT_FOUND', `No replica ${id} hosted here`);
    this.#live.get(id)?.end();
    this.#live.delete(id);
    await this.#spaces.hosted.del(id);
    await LocalReplica.destroy({ spaces: this.#spaces, root: this.#root, id });
    this.#events.add({ type: 'replica-removed', volume: record.volume, message: `replica ${id}` });
  }

  /**
   * The epoch rule, for a stream and an engine of this node alike: an older
   * epoch is refused, a newer one is kept, and the current holder is let go
   * first (its handle closed once its in-flight operations are done).
   */
  async #takeFor(id: string, epoch: number): Promise<HostedRecord> {
    const record = await this.#spaces.hosted.get(id);
    if (!record) throw new CorralError('NOT_FOUND', `No replica ${id} hosted here`);
    if (!Number.isSafeInteger(epoch) || epoch < record.epoch)
      throw new CorralError(
        'BUSY',
        `Replica ${id} belongs to a newer engine (epoch ${record.epoch}); this engine's epoch ${epoch} is stale`,
      );
    const previous = this.#live.get(id);
    if (previous) {
      previous.end();
      this.#live.delete(id);
      await previous.replica.close().catch(() => undefined);
    }
    if (epoch > record.epoch) await this.#spaces.hosted.put(id, { ...record, epoch });
    return record;
  }

  /**
   * Starts serving replica `id` to an engine stream. Returns the session to
   * feed with the stream's bytes and a function to call when the stream ends.
   */
  async attach(id: string, epoch: number, out: StreamOut, end: () => void): Promise<HostedSession> {
    const record = await this.#takeFor(id, epoch);
    const replica = await LocalReplica.open({ spaces: this.#spaces, root: this.#root, id });
    const session = new ReplicaSession(replica, out, (err) => {
      this.#events.add({
        type: 'replica-stream-error',
        volume: record.volume,
        message: `replica ${id}: ${err.message}`,
      });
      end();
    });
    const live: Live = { replica, end };
    this.#live.set(id, live);
    return {
      push: (chunk) => session.push(chunk),
      frame: (frame, pooled) => session.frame(frame, pooled),
      acquire: session.acquire,
      fail: (err) => session.fail(err),
      closed: async () => {
        session.close();
        if (this.#live.get(id) === live) this.#live.delete(id);
        // What the engine flushed is durable already; flush the rest before letting go.
        await replica.close().catch(() => undefined);
      },
    };
  }

  /**
   * Replica `id` for the engine of this node, opened in place (no stream:
   * reads and writes go to its files, as a single host's replicas do),
   * under the rule a stream follows: an older epoch is refused, a newer one
   * is kept, and the current holder is let go first — its handle closed,
   * in-flight operations drained — so that an engine fenced by a newer one
   * gets errors from here on.
   */
  async openForEngine(
    id: string,
    epoch: number,
    open: (id: string) => Promise<LocalReplica>,
  ): Promise<LocalReplica> {
    await this.#takeFor(id, epoch);
    const replica = await open(id);
    this.#live.set(id, { replica, end: () => undefined });
    return replica;
  }

  async stop(): Promise<void> {
    for (const [id, live] of this.#live) {
      live.end();
      this.#live.delete(id);
      await live.replica.close().catch(() => undefined);
    }
  }
}
