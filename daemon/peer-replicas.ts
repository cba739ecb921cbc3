import type { Clock } from '../common/clock.ts';
import { CorralError } from '../common/errors.ts';
import type { Spaces } from '../kv/spaces.ts';
import type { Cluster } from './cluster.ts';
import type { EventLog } from './events.ts';

/** A replica kept on another node: its id there, where the node was, and (in a cluster) its name. */
export interface PeerReplica {
  id: string;
  url: string;
  node?: string;
}

/**
 * Replicas this node's volumes keep on other nodes: made there, and
 * removed there — or, when the node does not answer, written down and
 * removed when it does, so that its space comes back.
 */
export class PeerReplicas {
  readonly #o: { spaces: Spaces; cluster: Cluster | undefined; clock: Clock; events: EventLog };

  constructor(options: {
    spaces: Spaces;
    cluster: Cluster | undefined;
    clock: Clock;
    events: EventLog;
  }) {
    this.#o = options;
  }

  /** Makes an empty replica of `volume` on the node at `url`, for an engine of `epoch` here. */
  async create(
    url: string,
    volume: string,
    sizeBytes: number,
    epoch: number,
    diskTag?: string,
  ): Promise<string> {
    const cluster = this.#o.cluster!;
    const { id } = await cluster.call<{ id: string }>(url, 'POST', '/v1/replicas', {
      volume,
      sizeBytes,
      engine: cluster.selfUrl,
      epoch,
      ...(diskTag !== undefined ? { diskTag } : {}),
    });
    return id;
  }

  /** Deletes replicas on their nodes; one whose node does not answer is left for `retry`. */
  async remove(volume: string, remote: PeerReplica[]): Promise<void> {
    for (const r of remote) {
      try {
        await this.#delete(r);
      } catch (err) {
        await this.#o.spaces.leftovers.put(r.id, {
          ...r,
          volume,
          since: new Date(this.#o.clock.nowMs()).toISOString(),
        });
        this.#o.events.add({
          type: 'replica-left-behind',
          volume,
          message: `replica ${r.id} on ${r.node ?? r.url} could not be removed yet (it will be when its node answers): ${err instanceof Error ? err.message : String(err)}`,
        });
      }
    }
  }

  /** Deletes the replicas left behind whose nodes answer now. */
  async retry(): Promise<void> {
    for (const [id, r] of await this.#o.spaces.leftovers.entries()) {
      try {
        await this.#delete(r);
      } catch {
        continue; // still away
      }
      await this.#o.spaces.leftovers.del(id);
      this.#o.events.add({
        type: 'replica-removed',
        volume: r.volume,
        message: `replica ${id} on ${r.node ?? r.url}, left behind since ${r.since}`,
      });
    }
  }

  async #delete(r: PeerReplica): Promise<void> {
    const cluster = this.#o.cluster;
    // In a cluster a node may come back at another address: the registry knows where.
    const url =
      r.node !== undefined && cluster?.registry
        ? ((await cluster.nodes({ cached: true })).find((n) => n.name === r.node)?.url ?? r.url)
        : r.url;
    try {
      await cluster?.call(url, 'DELETE', `/v1/replicas/${encodeURIComponent(r.id)}`);
    } catch (err) {
      if (!(err instanceof CorralError && err.code === 'NOT_FOUND')) throw err;
    }
  }
}
