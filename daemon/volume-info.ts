import type { Frontend, StandbyRecord, VolumeRecord } from '../kv/spaces.ts';
import type { QosLimits } from '../replication/qos.ts';
import type { RebuildProgress } from '../replication/rebuild.ts';
import type { Supervisor } from '../replication/supervisor.ts';

export interface VolumeInfo {
  name: string;
  sizeBytes: number;
  replicaCount: number;
  frontend: Frontend;
  createdAt: string;
  attached: boolean;
  state: 'attached' | 'detached' | 'failed' | 'restoring';
  /** In a cluster: the node whose engine serves the volume (or served it last). */
  node?: string;
  /** In a cluster: `auto` when a surviving node takes the volume over by itself. */
  failover?: 'auto';
  /** Only these TLS identities may open it over NBD. */
  nbdAllow?: string[];
  /** I/O limits; absent: none. */
  qos?: QosLimits;
  /** Encrypted at rest; `keyId` names the key it needs (a digest, not the key). */
  encrypted?: { keyId: string };
  /** A standby (DR) volume: read-only, following another volume's backups. */
  standby?: StandbyInfo;
  engineRestarts: number;
  nbdConnections: number;
  replicas: Array<{
    id: string;
    location: string;
    mode: string;
    revision: string;
    rebuild?: RebuildProgress;
  }>;
}

export interface StandbyInfo {
  /** The backups it follows (a target naming a volume). */
  from: string;
  pollSeconds: number;
  /** The backup it holds, and when that backup's snapshot was taken. */
  backup?: string;
  backupTakenAt?: string;
  /** How old the data it holds is: now minus that snapshot's time. */
  behindSeconds?: number;
  /**
   * The data a disaster at the source can cost at most once it is activated:
   * the poll interval plus the interval between the last two backups.
   */
  rpoSeconds?: number;
  /** A backup being applied (or whose apply was cut off: then reads are refused). */
  applying?: string;
}

/** What a volume's view needs beyond its record: its engine here, if any, and the cluster. */
export interface InfoContext {
  /** The volume's supervisor when its engine runs on this node. */
  supervisor: Supervisor | undefined;
  /** In a cluster (`--etcd`): another node's engine may serve it. */
  shared: boolean;
  nodeName: string | undefined;
  /** The nodes that are up: an engine elsewhere serves while its node is. */
  upNodes: Set<string>;
  nbdConnections: number;
  nowMs: number;
}

/**
 * A volume as `volume ls`/`get`, the API and the UI show it: from its record,
 * with the replica modes of its engine when it runs here, else as the record
 * has them (an engine on another node recorded its failures there).
 */
export function volumeInfo(record: VolumeRecord, here: InfoContext): VolumeInfo {
  const supervisor = here.supervisor;
  // Served by another node's engine: the modes as that engine recorded them.
  const elsewhere =
    !supervisor &&
    here.shared &&
    record.engineNode !== undefined &&
    record.engineNode !== here.nodeName;
  const failed = new Set(record.failedReplicas ?? []);
  const replicas =
    supervisor?.engine?.replicaModes() ??
    [
      ...record.replicaIds.map((id) => ({ id, location: 'local' })),
      ...(record.remoteReplicas ?? []).map((r) => ({ id: r.id, location: r.node ?? r.url })),
    ].map((r) => ({
      ...r,
      mode:
        elsewhere && record.attached
          ? failed.has(r.id)
            ? 'ERR'
            : 'RW'
          : supervisor
            ? 'restarting'
            : 'detached',
      revision: '',
    }));
  const servedElsewhere = elsewhere && record.attached && here.upNodes.has(record.engineNode!);
  return {
    name: record.name,
    sizeBytes: record.sizeBytes,
    replicaCount: record.replicaCount,
    frontend: record.frontend,
    createdAt: record.createdAt,
    attached: record.attached,
    state: record.restoring
      ? 'restoring'
      : supervisor || servedElsewhere
        ? 'attached'
        : record.attached
          ? 'failed'
          : 'detached',
    ...(record.engineNode !== undefined ? { node: record.engineNode } : {}),
    ...(record.failover ? { failover: record.failover } : {}),
    ...(record.nbdAllow ? { nbdAllow: record.nbdAllow } : {}),
    ...(record.qos && Object.keys(record.qos).length > 0 ? { qos: record.qos } : {}),
    ...(record.encryption ? { encrypted: { keyId: String(record.encryption.keyId) } } : {}),
    ...(record.standby ? { standby: standbyInfo(record.standby, here.nowMs) } : {}),
    engineRestarts: supervisor?.restarts ?? 0,
    nbdConnections: here.nbdConnections,
    replicas,
  };
}

function standbyInfo(s: StandbyRecord, now: number): StandbyInfo {
  const at = s.backupAt !== undefined ? Date.parse(s.backupAt) : undefined;
  const before = s.previousAt !== undefined ? Date.parse(s.previousAt) : undefined;
  const seconds = (ms: number): number => Math.max(0, Math.round(ms / 1000));
  return {
    from: s.from,
    pollSeconds: seconds(s.pollMs),
    ...(s.backup !== undefined ? { backup: s.backup } : {}),
    ...(s.backupAt !== undefined ? { backupTakenAt: s.backupAt } : {}),
    ...(at !== undefined ? { behindSeconds: seconds(now - at) } : {}),
    ...(at !== undefined && before !== undefined
      ? { rpoSeconds: seconds(s.pollMs + at - before) }
      : {}),
    ...(s.applying !== undefined ? { applying: s.applying } : {}),
  };
}
