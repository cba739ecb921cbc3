import type { Clock } from '../common/clock.ts';
import { CorralError } from '../common/errors.ts';
import type { Spaces, VolumeRecord } from '../kv/spaces.ts';
import { Engine } from '../replication/engine.ts';
import { faultFilter, type FaultFilter } from '../replication/fault-filter.ts';
import { LocalReplica } from '../replication/local-replica.ts';
import { RemoteReplica } from '../replication/remote-replica.ts';
import type { Replica } from '../replication/replica.ts';
import type { SupervisedEngine } from '../replication/supervisor.ts';
import type { Cluster } from './cluster.ts';
import type { EventLog } from './events.ts';
import type { HostedReplicas } from './hosted.ts';
import type { NodeInfo } from './node-info.ts';
import type { VolumeRecords } from './volume-records.ts';

export interface EngineFactoryOptions {
  spaces: Spaces;
  replicaRoot: string;
  records: VolumeRecords;
  cluster: Cluster | undefined;
  clock: Clock;
  events: EventLog;
  /** A remote replica request unanswered this long sets the replica to ERR. */
  replicaTimeoutMs: number | undefined;
  /** Bytes per second a snapshot delete may copy; undefined for no limit. */
  mergeBytesPerSecond: number | undefined;
  faultInjection: boolean;
  /** In a cluster: this node's hosted replicas, which its own engines open in place. */
  hosted?: HostedReplicas;
  nodeName?: string;
}

/**
 * How a volume's engine is made from its record: its replicas opened (this
 * host's directly, the others through their nodes with the engine's epoch),
 * those that cannot be trusted set aside, and every replica failure
 * recorded — under the claim's epoch — before the request that found it
 * answers. The supervisor calls the starter again after an engine crash.
 */
export class EngineFactory {
  readonly #o: EngineFactoryOptions;

  constructor(options: EngineFactoryOptions) {
    this.#o = options;
  }

  get #shared(): boolean {
    return this.#o.records.shared;
  }

  /**
   * The function that starts (and restarts) the engine of `record`'s volume
   * for the claim of `epoch`; `fenced` says when a record no longer names
   * this engine.
   */
  starter(input: {
    record: VolumeRecord;
    epoch: number;
    fenced: (record: VolumeRecord) => CorralError | undefined;
    onFault: (fault: FaultFilter) => void;
  }): () => Promise<SupervisedEngine> {
    const { record, epoch, fenced } = input;
    return async (): Promise<SupervisedEngine> => {
      // Read afresh: a restarted engine must see replicas replaced since the attach.
      const rec = (await this.#o.records.get(record.name)) ?? record;
      const stale = fenced(rec);
      if (stale) throw stale;
      const replicas: Replica[] = [];
      const failed = new Map<Replica, string>();
      try {
        for (const id of rec.replicaIds) replicas.push(await this.openLocal(id));
      } catch (err) {
        for (const r of replicas) r.abandon();
        throw err;
      }
      const cluster = this.#o.cluster;
      if (cluster) {
        const urls = await this.replicaUrls(rec);
        const remote = await Promise.all(
          (rec.remoteReplicas ?? []).map((r, i) => this.openReplica(r, urls[i]!, epoch)),
        );
        for (const r of remote) {
          replicas.push(r);
          if (r instanceof RemoteReplica && r.failure !== undefined) failed.set(r, r.failure);
        }
      }
      for (const r of replicas) {
        if (rec.failedReplicas?.includes(r.id) && !failed.has(r))
          failed.set(r, 'it failed before and has not been rebuilt since');
      }
      // A stale engine must not write its view into the record: the claim's epoch is checked.
      const markFailed = async (id: string, isFailed: boolean): Promise<void> => {
        await this.#o.records.update(record.name, (rec) => {
          const stale = fenced(rec);
          if (stale) throw stale;
          const set = new Set(rec.failedReplicas ?? []);
          if (isFailed) set.add(id);
          else set.delete(id);
          rec.failedReplicas = [...set];
        });
      };
      // An expand cut off by a crash (the record is its commit point): the replicas that had
      // not grown yet grow now; one that cannot is not trusted.
      for (const r of replicas) {
        if (failed.has(r) || r.sizeBytes >= rec.sizeBytes) continue;
        try {
          await r.expand(rec.sizeBytes);
        } catch (err) {
          failed.set(r, `could not grow to ${rec.sizeBytes} bytes: ${String(err)}`);
        }
      }
      const engine = new Engine({
        volume: record.name,
        sizeBytes: rec.sizeBytes,
        replicas,
        failed,
        markFailed,
        onEvent: (e) =>
          this.#o.events.add({
            type: e.type,
            volume: e.volume,
            message: `replica ${e.replica}: ${e.message}`,
          }),
      });
      // Replicas that start in ERR (unreachable, behind, another chain) missed or will miss
      // writes: recorded before any I/O.
      for (const m of engine.replicaModes()) if (m.mode === 'ERR') await markFailed(m.id, true);
      if (!this.#o.faultInjection) return engine;
      const fault = faultFilter(engine);
      input.onFault(fault);
      return fault;
    };
  }

  /** Where each remote replica of a record is now: in a cluster, at its node's registered address. */
  async replicaUrls(rec: VolumeRecord): Promise<string[]> {
    const remote = rec.remoteReplicas ?? [];
    if (!this.#shared || !remote.some((r) => r.node)) return remote.map((r) => r.url);
    const nodes = await this.#o.cluster!.nodes({ cached: true }).catch(() => [] as NodeInfo[]);
    const at = new Map(nodes.map((n) => [n.name, n.url]));
    return remote.map((r) => (r.node !== undefined ? at.get(r.node) : undefined) ?? r.url);
  }

  /**
   * A replica of another host (or, in a cluster, of this node: opened in
   * place, reads stay local) for an engine of `epoch`. A replica that cannot
   * be reached comes back with its `failure` set, for the engine to start
   * it in ERR.
   */
  async openReplica(
    r: { id: string; node?: string },
    url: string,
    epoch: number,
  ): Promise<Replica> {
    if (r.node !== undefined && r.node === this.#o.nodeName)
      try {
        return await this.openOwn(r.id, epoch);
      } catch {
        // Refused or damaged: the connection says why, as for any replica.
      }
    return RemoteReplica.connect({
      url,
      id: r.id,
      secret: this.#o.cluster!.secret,
      ...(this.#o.cluster!.tls ? { tls: this.#o.cluster!.tls } : {}),
      epoch,
      timeoutMs: this.#o.replicaTimeoutMs ?? 5000,
      clock: this.#o.clock,
    });
  }

  /**
   * In a cluster, a replica this node hosts, for an engine of this node with
   * `epoch` (refused when a newer engine holds it; see HostedReplicas).
   */
  openOwn(id: string, epoch: number): Promise<LocalReplica> {
    const hosted = this.#o.hosted;
    if (!hosted) return this.openLocal(id);
    return hosted.openForEngine(id, epoch, (i) => this.openLocal(i));
  }

  openLocal(id: string): Promise<LocalReplica> {
    return LocalReplica.open({
      spaces: this.#o.spaces,
      root: this.#o.replicaRoot,
      id,
      ...(this.#o.mergeBytesPerSecond
        ? { mergeLimit: { bytesPerSecond: this.#o.mergeBytesPerSecond, clock: this.#o.clock } }
        : {}),
    });
  }
}
