import type { Clock } from '../common/clock.ts';
import { CorralError } from '../common/errors.ts';
import type { VolumeRecord } from '../kv/spaces.ts';
import type { BlockDevice } from '../replication/block-device.ts';
import { encryptedDevice, type SectorCipher } from '../replication/crypt.ts';
import type { SnapshotInfo } from '../replication/replica.ts';
import type { Supervisor } from '../replication/supervisor.ts';
import type { EventLog } from './events.ts';
import { autoSnapshotName, validateSnapshotName, validateVolumeName } from './names.ts';

/**
 * Snapshots being read by long jobs (backups, clones), `volume@snapshot` →
 * readers: such a snapshot is not deleted, nor its volume detached or
 * reverted, until the last reader lets go.
 */
export class SnapshotHolds {
  readonly #count = new Map<string, number>();

  /** Holds `volume@snapshot`; the function lets go (once, however often it is called). */
  hold(key: string): () => void {
    this.#count.set(key, (this.#count.get(key) ?? 0) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const left = (this.#count.get(key) ?? 1) - 1;
      if (left > 0) this.#count.set(key, left);
      else this.#count.delete(key);
    };
  }

  /** BUSY while a job reads `snapshot` of `volume` (any of its snapshots when undefined). */
  check(volume: string, snapshot: string | undefined, what: string): void {
    for (const [key, count] of this.#count) {
      const [v, snap] = key.split('@') as [string, string];
      if (count > 0 && v === volume && (snapshot === undefined || snap === snapshot)) {
        throw new CorralError(
          'BUSY',
          `Cannot ${what}: a backup or clone is reading snapshot ${key}; try again when it ends`,
        );
      }
    }
  }
}

/** What the snapshot operations need of the volumes of this host (volumes.ts). */
export interface SnapshotHost {
  clock: Clock;
  events: EventLog;
  /** The volume's record (NOT_FOUND when there is none). */
  record(volume: string): Promise<VolumeRecord>;
  /** The engine of a volume attached here (NOT_FOUND, naming `what`, when it is not). */
  attached(volume: string, what: string): { supervisor: Supervisor; cipher?: SectorCipher };
  /** Runs `fn` in the volume's lane: one control operation per volume at a time. */
  serially<T>(volume: string, what: string, fn: () => Promise<T>): Promise<T>;
}

/**
 * The snapshots of the volumes attached here: list, take, delete, revert,
 * and read access for long jobs (under a hold). Each change runs in the
 * volume's lane and goes through its supervisor.
 */
export class VolumeSnapshots {
  readonly #host: SnapshotHost;
  readonly #holds: SnapshotHolds;

  constructor(host: SnapshotHost, holds: SnapshotHolds) {
    this.#host = host;
    this.#holds = holds;
  }

  async list(volume: string): Promise<SnapshotInfo[]> {
    await this.#host.record(volume);
    return this.#host
      .attached(volume, 'list its snapshots')
      .supervisor.control('list snapshots', (e) => e.snapshots());
  }

  async create(volume: string, name?: unknown): Promise<SnapshotInfo> {
    validateVolumeName(volume);
    const now = new Date(this.#host.clock.nowMs());
    const snap = name === undefined ? autoSnapshotName(now) : validateSnapshotName(name);
    return this.#host.serially(volume, `take snapshot ${snap}`, async () => {
      await this.#host.record(volume);
      const entry = this.#host.attached(volume, 'take a snapshot');
      const info = await entry.supervisor.control('take a snapshot', (e) => e.snapshot(snap, now));
      this.#host.events.add({ type: 'snapshot-created', volume, message: snap });
      return info;
    });
  }

  async delete(volume: string, name: string): Promise<void> {
    validateVolumeName(volume);
    const snap = validateSnapshotName(name);
    await this.#host.serially(volume, `delete snapshot ${snap}`, async () => {
      await this.#host.record(volume);
      this.#holds.check(volume, snap, `delete snapshot ${snap}`);
      const entry = this.#host.attached(volume, 'delete a snapshot');
      this.#host.events.add({ type: 'snapshot-delete-started', volume, message: snap });
      await entry.supervisor.control(`delete snapshot ${snap}`, (e) => e.deleteSnapshot(snap));
      this.#host.events.add({ type: 'snapshot-deleted', volume, message: snap });
    });
  }

  async revert(
    volume: string,
    name: string,
    options: { discardNewer?: boolean },
  ): Promise<{ removed: string[] }> {
    validateVolumeName(volume);
    const snap = validateSnapshotName(name);
    return this.#host.serially(volume, `revert to ${snap}`, async () => {
      if ((await this.#host.record(volume)).standby)
        throw new CorralError(
          'READ_ONLY',
          `Volume ${volume} is a standby: it holds its source's backups (activate it first)`,
        );
      this.#holds.check(volume, undefined, `revert it to ${snap}`);
      const now = new Date(this.#host.clock.nowMs());
      const removed = await this.#host
        .attached(volume, 'revert it')
        .supervisor.control(`revert to ${snap}`, (e) => e.revert(snap, now, options));
      this.#host.events.add({
        type: 'volume-reverted',
        volume,
        message: `to ${snap}${removed.length ? `, removed ${removed.join(', ')}` : ''}`,
      });
      return { removed };
    });
  }

  /**
   * Read access to one snapshot for a long job, through the volume's
   * supervisor (so an engine restart mid-job is survived): the snapshot cannot
   * be deleted, nor the volume detached or reverted, until `release`.
   */
  access(
    volume: string,
    snapshot: string,
    /** `plaintext`: an encrypted volume's snapshot as its clients see it (a backup re-encrypts it). */
    options: { plaintext?: boolean } = {},
  ): {
    info: SnapshotInfo;
    sizeBytes: number;
    /** The snapshot as a read-only device (through the supervisor). */
    device: BlockDevice;
    read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array>;
    touchedBlocks(base: string | undefined, granuleBytes: number): Promise<Set<number>>;
    release(): void;
  } {
    const { supervisor, cipher } = this.#host.attached(volume, 'read its snapshots');
    const info = supervisor.engine?.snapshots().find((s) => s.name === snapshot);
    if (!info)
      throw new CorralError('NOT_FOUND', `Volume ${volume} has no snapshot named ${snapshot}`);
    const key = `${volume}@${snapshot}`;
    const release = this.#holds.hold(key);
    const plain =
      options.plaintext && cipher
        ? encryptedDevice(supervisor.snapshotDevice(snapshot), cipher)
        : undefined;
    return {
      info,
      // The snapshot's own size: it keeps the one it was taken at.
      sizeBytes: info.sizeBytes,
      device: plain ?? supervisor.snapshotDevice(snapshot),
      read: plain
        ? (offset, length, into) => plain.read(offset, length, into)
        : (offset, length, into) =>
            supervisor.control(`read ${key}`, (e) =>
              e.snapshotDevice(snapshot).read(offset, length, into),
            ),
      touchedBlocks: (base, granuleBytes) =>
        supervisor.control(`compare ${key}`, (e) => e.touchedBlocks(base, snapshot, granuleBytes)),
      release,
    };
  }
}
