import { CorralError } from '../common/errors.ts';
import type { EtcdClient } from '../kv/etcd.ts';
import { EtcdSpace } from '../kv/etcd-space.ts';
import type { KeySpace } from '../kv/kv.ts';
import { volumeCodec, type VolumeRecord } from '../kv/spaces.ts';

/**
 * Where volume records live: the host's LevelDB when the daemon runs alone,
 * etcd in a cluster (every node sees every volume). Everything that changes
 * a record goes through `update`, which applies a change to the record as
 * it is now — one at a time on one host, compare-and-swap in etcd — so two
 * writers never lose each other's change.
 */
export interface VolumeRecords {
  readonly shared: boolean;
  get(name: string): Promise<VolumeRecord | undefined>;
  entries(): Promise<Array<[string, VolumeRecord]>>;
  /** Stores a new record; ALREADY_EXISTS when the name is taken (anywhere in the cluster). */
  create(record: VolumeRecord): Promise<void>;
  /**
   * Applies `change` to the current record and stores it; undefined when
   * there is no record. `change` may throw to store nothing (it may be
   * called again, on a newer record, when another writer came first).
   */
  update(name: string, change: (record: VolumeRecord) => void): Promise<VolumeRecord | undefined>;
  del(name: string): Promise<void>;
  /**
   * The record as last seen, for loops that look often (the repair loop):
   * in etcd kept current by a watch, so that looking costs no request.
   */
  cached(name: string): Promise<VolumeRecord | undefined>;
  /** Every record as last seen (etcd: no request; the watch keeps them current). */
  cachedEntries(): Promise<Array<[string, VolumeRecord]>>;
  /** Hears of every change to a record, made here or on another node (etcd only). */
  onChange?: (name: string, record: VolumeRecord | undefined) => void;
}

/** The single-host store: this host's LevelDB. */
export class LocalVolumeRecords implements VolumeRecords {
  readonly shared = false;
  readonly #space: KeySpace<VolumeRecord>;
  readonly #updates = new Map<string, Promise<unknown>>();
  /**
   * Records as last read or written here, for `cached`: the repair loop looks
   * at every volume every second, and a LevelDB read and JSON decode per
   * volume was most of what 100 idle volumes cost. This host is the only
   * writer of its LevelDB records, so the copy never goes stale.
   */
  readonly #seen = new Map<string, VolumeRecord>();

  constructor(space: KeySpace<VolumeRecord>) {
    this.#space = space;
  }

  get(name: string): Promise<VolumeRecord | undefined> {
    return this.#space.get(name);
  }

  entries(): Promise<Array<[string, VolumeRecord]>> {
    return this.#space.entries();
  }

