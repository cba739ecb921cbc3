import type { Disks } from './disks.ts';
import type { Clock } from '../common/clock.ts';
import type { Lanes } from '../common/lanes.ts';
import type { Spaces, VolumeRecord } from '../kv/spaces.ts';
import { LocalReplica } from '../replication/local-replica.ts';
import type { RebuildProgress } from '../replication/rebuild.ts';
import { RemoteReplica } from '../replication/remote-replica.ts';
import type { Replica } from '../replication/replica.ts';
import type { Supervisor } from '../replication/supervisor.ts';
import type { Cluster } from './cluster.ts';
import type { EventLog } from './events.ts';
import type { Failover } from './failover.ts';
import { autoSnapshotName } from './names.ts';
import type { NodeInfo } from './node-info.ts';
import type { Operations } from './operations.ts';
import type { PeerReplicas } from './peer-replicas.ts';
import { placeReplicas } from './placement.ts';
import type { VolumeRecords } from './volume-records.ts';

/** What the repair loop needs of the volumes of this node. */
export interface RepairHost {
  /** The volumes whose engine runs here (restores left out). */
  volumes(): string[];
  supervisor(name: string): Supervisor | undefined;
  /** A repair runs in the volume's lane, like every control operation. */
  lanes: Lanes;
  records: VolumeRecords;
  /** Where each remote replica of a record is now (in a cluster, its node's address). */
  replicaUrls(record: VolumeRecord): Promise<string[]>;
  /** A replica on this host; in a cluster under the engine's `epoch`. */
  openLocal(id: string, epoch: number): Promise<LocalReplica>;
}

export interface RepairOptions {
  host: RepairHost;
  cluster: Cluster | undefined;
  peers: PeerReplicas;
  /** Driven from the same loop: the slow sweep behind the node watch. */
  failover?: Failover;
  spaces: Spaces;
  replicaRoot: string;
  /** This host's disks: a failed local replica moves to another one. */
  disks?: Disks;
  clock: Clock;
  events: EventLog;
  operations?: Operations;
  /** A replica in ERR this long is rebuilt (reusing its data if its host is back). */
  rebuildDelayMs?: number;
  /** Bytes per second a rebuild may copy; undefined for no limit. */
  rebuildBytesPerSecond?: number;
  replicaTimeoutMs?: number;
}

/**
 * The repair loop: every second, each volume whose engine runs here is
 * looked at; a replica in ERR long enough is rebuilt in place when its
 * node answers again, else replaced by a new replica on another node
 * (placement.ts), and a volume short of replicas gets one. Rebuilds show
 * as operations with progress. (Node deaths and takeovers: failover.ts.)
 */
export class Repairs {
  readonly #o: RepairOptions;
  /** When each `volume/replica` was first seen in ERR. */
  readonly #failedSince = new Map<string, number>();
  /** How many replicas each volume should have, as its record said at the last full look. */
  readonly #wanted = new Map<string, number>();
  #timer: { cancel(): void } | undefined;
  /** Rebuilds under way, to stop them at detach and shutdown. */
  readonly #rebuilds = new Map<string, AbortController>();

  constructor(options: RepairOptions) {
    this.#o = options;
  }

  /** Stops a volume's rebuild (it is being detached). */
  abort(name: string): void {
    this.#rebuilds.get(name)?.abort();
    this.#wanted.delete(name);
  }

  /** Stops the loop and every rebuild (the daemon stops). */
  stop(): void {
    this.#timer?.cancel();
    for (const abort of this.#rebuilds.values()) abort.abort();
  }

  /** Looks at every attached volume's replicas every `intervalMs`. */
  start(intervalMs = 1000): void {
    let leftovers: Promise<void> | undefined;
    let ticks = 0;
    this.#timer = this.#o.clock.setInterval(() => {
      // Replicas left behind on peers: retried every few seconds, one pass at a time.
      if (ticks++ % 5 === 0 && !leftovers)
        leftovers = this.#o.peers
          .retry()
          .catch(() => undefined)
          .finally(() => (leftovers = undefined));
      // Behind the node watch, a slow sweep: a failover missed while this node was busy or away.
      if (ticks % 15 === 0) void this.#o.failover?.sweep().catch(() => undefined);
      for (const name of this.#o.host.volumes()) {
        // A volume whose replicas are all healthy and as many as it should have needs no
        // look (most volumes, most of the time); every 30th tick looks at all of them anyway.
        const healthy = this.#o.host.supervisor(name)?.engine?.healthyCount();
        if (
          ticks % 30 !== 0 &&
          healthy !== undefined &&
          healthy >= (this.#wanted.get(name) ?? Infinity)
        )
          continue;
        // A volume whose lane is taken (a repair still running, or a user's operation) is
        // looked at again next tick: the lane is also what keeps repairs one at a time.
        if (this.#o.host.lanes.holder(name) !== undefined) continue;
        this.#o.host.lanes
          .run(name, 'repair replicas', () => this.#repair(name), { waitMs: 0 })
          .catch((err: unknown) =>
            this.#o.events.add({
              type: 'repair-failed',
              volume: name,
              message: err instanceof Error ? err.message : String(err),
            }),
          );
      }
    }, intervalMs);
  }

