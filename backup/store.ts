import * as os from 'node:os';
import { randomBytes } from 'node:crypto';
import { systemClock, type Clock } from '../common/clock.ts';
import { concurrently } from '../common/concurrently.ts';
import { CorralError } from '../common/errors.ts';
import {
  backupConfigKey,
  backupsPrefix,
  blockKey,
  blocksPrefix,
  decodeBackupConfig,
  decodeVolumeConfig,
  encodeConfig,
  hashOfBlockKey,
  locksPrefix,
  volumeConfigKey,
  volumesPrefix,
  type BackupConfig,
  type VolumeConfig,
} from './format.ts';
import type { BackupTarget } from './target.ts';

export type LockKind = 'backup' | 'delete';

interface LockRecord {
  v: 1;
  kind: LockKind;
  id: string;
  host: string;
  pid: number;
  createdAt: string;
  refreshedAt: string;
}

/** A lock not refreshed for this long belongs to a job that died (its host is gone or cut off). */
export const LOCK_STALE_MS = 120_000;
const LOCK_REFRESH_MS = 30_000;

export interface StoreLock {
  readonly kind: LockKind;
  release(): Promise<void>;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as { code?: string }).code === 'EPERM';
  }
}

/**
 * A backupstore on a target: its configs, blocks and locks.
 *
 * Concurrency (docs/ARCHITECTURE.md, "Backups"): a backup may reuse a block
 * already in the store without writing it, so the garbage collector must not
 * run while a backup does. Jobs announce themselves with lock objects; a
 * delete (which collects garbage) runs only when no backup or other delete
 * holds one, and a backup only when no delete does. A lock is stale when its
 * process is gone (same host) or it was not refreshed for LOCK_STALE_MS.
 */
export class BackupStore {
  readonly target: BackupTarget;
  readonly #host = os.hostname();
  readonly #clock: Clock;

  constructor(target: BackupTarget, clock: Clock = systemClock) {
    this.target = target;
    this.#clock = clock;
  }

  get url(): string {
    return this.target.url;
  }

  async volumeConfig(volume: string): Promise<VolumeConfig | undefined> {
    const key = volumeConfigKey(volume);
    const bytes = await this.target.get(key);
    return bytes && decodeVolumeConfig(bytes, key);
  }

  async putVolumeConfig(config: VolumeConfig): Promise<void> {
    await this.target.put(volumeConfigKey(config.name), encodeConfig(config));
  }

  async backupConfig(volume: string, backup: string): Promise<BackupConfig | undefined> {
    const key = backupConfigKey(volume, backup);
    const bytes = await this.target.get(key);
    return bytes && decodeBackupConfig(bytes, key);
  }

  async putBackupConfig(config: BackupConfig): Promise<void> {
    await this.target.put(backupConfigKey(config.volume, config.name), encodeConfig(config));
  }

  /** Volumes that have a volume.cfg or backups in the store. */
  async volumes(): Promise<string[]> {
    const names = new Set<string>();
    for (const key of await this.target.list(volumesPrefix)) {
      const name = key.slice(volumesPrefix.length + 1).split('/')[0];
      if (name) names.add(name);
    }
    return [...names].sort();
  }

  /** Backup names of a volume (complete ones: their config exists). */
  async backupNames(volume: string): Promise<string[]> {
    const prefix = backupsPrefix(volume);
    return (await this.target.list(prefix))
      .map((k) => /^([^/]+)\.cfg$/.exec(k.slice(prefix.length + 1))?.[1])
      .filter((n): n is string => n !== undefined)
      .sort();
  }

  /** Every backup in the store, oldest first; one unreadable config fails the whole listing. */
  async backups(volume?: string): Promise<BackupConfig[]> {
    const out: BackupConfig[] = [];
    for (const v of volume === undefined ? await this.volumes() : [volume]) {
      for (const name of await this.backupNames(v)) {
        const config = await this.backupConfig(v, name);
        if (config) out.push(config);
      }
    }
    return out.sort((a, b) => a.createdAt.localeCompare(b.createdAt));
  }

  /** Finds a backup by name in any volume. */
  async findBackup(name: string, volume?: string): Promise<BackupConfig> {
    for (const v of volume === undefined ? await this.volumes() : [volume]) {
      const config = await this.backupConfig(v, name);
      if (config) return config;
    }
    throw new CorralError('NOT_FOUND', `No backup named ${name} in ${this.url}`);
  }

  hasBlock(hash: string): Promise<boolean> {
    return this.target.exists(blockKey(hash));
  }

