import type { Clock } from '../common/clock.ts';
import { CorralError, quoted } from '../common/errors.ts';
import { applyBackup, checkBackupKey } from '../backup/jobs.ts';
import { backupKeys, type BackupConfig, type BackupKeys } from '../backup/format.ts';
import type { BackupStore } from '../backup/store.ts';
import type { StandbyRecord } from '../kv/spaces.ts';
import { userKeyFrom } from '../replication/crypt.ts';
import type { BackupService } from './backups.ts';
import type { EventLog } from './events.ts';
import { validateVolumeName } from './names.ts';
import type { Operation, Operations } from './operations.ts';
import type { VolumeInfo } from './volume-info.ts';
import type { VolumeManager } from './volumes.ts';

/** How often the target is looked at when `poll` is not given. */
export const DEFAULT_POLL_MS = 60_000;
/** How often the service looks for standbys whose poll is due. */
const TICK_MS = 1000;

/**
 * Where a standby's backups are: `<target URL>?volume=NAME`, or a bare
 * volume name in the daemon's default target.
 */
export function parseStandbySource(
  from: unknown,
  defaultTarget: string,
): { target: string; volume: string } {
  if (typeof from !== 'string' || from === '')
    throw new CorralError(
      'INVALID_ARGUMENT',
      'standbyFrom names the backups to follow: a volume name, or a target URL with ?volume=NAME',
    );
  if (!from.includes('://')) return { target: defaultTarget, volume: validateVolumeName(from) };
  const url = new URL(from);
  const volume = url.searchParams.get('volume');
  if (!volume)
    throw new CorralError(
      'INVALID_ARGUMENT',
      `${from} names no volume: add ?volume=NAME (the volume whose backups the standby follows)`,
    );
  if (url.searchParams.has('backup'))
    throw new CorralError(
      'INVALID_ARGUMENT',
      `${from} names one backup: a standby follows all of a volume's backups (drop ?backup=)`,
    );
  url.searchParams.delete('volume');
  return { target: url.href, volume: validateVolumeName(volume) };
}

function pollMsOf(input: unknown): number {
  if (input === undefined) return DEFAULT_POLL_MS;
  if (typeof input !== 'number' || !Number.isInteger(input) || input < 1 || input > 86_400)
    throw new CorralError(
      'INVALID_ARGUMENT',
      `pollSeconds must be a whole number of seconds from 1 to 86400, got ${quoted(input)}`,
    );
  return input * 1000;
}

/**
 * Standby (DR) volumes: a volume restored from the newest backup of another
 * volume, then kept following it — every poll applies the blocks a newer
 * backup changed — read-only until it is activated. Polls run on the node
 * whose engine serves the standby; time comes from the Clock, so a test
 * turns it by hand.
 */
export class StandbyService {
  readonly #volumes: VolumeManager;
  readonly #backups: BackupService;
  readonly #operations: Operations;
  readonly #events: EventLog;
  readonly #clock: Clock;
  /** Backup keys of standbys following encrypted backups: in memory only, given again after a restart. */
  readonly #keys = new Map<string, BackupKeys>();
  /** When each standby was last polled (elapsed ms). */
  readonly #polledAt = new Map<string, number>();
  /** Standbys whose poll runs, and what it will return. */
  readonly #polling = new Map<string, Promise<string | undefined>>();
  /** Standbys whose missing key was reported (once, not at every poll). */
  readonly #keyReported = new Set<string>();
  #timer: { cancel(): void } | undefined;
  #ticking: Promise<void> | undefined;
  #again = false;

  constructor(options: {
    volumes: VolumeManager;
    backups: BackupService;
    operations: Operations;
    events: EventLog;
    clock: Clock;
  }) {
    this.#volumes = options.volumes;
    this.#backups = options.backups;
    this.#operations = options.operations;
    this.#events = options.events;
    this.#clock = options.clock;
  }

  start(): void {
    this.#timer = this.#clock.setInterval(() => this.#tick(), TICK_MS);
  }