  /**
   * One look at a volume's replicas: a replica in ERR for `rebuildDelayMs`
   * is rebuilt in place if its host answers again (it keeps what it has and
   * copies what changed), else replaced by a new replica on another host;
   * a volume with fewer replicas than it should have gets a new one.
   */
  async #repair(name: string): Promise<void> {
    const engine = this.#o.host.supervisor(name)?.engine;
    const cluster = this.#o.cluster;
    if (!engine || !cluster) return;
    const record = await this.#o.host.records.cached(name);
    if (!record) return;
    this.#wanted.set(name, record.replicaCount);
    await engine.noticeFailures();
    const now = this.#o.clock.nowMs();
    const modes = engine.replicaModes();
    for (const m of modes) {
      const key = `${name}/${m.id}`;
      if (m.mode === 'ERR') {
        if (!this.#failedSince.has(key)) this.#failedSince.set(key, now);
      } else this.#failedSince.delete(key);
    }
    // Nothing to copy from: the volume waits for a replica to come back (engine start salvages).
    if (!modes.some((m) => m.mode === 'RW')) return;
    const delay = this.#o.rebuildDelayMs ?? 10_000;
    const failed = modes.find(
      (m) => m.mode === 'ERR' && now - (this.#failedSince.get(`${name}/${m.id}`) ?? now) >= delay,
    );
    const connect = (id: string, url: string) =>
      RemoteReplica.connect({
        url,
        id,
        secret: cluster.secret,
        ...(cluster.tls ? { tls: cluster.tls } : {}),
        epoch: record.epoch ?? 1,
        timeoutMs: this.#o.replicaTimeoutMs ?? 5000,
        clock: this.#o.clock,
      });
    // A local replica that failed (a disk error, a full disk) is replaced by a new replica on
    // another host if one is free (its files go once that one is rebuilt); else it is rebuilt
    // in place, like a remote one back from an absence: the rebuild compares every granule by
    // digest and checks what it copied, so it trusts nothing the replica held. (After the
    // engine's host crashed, its replica starts behind and every other host has one already.)
    if (failed?.location === 'local') {
      const key = `${name}/${failed.id}`;
      try {
        if (
          !(await this.#replace(record, failed.id, connect)) &&
          !(await this.#replaceOnDisk(record, failed.id))
        )
          await this.#rebuild(
            name,
            await this.#o.host.openLocal(failed.id, record.epoch ?? 1),
            failed.id,
          );
        this.#failedSince.delete(key);
      } catch (err) {
        // Not again at once: each attempt takes a snapshot on every replica.
        this.#failedSince.set(key, now);
        throw err;
      }
      return;
    }
    if (failed) {
      // In a cluster the node may be back at another address: ask the registry.
      const urls = await this.#o.host.replicaUrls(record);
      const at = (record.remoteReplicas ?? []).findIndex((r) => r.id === failed.id);
      const back = await connect(failed.id, at >= 0 ? urls[at]! : failed.location);
      if (back.failure === undefined) {
        await this.#rebuild(name, back, failed.id);
        this.#failedSince.delete(`${name}/${failed.id}`);
        return;
      }
      back.abandon();
      // Its host is still away: a new replica elsewhere, after as long again.
      if (now - (this.#failedSince.get(`${name}/${failed.id}`) ?? now) < 2 * delay) return;
      await this.#replace(record, failed.id, connect);
      return;
    }
    if (modes.length < record.replicaCount) await this.#replace(record, undefined, connect);
  }

  /** Placed a new replica on another host and rebuilt it: true; no host free: false. */
  async #replace(
    record: VolumeRecord,
    replaces: string | undefined,
    connect: (id: string, url: string) => Promise<RemoteReplica>,
  ): Promise<boolean> {
    const cluster = this.#o.cluster!;
    const nodes = await cluster.nodes({ cached: true });
    // Nodes holding a replica already (by name in a cluster, where addresses may change); with
    // --peer this host too, whose replica is local.
    const holders = new Set((record.remoteReplicas ?? []).map((r) => r.node ?? r.url));
    const used = new Set(
      nodes.filter((n) => holders.has(n.name ?? n.url) || holders.has(n.url)).map((n) => n.url),
    );
    if (!cluster.registry) used.add(cluster.selfUrl);
    let target: NodeInfo | undefined;
    try {
      [target] = placeReplicas({
        volume: record.name,
        sizeBytes: record.sizeBytes,
        count: 1,
        nodes,
        exclude: used,
        selfRequired: false,
      });
    } catch {
      return false; // no host with room: stay degraded, try again later
    }
    if (!target) return false;
    const id = await this.#o.peers.create(
      target.url,
      record.name,
      record.sizeBytes,
      record.epoch ?? 1,
      record.diskTag,
    );
    // A new replica on the engine's own node is opened in place, as the engine opens the others
    // it hosts: a rebuild through a loopback stream had this node receive every granule, send it
    // to itself and receive it again (a 1 GiB rebuild cost this node 5.4-6.2 CPU-s; in place,
    // with the stream's reused buffers, 3.4-3.7).
    const here = cluster.registry !== undefined && target.name === cluster.nodeName;
    const replica: Replica | undefined = here
      ? await this.#o.host.openLocal(id, record.epoch ?? 1).catch(() => undefined)
      : await connect(id, target.url);
    if (replica === undefined || replica.failure !== undefined) {
      replica?.abandon();
      await this.#o.peers.remove(record.name, [{ id, url: target.url }]);
      return false;
    }
    // Recorded before the copy: a crash mid-rebuild leaves a replica that is behind
    // (its revision says so) rather than one nobody knows about.
    const old = (record.remoteReplicas ?? []).find((r) => r.id === replaces);
    // The new replica is recorded as failed until its rebuild completes.
    await this.#o.host.records.update(record.name, (rec) => {
      rec.remoteReplicas = [
        ...(rec.remoteReplicas ?? []).filter((r) => r.id !== replaces),
        { id, url: target.url, ...(target.name ? { node: target.name } : {}) },
      ];
      rec.replicaIds = rec.replicaIds.filter((r) => r !== replaces);
      rec.failedReplicas = [...(rec.failedReplicas ?? []).filter((r) => r !== replaces), id];
    });
    await this.#rebuild(record.name, replica, replaces);
    if (old) await this.#o.peers.remove(record.name, [old]);
    else if (replaces !== undefined && record.replicaIds.includes(replaces))
      await LocalReplica.destroy({
        spaces: this.#o.spaces,
        root: this.#o.replicaRoot,
        id: replaces,
      });
    return true;
  }