  putBlock(hash: string, encoded: readonly Uint8Array[]): Promise<void> {
    return this.target.put(blockKey(hash), encoded);
  }

  getBlock(hash: string): Promise<Buffer | undefined> {
    return this.target.get(blockKey(hash));
  }

  /**
   * Takes a lock of `kind`, waiting up to `waitMs` for conflicting jobs to end.
   * `onStale` hears of locks removed because their job died.
   */
  async lock(
    kind: LockKind,
    options: { waitMs?: number; onStale?: (detail: string) => void } = {},
  ): Promise<StoreLock> {
    const id = randomBytes(8).toString('hex');
    const key = `${locksPrefix}/${kind}-${id}.lck`;
    const deadline = this.#clock.nowMs() + (options.waitMs ?? 30_000);
    const write = async (): Promise<void> => {
      const now = new Date(this.#clock.nowMs()).toISOString();
      const record: LockRecord = {
        v: 1,
        kind,
        id,
        host: this.#host,
        pid: process.pid,
        createdAt: now,
        refreshedAt: now,
      };
      await this.target.put(key, Buffer.from(JSON.stringify(record)));
    };
    for (;;) {
      await write();
      const blocking = await this.#conflicts(kind, id, options.onStale);
      if (blocking === undefined) break;
      await this.target.delete(key);
      if (this.#clock.nowMs() >= deadline) {
        throw new CorralError(
          'BUSY',
          `The backupstore ${this.url} is busy: a ${blocking.kind} job (host ${blocking.host}, pid ${blocking.pid}, since ${blocking.createdAt}) holds it; try again when it ends`,
        );
      }
      await this.#clock.sleep(100 + Math.random() * 400);
    }
    const timer = this.#clock.setInterval(() => {
      write().catch(() => undefined);
    }, LOCK_REFRESH_MS);
    let released = false;
    return {
      kind,
      release: async () => {
        if (released) return;
        released = true;
        timer.cancel();
        await this.target.delete(key);
      },
    };
  }

  async #conflicts(
    kind: LockKind,
    ownId: string,
    onStale: ((detail: string) => void) | undefined,
  ): Promise<LockRecord | undefined> {
    for (const key of await this.target.list(locksPrefix)) {
      const m = /\/(backup|delete)-([0-9a-f]+)\.lck$/.exec(key);
      if (!m || m[2] === ownId) continue;
      const other = m[1] as LockKind;
      const bytes = await this.target.get(key);
      if (!bytes) continue;
      let record: LockRecord | undefined;
      try {
        record = JSON.parse(bytes.toString('utf8')) as LockRecord;
      } catch {
        record = undefined;
      }
      const stale =
        record === undefined ||
        typeof record.refreshedAt !== 'string' ||
        this.#clock.nowMs() - Date.parse(record.refreshedAt) > LOCK_STALE_MS ||
        (record.host === this.#host && record.pid !== process.pid && !pidAlive(record.pid));
      if (stale) {
        await this.target.delete(key);
        onStale?.(
          `removed the stale ${other} lock of a job that died (${record ? `host ${record.host}, pid ${record.pid}, since ${record.createdAt}` : 'unreadable lock'})`,
        );
        continue;
      }
      // Backups run side by side; a delete runs alone.
      if (kind === 'backup' && other === 'backup') continue;
      return record;
    }
    return undefined;
  }

  /**
   * Removes every block no backup lists, and leftovers of cut-off writes.
   * The caller holds a delete lock. Any config it cannot read stops it: a
   * block is never removed on the word of a listing it could not finish.
   */
  async collectGarbage(
    onProgress?: (done: number, total: number) => void,
  ): Promise<{ blocksRemoved: number }> {
    const referenced = new Set<string>();
    for (const backup of await this.backups()) for (const [, h] of backup.blocks) referenced.add(h);
    const garbage = (await this.target.list(blocksPrefix)).filter((key) => {
      const hash = hashOfBlockKey(key);
      return hash === undefined || !referenced.has(hash);
    });
    for (const key of await this.target.list(volumesPrefix)) {
      if (!key.endsWith('.cfg')) garbage.push(key);
    }
    let done = 0;
    await concurrently(garbage.length, 8, async (i) => {
      await this.target.delete(garbage[i]!);
      onProgress?.(++done, garbage.length);
    });
    await this.target.sync();
    return { blocksRemoved: garbage.filter((k) => hashOfBlockKey(k) !== undefined).length };
  }
}
