import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Clock } from '../common/clock.ts';
import { CorralError, quoted } from '../common/errors.ts';
import { Lanes } from '../common/lanes.ts';
import type { Frontend, Spaces, StandbyRecord, VolumeRecord } from '../kv/spaces.ts';
import type { BlockDevice } from '../replication/block-device.ts';
import type { FaultFilter, FaultMode } from '../replication/fault-filter.ts';
import type { QosLimits } from '../replication/qos.ts';
import {
  encryptedDevice,
  asWrappedKey,
  newVolumeKey,
  SectorCipher,
  unwrapKey,
  userKeyFrom,
  wrapKey,
} from '../replication/crypt.ts';
import type { Disks } from './disks.ts';
import { StandbyGate, standbyView } from './standby-view.ts';
import { LocalReplica } from '../replication/local-replica.ts';
import type { Cluster } from './cluster.ts';
import type { NodeInfo } from './node-info.ts';
import { EngineFactory } from './engine-factory.ts';
import type { HostedReplicas } from './hosted.ts';
import { Failover } from './failover.ts';
import { PeerReplicas } from './peer-replicas.ts';
import { placeReplicas } from './placement.ts';
import { Repairs } from './repair.ts';
import type { VolumeRecords } from './volume-records.ts';
import type { Operation, Operations } from './operations.ts';
import type { Difference } from '../replication/rebuild.ts';
import { copyAllocated } from '../replication/copy.ts';
import { Supervisor, type IoObserver } from '../replication/supervisor.ts';
import type { EventLog } from './events.ts';
import { SnapshotHolds, VolumeSnapshots } from './volume-snapshots.ts';
import { volumeInfo, type VolumeInfo } from './volume-info.ts';
import { parseSnapshotRef, validateVolumeName, validateVolumeSize, validateQos } from './names.ts';
import type { ScrubReport, SnapshotInfo } from '../replication/replica.ts';

export interface VolumeManagerOptions {
  spaces: Spaces;
  /** Volume records: this host's LevelDB, or etcd in a cluster (then every node sees them). */
  records: VolumeRecords;
  replicaRoot: string;
  clock: Clock;
  events: EventLog;
  hangTimeoutMs: number;
  faultInjection: boolean;
  /** Bytes per second a snapshot delete may copy; undefined for no limit. */
  mergeBytesPerSecond: number | undefined;
  /** How many NBD clients use a volume (detach refuses while any do). */
  connections: (name: string) => number;
  disconnect: (name: string) => void;
  /** Who holds a volume's FUSE image open (loop devices, processes); empty when nobody does. */
  imageHolders: (name: string) => Promise<string[]>;
  /** The disks replicas go to (the data dir's alone when absent). */
  disks?: Disks;
  /** A volume grew: the FUSE image's size as the kernel caches it must follow. */
  resized?: (name: string) => Promise<void>;
  /** The hosts replicas can go to; absent: this host only. */
  cluster?: Cluster;
  /** A remote replica request unanswered this long sets the replica to ERR. */
  replicaTimeoutMs?: number;
  /** Replica ids kept here for engines elsewhere: not orphans. */
  hostedIds?: () => Promise<string[]>;
  /** Long work (rebuild, verify) as operations with progress. */
  operations?: Operations;
  /** A replica in ERR this long is rebuilt (reusing its data if its host is back). */
  rebuildDelayMs?: number;
  /** Bytes per second a rebuild may copy; undefined for no limit. */
  rebuildBytesPerSecond?: number;
  /** How long a control operation waits for the one before it on the same volume (then BUSY). */
  laneWaitMs?: number;
  /**
   * What the metadata store knows of its own age: created by this start (it
   * was missing), and since when this host's metadata exists. Folders older
   * than the metadata are never swept.
   */
  metadata?: { created: boolean; sinceMs: number };
  /** Where unowned replicas are moved instead of deleted. */
  quarantineRoot?: string;
  /** True while the data disk is full (new volumes are refused with NO_SPACE). */
  diskFull?: () => Promise<boolean>;
  /** In a cluster: this node's hosted replicas (its engines open their own in place). */
  hosted?: HostedReplicas;
  /** Metrics: an observer of each volume's client requests, and forgetting a removed volume. */
  meters?: { observer(volume: string): IoObserver; forget(volume: string): void };
}

/** A call forwarded to another node may start an engine there: replicas take a while to answer. */
const FORWARD_TIMEOUT_MS = 60_000;
/** A clone made on its source's node answers once its data is copied. */
const CLONE_FORWARD_TIMEOUT_MS = 3_600_000;

/** The volumes of this host: their records, and an engine per attached one. */
export class VolumeManager {
  readonly #o: VolumeManagerOptions;
  /** The engines of this host, with the epoch each was claimed with. */
  readonly #attached = new Map<
    string,
    {
      supervisor: Supervisor;
      fault: FaultFilter | undefined;
      epoch: number;
      /** An encrypted volume's key, in memory while it is attached (never stored). */
      cipher?: SectorCipher;
      /** What frontends see: the supervisor, or the plaintext view of an encrypted volume. */
      view: BlockDevice;
    }
  >();
  /**
   * One control operation per volume at a time (create, clone, attach, detach,
   * rm, snapshot, delete, revert, replica changes, rebuild, verify), in arrival
   * order: interleaved, a delete merging a snapshot and a revert to it left a
   * chain with no head (docs/ARCHITECTURE.md, "Control operations").
   */
  readonly #lanes: Lanes;
  readonly #frontends = new Map<string, Frontend>();
  /** Attached volumes that only some TLS identities may open over NBD (`--nbd-allow`). */
  readonly #nbdAllow = new Map<string, readonly string[]>();
  /** Encrypted volumes' keys, given at create or attach, forgotten at detach. */
  readonly #keys = new Map<string, SectorCipher>();
  /** Snapshots being read by long jobs: not deleted, nor their volume detached or reverted. */
  readonly #holds = new SnapshotHolds();
  /** Snapshot operations (volume-snapshots.ts). */
  readonly #snapshots: VolumeSnapshots;
  /** Volumes being restored: attached for the restore only, hidden from the frontends. */
  readonly #restoring = new Set<string>();
  /** Attached standby volumes: what their readers wait on while a backup is applied. */
  readonly #standby = new Map<string, StandbyGate>();
  /** Replicas on other nodes: made, removed, or left to remove when their node answers. */
  readonly #peers: PeerReplicas;
  /** The repair loop (repair.ts). */
  readonly #repairs: Repairs;
  /** How engines are made (engine-factory.ts). */
  readonly #engines: EngineFactory;
  /** In a cluster: what this node does when another dies (failover.ts). */
  readonly failover: Failover | undefined;

