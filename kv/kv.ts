import * as fs from 'node:fs';
import * as path from 'node:path';
import { ClassicLevel } from 'classic-level';
import { Level } from 'level';
import { CorralError, isCorralError, systemErrorCode } from '../common/errors.ts';
import type { RecordCodec } from './codec.ts';

type Db = Level<string, Uint8Array>;
type Op = { type: 'put'; key: string; value: Uint8Array } | { type: 'del'; key: string };

/**
 * A typed key space: one prefix, one record codec. Keys inside a space are
 * plain strings; the prefix keeps spaces apart in the one LevelDB.
 */
export class KeySpace<T> {
  readonly #kv: Kv;
  readonly prefix: string;
  readonly codec: RecordCodec<T>;

  constructor(kv: Kv, prefix: string, codec: RecordCodec<T>) {
    this.#kv = kv;
    this.prefix = `${prefix}:`;
    this.codec = codec;
  }

  async get(key: string): Promise<T | undefined> {
    const bytes = await this.#kv.getRaw(this.prefix + key);
    return bytes === undefined ? undefined : this.codec.decode(bytes, this.prefix + key);
  }

  async put(key: string, value: T, options?: { sync?: boolean }): Promise<void> {
    await this.#kv.writeRaw(
      [{ type: 'put', key: this.prefix + key, value: this.codec.encode(value) }],
      options?.sync ?? true,
    );
  }

  async del(key: string, options?: { sync?: boolean }): Promise<void> {
    await this.#kv.writeRaw([{ type: 'del', key: this.prefix + key }], options?.sync ?? true);
  }

  /** Entries whose key starts with `keyPrefix` (all entries by default), in key order. */
  async entries(keyPrefix = ''): Promise<Array<[string, T]>> {
    const start = this.prefix + keyPrefix;
    return (await this.#kv.rangeRaw(start)).map(([key, bytes]) => [
      key.slice(this.prefix.length),
      this.codec.decode(bytes, key),
    ]);
  }

  async keys(keyPrefix = ''): Promise<string[]> {
    const start = this.prefix + keyPrefix;
    return (await this.#kv.keysRaw(start)).map((key) => key.slice(this.prefix.length));
  }
}

/** Writes across key spaces that land together or not at all. */
export class KvBatch {
  readonly #ops: Op[] = [];
  readonly #kv: Kv;

  constructor(kv: Kv) {
    this.#kv = kv;
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
    await this.#kv.writeRaw(this.#ops, options?.sync ?? true);
  }
}

interface PendingWrite {
  ops: Op[];
  sync: boolean;
  resolve: () => void;
  reject: (err: unknown) => void;
}

/** Space kept free beside the metadata store, given up when a write finds the disk full. */
export const RESERVE_BYTES = 16 * 1024 * 1024;

/**
 * The host's one LevelDB. Nothing outside kv/ imports `level`.
 *
 * Writes go to LevelDB one group at a time, and a write that fails closes and
 * reopens the store before anything else is written (docs/ARCHITECTURE.md,
 * "Metadata on a full disk"): LevelDB leaves a record torn by a failed append
 * in its log and appends the next ones after it, and at the next open the
 * torn record takes every later record of the log with it — writes
 * acknowledged after the disk had room again were lost at the next SIGKILL.
 * Reopening replays the log up to the torn record and starts a new one.
 */
export class Kv {
  readonly location: string;
  /** True if this open created the store (there was none): it knows nothing of older files. */
  readonly created: boolean;
  #db: Db;
  /** Set while the store is closed for a reopen (or failed to reopen); reads and writes wait. */
  #reopening: Promise<void> | undefined;
  #broken: CorralError | undefined;
  readonly #queue: PendingWrite[] = [];
  #writing = false;
  #closed = false;
  readonly #reservePath: string | undefined;
  #diskFull = false;
  /** The reserve was made once: the disk is full until it can be made again. */
  #reserved = false;

