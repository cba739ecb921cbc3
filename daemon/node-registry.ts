import { CorralError } from '../common/errors.ts';
import type { RecordCodec } from '../kv/codec.ts';
import type { EtcdClient } from '../kv/etcd.ts';
import { EtcdSpace } from '../kv/etcd-space.ts';
import type { NodeInfo } from './node-info.ts';

/** A node's lasting record: where it is, whether it takes new work. */
interface NodeRecord {
  name: string;
  url: string;
  registeredAt: string;
  cordoned?: boolean;
}

/** What a live node says of itself, under its lease: gone when the node is. */
interface AliveRecord {
  url: string;
  totalBytes: number;
  freeBytes: number;
  replicas: number;
  version?: string;
  since: string;
}

/** A node's records are plain JSON (no version field: they live only as long as the cluster). */
function jsonRecord<T>(name: string): RecordCodec<T> {
  return {
    name,
    encode: (value) => Buffer.from(JSON.stringify(value)),
    decode: (bytes) => JSON.parse(Buffer.from(bytes).toString()) as T,
  };
}

/** etcd keys (docs/ARCHITECTURE.md, "Cluster state in etcd"). */
export const NODES_PREFIX = '/corral/nodes/';
export const ALIVE_PREFIX = '/corral/alive/';

/** Free space is written again when it moved by more than this share of the disk. */
const FREE_SPACE_STEP = 0.01;

export interface NodeRegistryOptions {
  etcd: EtcdClient;
  name: string;
  /** A node whose lease is not renewed for this long is down. */
  ttlMs: number;
  /** This node as it reports itself (free space, replicas). */
  status: () => Promise<Omit<NodeInfo, 'state'>>;
  /** Hears of failures to renew the lease (etcd away): the node stays up as long as etcd lets it. */
  onError?: (err: Error) => void;
}

/**
 * This node's entry in the cluster: a record that stays, and an "alive" key
 * under an etcd lease that this node renews every third of its TTL. A node
 * is up while its alive key exists; etcd deletes the key when the lease
 * expires, so a dead node goes down within the TTL without anyone polling.
 * An idle node costs etcd one keep-alive per TTL/3 and a status write when
 * its free space moves.
 */
export class NodeRegistry {
  readonly #o: NodeRegistryOptions;
  #lease: string | undefined;
  #url = '';
  #lastFree = -1;
  #timer: ReturnType<typeof setInterval> | undefined;
  #renewing = false;
  /** The registry as the watches last told it (`follow`): placement reads it without a request. */
  #cache: { records: EtcdSpace<NodeRecord>; alive: EtcdSpace<AliveRecord> } | undefined;

  constructor(options: NodeRegistryOptions) {
    this.#o = options;
  }

  get name(): string {
    return this.#o.name;
  }

  get ttlMs(): number {
    return this.#o.ttlMs;
  }

  /** Registers this node at `url` and keeps it alive until `stop`. */
  async start(url: string): Promise<void> {
    this.#url = url;
    const key = NODES_PREFIX + this.#o.name;
    const existing = await this.#o.etcd.get(key);
    const before = existing ? (JSON.parse(existing.value.toString()) as NodeRecord) : undefined;
    const record: NodeRecord = {
      name: this.#o.name,
      url,
      registeredAt: before?.registeredAt ?? new Date().toISOString(),
      ...(before?.cordoned ? { cordoned: true } : {}),
    };
    await this.#o.etcd.put(key, JSON.stringify(record));
    await this.#announce();
    const every = Math.max(200, Math.floor(this.#o.ttlMs / 3));
    this.#timer = setInterval(() => void this.#renew(), every);
  }

  async #announce(): Promise<void> {
    this.#lease = await this.#o.etcd.grantLease(Math.max(1, Math.ceil(this.#o.ttlMs / 1000)));
    await this.#putAlive();
  }

  async #putAlive(): Promise<void> {
    const s = await this.#o.status();
    const alive: AliveRecord = {
      url: this.#url,
      totalBytes: s.totalBytes,
      freeBytes: s.freeBytes,
      replicas: s.replicas,
      ...(s.version !== undefined ? { version: s.version } : {}),
      since: new Date().toISOString(),
    };
    await this.#o.etcd.put(ALIVE_PREFIX + this.#o.name, JSON.stringify(alive), this.#lease);
    this.#lastFree = s.freeBytes;
  }

