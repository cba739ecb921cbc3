import { CorralError } from '../common/errors.ts';
import { userKeyFrom } from '../replication/crypt.ts';
import type { Clock } from '../common/clock.ts';
import {
  checkBackupKey,
  collectGarbage,
  createBackup,
  deleteBackup,
  restoreBackup,
  type BackupSource,
} from '../backup/jobs.ts';
import { backupKeys, type BackupConfig } from '../backup/format.ts';
import { BackupStore } from '../backup/store.ts';
import { openTarget } from '../backup/open-target.ts';
import { delayed, type TargetPolicy } from '../backup/target.ts';
import type { EventLog } from './events.ts';
import type { Operation, Operations } from './operations.ts';
import { validateSnapshotName, validateVolumeName } from './names.ts';
import type { VolumeManager } from './volumes.ts';

export interface BackupSummary {
  name: string;
  volume: string;
  snapshot: string;
  createdAt: string;
  sizeBytes: number;
  blocks: number;
  labels: Record<string, string>;
  stats: BackupConfig['stats'];
  /** A URL that names this backup alone, for restore on any host. */
  url: string;
}

/** A backup named by URL (`<target>?backup=NAME&volume=VOL`) or by name in a target. */
export function parseBackupRef(
  ref: string,
  defaultTarget: string,
): { target: string; name: string; volume: string | undefined } {
  if (!ref.includes('://')) return { target: defaultTarget, name: ref, volume: undefined };
  const url = new URL(ref);
  const name = url.searchParams.get('backup');
  if (!name)
    throw new CorralError(
      'INVALID_ARGUMENT',
      `Backup URL ${ref} names no backup: add ?backup=NAME (as printed by corral backup ls)`,
    );
  const volume = url.searchParams.get('volume') ?? undefined;
  url.searchParams.delete('backup');
  url.searchParams.delete('volume');
  return { target: url.href, name, volume };
}

function backupUrl(target: string, b: BackupConfig): string {
  const url = new URL(target);
  url.searchParams.set('backup', b.name);
  url.searchParams.set('volume', b.volume);
  return url.href;
}

export function summary(target: string, b: BackupConfig): BackupSummary {
  return {
    name: b.name,
    volume: b.volume,
    snapshot: b.snapshot.name,
    createdAt: b.createdAt,
    sizeBytes: b.sizeBytes,
    blocks: b.blocks.length,
    labels: b.labels,
    stats: b.stats,
    url: backupUrl(target, b),
  };
}

export interface BackupServiceOptions {
  volumes: VolumeManager;
  operations: Operations;
  events: EventLog;
  clock: Clock;
  /** The daemon's default target URL. */
  defaultTarget: string;
  /** Where targets may point (file roots, S3 credentials). */
  targetPolicy: TargetPolicy;
  concurrency?: number;
  /** Bytes per second a backup reads from a volume and a restore writes (`--backup-rate`). */
  bytesPerSecond?: number;
  /** Tests only: every store operation waits this long (CORRAL_BACKUP_DELAY_MS). */
  delayMs?: number;
}

/** Backups, restores and deletes as daemon operations. */
export class BackupService {
  readonly #o: BackupServiceOptions;
  readonly #stores = new Map<string, Promise<BackupStore>>();

  constructor(options: BackupServiceOptions) {
    this.#o = options;
  }

