import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomUUID } from 'node:crypto';
import { assert } from '../common/assert.ts';
import { CorralError, ioError } from '../common/errors.ts';
import { bitmapKey, type LayerRecord, type ReplicaRecord, type Spaces } from '../kv/spaces.ts';
import { BLOCK_SIZE, type Extent, type WriteOptions, type ZeroOptions } from './block-device.ts';
import { closeFd, fdatasync, fsyncDir, preadFull, pwriteFull } from './file-io.ts';
import { ABSENT, DATA, LayerMap, ReadIndex, UNRESOLVED, ZERO, ZERO_SOURCE } from './layer-map.ts';
import { RangeLock } from './range-lock.ts';
import type { Replica } from './replica.ts';

interface OpenLayer {
  record: LayerRecord;
  fd: number;
  map: LayerMap;
}

/** Largest zero buffer kept for NO_HOLE write-zeroes: never one buffer the size of the request. */
const ZERO_PIECE_BYTES = 1024 * 1024;
const ZERO_PIECE = new Uint8Array(ZERO_PIECE_BYTES);

export interface LocalReplicaOptions {
  spaces: Spaces;
  /** `<data dir>/replicas`: each replica gets a folder `<id>` below it. */
  root: string;
}

/**
 * One copy of a volume on this host: a chain of layer files (sparse, the
 * volume's size, 4 KiB blocks), their allocation bitmaps in LevelDB, a lazily
 * filled read index, and a revision counter.
 *
 * Write ordering (docs/ARCHITECTURE.md, "Crash safety"):
 *   1. data is written to the head's file (no sync);
 *   2. the block's bits change in memory, the write is acknowledged;
 *   3. a flush (or FUA) copies the changed bitmap chunks, fdatasyncs the
 *      layer files, and only then writes the copied chunks and the revision
 *      counter to LevelDB in one synced batch.
 * So a bit on disk always follows durable data: after a crash an unflushed
 * block reads as its previous content, never as bytes not written there.
 */
export class LocalReplica implements Replica {
  readonly id: string;
  readonly location = 'local';
  readonly sizeBytes: number;
  readonly #spaces: Spaces;
  readonly #dir: string;
  readonly #record: ReplicaRecord;
  readonly #layers: OpenLayer[];
  readonly #index: ReadIndex;
  readonly #locks = new RangeLock();
  readonly #blockCount: number;
  #revision: bigint;
  #persistedRevision: bigint;
  #unsynced = new Set<OpenLayer>();
  #flushRunning: Promise<void> | undefined;
  #flushNext: Promise<void> | undefined;
  #closed = false;
  /** File operations under way: fds are closed only at zero, so a number is never reused under one. */
  #pending = 0;
  #fdsClosed = false;

  private constructor(
    spaces: Spaces,
    dir: string,
    record: ReplicaRecord,
    layers: OpenLayer[],
    revision: bigint,
  ) {
    this.#spaces = spaces;
    this.#dir = dir;
    this.#record = record;
    this.id = record.id;
    this.sizeBytes = record.sizeBytes;
    this.#layers = layers;
    this.#blockCount = Math.ceil(record.sizeBytes / BLOCK_SIZE);
    this.#index = new ReadIndex(this.#blockCount);
    this.#revision = revision;
    this.#persistedRevision = revision;
  }

  static dirOf(root: string, id: string): string {
    return path.join(root, id);
  }

  /** Creates an empty replica: folder, head file, then its record (the record makes it exist). */
  static async create(
    options: LocalReplicaOptions & { volume: string; sizeBytes: number; now: Date },
  ): Promise<LocalReplica> {
    assert(
      options.sizeBytes % BLOCK_SIZE === 0,
      `replica size ${options.sizeBytes} not block aligned`,
    );
    const id = randomUUID();
    const dir = LocalReplica.dirOf(options.root, id);
    const head: LayerRecord = { id: randomUUID(), createdAt: options.now.toISOString() };
    try {
      await fs.promises.mkdir(dir, { recursive: true });
      await createLayerFile(dir, head.id, options.sizeBytes);
      await fsyncDir(dir);
      await fsyncDir(options.root);
    } catch (err) {
      await fs.promises.rm(dir, { recursive: true, force: true });
      throw ioError(`Cannot create replica files in ${dir}`, err);
    }
    const record: ReplicaRecord = {
      id,
      volume: options.volume,
      sizeBytes: options.sizeBytes,
      layers: [head],
    };
    await options.spaces.replicas.put(id, record);
    return LocalReplica.open({ ...options, id });
  }

