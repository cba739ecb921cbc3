import type { Cluster } from './cluster.ts';
import type { EventLog } from './events.ts';
import type { VolumeRecords } from './volume-records.ts';

/**
 * What happens when a node dies, in a cluster: its lease ends, every node's
 * watch hears it (node-registry.ts), and each volume with `--failover auto`
 * whose engine ran there is attached again on a surviving node that holds
 * one of its replicas. The attach itself — the claim with a newer epoch,
 * the fencing of the old engine — is `VolumeManager.attach`
 * (docs/ARCHITECTURE.md, "Engine ownership and fencing").
 */
export class Failover {
  readonly #o: {
    nodeName: string;
    cluster: Cluster;
    records: VolumeRecords;
    events: EventLog;
    attach: (volume: string) => Promise<unknown>;
  };

  constructor(options: {
    nodeName: string;
    cluster: Cluster;
    records: VolumeRecords;
    events: EventLog;
    attach: (volume: string) => Promise<unknown>;
  }) {
    this.#o = options;
  }

  /**
   * A node went down (its lease expired): the volumes with `--failover auto`
   * whose engine it ran are attached on a surviving node that holds a
   * replica — the first such node by name, so that exactly one tries (and
   * the claim's compare-and-swap settles any race). Looks at the records
   * this node keeps from its watch: no request per volume.
   */
  async nodeDown(node: string): Promise<void> {
    if (node === this.#o.nodeName) return;
    const candidates = (await this.#o.records.cachedEntries()).filter(
      ([, r]) => r.failover === 'auto' && r.attached && r.engineNode === node,
    );
    if (candidates.length === 0) return;
    const nodes = await this.#o.cluster.nodes({ cached: true });
    const up = new Set(
      nodes.filter((n) => n.state === 'up' && !n.cordoned && n.name !== node).map((n) => n.name),
    );
    for (const [name, record] of candidates) {
      const heir = (record.remoteReplicas ?? [])
        .map((r) => r.node)
        .filter((n): n is string => n !== undefined && up.has(n))
        .sort()[0];
      if (heir !== this.#o.nodeName) continue;
      this.#o.events.add({
        type: 'failover-started',
        volume: name,
        message: `node ${node} is down: ${heir} takes the volume over`,
      });
      await this.#o.attach(name).catch((err: unknown) =>
        this.#o.events.add({
          type: 'failover-failed',
          volume: name,
          message: err instanceof Error ? err.message : String(err),
        }),
      );
    }
  }

  /** Behind the node watch, a slow sweep: a failover missed while this node was busy or away. */
  async sweep(): Promise<void> {
    const owners = new Set(
      (await this.#o.records.cachedEntries())
        .filter(([, r]) => r.failover === 'auto' && r.attached && r.engineNode !== this.#o.nodeName)
        .map(([, r]) => r.engineNode),
    );
    if (owners.size === 0) return;
    for (const n of await this.#o.cluster.nodes({ cached: true }))
      if (n.state === 'down' && n.name !== undefined && owners.has(n.name))
        await this.nodeDown(n.name);
  }
}
