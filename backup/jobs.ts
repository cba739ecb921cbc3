import type { Clock } from '../common/clock.ts';
import { Pacer } from '../common/pacer.ts';
import { randomBytes } from 'node:crypto';
import { concurrently } from '../common/concurrently.ts';
import { CorralError } from '../common/errors.ts';
import type { BlockDevice } from '../replication/block-device.ts';
import {
  BACKUP_BLOCK_SIZE,
  backupConfigKey,
  blockName,
  type BackupKeys,
  decodeBlock,
  encodeBlock,
  isAllZero,
  type BackupConfig,
  type SnapshotRef,
} from './format.ts';
import type { BackupStore } from './store.ts';

/** What a backup reads: one snapshot of a volume, and what its layer bitmaps know. */
export interface BackupSource {
  readonly volume: string;
  readonly sizeBytes: number;
  readonly snapshot: SnapshotRef;
  /** Reads into `into` (exactly `length` bytes): a job reuses its buffers. */
  read(offset: number, length: number, into: Uint8Array): Promise<Uint8Array>;
  /**
   * Indexes of the `blockSize` blocks that may differ between snapshot `base`
   * and this one, from the layer bitmaps; undefined when `base` is not an
   * older snapshot of this chain (deleted, reverted away): then all is read.
   */
  changedSince(base: SnapshotRef, blockSize: number): Promise<Set<number> | undefined>;
  /** Indexes of the `blockSize` blocks holding any data; the rest read as zeros. */
  allocated(blockSize: number): Promise<Set<number>>;
}

export interface JobProgress {
  phase: string;
  done: number;
  total: number;
  /** Bytes read from the volume or the store so far. */
  bytes: number;
}

export interface BackupOptions {
  name?: string;
  labels?: Record<string, string>;
  concurrency?: number;
  now?: Date;
  onProgress?: (p: JobProgress) => void;
  onStaleLock?: (detail: string) => void;
  /** Bytes per second read from the volume, and the clock to keep it (`--backup-rate`). */
  rate?: { bytesPerSecond: number; clock: Clock };
  /** Encrypt every block under these (from the backup key). */
  keys?: BackupKeys;
}

/** A job waits this long for a conflicting one (a delete for running backups) before BUSY. */
const LOCK_WAIT_MS = 10 * 60_000;

export function newBackupName(now: Date): string {
  const stamp = now.toISOString().replace(/[-:]/g, '').replace('T', '').slice(0, 14);
  return `backup-${stamp}-${randomBytes(3).toString('hex')}`;
}

/** The newest complete backup of the volume that an incremental one can build on. */
async function baseOf(
  store: BackupStore,
  source: BackupSource,
  keyId: string | undefined,
): Promise<BackupConfig | undefined> {
  const vol = await store.volumeConfig(source.volume);
  let base = vol?.lastBackup ? await store.backupConfig(source.volume, vol.lastBackup) : undefined;
  // The last backup may have been deleted: fall back on the newest left.
  base ??= (await store.backups(source.volume)).at(-1);
  // Blocks under another key (or none) are named otherwise: a full backup, not an incremental.
  if (
    !base ||
    base.sizeBytes !== source.sizeBytes ||
    base.blockSize !== BACKUP_BLOCK_SIZE ||
    base.encryption?.keyId !== keyId
  )
    return undefined;
  return base;
}

/**
 * Backs up one snapshot. Order (crash safety): blocks first, each an atomic
 * put; then a sync; then the backup's config; then the volume's config. A
 * job cut off before its config leaves only unlisted blocks, which the next
 * delete collects; re-running it finds them and does not upload them again.
 */
