export interface DaemonEvent {
  id: number;
  time: string;
  type: string;
  volume?: string;
  message: string;
  /** In a cluster: the node that recorded it. */
  node?: string;
}

/** Recent events, newest last; bounded so that a flapping replica cannot grow memory. */
export class EventLog {
  readonly #events: DaemonEvent[] = [];
  readonly #limit: number;
  #next = 1;
  /** Hears of every event as it is added (a cluster also keeps a volume's events in etcd). */
  onAdd?: (event: DaemonEvent) => void;
  /** Followers (`events --follow`): each hears every event from the time it subscribed. */
  readonly #followers = new Set<(event: DaemonEvent) => void>();

  constructor(limit = 1000) {
    this.#limit = limit;
  }

  add(event: Omit<DaemonEvent, 'id' | 'time'>): DaemonEvent {
    const full = { id: this.#next++, time: new Date().toISOString(), ...event };
    this.#events.push(full);
    if (this.#events.length > this.#limit) this.#events.shift();
    this.onAdd?.(full);
    for (const f of this.#followers) f(full);
    return full;
  }

  /** Calls `f` with every event added from now on; the returned function stops it. */
  follow(f: (event: DaemonEvent) => void): () => void {
    this.#followers.add(f);
    return () => this.#followers.delete(f);
  }

  list(options?: { volume?: string; sinceId?: number }): DaemonEvent[] {
    return this.#events.filter(
      (e) =>
        (options?.volume === undefined || e.volume === options.volume) &&
        (options?.sinceId === undefined || e.id > options.sinceId),
    );
  }
}