  create(record: VolumeRecord): Promise<void> {
    return this.#one(record.name, async () => {
      if (await this.#space.get(record.name))
        throw new CorralError('ALREADY_EXISTS', `Volume ${record.name} already exists`);
      await this.#space.put(record.name, record);
      this.#seen.set(record.name, record);
    });
  }

  update(name: string, change: (record: VolumeRecord) => void): Promise<VolumeRecord | undefined> {
    return this.#one(name, async () => {
      const record = await this.#space.get(name);
      if (!record) return undefined;
      change(record);
      await this.#space.put(name, record);
      this.#seen.set(name, record);
      return record;
    });
  }

  del(name: string): Promise<void> {
    return this.#one(name, async () => {
      await this.#space.del(name);
      this.#seen.delete(name);
    });
  }

  async cached(name: string): Promise<VolumeRecord | undefined> {
    const seen = this.#seen.get(name);
    if (seen) return seen;
    const record = await this.#space.get(name);
    // Not while a write is queued: its outcome is what `cached` must show next.
    if (record && !this.#updates.has(name)) this.#seen.set(name, record);
    return record;
  }

  cachedEntries(): Promise<Array<[string, VolumeRecord]>> {
    return this.#space.entries();
  }

  #one<T>(name: string, fn: () => Promise<T>): Promise<T> {
    const next = (this.#updates.get(name) ?? Promise.resolve()).then(fn);
    const settled = next.catch(() => undefined);
    this.#updates.set(name, settled);
    void settled.then(() => {
      if (this.#updates.get(name) === settled) this.#updates.delete(name);
    });
    return next;
  }
}

/** etcd key of a volume's record (docs/ARCHITECTURE.md, "Cluster state in etcd"). */
export const VOLUMES_PREFIX = '/corral/volumes/';

/**
 * The cluster store: one key per volume in etcd, changed by compare-and-swap.
 * A watch on the prefix keeps a copy of every record here (`cached`,
 * kv/etcd-space.ts) and tells this node when another one changed a record
 * it cares about.
 */
export class EtcdVolumeRecords implements VolumeRecords {
  readonly shared = true;
  readonly #etcd: EtcdClient;
  readonly #copy: EtcdSpace<VolumeRecord>;
  onChange?: (name: string, record: VolumeRecord | undefined) => void;

  constructor(etcd: EtcdClient) {
    this.#etcd = etcd;
    this.#copy = new EtcdSpace(etcd, VOLUMES_PREFIX, volumeCodec);
    this.#copy.onChange = (name, record) => this.onChange?.(name, record);
  }

  /** Loads every record and follows changes from then on. */
  start(onWatchError: (err: Error) => void): Promise<void> {
    return this.#copy.start(onWatchError);
  }

  stop(): void {
    this.#copy.stop();
  }

  async cached(name: string): Promise<VolumeRecord | undefined> {
    return (await this.#copy.get(name)) ?? this.get(name);
  }

  /** The record as the watch last showed it, or undefined: never a request. */
  peek(name: string): VolumeRecord | undefined {
    return this.#copy.peek(name);
  }

  cachedEntries(): Promise<Array<[string, VolumeRecord]>> {
    return this.#copy.entries();
  }

  async get(name: string): Promise<VolumeRecord | undefined> {
    const kv = await this.#etcd.get(VOLUMES_PREFIX + name);
    if (!kv) return undefined;
    this.#copy.remember(name, kv.value, kv.modRevision);
    return volumeCodec.decode(kv.value, kv.key);
  }

  async entries(): Promise<Array<[string, VolumeRecord]>> {
    const kvs = await this.#etcd.range(VOLUMES_PREFIX);
    return kvs.map((kv) => {
      const record = volumeCodec.decode(kv.value, kv.key);
      return [record.name, record];
    });
  }

  async create(record: VolumeRecord): Promise<void> {
    const key = VOLUMES_PREFIX + record.name;
    const value = Buffer.from(volumeCodec.encode(record));
    const { ok, revision } = await this.#etcd.txn([{ key, modRevision: 0 }], [{ put: key, value }]);
    if (!ok) throw new CorralError('ALREADY_EXISTS', `Volume ${record.name} already exists`);
    this.#copy.remember(record.name, value, revision);
  }

  async update(
    name: string,
    change: (record: VolumeRecord) => void,
  ): Promise<VolumeRecord | undefined> {
    const key = VOLUMES_PREFIX + name;
    for (;;) {
      const kv = await this.#etcd.get(key);
      if (!kv) return undefined;
      const record = volumeCodec.decode(kv.value, kv.key);
      change(record);
      const value = Buffer.from(volumeCodec.encode(record));
      const { ok, revision } = await this.#etcd.txn(
        [{ key, modRevision: kv.modRevision }],
        [{ put: key, value }],
      );
      if (ok) {
        this.#copy.remember(name, value, revision);
        return record;
      }
      // Another writer came first: apply the change to what it stored.
    }
  }

  async del(name: string): Promise<void> {
    await this.#etcd.delete(VOLUMES_PREFIX + name);
    this.#copy.forget(name);
  }
}