  static async open(options: LocalReplicaOptions & { id: string }): Promise<LocalReplica> {
    const record = await options.spaces.replicas.get(options.id);
    if (!record)
      throw new CorralError('NOT_FOUND', `Replica ${options.id} has no record on this host`);
    const dir = LocalReplica.dirOf(options.root, record.id);
    const blockCount = Math.ceil(record.sizeBytes / BLOCK_SIZE);
    const layers: OpenLayer[] = [];
    try {
      for (const layer of record.layers) {
        const fd = await new Promise<number>((resolve, reject) =>
          fs.open(layerPath(dir, layer.id), 'r+', (err, fd) => (err ? reject(err) : resolve(fd))),
        );
        const map = new LayerMap(blockCount);
        layers.push({ record: layer, fd, map });
        for (const [key, bytes] of await options.spaces.bitmaps.entries(`${layer.id}/`)) {
          map.load(parseInt(key.slice(layer.id.length + 1), 16), bytes);
        }
      }
    } catch (err) {
      await Promise.allSettled(layers.map((l) => closeFd(l.fd)));
      if (err instanceof CorralError) throw err;
      throw ioError(`Cannot open replica ${record.id} of volume ${record.volume}`, err);
    }
    const rev = await options.spaces.revisions.get(record.id);
    const revision = rev ? Buffer.from(rev).readBigUInt64BE(0) : 0n;
    return new LocalReplica(options.spaces, dir, record, layers, revision);
  }

  /** Removes the replica's record, bitmaps and files. */
  static async destroy(options: LocalReplicaOptions & { id: string }): Promise<void> {
    const record = await options.spaces.replicas.get(options.id);
    const dir = LocalReplica.dirOf(options.root, options.id);
    if (record) {
      const batch = options.spaces.batch();
      for (const layer of record.layers) {
        for (const key of await options.spaces.bitmaps.keys(`${layer.id}/`)) {
          batch.del(options.spaces.bitmaps, key);
        }
      }
      batch.del(options.spaces.revisions, options.id).del(options.spaces.replicas, options.id);
      await batch.write();
    }
    await fs.promises.rm(dir, { recursive: true, force: true });
  }

  revision(): bigint {
    return this.#revision;
  }