  /**
   * A local replica that failed (its disk full or failing) replaced by a new
   * one on another disk of this host that holds no replica of the volume:
   * recorded as failed until its rebuild completes, the old one removed after.
   * False when there is no such disk.
   */
  async #replaceOnDisk(record: VolumeRecord, failedId: string): Promise<boolean> {
    const disks = this.#o.disks;
    if (!disks || disks.all.length < 2 || this.#o.host.records.shared) return false;
    const used = new Set<string>();
    for (const id of record.replicaIds)
      used.add((await this.#o.spaces.replicas.get(id))?.root ?? this.#o.replicaRoot);
    let disk;
    try {
      disk = await disks.choose({
        ...(record.diskTag !== undefined ? { tag: record.diskTag } : {}),
        avoid: used,
      });
    } catch {
      return false;
    }
    if (used.has(disk.root)) return false;
    const replica = await LocalReplica.create({
      spaces: this.#o.spaces,
      root: this.#o.replicaRoot,
      on: disk.root,
      volume: record.name,
      sizeBytes: record.sizeBytes,
      now: new Date(this.#o.clock.nowMs()),
    });
    await this.#o.host.records.update(record.name, (rec) => {
      rec.replicaIds = [...rec.replicaIds.filter((r) => r !== failedId), replica.id];
      rec.failedReplicas = [
        ...(rec.failedReplicas ?? []).filter((r) => r !== failedId),
        replica.id,
      ];
    });
    this.#o.events.add({
      type: 'replica-moved',
      volume: record.name,
      message: `replica ${failedId} failed: a new one on disk ${disk.path} is rebuilt`,
    });
    await this.#rebuild(record.name, replica, failedId);
    await LocalReplica.destroy({ spaces: this.#o.spaces, root: this.#o.replicaRoot, id: failedId });
    return true;
  }

  async #rebuild(name: string, target: Replica, replaces: string | undefined) {
    const supervisor = this.#o.host.supervisor(name);
    if (!supervisor) return;
    const abort = new AbortController();
    this.#rebuilds.set(name, abort);
    const now = new Date(this.#o.clock.nowMs());
    const work = (
      update?: (p: { phase: string; done: number; total: number; bytes: number }) => void,
    ) =>
      supervisor.control(`rebuild replica ${target.id}`, (e) =>
        e.rebuild(target, {
          clock: this.#o.clock,
          signal: abort.signal,
          now,
          snapshotName: `rebuild-${autoSnapshotName(now).slice(5)}`,
          ...(replaces !== undefined ? { replaces } : {}),
          ...(this.#o.rebuildBytesPerSecond
            ? { bytesPerSecond: this.#o.rebuildBytesPerSecond }
            : {}),
          onProgress: (p) =>
            update?.({ phase: 'rebuild', done: p.done, total: p.total, bytes: p.bytesCopied }),
        }),
      );
    try {
      const ops = this.#o.operations;
      if (!ops) await work();
      else
        await ops.start(
          'rebuild',
          `replica ${target.id} at ${target.location}`,
          name,
          work,
          (p: RebuildProgress) =>
            `${p.bytesCopied} bytes copied from ${p.sources === 1 ? 'one replica' : `${p.sources} replicas`}; ${p.layersSkipped} of ${p.layers} layers already held`,
        ).done;
    } catch (err) {
      target.abandon();
      throw err;
    } finally {
      this.#rebuilds.delete(name);
    }
  }
}
