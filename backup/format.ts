import {
  createCipheriv,
  createDecipheriv,
  createHash,
  createHmac,
  hkdfSync,
  randomBytes,
} from 'node:crypto';
import { promisify } from 'node:util';
import * as zlib from 'node:zlib';
import { CorralError } from '../common/errors.ts';
import { checkUserKey } from '../replication/crypt.ts';

/**
 * The backupstore format (docs/ARCHITECTURE.md, "Backups"), in one place:
 *
 *   backupstore/volumes/<volume>/volume.cfg           JSON, versioned
 *   backupstore/volumes/<volume>/backups/<backup>.cfg JSON, versioned; lists every block
 *   backupstore/blocks/<h0h1>/<h2h3>/<sha256>.blk     one block, header + payload
 *   backupstore/locks/<kind>-<id>.lck                 a running job (backup, delete)
 *
 * Blocks are named by the SHA-256 of their uncompressed content, so a block
 * is stored once however many backups and volumes hold it. An encrypted
 * backup's blocks are named by an HMAC-SHA256 of their content under a key
 * derived from the backup key instead: dedup works within one key, and the
 * names tell nothing of the content to whoever lacks it.
 */
export const BACKUP_BLOCK_SIZE = 2 * 1024 * 1024;
export const STORE = 'backupstore';
const CONFIG_VERSION = 1;

export const volumesPrefix = `${STORE}/volumes`;
export const blocksPrefix = `${STORE}/blocks`;
export const locksPrefix = `${STORE}/locks`;

export function volumeConfigKey(volume: string): string {
  return `${volumesPrefix}/${volume}/volume.cfg`;
}
export function backupsPrefix(volume: string): string {
  return `${volumesPrefix}/${volume}/backups`;
}
export function backupConfigKey(volume: string, backup: string): string {
  return `${backupsPrefix(volume)}/${backup}.cfg`;
}
export function blockKey(hash: string): string {
  return `${blocksPrefix}/${hash.slice(0, 2)}/${hash.slice(2, 4)}/${hash}.blk`;
}
/** The hash named by a block key, or undefined for anything else found under blocks/. */
export function hashOfBlockKey(key: string): string | undefined {
  return /\/([0-9a-f]{64})\.blk$/.exec(key)?.[1];
}

export interface VolumeConfig {
  name: string;
  sizeBytes: number;
  blockSize: number;
  createdAt: string;
  /** The newest complete backup, base of the next incremental one. */
  lastBackup: string | undefined;
  /** The key of the newest backup, when it is encrypted. */
  encryption?: BackupEncryption;
}

/** An encrypted backup: each block AES-256-GCM under a key derived from the backup key. */
export interface BackupEncryption {
  cipher: 'aes-256-gcm';
  /** A digest naming the backup key (not a check of it). */
  keyId: string;
}

/** What a backup key (≥ 32 random bytes) gives: one key to name blocks, one to encrypt them. */
export interface BackupKeys {
  keyId: string;
  mac: Buffer;
  enc: Buffer;
}

/**
 * HKDF-SHA256 without a salt: the key is random already, and the same key
 * must name a block the same way in every backup, or nothing would dedup.
 */
export function backupKeys(userKey: Buffer): BackupKeys {
  checkUserKey(userKey);
  const derive = (what: string) =>
    Buffer.from(hkdfSync('sha256', userKey, Buffer.alloc(0), `corral backup ${what}`, 32));
  return {
    keyId: createHash('sha256')
      .update('corral backup key id')
      .update(userKey)
      .digest('hex')
      .slice(0, 16),
    mac: derive('block names'),
    enc: derive('block data'),
  };
}

/** A block's name: SHA-256 of its content, or its HMAC under an encrypted backup's key. */
export function blockName(data: Uint8Array, keys: BackupKeys | undefined): string {
  return keys ? createHmac('sha256', keys.mac).update(data).digest('hex') : sha256(data);
}

export interface SnapshotRef {
  name: string;
  createdAt: string;
}

export interface BackupConfig {
  name: string;
  volume: string;
  snapshot: SnapshotRef;
  createdAt: string;
  sizeBytes: number;
  blockSize: number;
  labels: Record<string, string>;
  /** Every block of the volume at the snapshot that is not all zeros: [index, sha256]. */
  blocks: Array<[number, string]>;
  /** What this backup had to read and store itself. */
  stats: { blocksRead: number; blocksStored: number; bytesStored: number };
  /** Present when the blocks are encrypted: the key they need. */
  encryption?: BackupEncryption;
}

