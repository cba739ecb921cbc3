import type { EtcdClient } from '../kv/etcd.ts';
import type { DaemonEvent } from './events.ts';

/** etcd keys of a volume's events (docs/ARCHITECTURE.md, "Cluster state in etcd"). */
export const EVENTS_PREFIX = '/corral/events/';

/** How long a volume's events stay in etcd: a lease per node and hour, of this many seconds. */
const KEEP_SECONDS = 24 * 3600;

/**
 * A volume's events, seen from any node: each node also writes the events
 * that name a volume to etcd, under a lease that ends a day later, so that
 * `corral events --volume V` shows the takeover recorded on one node, the
 * release on another and the rebuild on a third. Writing is best effort
 * (an event is never worth failing an operation, and etcd may be away).
 */
export class ClusterEvents {
  readonly #etcd: EtcdClient;
  readonly #node: string;
  #lease: { id: string; hour: number } | undefined;

  constructor(etcd: EtcdClient, node: string) {
    this.#etcd = etcd;
    this.#node = node;
  }

  publish(event: DaemonEvent): void {
    if (event.volume === undefined) return;
    const key = `${EVENTS_PREFIX}${event.volume}/${event.time}-${this.#node}-${event.id}`;
    void this.#leaseNow()
      .then((lease) => this.#etcd.put(key, JSON.stringify({ ...event, node: this.#node }), lease))
      .catch(() => undefined);
  }

  /** A lease per hour: the events of an hour go together, a day later. */
  async #leaseNow(): Promise<string> {
    const hour = Math.floor(Date.now() / 3_600_000);
    if (this.#lease?.hour !== hour)
      this.#lease = { id: await this.#etcd.grantLease(KEEP_SECONDS), hour };
    return this.#lease.id;
  }

  /** Every node's events of a volume, oldest first. */
  async list(volume: string): Promise<DaemonEvent[]> {
    const kvs = await this.#etcd.range(`${EVENTS_PREFIX}${volume}/`);
    return kvs.map((kv) => JSON.parse(kv.value.toString()) as DaemonEvent);
  }
}