export async function createBackup(
  store: BackupStore,
  source: BackupSource,
  options: BackupOptions = {},
): Promise<BackupConfig> {
  const now = options.now ?? new Date();
  const name = options.name ?? newBackupName(now);
  const bs = BACKUP_BLOCK_SIZE;
  options.onProgress?.({ phase: 'lock', done: 0, total: 0, bytes: 0 });
  const lock = await store.lock('backup', {
    waitMs: LOCK_WAIT_MS,
    ...(options.onStaleLock ? { onStale: options.onStaleLock } : {}),
  });
  try {
    if (await store.target.exists(backupConfigKey(source.volume, name)))
      throw new CorralError('ALREADY_EXISTS', `Backup ${name} already exists in ${store.url}`);
    const base = await baseOf(store, source, options.keys?.keyId);
    const changed = base ? await source.changedSince(base.snapshot, bs) : undefined;
    const blocks = new Map<number, string>();
    let toRead: number[];
    if (base && changed) {
      for (const [index, hash] of base.blocks) if (!changed.has(index)) blocks.set(index, hash);
      toRead = [...changed].sort((a, b) => a - b);
    } else {
      toRead = [...(await source.allocated(bs))].sort((a, b) => a - b);
    }
    // Blocks the base lists are in the store (no delete runs while we hold the lock).
    const known = new Set(base?.blocks.map(([, h]) => h));
    const storing = new Map<string, Promise<void>>();
    const stats = { blocksRead: 0, blocksStored: 0, bytesStored: 0 };
    let bytes = 0;
    const report = (): void =>
      options.onProgress?.({
        phase: 'backup',
        done: stats.blocksRead,
        total: toRead.length,
        bytes,
      });
    report();
    // One 2 MiB buffer per worker, reused: a fresh one costs more in page faults than the hash.
    const buffers: Buffer[] = [];
    const pacer = options.rate
      ? new Pacer(options.rate.clock, options.rate.bytesPerSecond)
      : undefined;
    await concurrently(toRead.length, options.concurrency ?? 4, async (i, worker) => {
      const buffer = (buffers[worker] ??= Buffer.allocUnsafeSlow(bs));
      const index = toRead[i]!;
      const offset = index * bs;
      const length = Math.min(bs, source.sizeBytes - offset);
      const data = await source.read(offset, length, buffer.subarray(0, length));
      await pacer?.paced(length);
      stats.blocksRead++;
      bytes += data.length;
      if (!isAllZero(data)) {
        const hash = blockName(data, options.keys);
        blocks.set(index, hash);
        if (!known.has(hash)) {
          let put = storing.get(hash);
          if (!put) {
            put = (async () => {
              if (await store.hasBlock(hash)) return;
              const encoded = await encodeBlock(data, options.keys);
              await store.putBlock(hash, encoded);
              stats.blocksStored++;
              stats.bytesStored += encoded[0].length + encoded[1].length;
            })();
            storing.set(hash, put);
          }
          await put;
        }
      }
      report();
    });
    await store.target.sync();
    const config: BackupConfig = {
      name,
      volume: source.volume,
      snapshot: source.snapshot,
      createdAt: now.toISOString(),
      sizeBytes: source.sizeBytes,
      blockSize: bs,
      labels: options.labels ?? {},
      blocks: [...blocks].sort((a, b) => a[0] - b[0]),
      stats,
      ...(options.keys
        ? { encryption: { cipher: 'aes-256-gcm' as const, keyId: options.keys.keyId } }
        : {}),
    };
    await store.putBackupConfig(config);
    await store.target.sync();
    const vol = await store.volumeConfig(source.volume);
    await store.putVolumeConfig({
      name: source.volume,
      sizeBytes: source.sizeBytes,
      blockSize: bs,
      createdAt: vol?.createdAt ?? now.toISOString(),
      lastBackup: name,
      ...(config.encryption ? { encryption: config.encryption } : {}),
    });
    await store.target.sync();
    return config;
  } finally {
    await lock.release();
  }
}

/**
 * Deletes a backup, then every block no other backup lists. Order: the config
 * goes first (the backup is no longer listed), then the garbage; a delete cut
 * off half way leaves unlisted blocks that the next delete or gc removes.
 */
export async function deleteBackup(
  store: BackupStore,
  backup: BackupConfig,
  options: { onProgress?: (p: JobProgress) => void; onStaleLock?: (detail: string) => void } = {},
): Promise<{ blocksRemoved: number }> {
  options.onProgress?.({ phase: 'lock', done: 0, total: 0, bytes: 0 });
  const lock = await store.lock('delete', {
    waitMs: LOCK_WAIT_MS,
    ...(options.onStaleLock ? { onStale: options.onStaleLock } : {}),
  });
  try {
    await store.target.delete(backupConfigKey(backup.volume, backup.name));
    await store.target.sync();
    const vol = await store.volumeConfig(backup.volume);
    if (vol && vol.lastBackup === backup.name) {
      const newest = (await store.backups(backup.volume)).at(-1);
      await store.putVolumeConfig({ ...vol, lastBackup: newest?.name });
      await store.target.sync();
    }
    return await store.collectGarbage((done, total) =>
      options.onProgress?.({ phase: 'collect garbage', done, total, bytes: 0 }),
    );
  } finally {
    await lock.release();
  }
}

/** Collects garbage left by cut-off jobs, without deleting any backup. */
export async function collectGarbage(
  store: BackupStore,
  options: { onStaleLock?: (detail: string) => void } = {},
): Promise<{ blocksRemoved: number }> {
  const lock = await store.lock('delete', {
    waitMs: LOCK_WAIT_MS,
    ...(options.onStaleLock ? { onStale: options.onStaleLock } : {}),
  });
  try {
    return await store.collectGarbage();
  } finally {
    await lock.release();
  }
}

/** Refuses a missing or wrong key for an encrypted backup, and a key for a plain one. */
export function checkBackupKey(backup: BackupConfig, keys: BackupKeys | undefined): void {
  const needed = backup.encryption?.keyId;
  if (needed === undefined && keys)
    throw new CorralError(
      'INVALID_ARGUMENT',
      `Backup ${backup.name} is not encrypted: it takes no key`,
    );
  if (needed !== undefined && keys?.keyId !== needed)
    throw new CorralError(
      'FORBIDDEN',
      keys
        ? `Wrong key for backup ${backup.name}: it needs key ${needed}, this one is ${keys.keyId}`
        : `Backup ${backup.name} is encrypted: give its key (--key-file FILE; key ${needed})`,
    );
}

