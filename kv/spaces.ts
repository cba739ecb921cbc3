import { binaryCodec, field, jsonCodec } from './codec.ts';
import type { KeySpace, Kv, KvBatch } from './kv.ts';
import { CorralError } from '../common/errors.ts';

/**
 * The on-disk metadata format of a host, in one place. Prefixes never change
 * meaning; a new format of a record gets a new version number in its codec.
 */

export type Frontend = 'nbd' | 'fuse';

export interface VolumeRecord {
  name: string;
  sizeBytes: number;
  replicaCount: number;
  frontend: Frontend;
  createdAt: string;
  /** The user asked for it to be attached: it is attached again at daemon start. */
  attached: boolean;
  /** The ids of this volume's replicas on this host. */
  replicaIds: string[];
  /** Being restored from this backup: not served until done, removed if the daemon died meanwhile. */
  restoring?: string;
  /**
   * Replicas on other hosts: their id there and the host's API URL (in a
   * cluster, every replica, with its node's name: the URL is where the node
   * was when the replica was made; the node registry knows where it is now).
   */
  remoteReplicas?: Array<{ id: string; url: string; node?: string }>;
  /** In a cluster: the node whose engine serves the volume (or served it last). */
  engineNode?: string;
  /** In a cluster: re-attached on a surviving replica node when the engine's node goes down. */
  failover?: 'auto';
  /** Grows at every attach: a host keeping a replica refuses streams from older engines. */
  epoch?: number;
  /** Replicas set to ERR (they missed writes): never trusted again until rebuilt. */
  failedReplicas?: string[];
  /** Only these TLS identities (certificate CN, PSK user) may open it over NBD. */
  nbdAllow?: string[];
  /** I/O limits (replication/qos.ts); absent: none. */
  qos?: Record<string, number>;
  /** Its replicas go to disks with this tag. */
  diskTag?: string;
  /** Encrypted: the master key wrapped by the user's key (replication/crypt.ts `WrappedKey`). */
  encryption?: Record<string, string | number>;
  /** A standby (DR) volume: read-only, following a volume's backups (daemon/standby.ts). */
  standby?: StandbyRecord;
}

export interface StandbyRecord {
  /** The backups it follows: a target URL naming a volume (`?volume=NAME`). */
  from: string;
  /** How often the target is looked at for a newer backup. */
  pollMs: number;
  /** The last backup it holds whole, and when that backup's snapshot was taken. */
  backup?: string;
  backupAt?: string;
  /** When the snapshot of the backup before that one was taken: the backups' interval. */
  previousAt?: string;
  /** A backup being applied: until it is done the volume holds a mix and is not served. */
  applying?: string;
  /** The key id the backups are encrypted under (the key itself is never stored). */
  keyId?: string;
}

export interface LayerRecord {
  id: string;
  createdAt: string;
  /** Snapshot name; absent on the head (the live, writable layer). */
  snapshot?: string;
  /** When the snapshot was taken (the layer was frozen); older records lack it. */
  snapshotAt?: string;
  /**
   * A snapshot's size, when the volume has been expanded since (a snapshot
   * keeps the size it was taken at); absent: the replica's size.
   */
  sizeBytes?: number;
}

export interface ReplicaRecord {
  id: string;
  volume: string;
  sizeBytes: number;
  /** Oldest first; the last one is the head. */
  layers: LayerRecord[];
  /** A snapshot layer being merged into its child (a delete cut off by a crash resumes). */
  deleting?: string;
  /** The replica root it lives under, when on another disk than the data dir's. */
  root?: string;
}

function validateVolume(r: Record<string, unknown>, key: string): VolumeRecord {
  const frontend = field<string>(r, key, 'frontend', 'string');
  if (frontend !== 'nbd' && frontend !== 'fuse') {
    throw new CorralError('CORRUPT_METADATA', `record ${key}: unknown frontend ${frontend}`);
  }
  const replicaIds = r.replicaIds;
  if (!Array.isArray(replicaIds) || !replicaIds.every((x) => typeof x === 'string')) {
    throw new CorralError('CORRUPT_METADATA', `record ${key}: replicaIds is not a string list`);
  }
  return {
    name: field(r, key, 'name', 'string'),
    sizeBytes: field(r, key, 'sizeBytes', 'number'),
    replicaCount: field(r, key, 'replicaCount', 'number'),
    frontend,
    createdAt: field(r, key, 'createdAt', 'string'),
    attached: field(r, key, 'attached', 'boolean'),
    replicaIds,
    ...(typeof r.restoring === 'string' ? { restoring: r.restoring } : {}),
    ...(Array.isArray(r.remoteReplicas)
      ? {
          remoteReplicas: (r.remoteReplicas as Array<Record<string, unknown>>).map((x) => ({
            id: field<string>(x, key, 'id', 'string'),
            url: field<string>(x, key, 'url', 'string'),
            ...(typeof x.node === 'string' ? { node: x.node } : {}),
          })),
        }
      : {}),
    ...(typeof r.epoch === 'number' ? { epoch: r.epoch } : {}),
    ...(typeof r.engineNode === 'string' ? { engineNode: r.engineNode } : {}),
    ...(r.failover === 'auto' ? { failover: 'auto' as const } : {}),
    ...(Array.isArray(r.nbdAllow) && r.nbdAllow.every((i) => typeof i === 'string')
      ? { nbdAllow: r.nbdAllow }
      : {}),
    ...(typeof r.diskTag === 'string' ? { diskTag: r.diskTag } : {}),
    ...(typeof r.encryption === 'object' && r.encryption !== null
      ? { encryption: r.encryption as Record<string, string | number> }
      : {}),
    ...(typeof r.standby === 'object' && r.standby !== null
      ? { standby: validateStandby(r.standby as Record<string, unknown>, key) }
      : {}),
    ...(typeof r.qos === 'object' && r.qos !== null
      ? {
          qos: Object.fromEntries(
            Object.entries(r.qos).filter((e): e is [string, number] => typeof e[1] === 'number'),
          ),
        }
      : {}),
    ...(Array.isArray(r.failedReplicas)
      ? { failedReplicas: r.failedReplicas.filter((x): x is string => typeof x === 'string') }
      : {}),
  };
}