  async #renew(): Promise<void> {
    if (this.#renewing || !this.#lease) return;
    this.#renewing = true;
    try {
      if (!(await this.#o.etcd.keepAlive(this.#lease))) {
        // Expired while etcd could not be reached (or it lost it): announce again.
        await this.#announce();
        return;
      }
      const s = await this.#o.status();
      if (Math.abs(s.freeBytes - this.#lastFree) > FREE_SPACE_STEP * s.totalBytes)
        await this.#putAlive();
    } catch (err) {
      this.#o.onError?.(err instanceof Error ? err : new Error(String(err)));
    } finally {
      this.#renewing = false;
    }
  }

  /** Every node ever registered, up or down, sorted by name, read from etcd now. */
  async nodes(): Promise<NodeInfo[]> {
    const [records, alive] = await Promise.all([
      this.#o.etcd.range(NODES_PREFIX),
      this.#o.etcd.range(ALIVE_PREFIX),
    ]);
    const up = new Map<string, AliveRecord>();
    for (const kv of alive)
      up.set(kv.key.slice(ALIVE_PREFIX.length), JSON.parse(kv.value.toString()) as AliveRecord);
    return NodeRegistry.#join(
      records.map((kv) => JSON.parse(kv.value.toString()) as NodeRecord),
      up,
    );
  }

  /**
   * The nodes as this node's watches have them (after `follow`): what
   * placement and forwarding read, so that neither costs etcd a request.
   * Falls back to `nodes()` before `follow`.
   */
  async cachedNodes(): Promise<NodeInfo[]> {
    const cache = this.#cache;
    if (!cache) return this.nodes();
    return NodeRegistry.#join(
      [...cache.records.peekAll().values()].sort((a, b) => (a.name < b.name ? -1 : 1)),
      cache.alive.peekAll(),
    );
  }

  static #join(records: NodeRecord[], up: Map<string, AliveRecord>): NodeInfo[] {
    return records.map((r) => {
      const a = up.get(r.name);
      return {
        id: r.name,
        name: r.name,
        url: a?.url ?? r.url,
        state: a ? 'up' : 'down',
        totalBytes: a?.totalBytes ?? 0,
        freeBytes: a?.freeBytes ?? 0,
        replicas: a?.replicas ?? 0,
        cordoned: r.cordoned === true,
        ...(a?.version !== undefined ? { version: a.version } : {}),
      };
    });
  }

  /** Whether a node takes new replicas and engines. */
  async setCordoned(name: string, cordoned: boolean): Promise<void> {
    const key = NODES_PREFIX + name;
    for (;;) {
      const kv = await this.#o.etcd.get(key);
      if (!kv) throw new CorralError('NOT_FOUND', `No node named ${name} in the cluster`);
      const r = JSON.parse(kv.value.toString()) as NodeRecord;
      const next: NodeRecord = { ...r };
      if (cordoned) next.cordoned = true;
      else delete next.cordoned;
      const { ok } = await this.#o.etcd.txn(
        [{ key, modRevision: kv.modRevision }],
        [{ put: key, value: JSON.stringify(next) }],
      );
      if (ok) return;
    }
  }

  /**
   * Follows the registry: keeps the nodes and their alive keys from two
   * watches (`cachedNodes`), and tells `onDown` of every node whose alive
   * key goes (its lease expired, or it stopped and gave its lease back) as
   * etcd sees it happen: no node polls another.
   */
  async follow(onDown: (name: string) => void, onError: (err: Error) => void): Promise<void> {
    const cache = {
      records: new EtcdSpace(this.#o.etcd, NODES_PREFIX, jsonRecord<NodeRecord>('node')),
      alive: new EtcdSpace(this.#o.etcd, ALIVE_PREFIX, jsonRecord<AliveRecord>('alive node')),
    };
    cache.alive.onChange = (name, alive) => {
      if (alive === undefined) onDown(name);
    };
    await Promise.all([cache.records.start(onError), cache.alive.start(onError)]);
    this.#cache = cache;
  }

  /** Stops renewing and gives the lease back: the node is down at once. */
  async stop(): Promise<void> {
    this.#cache?.records.stop();
    this.#cache?.alive.stop();
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = undefined;
    if (this.#lease) await this.#o.etcd.revokeLease(this.#lease);
    this.#lease = undefined;
  }
}