function encryptionOf(r: Record<string, unknown>, what: string): BackupEncryption | undefined {
  const e = r.encryption as Record<string, unknown> | undefined;
  if (e === undefined || e === null) return undefined;
  if (typeof e !== 'object' || e.cipher !== 'aes-256-gcm' || typeof e.keyId !== 'string')
    throw corrupt(what, 'encryption is not aes-256-gcm with a key id');
  return { cipher: 'aes-256-gcm', keyId: e.keyId };
}

function corrupt(what: string, detail: string): CorralError {
  return new CorralError('CORRUPT_METADATA', `Backupstore ${what}: ${detail}`);
}

function parseConfig(bytes: Uint8Array, what: string): Record<string, unknown> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(Buffer.from(bytes).toString('utf8'));
  } catch {
    throw corrupt(what, 'not valid JSON');
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed))
    throw corrupt(what, 'not a JSON object');
  const record = parsed as Record<string, unknown>;
  if (record.v !== CONFIG_VERSION) {
    throw new CorralError(
      'UNSUPPORTED_FORMAT',
      `Backupstore ${what} has format version ${String(record.v)}; this Corral reads version ${CONFIG_VERSION}`,
    );
  }
  return record;
}

function str(r: Record<string, unknown>, key: string, what: string): string {
  const v = r[key];
  if (typeof v !== 'string') throw corrupt(what, `${key} is not a string`);
  return v;
}

function num(r: Record<string, unknown>, key: string, what: string): number {
  const v = r[key];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0)
    throw corrupt(what, `${key} is not a count`);
  return v;
}

export function encodeConfig(value: VolumeConfig | BackupConfig): Uint8Array {
  return Buffer.from(JSON.stringify({ v: CONFIG_VERSION, ...value }));
}

export function decodeVolumeConfig(bytes: Uint8Array, what: string): VolumeConfig {
  const r = parseConfig(bytes, what);
  const last = r.lastBackup;
  if (last !== undefined && last !== null && typeof last !== 'string')
    throw corrupt(what, 'lastBackup is not a string');
  return {
    name: str(r, 'name', what),
    sizeBytes: num(r, 'sizeBytes', what),
    blockSize: num(r, 'blockSize', what),
    createdAt: str(r, 'createdAt', what),
    lastBackup: typeof last === 'string' ? last : undefined,
    ...(encryptionOf(r, what) ? { encryption: encryptionOf(r, what)! } : {}),
  };
}

export function decodeBackupConfig(bytes: Uint8Array, what: string): BackupConfig {
  const r = parseConfig(bytes, what);
  const snap = r.snapshot as Record<string, unknown> | undefined;
  if (typeof snap !== 'object' || snap === null) throw corrupt(what, 'snapshot is missing');
  const sizeBytes = num(r, 'sizeBytes', what);
  const blockSize = num(r, 'blockSize', what);
  if (blockSize === 0) throw corrupt(what, 'blockSize is 0');
  const count = Math.ceil(sizeBytes / blockSize);
  const blocks = r.blocks;
  if (!Array.isArray(blocks)) throw corrupt(what, 'blocks is not a list');
  for (const b of blocks) {
    if (
      !Array.isArray(b) ||
      b.length !== 2 ||
      !Number.isSafeInteger(b[0]) ||
      (b[0] as number) < 0 ||
      (b[0] as number) >= count ||
      typeof b[1] !== 'string' ||
      !/^[0-9a-f]{64}$/.test(b[1])
    )
      throw corrupt(what, `bad block entry ${JSON.stringify(b)}`);
  }
  const labels = r.labels;
  const stats = (r.stats ?? {}) as Record<string, unknown>;
  return {
    name: str(r, 'name', what),
    volume: str(r, 'volume', what),
    snapshot: { name: str(snap, 'name', what), createdAt: str(snap, 'createdAt', what) },
    createdAt: str(r, 'createdAt', what),
    sizeBytes,
    blockSize,
    labels: typeof labels === 'object' && labels !== null ? (labels as Record<string, string>) : {},
    blocks: blocks as Array<[number, string]>,
    stats: {
      blocksRead: typeof stats.blocksRead === 'number' ? stats.blocksRead : 0,
      blocksStored: typeof stats.blocksStored === 'number' ? stats.blocksStored : 0,
      bytesStored: typeof stats.bytesStored === 'number' ? stats.bytesStored : 0,
    },
    ...(encryptionOf(r, what) ? { encryption: encryptionOf(r, what)! } : {}),
  };
}

export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

export function isAllZero(data: Uint8Array): boolean {
  // Compare 8 bytes at a time where the buffer allows it.
  if (data.byteOffset % 8 === 0 && data.length % 8 === 0) {
    const words = new BigUint64Array(data.buffer, data.byteOffset, data.length / 8);
    for (let i = 0; i < words.length; i++) if (words[i] !== 0n) return false;
    return true;
  }
  for (let i = 0; i < data.length; i++) if (data[i] !== 0) return false;
  return true;
}