  private constructor(db: Db, location: string, created: boolean, reservePath?: string) {
    this.#db = db;
    this.location = location;
    this.created = created;
    this.#reservePath = reservePath;
  }

  /**
   * Opens (or creates) the store at `location`. With `reserve`, a file of
   * RESERVE_BYTES next to it is kept, and deleted when a metadata write finds
   * the disk full, so the store can reopen and go on recording (a snapshot
   * delete that frees space needs metadata writes too).
   */
  static async open(location: string, options: { reserve?: boolean } = {}): Promise<Kv> {
    const created = !fs.existsSync(path.join(location, 'CURRENT'));
    const db = await openDb(location);
    const reservePath = options.reserve ? `${location}.reserve` : undefined;
    const kv = new Kv(db, location, created, reservePath);
    await kv.#makeReserve();
    return kv;
  }

  /**
   * Rebuilds a store whose CURRENT or MANIFEST is damaged from its log and
   * table files (LevelDB's repair), after copying the damaged one aside.
   * Returns where the copy is.
   */
  static async repair(location: string, now: Date): Promise<string> {
    const copy = `${location}.before-repair-${now.toISOString().replace(/[:.]/g, '-')}`;
    await fs.promises.cp(location, copy, { recursive: true });
    // `level` is classic-level under Node; its type does not show the static repair.
    await ClassicLevel.repair(location);
    return copy;
  }

  space<T>(prefix: string, codec: RecordCodec<T>): KeySpace<T> {
    if (prefix.includes(':')) throw new Error(`key space prefix ${prefix} must not contain ':'`);
    return new KeySpace(this, prefix, codec);
  }

  batch(): KvBatch {
    return new KvBatch(this);
  }

  /** @internal for KeySpace */
  async getRaw(key: string): Promise<Uint8Array | undefined> {
    await this.#usable();
    return this.#db.get(key);
  }