function validateStandby(r: Record<string, unknown>, key: string): StandbyRecord {
  const text = (name: string): Record<string, string> =>
    typeof r[name] === 'string' ? { [name]: r[name] } : {};
  return {
    from: field(r, key, 'from', 'string'),
    pollMs: field(r, key, 'pollMs', 'number'),
    ...text('backup'),
    ...text('backupAt'),
    ...text('previousAt'),
    ...text('applying'),
    ...text('keyId'),
  };
}

/** How a job record is stored, in LevelDB and in etcd alike. */
export const jobCodec = jsonCodec('job', 1, validateJob);

/** How a volume record is stored, in LevelDB and in etcd alike. */
export const volumeCodec = jsonCodec('volume', 1, validateVolume);

function validateReplica(r: Record<string, unknown>, key: string): ReplicaRecord {
  const layers = r.layers;
  if (!Array.isArray(layers) || layers.length === 0) {
    throw new CorralError('CORRUPT_METADATA', `record ${key}: a replica needs at least one layer`);
  }
  return {
    id: field(r, key, 'id', 'string'),
    volume: field(r, key, 'volume', 'string'),
    sizeBytes: field(r, key, 'sizeBytes', 'number'),
    ...(typeof r.deleting === 'string' ? { deleting: r.deleting } : {}),
    ...(typeof r.root === 'string' ? { root: r.root } : {}),
    layers: layers.map((l: unknown, i) => {
      if (typeof l !== 'object' || l === null) {
        throw new CorralError('CORRUPT_METADATA', `record ${key}: layer ${i} is not an object`);
      }
      const layer = l as Record<string, unknown>;
      const out: LayerRecord = {
        id: field(layer, key, 'id', 'string'),
        createdAt: field(layer, key, 'createdAt', 'string'),
      };
      if (typeof layer.snapshot === 'string') out.snapshot = layer.snapshot;
      if (typeof layer.snapshotAt === 'string') out.snapshotAt = layer.snapshotAt;
      if (typeof layer.sizeBytes === 'number') out.sizeBytes = layer.sizeBytes;
      return out;
    }),
  };
}

export interface JobRecord {
  id: string;
  volume: string;
  cron: string;
  task: 'snapshot' | 'backup' | 'scrub';
  /** Snapshots (or backups) of this job kept; older ones are deleted after each run. */
  retain: number;
  /** Backup target URL; the daemon's default when absent. */
  target?: string;
  createdAt: string;
  lastRunAt?: string;
  lastOutcome?: string;
}

function validateJob(r: Record<string, unknown>, key: string): JobRecord {
  const task = field<string>(r, key, 'task', 'string');
  if (task !== 'snapshot' && task !== 'backup' && task !== 'scrub') {
    throw new CorralError('CORRUPT_METADATA', `record ${key}: unknown task ${task}`);
  }
  return {
    id: field(r, key, 'id', 'string'),
    volume: field(r, key, 'volume', 'string'),
    cron: field(r, key, 'cron', 'string'),
    task,
    retain: field(r, key, 'retain', 'number'),
    createdAt: field(r, key, 'createdAt', 'string'),
    ...(typeof r.target === 'string' ? { target: r.target } : {}),
    ...(typeof r.lastRunAt === 'string' ? { lastRunAt: r.lastRunAt } : {}),
    ...(typeof r.lastOutcome === 'string' ? { lastOutcome: r.lastOutcome } : {}),
  };
}

export interface HostedRecord {
  id: string;
  volume: string;
  /** The API URL of the daemon running the volume's engine. */
  engine: string;
  /** The newest engine epoch seen: streams from older engines are refused. */
  epoch: number;
  createdAt: string;
}