/*
 * A block file: 12 bytes of header, then the payload.
 *   0  'CRLB'   magic
 *   4  u8       format version (1)
 *   5  u8       encoding: 0 stored as is, 1 gzip; + 0x10: AES-256-GCM, the payload then
 *               being iv (12) | tag (16) | the encrypted (stored or gzipped) bytes
 *   6  u16      reserved (0)
 *   8  u32 BE   length of the uncompressed block
 */
const MAGIC = 0x43524c42; // 'CRLB'
const HEADER_BYTES = 12;
const RAW = 0;
const GZIP = 1;
const SEALED = 0x10;
/** Compress a sample first: random data (encrypted, compressed already) is stored as is, 5x faster. */
const SAMPLE_BYTES = 8 * 1024;
const WORTH_COMPRESSING = 0.9;

const gzip = promisify(zlib.gzip);
const gunzip = promisify(zlib.gunzip);

/** A block file as two chunks, header and payload: the payload may be `data` itself, not a copy. */
export async function encodeBlock(
  data: Uint8Array,
  keys?: BackupKeys,
): Promise<[Buffer, Uint8Array]> {
  let encoding = RAW;
  let payload: Uint8Array = data;
  const sampleAt = Math.max(0, Math.floor(data.length / 2) - SAMPLE_BYTES / 2);
  const sample = data.subarray(sampleAt, sampleAt + SAMPLE_BYTES);
  if (zlib.deflateRawSync(sample, { level: 1 }).length < sample.length * WORTH_COMPRESSING) {
    const packed = await gzip(data, { level: 1 });
    if (packed.length < data.length) {
      encoding = GZIP;
      payload = packed;
    }
  }
  if (keys) {
    const iv = randomBytes(12);
    const c = createCipheriv('aes-256-gcm', keys.enc, iv);
    const sealed = Buffer.concat([c.update(payload), c.final()]);
    payload = Buffer.concat([iv, c.getAuthTag(), sealed]);
    encoding |= SEALED;
  }
  const header = Buffer.alloc(HEADER_BYTES);
  header.writeUInt32BE(MAGIC, 0);
  header.writeUInt8(1, 4);
  header.writeUInt8(encoding, 5);
  header.writeUInt16BE(0, 6);
  header.writeUInt32BE(data.length, 8);
  return [header, payload];
}

/**
 * Decodes a block file and checks it against its name: a block never
 * restores as other bytes. An encrypted one needs its backup's keys; a
 * flipped bit fails its authentication.
 */
export async function decodeBlock(file: Buffer, hash: string, keys?: BackupKeys): Promise<Buffer> {
  const bad = (detail: string): CorralError =>
    new CorralError('CORRUPT_METADATA', `Backup block ${hash}: ${detail}`);
  if (file.length < HEADER_BYTES || file.readUInt32BE(0) !== MAGIC) throw bad('not a block file');
  if (file.readUInt8(4) !== 1)
    throw new CorralError(
      'UNSUPPORTED_FORMAT',
      `Backup block ${hash} has format version ${file.readUInt8(4)}; this Corral reads version 1`,
    );
  let encoding = file.readUInt8(5);
  const length = file.readUInt32BE(8);
  let payload = file.subarray(HEADER_BYTES);
  if (encoding & SEALED) {
    if (!keys)
      throw new CorralError(
        'FORBIDDEN',
        `Backup block ${hash} is encrypted: its backup's key is needed`,
      );
    if (payload.length < 28) throw bad('too short for an encrypted block');
    try {
      const d = createDecipheriv('aes-256-gcm', keys.enc, payload.subarray(0, 12));
      d.setAuthTag(payload.subarray(12, 28));
      payload = Buffer.concat([d.update(payload.subarray(28)), d.final()]);
    } catch {
      throw new CorralError(
        'DATA_CORRUPT',
        `Backup block ${hash} fails its authentication: it was changed or damaged in the store`,
      );
    }
    encoding &= ~SEALED;
  } else if (keys) throw bad('is not encrypted, and its backup is');
  let data: Buffer;
  if (encoding === RAW) data = payload;
  else if (encoding === GZIP) {
    try {
      data = await gunzip(payload);
    } catch {
      throw bad('its compressed payload does not decompress');
    }
  } else throw bad(`unknown encoding ${encoding}`);
  if (data.length !== length) throw bad(`holds ${data.length} bytes, its header says ${length}`);
  if (blockName(data, keys) !== hash) throw bad('content does not match its checksum');
  return data;
}
