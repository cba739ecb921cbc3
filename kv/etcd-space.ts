import type { RecordCodec } from './codec.ts';
import type { EtcdClient } from './etcd.ts';

/**
 * Records under one etcd prefix, kept here by a watch: reads cost etcd no
 * request (a loop that looks every second, like the job scheduler, stays
 * free for an idle node), writes go to etcd and into the copy at once. The
 * same get/put/del/entries as a LevelDB key space, for stores that move
 * into etcd when the daemon runs in a cluster.
 */
export class EtcdSpace<T> {
  readonly #etcd: EtcdClient;
  readonly #prefix: string;
  readonly #codec: RecordCodec<T>;
  readonly #copy = new Map<string, { value: T; revision: number }>();
  readonly #stop = new AbortController();

  constructor(etcd: EtcdClient, prefix: string, codec: RecordCodec<T>) {
    this.#etcd = etcd;
    this.#prefix = prefix;
    this.#codec = codec;
  }

  /** Loads every record and follows changes from then on. */
  async start(onWatchError: (err: Error) => void): Promise<void> {
    const { kvs, revision } = await this.#etcd.snapshot(this.#prefix);
    for (const kv of kvs) this.#seen(kv.key, kv.value, kv.modRevision);
    this.#etcd.watch(
      this.#prefix,
      revision + 1,
      (e) => {
        if (e.type === 'put') this.#seen(e.key, e.value, e.modRevision);
        else {
          const key = e.key.slice(this.#prefix.length);
          const had = this.#copy.get(key);
          if (!had || had.revision < e.modRevision) this.#copy.delete(key);
        }
      },
      this.#stop.signal,
      onWatchError,
    );
  }

  stop(): void {
    this.#stop.abort();
  }

  #seen(fullKey: string, bytes: Uint8Array, revision: number): void {
    const key = fullKey.slice(this.#prefix.length);
    const had = this.#copy.get(key);
    if (had && had.revision >= revision) return;
    try {
      this.#copy.set(key, { value: this.#codec.decode(bytes, fullKey), revision });
    } catch {
      // A record this version cannot read stays out of the copy.
    }
  }

  get(key: string): Promise<T | undefined> {
    const hit = this.#copy.get(key);
    return Promise.resolve(hit ? structuredClone(hit.value) : undefined);
  }

  async put(key: string, value: T): Promise<void> {
    const bytes = this.#codec.encode(value);
    const revision = await this.#etcd.put(this.#prefix + key, Buffer.from(bytes));
    this.#seen(this.#prefix + key, bytes, revision);
  }

  async del(key: string): Promise<void> {
    await this.#etcd.delete(this.#prefix + key);
    this.#copy.delete(key);
  }

  entries(): Promise<Array<[string, T]>> {
    return Promise.resolve(
      [...this.#copy.entries()]
        .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
        .map(([key, { value }]) => [key, structuredClone(value)]),
    );
  }
}