  /** A tick that comes while one runs is not lost: it runs once that one ends. */
  #tick(): void {
    if (this.#ticking) {
      this.#again = true;
      return;
    }
    this.#ticking = (async () => {
      do {
        this.#again = false;
        await this.pollDue().catch((err: unknown) =>
          this.#events.add({
            type: 'standby-poll-failed',
            message: err instanceof Error ? err.message : String(err),
          }),
        );
      } while (this.#again);
    })().finally(() => (this.#ticking = undefined));
  }

  async stop(): Promise<void> {
    this.#timer?.cancel();
    await this.#ticking;
    await Promise.allSettled(this.#polling.values());
  }

  /**
   * Makes a standby: the newest backup of the source is restored into a new
   * volume (an operation with progress); it then follows the source's
   * backups from the next poll on.
   */
  async create(input: {
    name: unknown;
    from: unknown;
    pollSeconds?: unknown;
    replicas?: unknown;
    frontend?: unknown;
    /** The backups' key (base64), when they are encrypted. */
    key?: unknown;
  }): Promise<{ operation: Operation; done: Promise<VolumeInfo> }> {
    const name = validateVolumeName(input.name);
    const { target, volume } = parseStandbySource(input.from, this.#backups.defaultTarget);
    const pollMs = pollMsOf(input.pollSeconds);
    const keys = input.key === undefined ? undefined : backupKeys(userKeyFrom(input.key));
    const store = await this.#backups.store(target);
    const newest = (await store.backups(volume)).at(-1);
    if (!newest)
      throw new CorralError(
        'NOT_FOUND',
        `No backups of volume ${volume} in ${store.url}: a standby starts from one`,
      );
    checkBackupKey(newest, keys);
    const from = sourceUrl(store.url, volume);
    const standby: StandbyRecord = {
      from,
      pollMs,
      backup: newest.name,
      backupAt: newest.snapshot.createdAt,
      ...(keys ? { keyId: keys.keyId } : {}),
    };
    await this.#volumes.create({
      name,
      size: newest.sizeBytes,
      ...(input.replicas !== undefined ? { replicas: input.replicas } : {}),
      ...(input.frontend !== undefined ? { frontend: input.frontend } : {}),
      restoring: `${from}&backup=${encodeURIComponent(newest.name)}`,
      standby,
    });
    if (keys) this.#keys.set(name, keys);
    this.#polledAt.set(name, this.#clock.elapsedMs());
    return this.#operations.start(
      'standby-restore',
      `${newest.name} into standby ${name}`,
      name,
      async (update) => {
        try {
          await applyBackup(store, newest, this.#volumes.restoreDevice(name), {
            ...this.#backups.jobOptions(),
            onProgress: update,
            holds: 'zeros',
            ...(keys ? { keys } : {}),
          });
          await this.#volumes.finishRestore(name);
        } catch (err) {
          this.#keys.delete(name);
          await this.#volumes.remove(name, { force: true }).catch(() => undefined);
          throw err;
        }
        return this.#volumes.get(name);
      },
      () => `standby ${name} holds backup ${newest.name}; it follows ${from}`,
    );
  }

  /** The backup key of a standby following encrypted backups, given again (after a restart). */
  async giveKey(name: string, key: unknown): Promise<void> {
    await this.#volumes.get(name); // NOT_FOUND for a name no volume has
    const keyId = await this.#keyIdOf(name);
    if (keyId === undefined)
      throw new CorralError(
        'INVALID_ARGUMENT',
        `Volume ${name} follows no encrypted backups: it takes no key`,
      );
    const keys = backupKeys(userKeyFrom(key));
    if (keys.keyId !== keyId)
      throw new CorralError(
        'FORBIDDEN',
        `Wrong key for standby ${name}: its backups need key ${keyId}, this one is ${keys.keyId}`,
      );
    this.#keys.set(name, keys);
    this.#keyReported.delete(name);
  }

  /** Whether `name` is a standby whose backups are encrypted (attach takes their key). */
  async takesBackupKey(name: string): Promise<boolean> {
    return (await this.#keyIdOf(name)) !== undefined;
  }

  async #keyIdOf(name: string): Promise<string | undefined> {
    const found = (await this.#volumes.standbys()).find((s) => s.name === name);
    return found?.standby.keyId;
  }

  /** Polls every standby of this host whose interval has passed. */
  async pollDue(): Promise<void> {
    const now = this.#clock.elapsedMs();
    for (const { name, standby } of await this.#volumes.standbys()) {
      const last = this.#polledAt.get(name);
      if (last === undefined) {
        // Attached by this start: its first poll is one interval away, or now if it was cut off.
        if (standby.applying === undefined) {
          this.#polledAt.set(name, now);
          continue;
        }
      } else if (now - last < standby.pollMs) continue;
      await this.poll(name).catch(() => undefined);
    }
  }

  /**
   * Looks for a newer backup and applies it; resolves to the backup applied,
   * or undefined when there was none. One poll per standby at a time.
   */
  poll(name: string): Promise<string | undefined> {
    let running = this.#polling.get(name);
    if (!running) {
      running = this.#poll(name).finally(() => this.#polling.delete(name));
      this.#polling.set(name, running);
    }
    return running;
  }

  async #poll(name: string): Promise<string | undefined> {
    this.#polledAt.set(name, this.#clock.elapsedMs());
    const found = (await this.#volumes.standbys()).find((s) => s.name === name);
    if (!found)
      throw new CorralError('INVALID_ARGUMENT', `Volume ${name} is not a standby attached here`);
    const standby = found.standby;
    try {
      const { target, volume } = parseStandbySource(standby.from, this.#backups.defaultTarget);
      const store = await this.#backups.store(target);
      const newest = (await store.backups(volume)).at(-1);
      if (!newest) return undefined;
      if (newest.name === standby.backup && standby.applying === undefined) return undefined;
      const keys = this.#keys.get(name);
      if (newest.encryption && !keys) {
        if (!this.#keyReported.has(name)) {
          this.#keyReported.add(name);
          this.#events.add({
            type: 'standby-needs-key',
            volume: name,
            message: `backup ${newest.name} is encrypted and this daemon has no key for it (keys live in memory): corral volume attach ${name} --key-file FILE`,
          });
        }
        return undefined;
      }
      checkBackupKey(newest, keys);
      await this.#apply(name, store, newest, standby, keys);
      return newest.name;
    } catch (err) {
      this.#events.add({
        type: 'standby-poll-failed',
        volume: name,
        message: err instanceof Error ? err.message : String(err),
      });
      throw err;
    }
  }

  async #apply(
    name: string,
    store: BackupStore,
    backup: BackupConfig,
    standby: StandbyRecord,
    keys: BackupKeys | undefined,
  ): Promise<void> {
    // What the volume holds decides what is written: the backup it holds whole (only the
    // blocks that differ), or after a cut-off apply an unknown mix (every block).
    const held =
      standby.applying === undefined && standby.backup !== undefined
        ? await store.backupConfig(backup.volume, standby.backup)
        : undefined;
    const { done } = this.#operations.start(
      'standby-apply',
      `${backup.name} into standby ${name}`,
      name,
      (update) =>
        this.#volumes.applyStandby(
          name,
          { name: backup.name, sizeBytes: backup.sizeBytes, snapshotAt: backup.snapshot.createdAt },
          (device) =>
            applyBackup(store, backup, device, {
              ...this.#backups.jobOptions(),
              onProgress: update,
              holds: held ?? 'unknown',
              ...(keys ? { keys } : {}),
            }),
        ),
      (r) =>
        `${r.blocksWritten} blocks written (${r.bytesWritten} bytes), ${r.blocksTrimmed} ranges trimmed`,
    );
    await done;
  }

  /**
   * Stops following and makes the standby writable, at the newest complete
   * backup when the target answers (one last poll), else at the last one it
   * applied. A standby holding half a backup is not activated.
   */
  async activate(name: string): Promise<VolumeInfo> {
    validateVolumeName(name);
    try {
      await this.poll(name);
    } catch (err) {
      this.#events.add({
        type: 'standby-last-poll-failed',
        volume: name,
        message: `activated at the last backup it applied: ${err instanceof Error ? err.message : String(err)}`,
      });
    }
    const info = await this.#volumes.activate(name);
    this.#keys.delete(name);
    this.#polledAt.delete(name);
    return info;
  }
}

function sourceUrl(target: string, volume: string): string {
  const url = new URL(target);
  url.searchParams.set('volume', volume);
  return url.href;
}