  constructor(options: VolumeManagerOptions) {
    this.#o = options;
    this.#lanes = new Lanes({ clock: options.clock, waitMs: options.laneWaitMs ?? 30_000 });
    this.#snapshots = new VolumeSnapshots(
      {
        clock: options.clock,
        events: options.events,
        record: (volume) => this.#record(volume),
        attached: (volume, what) => this.#attachedEntry(volume, what),
        serially: (volume, what, fn) => this.#serially(volume, what, fn),
      },
      this.#holds,
    );
    options.records.onChange = (name, record) => this.#recordChanged(name, record);
    this.#engines = new EngineFactory({
      spaces: options.spaces,
      replicaRoot: options.replicaRoot,
      records: options.records,
      cluster: options.cluster,
      clock: options.clock,
      events: options.events,
      replicaTimeoutMs: options.replicaTimeoutMs,
      mergeBytesPerSecond: options.mergeBytesPerSecond,
      faultInjection: options.faultInjection,
      ...(options.hosted ? { hosted: options.hosted } : {}),
      ...(options.cluster?.nodeName !== undefined ? { nodeName: options.cluster.nodeName } : {}),
    });
    this.#peers = new PeerReplicas({
      spaces: options.spaces,
      cluster: options.cluster,
      clock: options.clock,
      events: options.events,
    });
    const nodeName = options.cluster?.nodeName;
    this.failover =
      options.records.shared && options.cluster && nodeName !== undefined
        ? new Failover({
            nodeName,
            cluster: options.cluster,
            records: options.records,
            events: options.events,
            attach: (volume) => this.attach(volume),
          })
        : undefined;
    this.#repairs = new Repairs({
      host: {
        volumes: () => [...this.#attached.keys()].filter((n) => !this.#restoring.has(n)),
        supervisor: (name) => this.#attached.get(name)?.supervisor,
        lanes: this.#lanes,
        records: options.records,
        replicaUrls: (record) => this.#engines.replicaUrls(record),
        openLocal: (id, epoch) =>
          this.#shared ? this.#engines.openOwn(id, epoch) : this.#engines.openLocal(id),
      },
      cluster: options.cluster,
      peers: this.#peers,
      ...(this.failover ? { failover: this.failover } : {}),
      spaces: options.spaces,
      replicaRoot: options.replicaRoot,
      ...(options.disks ? { disks: options.disks } : {}),
      clock: options.clock,
      events: options.events,
      ...(options.operations ? { operations: options.operations } : {}),
      ...(options.rebuildDelayMs !== undefined ? { rebuildDelayMs: options.rebuildDelayMs } : {}),
      ...(options.rebuildBytesPerSecond !== undefined
        ? { rebuildBytesPerSecond: options.rebuildBytesPerSecond }
        : {}),
      ...(options.replicaTimeoutMs !== undefined
        ? { replicaTimeoutMs: options.replicaTimeoutMs }
        : {}),
    });
  }

  /** Looks for replicas to rebuild every `intervalMs` (repair.ts). */
  startRepairs(intervalMs = 1000): void {
    this.#repairs.start(intervalMs);
  }

  /**
   * Another node claimed a volume whose engine runs here (a newer epoch), or
   * removed it: this engine is fenced. The replicas refuse it already; it
   * also stops here at once, so that its clients get errors and reconnect
   * to the new node rather than wait on a volume nobody serves from here.
   */
  #recordChanged(name: string, record: VolumeRecord | undefined): void {
    const entry = this.#attached.get(name);
    if (!entry || (record && (record.epoch ?? 0) <= entry.epoch)) return;
    this.#attached.delete(name);
    this.#frontends.delete(name);
    this.#nbdAllow.delete(name);
    this.#standby.get(name)?.open(true);
    this.#standby.delete(name);
    this.#repairs.abort(name);
    this.#o.disconnect(name);
    this.#o.events.add({
      type: 'engine-fenced',
      volume: name,
      message: record
        ? `node ${record.engineNode ?? '?'} took the volume over (epoch ${record.epoch ?? 0}, this engine's ${entry.epoch}): stopped here`
        : 'the volume was removed on another node: stopped here',
    });
    void entry.supervisor.stop().catch(() => undefined);
  }

  /** Attaches what was attached before the daemon stopped; drops half-created replicas. */
  async start(): Promise<void> {
    await fs.promises.mkdir(this.#o.replicaRoot, { recursive: true });
    const volumes = await this.#o.records.entries();
    await this.#sweep(volumes);
    for (const [name, v] of volumes) {
      // In a cluster every node sees every volume: each starts the engines it served.
      if (this.#shared && v.engineNode !== this.#nodeName) continue;
      if (v.restoring !== undefined) {
        // The daemon died during a restore: a half-restored volume must not pass for the backup.
        await this.#o.records.del(name);
        for (const id of v.replicaIds)
          await LocalReplica.destroy({ spaces: this.#o.spaces, root: this.#o.replicaRoot, id });
        this.#o.events.add({
          type: 'restore-abandoned',
          volume: name,
          message: `removed: its restore from ${v.restoring} was cut off`,
        });
        continue;
      }
      if (!v.attached) continue;
      try {
        await this.#attach(v);
      } catch (err) {
        this.#o.events.add({
          type: 'attach-failed',
          volume: name,
          message: err instanceof Error ? err.message : String(err),
        });
      }
    }
  }

  /**
   * Replicas no volume owns (a crash between a replica and its volume
   * record, or during a removal) and folders no replica record names are
   * moved to the quarantine folder with an event, never deleted: a bug or a
   * damaged metadata store must not cost data. Nothing is swept when the
   * metadata is empty or was made by this start (a lost `meta/` once made
   * the daemon delete every replica), nor a folder older than the metadata.
   */
  async #sweep(volumes: Array<[string, VolumeRecord]>): Promise<void> {
    const owned = new Set([
      ...volumes.flatMap(([, v]) => v.replicaIds),
      ...((await this.#o.hostedIds?.()) ?? []),
    ]);
    const records = await this.#o.spaces.replicas.entries();
    const roots = this.#o.disks?.all.map((d) => d.root) ?? [this.#o.replicaRoot];
    const folders: Array<{ root: string; folder: string }> = [];
    for (const root of roots)
      for (const folder of await fs.promises.readdir(root).catch(() => [] as string[]))
        folders.push({ root, folder });
    const known = new Set(records.map(([id]) => id));
    const unowned = records.filter(([id]) => !owned.has(id));
    const stray = folders.filter(({ folder: f }) => !owned.has(f) && !known.has(f));
    if (unowned.length === 0 && stray.length === 0) return;
    const meta = this.#o.metadata;
    if (meta?.created || (volumes.length === 0 && owned.size === 0 && records.length === 0)) {
      const message = `${stray.length} replica folder(s) in ${roots.join(', ')} that no metadata names were left in place: the metadata store is ${meta?.created ? 'new (was meta/ lost or moved?)' : 'empty'}. Restore meta/ from a copy, or move the folders away yourself`;
      this.#o.events.add({ type: 'sweep-refused', message });
      return;
    }
    // Without a quarantine folder nothing is moved, and nothing is ever deleted.
    const dataQuarantine = this.#o.quarantineRoot;
    if (!dataQuarantine) return;
    const move = async (id: string, root: string, record: unknown, why: string): Promise<void> => {
      const from = LocalReplica.dirOf(root, id);
      // On its own disk: a rename across filesystems would be a copy.
      const quarantine =
        root === this.#o.replicaRoot ? dataQuarantine : path.join(path.dirname(root), 'quarantine');
      await fs.promises.mkdir(quarantine, { recursive: true });
      const to = path.join(quarantine, id);
      if (fs.existsSync(from)) await fs.promises.rename(from, to);
      else await fs.promises.mkdir(to, { recursive: true });
      if (record !== undefined)
        await fs.promises.writeFile(
          path.join(to, 'replica.json'),
          JSON.stringify(record, null, 2) + '\n',
        );
      this.#o.events.add({
        type: 'replica-quarantined',
        message: `replica ${id} (${why}) moved to ${to}; remove it when you are sure it is not needed`,
      });
    };
    for (const [id, record] of unowned) {
      await move(
        id,
        record.root ?? this.#o.replicaRoot,
        record,
        `of volume ${record.volume}, which does not own it`,
      );
      // The folder is kept; the records of a replica no volume owns go.
      await LocalReplica.destroy({ spaces: this.#o.spaces, root: this.#o.replicaRoot, id });
    }
    for (const { root, folder } of stray) {
      const stat = await fs.promises.stat(LocalReplica.dirOf(root, folder));
      if (meta && stat.mtimeMs < meta.sinceMs) {
        this.#o.events.add({
          type: 'sweep-refused',
          message: `replica folder ${folder} is older than this host's metadata and no record names it: left in place`,
        });
        continue;
      }
      await move(folder, root, undefined, 'no metadata names it');
    }
  }

  #serially<T>(name: string, what: string, fn: () => Promise<T>): Promise<T> {
    return this.#lanes.run(name, what, fn);
  }

  /** True in a cluster (`--etcd`): records are shared, engines move between nodes. */
  get #shared(): boolean {
    return this.#o.records.shared;
  }

  /** This node's name in a cluster. */
  get #nodeName(): string | undefined {
    return this.#o.cluster?.nodeName;
  }

  async #record(name: string): Promise<VolumeRecord> {
    const record = await this.#o.records.get(validateVolumeName(name));
    if (!record) throw new CorralError('NOT_FOUND', `No volume named ${name}`);
    return record;
  }

  async create(input: {
    name: unknown;
    size?: unknown;
    replicas?: unknown;
    frontend?: unknown;
    fromSnapshot?: unknown;
    /** Replicas beyond the hosts that can take one stay on this host (less safe; asked for). */
    allowSameHost?: unknown;
    /** The volume is the target of a restore from this backup (see `finishRestore`). */
    restoring?: string;
    /** `auto`: in a cluster, a surviving replica node takes the volume over by itself. */
    failover?: unknown;
    /** TLS identities that alone may open the volume over NBD. */
    nbdAllow?: unknown;
    /** I/O limits (see `setQos`). */
    qos?: unknown;
    /** Its replicas go to disks with this tag (on every host). */
    diskTag?: unknown;
    /** Encrypt it at rest with a new master key wrapped by `key` (base64, ≥ 32 bytes). */
    encrypt?: unknown;
    key?: unknown;
    /** A standby fed by backups (daemon/standby.ts): restored, then read-only until activated. */
    standby?: StandbyRecord;
  }): Promise<VolumeInfo> {
    const name = validateVolumeName(input.name);
    if (input.fromSnapshot === undefined) return this.#create(name, input, undefined);
    const ref = parseSnapshotRef(input.fromSnapshot);
    // In a cluster a clone is made where its source's engine runs (it reads the snapshot there).
    const owner =
      input.restoring === undefined ? await this.engineElsewhere(ref.volume) : undefined;
    if (owner !== undefined)
      return this.#o.cluster!.call<VolumeInfo>(
        owner,
        'POST',
        '/v1/volumes',
        {
          name,
          fromSnapshot: input.fromSnapshot,
          ...(input.size !== undefined ? { size: input.size } : {}),
          ...(input.replicas !== undefined ? { replicas: input.replicas } : {}),
          ...(input.frontend !== undefined ? { frontend: input.frontend } : {}),
          ...(input.failover !== undefined ? { failover: input.failover } : {}),
          ...(input.nbdAllow !== undefined ? { nbdAllow: input.nbdAllow } : {}),
          ...(input.qos !== undefined ? { qos: input.qos } : {}),
          ...(input.diskTag !== undefined ? { diskTag: input.diskTag } : {}),
        },
        { timeoutMs: CLONE_FORWARD_TIMEOUT_MS },
      );
    // The source snapshot is held while it is copied: deleting it, reverting or detaching its
    // volume meanwhile answers BUSY instead of pulling the chain from under the copy.
    const access = await this.#serially(ref.volume, `clone ${ref.volume}@${ref.snapshot}`, () =>
      Promise.resolve(this.snapshotAccess(ref.volume, ref.snapshot)),
    );
    try {
      const sourceRecord = await this.#record(ref.volume);
      const sourceCipher = this.#attached.get(ref.volume)?.cipher;
      return await this.#create(
        name,
        input,
        access.device,
        sourceRecord.encryption && sourceCipher
          ? { wrapped: sourceRecord.encryption, cipher: sourceCipher }
          : undefined,
      );
    } finally {
      access.release();
    }
  }

  async #create(
    name: string,
    input: {
      size?: unknown;
      replicas?: unknown;
      frontend?: unknown;
      allowSameHost?: unknown;
      restoring?: string;
      failover?: unknown;
      nbdAllow?: unknown;
      qos?: unknown;
      diskTag?: unknown;
      encrypt?: unknown;
      key?: unknown;
      standby?: StandbyRecord;
    },
    source: BlockDevice | undefined,
    /** A clone of an encrypted volume: its wrapped key and cipher (the copy is ciphertext). */
    sourceKey?: { wrapped: Record<string, string | number>; cipher: SectorCipher },
  ): Promise<VolumeInfo> {
    const qos = input.qos === undefined ? undefined : limitsSet(validateQos(input.qos));
    const diskTag = input.diskTag === undefined ? undefined : validateDiskTag(input.diskTag);
    if (input.encrypt !== undefined && typeof input.encrypt !== 'boolean')
      throw new CorralError('INVALID_ARGUMENT', 'encrypt is true or false');
    if (input.encrypt === true && input.key === undefined)
      throw new CorralError('INVALID_ARGUMENT', 'An encrypted volume needs a key (key: base64)');
    if (input.encrypt === true && (source || input.restoring !== undefined))
      throw new CorralError(
        'INVALID_ARGUMENT',
        "A clone keeps its source's encryption, and a restore its backup's: encrypt and key are for new volumes",
      );
    let encryption: { wrapped: Record<string, string | number>; cipher: SectorCipher } | undefined =
      sourceKey;
    if (input.encrypt === true) {
      const { master, wrapped } = newVolumeKey(userKeyFrom(input.key));
      encryption = { wrapped, cipher: new SectorCipher(master) };
    }
    const sizeBytes =
      source && input.size === undefined ? source.sizeBytes : validateVolumeSize(input.size);
    if (source && sizeBytes < source.sizeBytes) {
      throw new CorralError(
        'INVALID_SIZE',
        `A clone needs at least the snapshot's size, ${source.sizeBytes} bytes`,
      );
    }
    const replicaCount = input.replicas ?? 1;
    if (
      typeof replicaCount !== 'number' ||
      !Number.isInteger(replicaCount) ||
      replicaCount < 1 ||
      replicaCount > 16
    ) {
      throw new CorralError(
        'INVALID_ARGUMENT',
        `Invalid replica count ${quoted(replicaCount)}: use a whole number from 1 to 16`,
      );
    }
    if (replicaCount > 1 && source) {
      throw new CorralError(
        'INVALID_ARGUMENT',
        'A clone starts with one replica; create it, then raise its replicas (not yet supported)',
      );
    }
    const frontend = input.frontend ?? 'nbd';
    if (frontend !== 'nbd' && frontend !== 'fuse') {
      throw new CorralError(
        'INVALID_ARGUMENT',
        `Invalid frontend ${quoted(frontend)}: use nbd or fuse`,
      );
    }
    const failover = input.failover ?? 'off';
    if (failover !== 'off' && failover !== 'auto')
      throw new CorralError(
        'INVALID_ARGUMENT',
        `Invalid failover ${quoted(failover)}: use auto or off`,
      );
    if (failover === 'auto' && !this.#shared)
      throw new CorralError(
        'INVALID_ARGUMENT',
        'Automatic failover needs a cluster: start the daemons with --etcd',
      );
    const nbdAllow = input.nbdAllow;
    if (
      nbdAllow !== undefined &&
      (!Array.isArray(nbdAllow) ||
        nbdAllow.length === 0 ||
        !nbdAllow.every((i) => typeof i === 'string' && /^[\x21-\x7e]{1,128}$/.test(i)))
    )
      throw new CorralError(
        'INVALID_ARGUMENT',
        'nbdAllow takes a list of TLS identities (certificate CNs or PSK user names)',
      );
    return this.#serially(name, `create volume ${name}`, async () => {
      if (await this.#o.records.get(name))
        throw new CorralError('ALREADY_EXISTS', `Volume ${name} already exists`);
      if (await this.#o.diskFull?.())
        throw new CorralError(
          'NO_SPACE',
          `Cannot create volume ${name}: the data disk of this host is full (its metadata reserve is in use); free space first`,
        );
      // In a cluster every replica is kept as a hosted replica on its node (this one's too),
      // so that an engine on any node can reach them all.
      const peers = this.#shared
        ? await this.#placeInCluster(name, sizeBytes, replicaCount)
        : replicaCount > 1
          ? await this.#place(name, sizeBytes, replicaCount, input.allowSameHost === true)
          : [];
      // With --allow-same-host, the replicas the other hosts cannot take stay here too.
      const localCount = replicaCount - peers.length;
      const remoteReplicas: Array<{ id: string; url: string; node?: string }> = [];
      try {
        for (const peer of peers) {
          const id = await this.#peers.create(peer.url, name, sizeBytes, 1, diskTag);
          remoteReplicas.push({ id, url: peer.url, ...(peer.name ? { node: peer.name } : {}) });
        }
        // A clone in a cluster: the snapshot is copied into its (one) replica, wherever it is.
        if (source)
          for (const r of remoteReplicas) {
            const replica = await this.#engines.openReplica(r, r.url, 1);
            if (replica.failure !== undefined) {
              replica.abandon();
              throw new CorralError('IO_ERROR', `Replica of clone ${name}: ${replica.failure}`);
            }
            try {
              await copyAllocated(source, replica);
            } catch (err) {
              replica.abandon();
              throw err;
            }
            await replica.close();
          }
      } catch (err) {
        await this.#peers.remove(name, remoteReplicas);
        throw err;
      }
      // Replica first, then the volume record that owns it: a crash in between leaves
      // an unowned replica, removed at the next start.
      const localIds: string[] = [];
      const usedDisks = new Set<string>();
      for (let i = 0; i < localCount; i++) {
        // The disk with the most room among those tagged, one this volume does not use yet.
        const disk = await this.#o.disks?.choose({
          ...(diskTag !== undefined ? { tag: diskTag } : {}),
          avoid: usedDisks,
        });
        if (disk) usedDisks.add(disk.root);
        const replica = await LocalReplica.create({
          spaces: this.#o.spaces,
          root: this.#o.replicaRoot,
          ...(disk ? { on: disk.root } : {}),
          volume: name,
          sizeBytes,
          now: new Date(this.#o.clock.nowMs()),
        });
        localIds.push(replica.id);
        try {
          if (source) await copyAllocated(source, replica);
        } catch (err) {
          replica.abandon();
          for (const id of localIds)
            await LocalReplica.destroy({ spaces: this.#o.spaces, root: this.#o.replicaRoot, id });
          await this.#peers.remove(name, remoteReplicas);
          throw err;
        }
        await replica.close();
      }
      const record: VolumeRecord = {
        name,
        sizeBytes,
        replicaCount,
        frontend,
        createdAt: new Date(this.#o.clock.nowMs()).toISOString(),
        attached: true,
        replicaIds: localIds,
        ...(input.restoring !== undefined ? { restoring: input.restoring } : {}),
        ...(remoteReplicas.length > 0 ? { remoteReplicas } : {}),
        epoch: 0,
        ...(this.#shared ? { engineNode: this.#nodeName! } : {}),
        ...(failover === 'auto' ? { failover: 'auto' as const } : {}),
        ...(nbdAllow !== undefined ? { nbdAllow: nbdAllow as string[] } : {}),
        ...(qos !== undefined ? { qos } : {}),
        ...(diskTag !== undefined ? { diskTag } : {}),
        ...(encryption ? { encryption: encryption.wrapped } : {}),
        ...(input.standby ? { standby: input.standby } : {}),
      };
      if (encryption) this.#keys.set(name, encryption.cipher);
      if (input.restoring !== undefined) this.#restoring.add(name);
      try {
        await this.#o.records.create(record);
      } catch (err) {
        // Another node created the name first (or etcd is away): the replicas made here go.
        for (const id of localIds)
          await LocalReplica.destroy({ spaces: this.#o.spaces, root: this.#o.replicaRoot, id });
        await this.#peers.remove(name, remoteReplicas);
        throw err;
      }
      this.#o.events.add({ type: 'volume-created', volume: name, message: `${sizeBytes} bytes` });
      return this.#info(await this.#attach(record), new Set());
    });
  }

  /** Starts the volume's engine here; returns the record as it is then (claimed, in a cluster). */
  async #attach(record: VolumeRecord): Promise<VolumeRecord> {
    if (record.encryption && !this.#keys.has(record.name))
      throw new CorralError(
        'FORBIDDEN',
        `Volume ${record.name} is encrypted: attach it with its key (corral volume attach ${record.name} --key-file FILE)`,
      );
    this.#frontends.set(record.name, record.frontend);
    if (record.nbdAllow) this.#nbdAllow.set(record.name, record.nbdAllow);
    if (this.#attached.has(record.name)) return record;
    const self = this.#nodeName;
    if (this.#shared) {
      // The claim: one compare-and-swap names this node the engine's and gives a newer
      // epoch; every replica refuses older epochs from the moment this engine reaches it.
      const expected = record.engineNode;
      const claimed = await this.#o.records.update(record.name, (rec) => {
        if (rec.engineNode !== expected)
          throw new CorralError(
            'BUSY',
            `Volume ${rec.name} was attached on node ${rec.engineNode ?? '?'} meanwhile; try again`,
          );
        rec.engineNode = self!;
        rec.epoch = (rec.epoch ?? 0) + 1;
        rec.attached = true;
      });
      if (!claimed) throw new CorralError('NOT_FOUND', `No volume named ${record.name}`);
      record = claimed;
    } else if (record.remoteReplicas?.length) {
      // A new engine: replicas elsewhere will refuse the previous one from now on.
      const bumped = await this.#o.records.update(record.name, (rec) => {
        rec.epoch = (rec.epoch ?? 0) + 1;
      });
      if (bumped) record = bumped;
    }
    const epoch = record.epoch ?? 1;
    /** In a cluster, a record that names another engine (or a newer epoch) means this one is fenced. */
    const fenced = (rec: VolumeRecord): CorralError | undefined =>
      this.#shared && (rec.engineNode !== self || rec.epoch !== epoch)
        ? new CorralError(
            'BUSY',
            `Volume ${rec.name} is now served by node ${rec.engineNode ?? '?'} (epoch ${rec.epoch ?? 0}); the engine of epoch ${epoch} on ${self ?? 'this node'} is fenced`,
          )
        : undefined;
    let fault: FaultFilter | undefined;
    const start = this.#engines.starter({
      record,
      epoch,
      fenced,
      onFault: (f) => {
        fault = f;
        const entry = this.#attached.get(record.name);
        if (entry) entry.fault = f;
      },
    });
    const supervisor = await Supervisor.start({
      volume: record.name,
      sizeBytes: record.sizeBytes,
      start,
      clock: this.#o.clock,
      hangTimeoutMs: this.#o.hangTimeoutMs,
      onEvent: (e) => this.#o.events.add({ type: e.type, volume: e.volume, message: e.message }),
      ...(this.#o.meters ? { onIo: this.#o.meters.observer(record.name) } : {}),
      ...(record.qos ? { qos: record.qos } : {}),
    });
    const cipher = record.encryption ? this.#keys.get(record.name) : undefined;
    let view: BlockDevice = cipher ? encryptedDevice(supervisor, cipher) : supervisor;
    if (record.standby) {
      // A cut-off apply left a mix of two backups: nobody reads it until a poll applies one whole.
      const gate = new StandbyGate(record.name, record.standby.applying !== undefined);
      this.#standby.set(record.name, gate);
      view = standbyView(record.name, view, gate);
    }
    this.#attached.set(record.name, {
      supervisor,
      fault,
      epoch,
      ...(cipher ? { cipher } : {}),
      view,
    });
    this.#frontends.set(record.name, record.frontend);
    if (record.nbdAllow) this.#nbdAllow.set(record.name, record.nbdAllow);
    return record;
  }

  /**
   * Attaches a volume here, or in a cluster on `node`. A volume served by
   * another node moves: a node that is up lets go first (its engine drains
   * and flushes, its clients are disconnected); one that is down (its lease
   * expired) is taken over, and the newer epoch fences it should it come back.
   */
  async attach(
    name: string,
    options: { frontend?: unknown; node?: unknown; key?: unknown } = {},
  ): Promise<VolumeInfo> {
    const frontend = options.frontend;
    const userKey = options.key === undefined ? undefined : userKeyFrom(options.key);
    if (frontend !== undefined && frontend !== 'nbd' && frontend !== 'fuse') {
      throw new CorralError(
        'INVALID_ARGUMENT',
        `Invalid frontend ${quoted(frontend)}: use nbd or fuse`,
      );
    }
    const node = options.node;
    if (node !== undefined) {
      if (typeof node !== 'string' || node === '')
        throw new CorralError('INVALID_ARGUMENT', `Invalid node ${quoted(node)}`);
      if (!this.#shared)
        throw new CorralError(
          'INVALID_ARGUMENT',
          'Attaching on another node needs a cluster: start the daemons with --etcd',
        );
      if (node !== this.#nodeName) {
        const target = (await this.#o.cluster!.nodes()).find((n) => n.name === node);
        if (!target) throw new CorralError('NOT_FOUND', `No node named ${node} in the cluster`);
        if (target.state !== 'up')
          throw new CorralError('UNAVAILABLE', `Node ${node} is down: attach on a node that is up`);
        return this.#o.cluster!.call<VolumeInfo>(
          target.url,
          'POST',
          `/v1/volumes/${encodeURIComponent(name)}/attach`,
          {
            ...(frontend === undefined ? {} : { frontend }),
            ...(options.key !== undefined ? { key: options.key } : {}),
          },
          { timeoutMs: FORWARD_TIMEOUT_MS },
        );
      }
    }
    return this.#serially(name, `attach volume ${name}`, async () => {
      let record = await this.#record(name);
      // The key is checked before anything moves: a wrong one is refused with no I/O done.
      if (record.encryption) {
        if (!userKey)
          throw new CorralError(
            'FORBIDDEN',
            `Volume ${name} is encrypted: attach it with its key (--key-file FILE or --key-env VAR)`,
          );
        const master = unwrapKey(asWrappedKey(record.encryption, name), userKey, name);
        if (!this.#attached.has(name)) this.#keys.set(name, new SectorCipher(master));
      } else if (userKey)
        throw new CorralError(
          'INVALID_ARGUMENT',
          `Volume ${name} is not encrypted: it takes no key`,
        );
      if (
        this.#shared &&
        record.attached &&
        record.engineNode !== undefined &&
        record.engineNode !== this.#nodeName
      )
        await this.#takeFrom(record);
      if (!record.attached || (frontend !== undefined && record.frontend !== frontend)) {
        record =
          (await this.#o.records.update(name, (rec) => {
            rec.attached = true;
            if (frontend !== undefined) rec.frontend = frontend;
          })) ?? record;
      }
      record = await this.#attach(record);
      this.#o.events.add({ type: 'volume-attached', volume: name, message: 'attached' });
      return this.#info(record, new Set());
    });
  }

  /**
   * Makes another node's engine let go of a volume before this node takes
   * it: asked to (`release`) when the node is up, else taken over.
   */
  async #takeFrom(record: VolumeRecord): Promise<void> {
    const nodes = await this.#o.cluster!.nodes();
    const owner = nodes.find((n) => n.name === record.engineNode);
    if (owner?.state === 'up') {
      this.#o.events.add({
        type: 'volume-moving',
        volume: record.name,
        message: `from node ${owner.name ?? owner.url} to ${this.#nodeName ?? '?'}`,
      });
      await this.#o.cluster!.call(
        owner.url,
        'POST',
        `/v1/peer/volumes/${encodeURIComponent(record.name)}/release`,
        {},
        { timeoutMs: FORWARD_TIMEOUT_MS },
      );
      return;
    }
    this.#o.events.add({
      type: 'volume-takeover',
      volume: record.name,
      message: `node ${record.engineNode ?? '?'} is down (its lease expired): ${this.#nodeName ?? '?'} takes the volume over with epoch ${(record.epoch ?? 0) + 1}`,
    });
  }

  /**
   * Another node takes this volume (a planned move): the engine here drains
   * and stops — in-flight requests finish, everything is flushed — and its
   * NBD clients are disconnected so that they reconnect to the new node.
   * The record keeps naming this node until the new one claims it.
   */
  async release(name: string): Promise<void> {
    await this.#serially(name, `release volume ${name}`, async () => {
      const record = await this.#record(name);
      await this.#detach(record, true);
      this.#o.events.add({ type: 'volume-released', volume: name, message: 'to another node' });
    });
  }

  /**
   * In a cluster: the API address of the node whose engine serves `name`,
   * when that is another node and it is up (the API forwards the volume's
   * calls there); else undefined.
   */
  async engineElsewhere(name: string): Promise<string | undefined> {
    if (!this.#shared) return undefined;
    const record = await this.#o.records.get(name);
    if (!record?.attached || !record.engineNode || record.engineNode === this.#nodeName)
      return undefined;
    const owner = (await this.#o.cluster!.nodes({ cached: true })).find(
      (n) => n.name === record.engineNode,
    );
    return owner?.state === 'up' ? owner.url : undefined;
  }

  async detach(name: string, options?: { force?: boolean }): Promise<VolumeInfo> {
    return this.#serially(name, `detach volume ${name}`, async () => {
      let record = await this.#record(name);
      await this.#detach(record, options?.force ?? false);
      record =
        (await this.#o.records.update(name, (rec) => {
          rec.attached = false;
        })) ?? record;
      this.#o.events.add({ type: 'volume-detached', volume: name, message: 'detached' });
      return this.#info(record, new Set());
    });
  }

  async #detach(record: VolumeRecord, force: boolean): Promise<void> {
    const entry = this.#attached.get(record.name);
    if (!entry) return;
    this.#holds.check(record.name, undefined, 'detach it');
    this.#repairs.abort(record.name);
    const clients = this.#o.connections(record.name);
    if (clients > 0 && !force) {
      throw new CorralError(
        'BUSY',
        `Volume ${record.name} is in use by ${clients} NBD connection${clients === 1 ? '' : 's'}; disconnect them or use --force`,
      );
    }
    // An open image cannot be forced away: the kernel would see its file vanish under a mount.
    const holders = await this.#o.imageHolders(record.name);
    if (holders.length > 0) {
      throw new CorralError(
        'BUSY',
        `Volume ${record.name}'s image is open (${holders.join(', ')}); unmount and detach it first (losetup -d)`,
      );
    }
    this.#o.disconnect(record.name);
    this.#attached.delete(record.name);
    this.#frontends.delete(record.name);
    this.#nbdAllow.delete(record.name);
    this.#keys.delete(record.name);
    this.#standby.get(record.name)?.open(true);
    this.#standby.delete(record.name);
    await entry.supervisor.stop();
  }

  async remove(name: string, options?: { force?: boolean }): Promise<void> {
    await this.#serially(name, `remove volume ${name}`, async () => {
      const record = await this.#record(name);
      await this.#detach(record, options?.force ?? false);
      // The volume record goes first: once it is gone, leftover replicas are unowned and
      // the next start removes them, so a crash here never leaves a volume half there.
      await this.#o.records.del(name);
      this.#restoring.delete(name);
      for (const id of record.replicaIds) {
        await LocalReplica.destroy({ spaces: this.#o.spaces, root: this.#o.replicaRoot, id });
      }
      await this.#peers.remove(name, record.remoteReplicas ?? []);
      this.#o.meters?.forget(name);
      this.#o.events.add({ type: 'volume-removed', volume: name, message: 'removed' });
    });
  }

  /**
   * Picks the peers for a volume's other replicas: one replica per host
   * (this host keeps the first, next to the engine), the hosts with the most
   * free space first.
   */
  async #place(
    name: string,
    sizeBytes: number,
    count: number,
    allowSameHost: boolean,
  ): Promise<NodeInfo[]> {
    const nodes: NodeInfo[] = (await this.#o.cluster?.nodes()) ?? [];
    const chosen = placeReplicas({
      volume: name,
      sizeBytes,
      count,
      nodes,
      selfRequired: true,
      allowFewer: allowSameHost,
      hint:
        nodes.length > 1 ? '; --allow-same-host puts the rest on this host' : ' (no --peer given)',
    });
    return chosen.slice(1);
  }

  /** A cluster's placement: `count` nodes of the registry, this one first if it qualifies. */
  async #placeInCluster(name: string, sizeBytes: number, count: number): Promise<NodeInfo[]> {
    return placeReplicas({
      volume: name,
      sizeBytes,
      count,
      nodes: await this.#o.cluster!.nodes({ cached: true }),
      selfRequired: false,
    });
  }

  async list(): Promise<VolumeInfo[]> {
    const [records, up] = await Promise.all([this.#o.records.entries(), this.#upNodes()]);
    return records.map(([, v]) => this.#info(v, up));
  }

  async get(name: string): Promise<VolumeInfo> {
    const [record, up] = await Promise.all([this.#record(name), this.#upNodes()]);
    return this.#info(record, up);
  }

  /** In a cluster, the names of the nodes that are up (an engine elsewhere serves if its node is). */
  async #upNodes(): Promise<Set<string>> {
    if (!this.#shared) return new Set();
    const nodes = await this.#o.cluster!.nodes();
    return new Set(nodes.filter((n) => n.state === 'up').map((n) => n.name ?? ''));
  }

  #info(record: VolumeRecord, upNodes: Set<string>): VolumeInfo {
    return volumeInfo(record, {
      supervisor: this.#attached.get(record.name)?.supervisor,
      shared: this.#shared,
      nodeName: this.#nodeName,
      upNodes,
      nbdConnections: this.#o.connections(record.name),
      nowMs: this.#o.clock.nowMs(),
    });
  }

  /** The block device of an attached volume, or of `volume@snapshot` (read-only), for the frontends. */
  device(name: string): BlockDevice | undefined {
    const at = name.indexOf('@');
    if (this.#restoring.has(at < 0 ? name : name.slice(0, at))) return undefined;
    if (at < 0) return this.#attached.get(name)?.view;
    const entry = this.#attached.get(name.slice(0, at));
    const snapshot = name.slice(at + 1);
    if (!entry?.supervisor.engine?.snapshots().some((s) => s.name === snapshot)) return undefined;
    const device = entry.supervisor.snapshotDevice(snapshot);
    return entry.cipher ? encryptedDevice(device, entry.cipher) : device;
  }

  #attachedEntry(name: string, what: string): { supervisor: Supervisor; cipher?: SectorCipher } {
    const entry = this.#attached.get(validateVolumeName(name));
    if (!entry) {
      throw new CorralError(
        'NOT_FOUND',
        `Volume ${name} is not attached here; attach it to ${what}`,
      );
    }
    return entry;
  }

  snapshots(volume: string): Promise<SnapshotInfo[]> {
    return this.#snapshots.list(volume);
  }

  createSnapshot(volume: string, name?: unknown): Promise<SnapshotInfo> {
    return this.#snapshots.create(volume, name);
  }
  /**
   * Online expand of an attached volume. The replicas grow first (the engine
   * pauses I/O meanwhile, each replica's own record is its commit point), the
   * volume record last: a crash in between leaves the old size in the record,
   * and the next attach grows any replica left smaller (engine-factory.ts).
   */
  async expand(volume: string, size: unknown): Promise<VolumeInfo> {
    validateVolumeName(volume);
    const sizeBytes = validateVolumeSize(size);
    await this.#serially(volume, 'expand it', async () => {
      const record = await this.#record(volume);
      if (sizeBytes < record.sizeBytes)
        throw new CorralError(
          'INVALID_SIZE',
          `Volume ${volume} is ${record.sizeBytes} bytes; it cannot shrink to ${sizeBytes}`,
        );
      if (record.restoring !== undefined)
        throw new CorralError('BUSY', `Volume ${volume} is being restored; expand it after`);
      if (record.standby)
        throw new CorralError(
          'READ_ONLY',
          `Volume ${volume} is a standby: it takes the size of the backups it follows (activate it first)`,
        );
      await this.#grow(record, sizeBytes);
    });
    return this.get(volume);
  }

  /** The expand itself, in the volume's lane. */
  async #grow(record: VolumeRecord, sizeBytes: number): Promise<void> {
    const volume = record.name;
    const entry = this.#attachedEntry(volume, 'expand it');
    if (sizeBytes === record.sizeBytes && entry.supervisor.sizeBytes === sizeBytes) return;
    await entry.supervisor.control('expand', (e) => e.expand(sizeBytes));
    await this.#o.records.update(volume, (r) => {
      r.sizeBytes = sizeBytes;
    });
    this.#o.events.add({
      type: 'volume-expanded',
      volume,
      message: `${record.sizeBytes} → ${sizeBytes} bytes`,
    });
    await this.#o.resized?.(volume).catch(() => undefined);
  }

  /** The attached standby volumes of this host, with their records. */
  async standbys(): Promise<Array<{ name: string; standby: StandbyRecord }>> {
    const out: Array<{ name: string; standby: StandbyRecord }> = [];
    for (const name of this.#standby.keys()) {
      // As last seen: polls look every second (in a cluster, the watch keeps it current).
      const standby = (await this.#o.records.cached(name))?.standby;
      if (standby && !this.#restoring.has(name)) out.push({ name, standby });
    }
    return out;
  }

  /**
   * Applies a backup to a standby volume, in its lane: readers wait, the
   * record names the backup being applied (a crash leaves it: the next apply
   * rewrites every block, and reads are refused until then), the volume grows
   * to the backup's size, `apply` writes; then the record names the backup
   * it holds and readers pass again.
   */
  async applyStandby<T>(
    name: string,
    backup: { name: string; sizeBytes: number; snapshotAt: string },
    apply: (device: BlockDevice, held: StandbyRecord) => Promise<T>,
  ): Promise<T> {
    return this.#serially(name, `apply backup ${backup.name}`, async () => {
      const record = await this.#record(name);
      const held = record.standby;
      const gate = this.#standby.get(name);
      if (!held || !gate)
        throw new CorralError('INVALID_ARGUMENT', `Volume ${name} is not an attached standby`);
      if (backup.sizeBytes < record.sizeBytes)
        throw new CorralError(
          'INVALID_SIZE',
          `Backup ${backup.name} is ${backup.sizeBytes} bytes, smaller than standby ${name} (${record.sizeBytes}): not the volume it followed (was it made again?)`,
        );
      gate.close();
      let whole = false;
      try {
        await this.#o.records.update(name, (r) => {
          if (r.standby) r.standby.applying = backup.name;
        });
        await this.#grow(record, backup.sizeBytes);
        const result = await apply(this.#attachedEntry(name, 'apply a backup').supervisor, held);
        await this.#o.records.update(name, (r) => {
          if (!r.standby) return;
          delete r.standby.applying;
          if (r.standby.backupAt !== undefined) r.standby.previousAt = r.standby.backupAt;
          r.standby.backup = backup.name;
          r.standby.backupAt = backup.snapshotAt;
        });
        whole = true;
        return result;
      } finally {
        gate.open(!whole);
      }
    });
  }

  /**
   * A standby stops following its backups and becomes a normal volume,
   * writable, holding the last backup it applied whole. Its NBD clients
   * (read-only) are disconnected: they reconnect to a writable export.
   */
  async activate(name: string): Promise<VolumeInfo> {
    validateVolumeName(name);
    await this.#serially(name, 'activate it', async () => {
      const record = await this.#record(name);
      if (!record.standby)
        throw new CorralError('INVALID_ARGUMENT', `Volume ${name} is not a standby volume`);
      if (record.restoring !== undefined)
        throw new CorralError('BUSY', `Standby ${name} is still being restored: activate it after`);
      if (record.standby.applying !== undefined)
        throw new CorralError(
          'UNAVAILABLE',
          `Standby ${name} holds part of backup ${record.standby.applying} (its apply was cut off): it is applied whole at the next poll; activate it then (is ${record.standby.from} reachable?)`,
        );
      const held = record.standby.backup;
      await this.#o.records.update(name, (r) => {
        delete r.standby;
      });
      const entry = this.#attached.get(name);
      if (entry)
        entry.view = entry.cipher
          ? encryptedDevice(entry.supervisor, entry.cipher)
          : entry.supervisor;
      this.#standby.get(name)?.open(false);
      this.#standby.delete(name);
      this.#o.disconnect(name);
      this.#o.events.add({
        type: 'standby-activated',
        volume: name,
        message: `writable, holding backup ${held ?? '?'}`,
      });
    });
    return this.get(name);
  }

  /**
   * Changes a volume's I/O limits, live when it is attached: the limits given
   * replace those set (0 removes one), the others stay.
   */
  async setQos(volume: string, input: unknown): Promise<VolumeInfo> {
    validateVolumeName(volume);
    const change = validateQos(input);
    await this.#serially(volume, 'set its limits', async () => {
      await this.#record(volume);
      const updated = await this.#o.records.update(volume, (r) => {
        r.qos = limitsSet({ ...(r.qos ?? {}), ...change });
      });
      this.#attached.get(volume)?.supervisor.setQos(updated?.qos ?? {});
      this.#o.events.add({
        type: 'volume-limits-set',
        volume,
        message: describeLimits(updated?.qos ?? {}),
      });
    });
    return this.get(volume);
  }

  /**
   * A new user key for an encrypted volume: the master key is unwrapped with
   * the old one (refused if wrong) and wrapped with the new one; no data is
   * rewritten, and the old key no longer opens the volume.
   */
  async rekey(volume: string, input: { key?: unknown; newKey?: unknown }): Promise<VolumeInfo> {
    validateVolumeName(volume);
    const oldKey = userKeyFrom(input.key);
    const newKey = userKeyFrom(input.newKey);
    await this.#serially(volume, 'change its key', async () => {
      const record = await this.#record(volume);
      if (!record.encryption)
        throw new CorralError('INVALID_ARGUMENT', `Volume ${volume} is not encrypted`);
      const master = unwrapKey(asWrappedKey(record.encryption, volume), oldKey, volume);
      const wrapped = wrapKey(master, newKey);
      await this.#o.records.update(volume, (r) => {
        r.encryption = wrapped;
      });
      this.#o.events.add({
        type: 'volume-rekeyed',
        volume,
        message: `key ${String(record.encryption.keyId)} replaced by ${wrapped.keyId}`,
      });
    });
    return this.get(volume);
  }

  deleteSnapshot(volume: string, name: string): Promise<void> {
    return this.#snapshots.delete(volume, name);
  }

  revert(
    volume: string,
    name: string,
    options: { discardNewer?: boolean },
  ): Promise<{ removed: string[] }> {
    return this.#snapshots.revert(volume, name, options);
  }

  /** Read access to one snapshot for a long job (`VolumeSnapshots.access`). */
  snapshotAccess(
    volume: string,
    snapshot: string,
    options: { plaintext?: boolean } = {},
  ): ReturnType<VolumeSnapshots['access']> {
    return this.#snapshots.access(volume, snapshot, options);
  }

  /** The device of a volume being restored (hidden from the frontends until `finishRestore`). */
  restoreDevice(name: string): BlockDevice {
    const entry = this.#attached.get(name);
    if (!entry || !this.#restoring.has(name))
      throw new CorralError('NOT_FOUND', `Volume ${name} is not being restored`);
    return entry.supervisor;
  }

  async finishRestore(name: string): Promise<void> {
    await this.#record(name);
    await this.#o.records.update(name, (rec) => {
      delete rec.restoring;
    });
    this.#restoring.delete(name);
  }

  /** Whether an NBD client with this TLS identity may open an export (`vol` or `vol@snap`). */
  nbdPermits(exportName: string, identity: string | undefined): boolean {
    const allow = this.#nbdAllow.get(exportName.split('@')[0]!);
    return allow === undefined || (identity !== undefined && allow.includes(identity));
  }

  attachedNames(): string[] {
    return [...this.#attached.keys()].filter((n) => !this.#restoring.has(n)).sort();
  }

  /** Attached volumes shown as FUSE images (NBD serves every attached volume). */
  fuseNames(): string[] {
    return this.attachedNames().filter((n) => this.#frontends.get(n) === 'fuse');
  }

  /** The device behind a FUSE image: only volumes attached with the FUSE frontend have one. */
  fuseDevice(name: string): BlockDevice | undefined {
    return this.#frontends.get(name) === 'fuse' ? this.device(name) : undefined;
  }
  /** Takes a replica out of a volume; the repair loop then places a new one. */
  async removeReplica(name: string, id: string): Promise<void> {
    validateVolumeName(name);
    await this.#serially(name, `remove replica ${id}`, () => this.#removeReplica(name, id));
  }

  async #removeReplica(name: string, id: string): Promise<void> {
    const record = await this.#record(name);
    const entry = this.#attachedEntry(name, 'remove a replica');
    await entry.supervisor.control(`remove replica ${id}`, (e) => e.removeReplica(id));
    const remote = (record.remoteReplicas ?? []).filter((r) => r.id === id);
    const local = record.replicaIds.includes(id);
    await this.#o.records.update(name, (rec) => {
      rec.remoteReplicas = (rec.remoteReplicas ?? []).filter((r) => r.id !== id);
      rec.replicaIds = rec.replicaIds.filter((r) => r !== id);
      rec.failedReplicas = (rec.failedReplicas ?? []).filter((r) => r !== id);
    });
    if (local)
      await LocalReplica.destroy({ spaces: this.#o.spaces, root: this.#o.replicaRoot, id });
    await this.#peers.remove(name, remote);
  }

  /** Compares all healthy replicas of a volume, as an operation. */
  async verify(name: string): Promise<{
    operation: Operation;
    done: Promise<{ replicas: number; differences: Difference[] }>;
  }> {
    await this.#record(name);
    const entry = this.#attachedEntry(name, 'verify it');
    const ops = this.#o.operations;
    if (!ops) throw new CorralError('INTERNAL', 'operations are not set up');
    return ops.start(
      'verify',
      `volume ${name}`,
      name,
      (update) =>
        this.#serially(name, 'verify', () =>
          entry.supervisor.control('verify', async (e) => {
            const replicas = e.replicaModes().filter((m) => m.mode === 'RW').length;
            // Every snapshot and the live volume are compared: shown as one pass over the
            // volume (a 4 GiB volume with a snapshot counted to 8 GiB), bytes read as they are.
            const differences = await e.verify((done, total) =>
              update({
                phase: 'verify',
                done: Math.round((done / total) * e.sizeBytes),
                total: e.sizeBytes,
                bytes: done,
              }),
            );
            return { replicas, differences };
          }),
        ),
      (r) =>
        r.differences.length === 0
          ? `${r.replicas} replicas identical`
          : `${r.differences.length} ranges differ`,
    );
  }

  /** Checks every block of every healthy replica against its checksum (see Engine.scrub). */
  async scrubNow(
    name: string,
    onProgress?: (done: number, total: number) => void,
  ): Promise<ScrubReport[]> {
    await this.#record(name);
    const entry = this.#attachedEntry(name, 'scrub it');
    return this.#serially(name, 'scrub', () =>
      entry.supervisor.control('scrub', (e) => e.scrub(onProgress)),
    );
  }

  /** `scrubNow` as an operation with progress. */
  async scrub(name: string): Promise<{
    operation: Operation;
    done: Promise<{ replicas: ScrubReport[] }>;
  }> {
    await this.#record(name);
    this.#attachedEntry(name, 'scrub it');
    const ops = this.#o.operations;
    if (!ops) throw new CorralError('INTERNAL', 'operations are not set up');
    return ops.start(
      'scrub',
      `volume ${name}`,
      name,
      async (update) => ({
        replicas: await this.scrubNow(name, (done, total) =>
          update({ phase: 'scrub', done, total, bytes: done }),
        ),
      }),
      (r) => {
        const bad = r.replicas.filter((x) => x.bad.length > 0);
        return bad.length === 0
          ? `${r.replicas.length} replicas clean`
          : bad.map((x) => `${x.replica}: ${x.bad.length} bad blocks`).join('; ');
      },
    );
  }

  setFault(name: string, mode: FaultMode): void {
    const entry = this.#attached.get(name);
    if (!entry) throw new CorralError('NOT_FOUND', `Volume ${name} is not attached`);
    if (!entry.fault)
      throw new CorralError('INVALID_ARGUMENT', 'fault injection is not enabled on this daemon');
    entry.fault.setMode(mode);
  }

  /** Flushes and closes every engine (graceful stop). */
  async stop(): Promise<void> {
    this.#repairs.stop();
    const entries = [...this.#attached.values()];
    this.#attached.clear();
    const results = await Promise.allSettled(entries.map((e) => e.supervisor.stop()));
    for (const r of results) {
      if (r.status === 'rejected')
        this.#o.events.add({ type: 'stop-failed', message: String(r.reason) });
    }
  }
}

/** The limits that are set (0 means none: dropped). */
function limitsSet(limits: QosLimits): QosLimits {
  return Object.fromEntries(Object.entries(limits).filter(([, v]) => v > 0));
}

function describeLimits(limits: QosLimits): string {
  const set = Object.entries(limits);
  return set.length === 0 ? 'no limits' : set.map(([k, v]) => `${k} ${v}`).join(', ');
}

function validateDiskTag(input: unknown): string {
  if (typeof input !== 'string' || !/^[a-z0-9][a-z0-9-]{0,31}$/.test(input))
    throw new CorralError(
      'INVALID_ARGUMENT',
      'diskTag is a disk tag: lower-case letters, digits and dashes, at most 32',
    );
  return input;
}