  /** @internal for KeySpace */
  async rangeRaw(start: string): Promise<Array<[string, Uint8Array]>> {
    await this.#usable();
    const out: Array<[string, Uint8Array]> = [];
    for await (const entry of this.#db.iterator({ gte: start, lt: start + '\uffff' }))
      out.push(entry);
    return out;
  }

  /** @internal for KeySpace */
  async keysRaw(start: string): Promise<string[]> {
    await this.#usable();
    const out: string[] = [];
    for await (const key of this.#db.keys({ gte: start, lt: start + '\uffff' })) out.push(key);
    return out;
  }

  /**
   * Queues `ops` to be written atomically. Writes waiting while another is
   * under way go to LevelDB as one batch (one log record, one sync), so no
   * write is ever appended behind one whose outcome is not yet known.
   */
  writeRaw(ops: Op[], sync: boolean): Promise<void> {
    return new Promise((resolve, reject) => {
      this.#queue.push({ ops, sync, resolve, reject });
      if (!this.#writing) void this.#drain();
    });
  }

  async #drain(): Promise<void> {
    this.#writing = true;
    while (this.#queue.length > 0) {
      const group = this.#queue.splice(0);
      try {
        await this.#usable();
        await this.#db.batch(
          group.flatMap((w) => w.ops),
          { sync: group.some((w) => w.sync) },
        );
        for (const w of group) w.resolve();
      } catch (err) {
        const failure = metadataError('Cannot write metadata', err);
        for (const w of group) w.reject(failure);
        if (!this.#closed && !isCorralError(err)) await this.#reopen(failure);
      }
    }
    this.#writing = false;
  }

  /** Waits for a reopen under way; retries one that failed (the disk may have room now). */
  async #usable(): Promise<void> {
    if (this.#closed) throw new CorralError('SHUTTING_DOWN', 'The metadata store is closed');
    if (this.#reopening) await this.#reopening;
    if (this.#broken) await this.#reopen(this.#broken);
    if (this.#broken) throw this.#broken;
  }

  #reopen(cause: CorralError): Promise<void> {
    this.#reopening ??= (async () => {
      if (this.#reservePath && cause.code === 'NO_SPACE') {
        await fs.promises.rm(this.#reservePath, { force: true });
        this.#diskFull = true;
      }
      try {
        await this.#db.close().catch(() => undefined);
        this.#db = await openDb(this.location);
        this.#broken = undefined;
        await this.#makeReserve();
      } catch (err) {
        this.#broken = metadataError('Cannot reopen the metadata store', err);
      }
    })().finally(() => (this.#reopening = undefined));
    return this.#reopening;
  }

  /** Puts the reserve back once the disk has room for it and more. */
  async #makeReserve(): Promise<void> {
    const file = this.#reservePath;
    if (!file) return;
    try {
      const have = await fs.promises.stat(file).catch(() => undefined);
      if (have && have.blocks * 512 >= RESERVE_BYTES) {
        this.#reserved = true;
        return;
      }
      const { bavail, bsize } = await fs.promises.statfs(path.dirname(file));
      const free = bavail * bsize;
      // A disk too small for a reserve is no longer full once it has room for one.
      if (!this.#reserved && free >= RESERVE_BYTES) this.#diskFull = false;
      if (free < 2 * RESERVE_BYTES) return;
      // Written, not truncated: a sparse file would reserve nothing.
      await fs.promises.writeFile(file, Buffer.alloc(RESERVE_BYTES));
      this.#reserved = true;
      this.#diskFull = false;
    } catch {
      await fs.promises.rm(file, { force: true }).catch(() => undefined);
    }
  }

  /**
   * True from a metadata write that found the disk full until the reserve
   * can be written again (twice its size free).
   */
  async diskFull(): Promise<boolean> {
    if (this.#diskFull) await this.#makeReserve();
    return this.#diskFull;
  }

  async close(): Promise<void> {
    while (this.#writing || this.#reopening) {
      await (this.#reopening ?? new Promise((resolve) => setImmediate(resolve)));
    }
    this.#closed = true;
    await this.#db.close();
  }
}

/** LevelDB reports errors as text with a LEVEL_ code; the errno is in the text. */
function metadataError(what: string, err: unknown): CorralError {
  if (err instanceof CorralError) return err;
  const message = err instanceof Error ? err.message : String(err);
  if (/No space left|ENOSPC|Disk quota/i.test(message)) {
    return new CorralError('NO_SPACE', `${what}: no space left on the metadata disk`, {
      cause: Object.assign(new Error(message), { code: 'ENOSPC' }),
    });
  }
  return new CorralError('IO_ERROR', `${what}: ${message}`, { cause: err });
}

async function openDb(location: string): Promise<Db> {
  const db: Db = new Level<string, Uint8Array>(location, {
    keyEncoding: 'utf8',
    valueEncoding: 'view',
  });
  try {
    await db.open();
  } catch (err) {
    const cause = err instanceof Error ? err.cause : undefined;
    const code = systemErrorCode(cause);
    const detail = cause instanceof Error ? cause.message : String(err);
    if (code === 'LEVEL_LOCKED')
      throw new CorralError(
        'BUSY',
        `Cannot open metadata store ${location}: another corral daemon is using this data dir (${detail})`,
        { cause: err },
      );
    if (code === 'LEVEL_CORRUPTION' || (code === 'LEVEL_IO_ERROR' && !/No space/i.test(detail)))
      throw new CorralError(
        'CORRUPT_METADATA',
        `Cannot open metadata store ${location}: it is damaged (${detail}). The replicas' data is untouched; "corral daemon --repair-metadata" rebuilds the store from its log and tables (a copy of the damaged one is kept)`,
        { cause: err },
      );
    throw metadataError(`Cannot open metadata store ${location}`, cause ?? err);
  }
  return db;
}