  get #head(): OpenLayer {
    const head = this.#layers[this.#layers.length - 1];
    assert(head, 'replica has no head layer');
    return head;
  }

  /** Which source holds a block: a layer index + 1, or ZERO_SOURCE. */
  #resolve(block: number): number {
    const cached = this.#index.get(block);
    if (cached !== UNRESOLVED) return cached;
    let source = ZERO_SOURCE;
    for (let i = this.#layers.length - 1; i >= 0; i--) {
      const state = this.#layers[i]!.map.state(block);
      if (state === DATA) {
        source = i + 1;
        break;
      }
      if (state === ZERO) break;
    }
    this.#index.set(block, source);
    return source;
  }

  #checkRange(offset: number, length: number): void {
    assert(
      Number.isSafeInteger(offset) &&
        Number.isSafeInteger(length) &&
        offset >= 0 &&
        length >= 0 &&
        offset + length <= this.sizeBytes,
      `range ${offset}+${length} outside replica of ${this.sizeBytes} bytes`,
    );
    assert(!this.#closed, `replica ${this.id} is closed`);
  }

  async read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    this.#checkRange(offset, length);
    assert(
      into === undefined || into.length === length,
      `read buffer of ${into?.length} bytes for ${length}`,
    );
    const out = into ?? Buffer.allocUnsafe(length);
    this.#pending++;
    try {
      await this.#readInto(out, 0, offset, length);
    } finally {
      this.#leave();
    }
    return out;
  }

  #leave(): void {
    this.#pending--;
    if (this.#pending === 0 && this.#closed && !this.#fdsClosed) {
      this.#fdsClosed = true;
      for (const l of this.#layers) closeFd(l.fd).catch(() => undefined);
    }
  }

  abandon(): void {
    this.#closed = true;
    this.#pending++;
    this.#leave();
  }

  /** Fills `buf[bufOffset, +length)` with the volume's bytes at `offset`, through the chain. */
  async #readInto(
    buf: Uint8Array,
    bufOffset: number,
    offset: number,
    length: number,
  ): Promise<void> {
    if (length === 0) return;
    const end = offset + length;
    const pending: Array<Promise<void>> = [];
    let block = Math.floor(offset / BLOCK_SIZE);
    let runStart = offset;
    let source = this.#resolve(block);
    for (;;) {
      const blockEnd = Math.min((block + 1) * BLOCK_SIZE, end);
      const next = blockEnd < end ? this.#resolve(block + 1) : -1;
      if (next !== source) {
        const runLength = blockEnd - runStart;
        const at = bufOffset + (runStart - offset);
        if (source === ZERO_SOURCE) {
          buf.fill(0, at, at + runLength);
        } else {
          const layer = this.#layers[source - 1];
          assert(layer, `read index points at missing layer ${source - 1}`);
          pending.push(preadFull(layer.fd, buf, at, runLength, runStart));
        }
        if (next === -1) break;
        runStart = blockEnd;
        source = next;
      }
      block++;
    }
    // allSettled: no pread may still be filling `buf` once we return, even on failure
    // (the engine may retry the read into the same buffer on another replica).
    const results = await Promise.allSettled(pending);
    const failed = results.find((r) => r.status === 'rejected');
    if (failed) throw ioError(`Cannot read replica ${this.id}`, failed.reason);
  }

  async write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    this.#checkRange(offset, data.length);
    if (data.length === 0) return;
    const end = offset + data.length;
    const startBlock = Math.floor(offset / BLOCK_SIZE);
    const endBlock = Math.ceil(end / BLOCK_SIZE);
    const head = this.#head;
    this.#pending++;
    try {
      if (offset % BLOCK_SIZE === 0 && end % BLOCK_SIZE === 0) {
        await pwriteFull(head.fd, data, offset);
      } else {
        const release = await this.#locks.acquire(startBlock, endBlock);
        try {
          await this.#readModifyWrite(head, offset, data, startBlock, endBlock);
        } finally {
          release();
        }
      }
    } catch (err) {
      throw ioError(`Cannot write replica ${this.id} at ${offset}`, err);
    } finally {
      this.#leave();
    }
    assert(!this.#closed, `replica ${this.id} was closed during a write`);
    this.#markBlocks(startBlock, endBlock, DATA);
    this.#unsynced.add(head);
    if (options?.fua) await this.flush();
  }

  async #readModifyWrite(
    head: OpenLayer,
    offset: number,
    data: Uint8Array,
    startBlock: number,
    endBlock: number,
  ): Promise<void> {
    const alignedStart = startBlock * BLOCK_SIZE;
    const buf = Buffer.allocUnsafe((endBlock - startBlock) * BLOCK_SIZE);
    const end = offset + data.length;
    // Only the partial edge blocks need their old bytes; data covers the rest.
    if (offset % BLOCK_SIZE !== 0) await this.#readInto(buf, 0, alignedStart, BLOCK_SIZE);
    if (end % BLOCK_SIZE !== 0 && (endBlock - 1 !== startBlock || offset % BLOCK_SIZE === 0)) {
      await this.#readInto(buf, buf.length - BLOCK_SIZE, (endBlock - 1) * BLOCK_SIZE, BLOCK_SIZE);
    }
    buf.set(data, offset - alignedStart);
    await pwriteFull(head.fd, buf, alignedStart);
  }

  #markBlocks(startBlock: number, endBlock: number, state: typeof DATA | typeof ZERO): void {
    const headIndex = this.#layers.length - 1;
    const head = this.#head;
    // On the base layer nothing lies below, so a zeroed block can simply be absent.
    const stored = state === ZERO && headIndex === 0 ? ABSENT : state;
    const source = state === DATA ? headIndex + 1 : ZERO_SOURCE;
    for (let b = startBlock; b < endBlock; b++) {
      head.map.set(b, stored);
      this.#index.set(b, source);
    }
    this.#revision++;
  }

  async trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    // Trimmed blocks read as zeros: simpler for clients than "undefined", and free here.
    await this.zero(offset, length, options);
  }

  async zero(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    this.#checkRange(offset, length);
    if (length === 0) return;
    const end = offset + length;
    if (options?.noHole) {
      // Allocated zeros: written for real, in bounded pieces.
      for (let at = offset; at < end; at += ZERO_PIECE_BYTES) {
        await this.write(at, ZERO_PIECE.subarray(0, Math.min(ZERO_PIECE_BYTES, end - at)));
      }
    } else {
      const firstFull = Math.ceil(offset / BLOCK_SIZE);
      const lastFull = Math.floor(end / BLOCK_SIZE);
      if (firstFull >= lastFull) {
        await this.write(offset, ZERO_PIECE.subarray(0, length));
      } else {
        if (offset % BLOCK_SIZE !== 0) {
          await this.write(offset, ZERO_PIECE.subarray(0, firstFull * BLOCK_SIZE - offset));
        }
        if (end % BLOCK_SIZE !== 0) {
          await this.write(
            lastFull * BLOCK_SIZE,
            ZERO_PIECE.subarray(0, end - lastFull * BLOCK_SIZE),
          );
        }
        this.#markBlocks(firstFull, lastFull, ZERO);
      }
    }
    if (options?.fua) await this.flush();
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    this.#checkRange(offset, length);
    const out: Extent[] = [];
    const end = offset + length;
    let at = offset;
    while (at < end) {
      const block = Math.floor(at / BLOCK_SIZE);
      const blockEnd = Math.min((block + 1) * BLOCK_SIZE, end);
      const hole = this.#resolve(block) === ZERO_SOURCE;
      const last = out[out.length - 1];
      if (last && last.hole === hole) last.lengthBytes += blockEnd - at;
      else out.push({ lengthBytes: blockEnd - at, hole, zero: hole });
      at = blockEnd;
    }
    return Promise.resolve(out);
  }

  /**
   * Group commit: a flush that arrives while one runs waits for it and then
   * runs once more for everyone who arrived meanwhile, since the running one
   * may have started before their writes completed.
   */
  flush(): Promise<void> {
    if (!this.#flushRunning) {
      this.#flushRunning = this.#runFlush().finally(() => {
        this.#flushRunning = undefined;
      });
      return this.#flushRunning;
    }
    this.#flushNext ??= this.#flushRunning
      .catch(() => undefined)
      .then(() => {
        this.#flushNext = undefined;
        return this.flush();
      });
    return this.#flushNext;
  }

  async #runFlush(): Promise<void> {
    if (this.#closed) return;
    const layers = [...this.#unsynced];
    this.#unsynced.clear();
    const chunks = this.#layers.map((layer) => ({ layer, dirty: layer.map.takeDirty() }));
    const revision = this.#revision;
    this.#pending++;
    try {
      await Promise.all(layers.map((l) => fdatasync(l.fd)));
      const kvBatch = this.#spaces.batch();
      for (const { layer, dirty } of chunks) {
        for (const [index, bytes] of dirty)
          kvBatch.put(this.#spaces.bitmaps, bitmapKey(layer.record.id, index), bytes);
      }
      if (revision !== this.#persistedRevision) {
        const rev = Buffer.alloc(8);
        rev.writeBigUInt64BE(revision);
        kvBatch.put(this.#spaces.revisions, this.id, rev);
      }
      await kvBatch.write({ sync: true });
      this.#persistedRevision = revision;
    } catch (err) {
      // Keep the promise that the next flush retries what this one could not make durable.
      for (const l of layers) this.#unsynced.add(l);
      for (const { layer, dirty } of chunks) layer.map.markDirty(dirty.map(([i]) => i));
      throw ioError(`Cannot flush replica ${this.id}`, err);
    } finally {
      this.#leave();
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    await this.flush();
    this.abandon();
  }

  /** Bytes of volume data held per layer (allocated blocks × block size). */
  stats(): { layers: Array<{ id: string; snapshot?: string; allocatedBytes: number }> } {
    return {
      layers: this.#layers.map((l) => {
        const blocks = l.map.countData();
        return {
          id: l.record.id,
          ...(l.record.snapshot ? { snapshot: l.record.snapshot } : {}),
          allocatedBytes: blocks * BLOCK_SIZE,
        };
      }),
    };
  }
}

function layerPath(dir: string, layerId: string): string {
  return path.join(dir, `${layerId}.layer`);
}

async function createLayerFile(dir: string, layerId: string, sizeBytes: number): Promise<void> {
  const handle = await fs.promises.open(layerPath(dir, layerId), 'wx');
  try {
    await handle.truncate(sizeBytes);
    await handle.sync();
  } finally {
    await handle.close();
  }
}