export interface RestoreOptions {
  concurrency?: number;
  onProgress?: (p: JobProgress) => void;
  /** Bytes per second written to the volume (`--backup-rate`). */
  rate?: { bytesPerSecond: number; clock: Clock };
  /** An encrypted backup's keys (from its backup key). */
  keys?: BackupKeys;
}

/**
 * Writes a backup into a device that reads as zeros (a new volume), checking
 * every block against its checksum before it is written; then flushes.
 */
export async function restoreBackup(
  store: BackupStore,
  backup: BackupConfig,
  device: BlockDevice,
  options: RestoreOptions = {},
): Promise<void> {
  await applyBackup(store, backup, device, { ...options, holds: 'zeros' });
}

/**
 * Makes a device hold a backup. What it holds already (`holds`) decides what
 * is written: `zeros` (a new volume) takes the backup's blocks; a backup it
 * holds whole takes only the blocks that differ from that one's, and the
 * blocks the newer one lacks are trimmed (they read as zeros); `unknown` (a
 * cut-off apply) takes every block and trims the rest. Then it flushes.
 * Every block is checked against its name before it is written.
 */
export async function applyBackup(
  store: BackupStore,
  backup: BackupConfig,
  device: BlockDevice,
  options: RestoreOptions & { holds: 'zeros' | 'unknown' | BackupConfig },
): Promise<{ blocksWritten: number; blocksTrimmed: number; bytesWritten: number }> {
  // The key is checked before any block is read: a wrong one names both keys, nothing is written.
  checkBackupKey(backup, options.keys);
  const needed = backup.encryption?.keyId;
  const pacer = options.rate
    ? new Pacer(options.rate.clock, options.rate.bytesPerSecond)
    : undefined;
  if (device.sizeBytes < backup.sizeBytes)
    throw new CorralError(
      'INVALID_ARGUMENT',
      `Cannot restore backup ${backup.name} of ${backup.sizeBytes} bytes into ${device.sizeBytes} bytes`,
    );
  const bs = backup.blockSize;
  const holds = options.holds;
  // Blocks named alike hold the same bytes: only names that differ are written.
  const before =
    typeof holds === 'object' && holds.blockSize === bs && holds.encryption?.keyId === needed
      ? new Map(holds.blocks)
      : undefined;
  const wanted = backup.blocks.filter(([index, hash]) => before?.get(index) !== hash);
  const listed = new Set(backup.blocks.map(([index]) => index));
  // What must read as zeros and may not: the older backup's blocks the newer one lacks, or
  // (holding an unknown mix) every block the backup does not list.
  const toTrim: Array<[number, number]> = [];
  if (before) {
    for (const index of before.keys())
      if (!listed.has(index))
        toTrim.push([index * bs, Math.min(bs, device.sizeBytes - index * bs)]);
  } else if (holds !== 'zeros') {
    let start = -1;
    const blocks = Math.ceil(device.sizeBytes / bs);
    for (let i = 0; i <= blocks; i++) {
      const gap = i < blocks && !listed.has(i);
      if (gap && start < 0) start = i;
      if (!gap && start >= 0) {
        const end = Math.min(i * bs, device.sizeBytes);
        toTrim.push([start * bs, end - start * bs]);
        start = -1;
      }
    }
  }
  let done = 0;
  let bytes = 0;
  const total = wanted.length + toTrim.length;
  options.onProgress?.({ phase: 'restore', done, total, bytes });
  await concurrently(wanted.length, options.concurrency ?? 4, async (i) => {
    const [index, hash] = wanted[i]!;
    const file = await store.getBlock(hash);
    if (!file)
      throw new CorralError(
        'CORRUPT_METADATA',
        `Backup ${backup.name} lists block ${hash} (at ${index * bs}), which is missing from ${store.url}`,
      );
    const data = await decodeBlock(file, hash, options.keys);
    const offset = index * bs;
    if (data.length !== Math.min(bs, backup.sizeBytes - offset))
      throw new CorralError(
        'CORRUPT_METADATA',
        `Backup block ${hash} at ${offset} holds ${data.length} bytes, not a whole block`,
      );
    await device.write(offset, data);
    await pacer?.paced(data.length);
    done++;
    bytes += data.length;
    options.onProgress?.({ phase: 'restore', done, total, bytes });
  });
  for (const [offset, length] of toTrim) {
    await device.trim(offset, length);
    done++;
    options.onProgress?.({ phase: 'restore', done, total, bytes });
  }
  await device.flush();
  return { blocksWritten: wanted.length, blocksTrimmed: toTrim.length, bytesWritten: bytes };
}
