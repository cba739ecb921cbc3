import { CorralError } from '../common/errors.ts';
import type { EtcdClient } from '../kv/etcd.ts';
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
    });
  }

  update(name: string, change: (record: VolumeRecord) => void): Promise<VolumeRecord | undefined> {
    return this.#one(name, async () => {
      const record = await this.#space.get(name);
      if (!record) return undefined;
      change(record);
      await this.#space.put(name, record);
      return record;
    });
  }

  del(name: string): Promise<void> {
    return this.#one(name, () => this.#space.del(name));
  }

  cached(name: string): Promise<VolumeRecord | undefined> {
    return this.#space.get(name);
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
 * A watch on the prefix keeps a copy of every record here (`cached`) and
 * tells this node when another one changed a record it cares about.
 */
export class EtcdVolumeRecords implements VolumeRecords {
  readonly shared = true;
  readonly #etcd: EtcdClient;
  readonly #cache = new Map<string, { record: VolumeRecord; revision: number }>();
  readonly #stop = new AbortController();
  onChange?: (name: string, record: VolumeRecord | undefined) => void;

  constructor(etcd: EtcdClient) {
    this.#etcd = etcd;
  }

  /** Loads every record and follows changes from then on. */
  async start(onWatchError: (err: Error) => void): Promise<void> {
    const { kvs, revision } = await this.#etcd.snapshot(VOLUMES_PREFIX);
    for (const kv of kvs) this.#seen(kv.key, kv.value, kv.modRevision);
    this.#etcd.watch(
      VOLUMES_PREFIX,
      revision + 1,
      (e) => {
        const name = e.key.slice(VOLUMES_PREFIX.length);
        if (e.type === 'delete') {
          const had = this.#cache.get(name);
          if (had && had.revision > e.modRevision) return;
          this.#cache.delete(name);
          this.onChange?.(name, undefined);
        } else {
          const record = this.#seen(e.key, e.value, e.modRevision);
          if (record) this.onChange?.(name, record);
        }
      },
      this.#stop.signal,
      onWatchError,
    );
  }

  stop(): void {
    this.#stop.abort();
  }

  /** Keeps a record read or written at `revision`, unless a newer one is known. */
  #seen(key: string, value: Buffer, revision: number): VolumeRecord | undefined {
    let record: VolumeRecord;
    try {
      record = this.#decode(key, value);
    } catch {
      return undefined; // a record this version cannot read: `get` says why
    }
    const had = this.#cache.get(record.name);
    if (had && had.revision >= revision) return undefined;
    this.#cache.set(record.name, { record, revision });
    return record;
  }

  async cached(name: string): Promise<VolumeRecord | undefined> {
    const hit = this.#cache.get(name);
    return hit ? structuredClone(hit.record) : this.get(name);
  }

  /** The record as the watch last showed it, or undefined: never a request. */
  peek(name: string): VolumeRecord | undefined {
    return this.#cache.get(name)?.record;
  }

  cachedEntries(): Promise<Array<[string, VolumeRecord]>> {
    return Promise.resolve(
      [...this.#cache.values()].map(({ record }) => [record.name, structuredClone(record)]),
    );
  }

  #decode(key: string, value: Buffer): VolumeRecord {
    return volumeCodec.decode(value, key);
  }

  async get(name: string): Promise<VolumeRecord | undefined> {
    const kv = await this.#etcd.get(VOLUMES_PREFIX + name);
    if (!kv) return undefined;
    this.#seen(kv.key, kv.value, kv.modRevision);
    return this.#decode(kv.key, kv.value);
  }

  async entries(): Promise<Array<[string, VolumeRecord]>> {
    const kvs = await this.#etcd.range(VOLUMES_PREFIX);
    return kvs.map((kv) => {
      const record = this.#decode(kv.key, kv.value);
      return [record.name, record];
    });
  }

  async create(record: VolumeRecord): Promise<void> {
    const key = VOLUMES_PREFIX + record.name;
    const value = Buffer.from(volumeCodec.encode(record));
    const { ok, revision } = await this.#etcd.txn([{ key, modRevision: 0 }], [{ put: key, value }]);
    if (!ok) throw new CorralError('ALREADY_EXISTS', `Volume ${record.name} already exists`);
    this.#seen(key, value, revision);
  }

  async update(
    name: string,
    change: (record: VolumeRecord) => void,
  ): Promise<VolumeRecord | undefined> {
    const key = VOLUMES_PREFIX + name;
    for (;;) {
      const kv = await this.#etcd.get(key);
      if (!kv) return undefined;
      const record = this.#decode(kv.key, kv.value);
      change(record);
      const value = Buffer.from(volumeCodec.encode(record));
      const { ok, revision } = await this.#etcd.txn(
        [{ key, modRevision: kv.modRevision }],
        [{ put: key, value }],
      );
      if (ok) {
        this.#seen(key, value, revision);
        return record;
      }
      // Another writer came first: apply the change to what it stored.
    }
  }

  async del(name: string): Promise<void> {
    await this.#etcd.delete(VOLUMES_PREFIX + name);
    this.#cache.delete(name);
  }
}
