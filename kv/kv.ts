import { Level } from 'level';
import { CorralError } from '../common/errors.ts';
import type { RecordCodec } from './codec.ts';

type Db = Level<string, Uint8Array>;

/**
 * A typed key space: one prefix, one record codec. Keys inside a space are
 * plain strings; the prefix keeps spaces apart in the one LevelDB.
 */
export class KeySpace<T> {
  readonly #db: Db;
  readonly prefix: string;
  readonly codec: RecordCodec<T>;

  constructor(db: Db, prefix: string, codec: RecordCodec<T>) {
    this.#db = db;
    this.prefix = `${prefix}:`;
    this.codec = codec;
  }

  async get(key: string): Promise<T | undefined> {
    const bytes = await this.#db.get(this.prefix + key);
    return bytes === undefined ? undefined : this.codec.decode(bytes, this.prefix + key);
  }

  async put(key: string, value: T, options?: { sync?: boolean }): Promise<void> {
    await this.#db.put(this.prefix + key, this.codec.encode(value), {
      sync: options?.sync ?? true,
    });
  }

  async del(key: string, options?: { sync?: boolean }): Promise<void> {
    await this.#db.del(this.prefix + key, { sync: options?.sync ?? true });
  }

  /** Entries whose key starts with `keyPrefix` (all entries by default), in key order. */
  async entries(keyPrefix = ''): Promise<Array<[string, T]>> {
    const out: Array<[string, T]> = [];
    const start = this.prefix + keyPrefix;
    for await (const [key, bytes] of this.#db.iterator({ gte: start, lt: start + '\uffff' })) {
      out.push([key.slice(this.prefix.length), this.codec.decode(bytes, key)]);
    }
    return out;
  }

  async keys(keyPrefix = ''): Promise<string[]> {
    const out: string[] = [];
    const start = this.prefix + keyPrefix;
    for await (const key of this.#db.keys({ gte: start, lt: start + '\uffff' })) {
      out.push(key.slice(this.prefix.length));
    }
    return out;
  }
}

/** Writes across key spaces that land together or not at all. */
export class KvBatch {
  readonly #ops: Array<
    { type: 'put'; key: string; value: Uint8Array } | { type: 'del'; key: string }
  > = [];
  readonly #db: Db;

  constructor(db: Db) {
    this.#db = db;
  }

  put<T>(space: KeySpace<T>, key: string, value: T): this {
    this.#ops.push({ type: 'put', key: space.prefix + key, value: space.codec.encode(value) });
    return this;
  }

  del<T>(space: KeySpace<T>, key: string): this {
    this.#ops.push({ type: 'del', key: space.prefix + key });
    return this;
  }

  get length(): number {
    return this.#ops.length;
  }

  /** `sync` defaults to true: metadata that orders after data must be durable. */
  async write(options?: { sync?: boolean }): Promise<void> {
    if (this.#ops.length === 0) return;
    await this.#db.batch(this.#ops, { sync: options?.sync ?? true });
  }
}

/** The host's one LevelDB. Nothing outside kv/ imports `level`. */
export class Kv {
  readonly #db: Db;

  private constructor(db: Db) {
    this.#db = db;
  }

  static async open(location: string): Promise<Kv> {
    const db: Db = new Level<string, Uint8Array>(location, {
      keyEncoding: 'utf8',
      valueEncoding: 'view',
    });
    try {
      await db.open();
    } catch (err) {
      throw new CorralError(
        'BUSY',
        `Cannot open metadata store ${location}: is another corral daemon using this data dir?`,
        { cause: err },
      );
    }
    return new Kv(db);
  }

  space<T>(prefix: string, codec: RecordCodec<T>): KeySpace<T> {
    if (prefix.includes(':')) throw new Error(`key space prefix ${prefix} must not contain ':'`);
    return new KeySpace(this.#db, prefix, codec);
  }

  batch(): KvBatch {
    return new KvBatch(this.#db);
  }

  async close(): Promise<void> {
    await this.#db.close();
  }
}
