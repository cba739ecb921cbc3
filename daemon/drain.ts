import type { Clock } from '../common/clock.ts';
import { CorralError } from '../common/errors.ts';
import type { VolumeRecord } from '../kv/spaces.ts';
import type { Cluster } from './cluster.ts';
import type { NodeInfo } from './node-info.ts';
import type { Operation, OperationProgress, Operations } from './operations.ts';
import type { VolumeRecords } from './volume-records.ts';

export interface DrainResult {
  /** Volumes whose engine moved off the node. */
  enginesMoved: string[];
  /** Volumes whose replica on the node was rebuilt elsewhere. */
  replicasMoved: string[];
  /** Replicas left: of detached volumes (nothing rebuilds them), or that could not move. */
  left: Array<{ volume: string; why: string }>;
}

export interface DrainerOptions {
  cluster: Cluster;
  records: VolumeRecords;
  operations: Operations;
  clock: Clock;
  /** Attaches a volume on a node (a planned move when it runs elsewhere). */
  attach: (volume: string, node: string) => Promise<unknown>;
}

/** How long one volume may take to be whole again after its replica on the node was taken out. */
const REBUILD_DEADLINE_MS = 30 * 60_000;

/**
 * `corral node drain N`, e.g. before an upgrade: the node is cordoned (no
 * new replicas or engines), every engine it runs moves to another node
 * that holds a replica of the volume (a planned move), then its replicas
 * go one volume at a time — the engine takes the replica out and its
 * repair loop builds a new one on another node — waiting for each volume
 * to be whole again before the next, so that no volume is ever short of
 * more than that one replica.
 */
export class Drainer {
  readonly #o: DrainerOptions;

  constructor(options: DrainerOptions) {
    this.#o = options;
  }

  start(node: string): { operation: Operation; done: Promise<DrainResult> } {
    return this.#o.operations.start(
      'drain',
      `node ${node}`,
      undefined,
      (update) => this.#drain(node, update),
      (r) =>
        `${r.enginesMoved.length} engines and ${r.replicasMoved.length} replicas moved off ${node}` +
        (r.left.length ? `; ${r.left.length} replicas left` : ''),
    );
  }

  async #drain(node: string, update: (p: OperationProgress) => void): Promise<DrainResult> {
    const cluster = this.#o.cluster;
    const registry = cluster.registry;
    if (!registry)
      throw new CorralError(
        'INVALID_ARGUMENT',
        'Draining needs a cluster: start the daemons with --etcd',
      );
    const nodes = await cluster.nodes();
    if (!nodes.some((n) => n.name === node))
      throw new CorralError('NOT_FOUND', `No node named ${node} in the cluster`);
    await registry.setCordoned(node, true);
    const result: DrainResult = { enginesMoved: [], replicasMoved: [], left: [] };
    const records = (await this.#o.records.entries()).map(([, r]) => r);
    const engines = records.filter((r) => r.attached && r.engineNode === node);
    const holding = records.filter((r) => (r.remoteReplicas ?? []).some((x) => x.node === node));
    const total = engines.length + holding.length;
    let done = 0;
    const step = (phase: string) => update({ phase, done: ++done, total, bytes: 0 });
    update({ phase: 'engines', done, total, bytes: 0 });

    for (const record of engines) {
      const up = new Map((await cluster.nodes()).map((n) => [n.name, n]));
      const heir = this.#heir(record, node, up);
      if (!heir) {
        result.left.push({ volume: record.name, why: 'no other node that is up holds a replica' });
        step('engines');
        continue;
      }
      await this.#o.attach(record.name, heir);
      result.enginesMoved.push(record.name);
      step('engines');
    }

    for (const stale of holding) {
      const record = await this.#o.records.get(stale.name);
      const replica = (record?.remoteReplicas ?? []).find((x) => x.node === node);
      if (!record || !replica) {
        step('replicas');
        continue;
      }
      const engine = record.attached
        ? (await cluster.nodes()).find((n) => n.name === record.engineNode && n.state === 'up')
        : undefined;
      if (!engine) {
        result.left.push({
          volume: record.name,
          why: record.attached
            ? `its engine's node ${record.engineNode ?? '?'} is down`
            : 'it is detached: attach it, and drain again, to move its replica',
        });
        step('replicas');
        continue;
      }
      const path = `/v1/volumes/${encodeURIComponent(record.name)}`;
      await cluster.call(
        engine.url,
        'DELETE',
        `${path}/replicas/${encodeURIComponent(replica.id)}`,
      );
      await this.#whole(engine.url, path, record, replica.id);
      result.replicasMoved.push(record.name);
      step('replicas');
    }
    return result;
  }

  /** The node a volume's engine moves to: up, not cordoned, holding a replica, first by name. */
  #heir(record: VolumeRecord, leaving: string, nodes: Map<string | undefined, NodeInfo>) {
    return (record.remoteReplicas ?? [])
      .map((r) => r.node)
      .filter((n): n is string => {
        const info = nodes.get(n);
        return n !== undefined && n !== leaving && info?.state === 'up' && !info.cordoned;
      })
      .sort()[0];
  }

  /** Waits until the volume has its replicas again, all healthy, without the one taken out. */
  async #whole(url: string, path: string, record: VolumeRecord, gone: string): Promise<void> {
    const until = this.#o.clock.nowMs() + REBUILD_DEADLINE_MS;
    for (;;) {
      const v = await this.#o.cluster.call<{ replicas: Array<{ id: string; mode: string }> }>(
        url,
        'GET',
        path,
      );
      const rw = v.replicas.filter((r) => r.mode === 'RW' && r.id !== gone);
      if (rw.length >= record.replicaCount) return;
      if (this.#o.clock.nowMs() > until)
        throw new CorralError(
          'IO_ERROR',
          `Volume ${record.name} has ${rw.length} of ${record.replicaCount} healthy replicas after ${REBUILD_DEADLINE_MS / 60_000} minutes; the drain stops here`,
        );
      await this.#o.clock.sleep(500);
    }
  }
}