function validateHosted(r: Record<string, unknown>, key: string): HostedRecord {
  return {
    id: field(r, key, 'id', 'string'),
    volume: field(r, key, 'volume', 'string'),
    engine: field(r, key, 'engine', 'string'),
    epoch: field(r, key, 'epoch', 'number'),
    createdAt: field(r, key, 'createdAt', 'string'),
  };
}

/** An API token: only a hash of it is kept (daemon/auth.ts). */
export interface TokenRecord {
  name: string;
  role: 'read-only' | 'operator' | 'admin';
  /** SHA-256 of the whole token, hex. */
  hash: string;
  createdAt: string;
}

function validateToken(r: Record<string, unknown>, key: string): TokenRecord {
  const role = field<string>(r, key, 'role', 'string');
  if (role !== 'read-only' && role !== 'operator' && role !== 'admin')
    throw new CorralError('CORRUPT_METADATA', `record ${key}: unknown role "${role}"`);
  return {
    name: field(r, key, 'name', 'string'),
    role,
    hash: field(r, key, 'hash', 'string'),
    createdAt: field(r, key, 'createdAt', 'string'),
  };
}

/** How a token record is stored, in LevelDB and in etcd alike. */
export const tokenCodec = jsonCodec('token', 1, validateToken);

export interface Spaces {
  volumes: KeySpace<VolumeRecord>;
  replicas: KeySpace<ReplicaRecord>;
  /** Layer allocation bitmaps: key `<layerId>/<chunk, 8 hex digits>`. */
  bitmaps: KeySpace<Uint8Array>;
  /** Replica revision counters: key `<replicaId>`, 8 bytes big-endian. */
  revisions: KeySpace<Uint8Array>;
  /** Block checksums of a layer: key `<layerId>/<sum chunk, 8 hex digits>`, 1024 × u32 LE. */
  sums: KeySpace<Uint8Array>;
  /**
   * Write-intent marks: regions (bitmap chunks, 128 MiB of volume) of a layer
   * that may hold writes newer than their stored checksums. Key
   * `<replicaId>/<layerId>/<chunk, 8 hex digits>`, empty value; set (synced)
   * before the first write into a region, cleared (with the region's sums) by
   * a flush after the region has had no writes for a few seconds; a region
   * still marked at open has its sums recomputed from the data, so a crash
   * never reads as corruption.
   */
  marks: KeySpace<Uint8Array>;
  /** Replicas kept here for engines on other hosts: key `<replicaId>`. */
  hosted: KeySpace<HostedRecord>;
  /** Replicas on peers that a volume removal could not delete yet: key `<replicaId>`; retried. */
  /** Replicas on other hosts to delete when they answer (`node`: in a cluster, found by name). */
  leftovers: KeySpace<{ id: string; url: string; node?: string; volume: string; since: string }>;
  /** This node: key `self`. */
  node: KeySpace<{ id: string; secret: string; createdAt: string }>;
  /** Recurring jobs: key `<jobId>`. */
  jobs: KeySpace<JobRecord>;
  /** API tokens (one host; a cluster keeps them in etcd): key `<name>`. */
  tokens: KeySpace<TokenRecord>;
  /** A batch across these spaces, written atomically. */
  batch(): KvBatch;
}

export function openSpaces(kv: Kv): Spaces {
  return {
    volumes: kv.space('vol', volumeCodec),
    replicas: kv.space('rep', jsonCodec('replica', 1, validateReplica)),
    bitmaps: kv.space('bmp', binaryCodec('bitmap', 1)),
    revisions: kv.space('rev', binaryCodec('revision', 1)),
    sums: kv.space('sum', binaryCodec('block sums', 1)),
    marks: kv.space('drt', binaryCodec('checksum mark', 1)),
    jobs: kv.space('job', jobCodec),
    tokens: kv.space('tok', tokenCodec),
    hosted: kv.space('hst', jsonCodec('hosted replica', 1, validateHosted)),
    leftovers: kv.space(
      'lft',
      jsonCodec('left-behind replica', 1, (r, key) => ({
        id: field<string>(r, key, 'id', 'string'),
        url: field<string>(r, key, 'url', 'string'),
        ...(typeof r.node === 'string' ? { node: r.node } : {}),
        volume: field<string>(r, key, 'volume', 'string'),
        since: field<string>(r, key, 'since', 'string'),
      })),
    ),
    node: kv.space(
      'nod',
      jsonCodec('node', 1, (r, key) => ({
        id: field<string>(r, key, 'id', 'string'),
        secret: field<string>(r, key, 'secret', 'string'),
        createdAt: field<string>(r, key, 'createdAt', 'string'),
      })),
    ),
    batch: () => kv.batch(),
  };
}

export function bitmapKey(layerId: string, chunk: number): string {
  return `${layerId}/${chunk.toString(16).padStart(8, '0')}`;
}