  #rate(): { rate?: { bytesPerSecond: number; clock: Clock } } {
    const bytesPerSecond = this.#o.bytesPerSecond;
    return bytesPerSecond ? { rate: { bytesPerSecond, clock: this.#o.clock } } : {};
  }

  /** What every job of this daemon's runs with: its concurrency and `--backup-rate`. */
  jobOptions(): { concurrency: number; rate?: { bytesPerSecond: number; clock: Clock } } {
    return { concurrency: this.#o.concurrency ?? 4, ...this.#rate() };
  }

  get defaultTarget(): string {
    return this.#o.defaultTarget;
  }

  store(target: unknown): Promise<BackupStore> {
    if (target !== undefined && typeof target !== 'string')
      throw new CorralError('INVALID_ARGUMENT', 'target must be a URL string');
    const url = target ?? this.#o.defaultTarget;
    let store = this.#stores.get(url);
    if (!store) {
      const delayMs = this.#o.delayMs;
      store = openTarget(url, this.#o.targetPolicy).then(
        (t) => new BackupStore(delayMs ? delayed(t, delayMs) : t, this.#o.clock),
      );
      store.catch(() => this.#stores.delete(url));
      this.#stores.set(url, store);
    }
    return store;
  }

  #staleLock(volume: string | undefined) {
    return (detail: string): void => {
      this.#o.events.add({
        type: 'backup-lock-stale',
        ...(volume !== undefined ? { volume } : {}),
        message: detail,
      });
    };
  }

  /** Backs up a snapshot (one is taken when none is named). */
  async create(input: {
    volume: unknown;
    snapshot?: unknown;
    target?: unknown;
    labels?: Record<string, string>;
    /** A backup key (base64, ≥ 32 bytes): every block encrypted under it. */
    key?: unknown;
  }): Promise<{ operation: Operation; done: Promise<BackupSummary> }> {
    const volume = validateVolumeName(input.volume);
    const keys = input.key === undefined ? undefined : backupKeys(userKeyFrom(input.key));
    // One key story: an encrypted volume's backup is its plaintext encrypted under the backup
    // key; without one it would be plaintext in the store, which the volume's owner did not ask for.
    if ((await this.#o.volumes.get(volume)).encrypted && !keys)
      throw new CorralError(
        'INVALID_ARGUMENT',
        `Volume ${volume} is encrypted: its backups must be too (--encrypt-key-file FILE or --encrypt-key-env VAR)`,
      );
    const store = await this.store(input.target);
    let snapshot: string;
    if (input.snapshot === undefined) {
      snapshot = (await this.#o.volumes.createSnapshot(volume)).name;
    } else snapshot = validateSnapshotName(input.snapshot);
    const access = this.#o.volumes.snapshotAccess(volume, snapshot, { plaintext: true });
    const source: BackupSource = {
      volume,
      sizeBytes: access.sizeBytes,
      snapshot: { name: snapshot, createdAt: access.info.createdAt },
      read: (offset, length, into) => access.read(offset, length, into),
      changedSince: async (base, granule) => {
        try {
          const info = (await this.#o.volumes.snapshots(volume)).find((s) => s.name === base.name);
          if (!info || info.createdAt !== base.createdAt) return undefined;
          return await access.touchedBlocks(base.name, granule);
        } catch (err) {
          if (err instanceof CorralError && err.code === 'NOT_FOUND') return undefined;
          throw err;
        }
      },
      allocated: (granule) => access.touchedBlocks(undefined, granule),
    };
    try {
      return this.#o.operations.start(
        'backup',
        `${volume}@${snapshot} to ${store.url}`,
        volume,
        async (update) => {
          try {
            const config = await createBackup(store, source, {
              ...(input.labels ? { labels: input.labels } : {}),
              now: new Date(this.#o.clock.nowMs()),
              concurrency: this.#o.concurrency ?? 4,
              onProgress: update,
              onStaleLock: this.#staleLock(volume),
              ...this.#rate(),
              ...(keys ? { keys } : {}),
            });
            return summary(store.url, config);
          } finally {
            access.release();
          }
        },
        (s) =>
          `backup ${s.name}: ${s.blocks} blocks, read ${s.stats.blocksRead}, stored ${s.stats.blocksStored} (${s.stats.bytesStored} bytes)`,
      );
    } catch (err) {
      access.release();
      throw err;
    }
  }

  async list(input: { target?: unknown; volume?: unknown }): Promise<BackupSummary[]> {
    const store = await this.store(input.target);
    const volume = input.volume === undefined ? undefined : validateVolumeName(input.volume);
    return (await store.backups(volume)).map((b) => summary(store.url, b));
  }

  async #find(ref: string, target: unknown): Promise<{ store: BackupStore; backup: BackupConfig }> {
    const parsed = parseBackupRef(ref, typeof target === 'string' ? target : this.#o.defaultTarget);
    const store = await this.store(parsed.target);
    return { store, backup: await store.findBackup(parsed.name, parsed.volume) };
  }

  async get(ref: string, target?: unknown): Promise<BackupSummary> {
    const { store, backup } = await this.#find(ref, target);
    return summary(store.url, backup);
  }

  async restore(input: {
    backup: string;
    volume: unknown;
    target?: unknown;
    /** An encrypted backup's key (base64). */
    key?: unknown;
  }): Promise<{ operation: Operation; done: Promise<{ volume: string; backup: string }> }> {
    const name = validateVolumeName(input.volume);
    const keys = input.key === undefined ? undefined : backupKeys(userKeyFrom(input.key));
    const { store, backup } = await this.#find(input.backup, input.target);
    // Checked before the volume is made: a wrong or missing key leaves nothing behind.
    checkBackupKey(backup, keys);
    const ref = backupUrl(store.url, backup);
    await this.#o.volumes.create({ name, size: backup.sizeBytes, restoring: ref });
    return this.#o.operations.start(
      'restore',
      `${backup.name} into ${name}`,
      name,
      async (update) => {
        try {
          await restoreBackup(store, backup, this.#o.volumes.restoreDevice(name), {
            concurrency: this.#o.concurrency ?? 4,
            onProgress: update,
            ...this.#rate(),
            ...(keys ? { keys } : {}),
          });
          await this.#o.volumes.finishRestore(name);
        } catch (err) {
          await this.#o.volumes.remove(name, { force: true }).catch(() => undefined);
          throw err;
        }
        return { volume: name, backup: backup.name };
      },
      (r) => `volume ${r.volume} restored from ${r.backup}`,
    );
  }

  async remove(
    ref: string,
    target?: unknown,
  ): Promise<{ operation: Operation; done: Promise<{ blocksRemoved: number }> }> {
    const { store, backup } = await this.#find(ref, target);
    return this.#o.operations.start(
      'backup-delete',
      `${backup.name} from ${store.url}`,
      backup.volume,
      (update) =>
        deleteBackup(store, backup, {
          onProgress: update,
          onStaleLock: this.#staleLock(backup.volume),
        }),
      (r) => `${r.blocksRemoved} unreferenced blocks removed`,
    );
  }

  async gc(
    target?: unknown,
  ): Promise<{ operation: Operation; done: Promise<{ blocksRemoved: number }> }> {
    const store = await this.store(target);
    return this.#o.operations.start(
      'backup-gc',
      store.url,
      undefined,
      () => collectGarbage(store, { onStaleLock: this.#staleLock(undefined) }),
      (r) => `${r.blocksRemoved} unreferenced blocks removed`,
    );
  }
}
