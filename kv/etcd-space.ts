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
  /** Hears of every change the watch brings (a record another node wrote or deleted). */
  onChange?: (key: string, value: T | undefined) => void;

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
        const key = e.key.slice(this.#prefix.length);
        if (e.type === 'put') {
          const value = this.#seen(e.key, e.value, e.modRevision);
          if (value !== undefined) this.onChange?.(key, value);
        } else {
          const had = this.#copy.get(key);
          if (had && had.revision > e.modRevision) return;
          this.#copy.delete(key);
          this.onChange?.(key, undefined);
        }
      },
      this.#stop.signal,
      onWatchError,
    );
  }

  stop(): void {
    this.#stop.abort();
  }

  /** Keeps a record read or written at `revision`, unless a newer one is known; returns it if kept. */
  #seen(fullKey: string, bytes: Uint8Array, revision: number): T | undefined {
    const key = fullKey.slice(this.#prefix.length);
    const had = this.#copy.get(key);
    if (had && had.revision >= revision) return undefined;
    try {
      const value = this.#codec.decode(bytes, fullKey);
      this.#copy.set(key, { value, revision });
      return value;
    } catch {
      return undefined; // a record this version cannot read stays out of the copy
    }
  }

  /** A write made elsewhere (a compare-and-swap) at `revision`, for the copy. */
  remember(key: string, bytes: Uint8Array, revision: number): void {
    this.#seen(this.#prefix + key, bytes, revision);
  }

  forget(key: string): void {
    this.#copy.delete(key);
  }

  /** The record as last seen, not copied (the caller must not change it); never a request. */
  peek(key: string): T | undefined {
    return this.#copy.get(key)?.value;
  }

  get(key: string): Promise<T | undefined> {
    const hit = this.#copy.get(key);
    return Promise.resolve(hit ? structuredClone(hit.value) : undefined);
  }

  async put(key: string, value: T): Promise<void> {
    const bytes = this.#codec.encode(value);
    this.remember(key, bytes, await this.#etcd.put(this.#prefix + key, Buffer.from(bytes)));
  }

  async del(key: string): Promise<void> {
    await this.#etcd.delete(this.#prefix + key);
    this.#copy.delete(key);
  }

  /** Every record as last seen, by key, not copied (the caller must not change them). */
  peekAll(): Map<string, T> {
    return new Map([...this.#copy].map(([key, { value }]) => [key, value]));
  }

  entries(): Promise<Array<[string, T]>> {
    return Promise.resolve(
      [...this.#copy.entries()]
        .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
        .map(([key, { value }]) => [key, structuredClone(value)]),
    );
  }
}
