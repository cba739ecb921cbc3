import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash, randomUUID } from 'node:crypto';
import { assert, fail } from '../common/assert.ts';
import { Pacer } from '../common/pacer.ts';
import { CorralError, ioError } from '../common/errors.ts';
import { systemClock, type Clock } from '../common/clock.ts';
import type { KvBatch } from '../kv/kv.ts';
import { bitmapKey, type LayerRecord, type ReplicaRecord, type Spaces } from '../kv/spaces.ts';
import { BLOCK_SIZE, type Extent, type WriteOptions, type ZeroOptions } from './block-device.ts';
import {
  closeFd,
  fdatasync,
  fsyncDir,
  preadFull,
  pwriteFull,
  syncWrites,
  type SyncWriteGate,
} from './file-io.ts';
import {
  ABSENT,
  BLOCKS_PER_CHUNK,
  DATA,
  LayerMap,
  MAX_LAYERS,
  ReadIndex,
  UNRESOLVED,
  ZERO,
  ZERO_SOURCE,
} from './layer-map.ts';
import { RangeLock } from './range-lock.ts';
import { BlockRanges } from './block-ranges.ts';
import { punchHoles } from './punch.ts';
import { BlockSums, SUMS_PER_CHUNK } from './block-sums.ts';
import { decodeTrailer, encodeTrailer } from './revision-trailer.ts';
import type { BadBlock, Replica, SnapshotInfo } from './replica.ts';

/** A write under way: which blocks of which layer, and who waits for it to end. */
interface InflightWrite {
  layer: OpenLayer;
  start: number;
  end: number;
  /** A read-modify-write reads its edge blocks first (under the range lock). */
  reads: boolean;
  waiters?: Array<() => void>;
}

interface OpenLayer {
  record: LayerRecord;
  fd: number;
  map: LayerMap;
  /** The checksum of every DATA block written since checksums exist. */
  sums: BlockSums;
  /** Per region (bitmap chunk): write-intent mark durable (MARKED), written since the last flush began (RECENT), its mark to be cleared by the running flush (QUIET). */
  regions: Uint8Array;
  /**
   * The regions with any bit set: a flush looks at these only (a commit's flush of a 1 TiB
   * volume with 100 snapshots walked every region of every layer, ~800k a flush).
   */
  active: Set<number>;
  /** Per region: writes under way. */
  writing: Uint32Array;
  /** Per region: when a flush last found it written (the clock's elapsedMs), for MARK_LINGER_MS. */
  writtenAt: Float64Array;
  /** Stable number of this layer while the replica is open: what the read index stores. */
  slot: number;
}

/**
 * Snapshots per replica. Each layer is one open file and 16 bits in the
 * read index name a layer, so this stays far below both the fd limit and
 * MAX_LAYERS; 500 is well past what the chain must serve in constant time.
 */
export const MAX_SNAPSHOTS = 500;
// The head and the base layer take slots too.
assert(MAX_SNAPSHOTS + 2 < MAX_LAYERS, 'MAX_SNAPSHOTS must leave layer slots free');

/** Blocks copied per step when a snapshot is merged away: big enough to stream, small enough to interleave with I/O. */
const MERGE_RUN_BLOCKS = 16;

/** Calls `fn(start, end)` for each maximal run of indexes in [0, count) where `selected` holds. */
async function forEachRun(
  count: number,
  selected: (i: number) => boolean,
  fn: (start: number, end: number) => Promise<void>,
): Promise<void> {
  for (let i = 0; i < count;) {
    if (!selected(i)) {
      i++;
      continue;
    }
    let j = i;
    while (j < count && selected(j)) j++;
    await fn(i, j);
    i = j;
  }
}

/** Unflushed bytes a replica lets pile up before it flushes on its own (write-behind). */
const WRITE_BEHIND_BYTES = 64 * 1024 * 1024;

/** Largest zero buffer kept for NO_HOLE write-zeroes: never one buffer the size of the request. */
const ZERO_PIECE_BYTES = 1024 * 1024;
const ZERO_PIECE = new Uint8Array(ZERO_PIECE_BYTES);

/** Punched per range lock held: a write into a block being punched waits at most this much. */
const PUNCH_WINDOW_BLOCKS = (64 * 1024 * 1024) / BLOCK_SIZE;
/** Trims not followed by a client's flush are made durable (and punched) this long after. */
const PUNCH_FLUSH_DELAY_MS = 1000;

/** A block state only digests show: DATA whose bytes fail their checksum. */
const POISONED = 0xee;

/** OpenLayer.regions bits. */
const MARKED = 1;
const RECENT = 2;
/** Marked, and quiet long enough when the running flush began: the flush clears its mark. */
const QUIET = 4;
/**
 * A region's write-intent mark stays this long after its last write (md's bitmap lingers the
 * same way). Cleared at the first flush after each write, a database's commit — write, fsync,
 * write into the same region — paid a synced LevelDB write for the mark before every write:
 * three syncs in a row per commit. The cost is bounded: at open after a crash, the regions
 * written in the last few seconds are hashed again.
 */
const MARK_LINGER_MS = 5000;

/** A layer's in-memory state, empty (its bitmaps and sums are loaded into it, if any). */
function layerState(
  blockCount: number,
): Pick<OpenLayer, 'map' | 'sums' | 'regions' | 'active' | 'writing' | 'writtenAt'> {
  const regions = Math.ceil(blockCount / BLOCKS_PER_CHUNK);
  return {
    map: new LayerMap(blockCount),
    sums: new BlockSums(blockCount),
    regions: new Uint8Array(regions),
    active: new Set(),
    writing: new Uint32Array(regions),
    writtenAt: new Float64Array(regions),
  };
}

/** The region (bitmap chunk) a sum chunk lies in. */
function sumChunkRegion(sumChunk: number): number {
  return Math.floor((sumChunk * SUMS_PER_CHUNK) / BLOCKS_PER_CHUNK);
}

/** The value of a write-intent mark: its key says it all. */
const EMPTY = new Uint8Array(0);

export interface LocalReplicaOptions {
  spaces: Spaces;
  /**
   * `<data dir>/replicas`: each replica gets a folder `<id>` below it, unless
   * its record names another root (a replica on another disk).
   */
  root: string;
  /** Limits how fast a snapshot delete copies, so that it does not starve client I/O. */
  mergeLimit?: { bytesPerSecond: number; clock: Clock };
  /** Times how long write-intent marks linger (the system clock unless a test turns one). */
  clock?: Clock;
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
 *      counter to LevelDB in one synced batch (a flush with nothing but the
 *      counter to record writes it in the head's trailer, before the sync).
 * So a bit on disk always follows durable data: after a crash an unflushed
 * block reads as its previous content, never as bytes not written there.
 */
export class LocalReplica implements Replica {
  readonly id: string;
  readonly location = 'local';
  sizeBytes: number;
  readonly #spaces: Spaces;
  readonly #dir: string;
  #record: ReplicaRecord;
  #layers: OpenLayer[];
  /** Layers by slot; retired ones stay until no I/O can touch them. */
  readonly #bySlot: Array<OpenLayer | undefined> = [];
  #retired: OpenLayer[] = [];
  /** While a snapshot is merged into the head, every write takes the range lock. */
  #mergeInto: OpenLayer | undefined;
  /** How fast a snapshot delete may copy (undefined: no limit). */
  #mergeLimit: LocalReplicaOptions['mergeLimit'];
  /**
   * Writes that took the lock-free path (aligned, no merge into the head at
   * their start) and have not marked their blocks yet. A merge into the head
   * waits for them: otherwise it could see such a block as absent and copy
   * the snapshot's old bytes over the new ones.
   */
  #unlockedWrites = 0;
  readonly #unlockedWaiters: Array<() => void> = [];
  readonly #index: ReadIndex;
  readonly #locks = new RangeLock();
  #blockCount: number;
  #revision: bigint;
  /** The revision last made durable: in the head's trailer or in LevelDB. */
  #persistedRevision: bigint;
  /** The revision LevelDB holds: behind the head's trailer after commits' flushes. */
  #kvRevision: bigint;
  /** The next flush writes the counter in both places (it may have gone down: setRevision). */
  #revisionBothPlaces = false;
  #unsynced = new Set<OpenLayer>();
  /** Bytes written since the last flush began: past WRITE_BEHIND_BYTES a flush starts on its own. */
  #unsyncedBytes = 0;
  /** Metadata changes that must land in the next flush's batch, after its data sync. */
  readonly #commits: Array<(batch: KvBatch) => void> = [];
  #flushRunning: Promise<void> | undefined;
  #flushNext: Promise<void> | undefined;
  #closed = false;
  /** Writes under way, all layers; a read that raced one waits for it (see #badBlocks). */
  readonly #inflight = new Set<InflightWrite>();
  /** File operations under way: fds are closed only at zero, so a number is never reused under one. */
  #pending = 0;
  /** `close` waits here for the operations in flight: none may land after it returns. */
  readonly #drainWaiters: Array<() => void> = [];
  #fdsClosed = false;
  /**
   * Space to return (see "Trim returns space" in docs/ARCHITECTURE.md):
   * blocks of each layer that held data and were trimmed or zeroed since the
   * last flush began; then, per flush, what that flush made durable and is
   * being punched. A write takes its blocks out of every one of them.
   */
  #punchQueue = new Map<OpenLayer, BlockRanges>();
  readonly #punchReady: Array<Map<OpenLayer, BlockRanges>> = [];
  /** Punches under way: writes take the range lock meanwhile, so none lands under a punch. */
  #punching = 0;
  #punchTimer: NodeJS.Timeout | undefined;
  /** A flush of our own that clears marks left to linger, once their regions stay quiet. */
  #lingerTimer: { cancel(): void } | undefined;
  #clock: Clock = systemClock;
  /** Set by close: its last flush clears every mark it can, lingering or not. */
  #closing = false;
  /** Why punching stopped (a filesystem without holes), once. */
  #punchFailure: string | undefined;

  /** Its disk's: a disk that falls behind sends only its own writes off the event loop. */
  readonly #gate: SyncWriteGate;

  private constructor(
    spaces: Spaces,
    dir: string,
    record: ReplicaRecord,
    layers: OpenLayer[],
    revision: bigint,
    kvRevision: bigint,
  ) {
    this.#spaces = spaces;
    this.#dir = dir;
    this.#gate = syncWrites.for(path.dirname(dir));
    this.#record = record;
    this.id = record.id;
    this.sizeBytes = record.sizeBytes;
    this.#layers = layers;
    for (const l of layers) this.#bySlot[l.slot] = l;
    this.#blockCount = Math.ceil(record.sizeBytes / BLOCK_SIZE);
    this.#index = new ReadIndex(this.#blockCount);
    this.#revision = revision;
    this.#persistedRevision = revision;
    this.#kvRevision = kvRevision;
  }

  static dirOf(root: string, id: string): string {
    return path.join(root, id);
  }

  /** Creates an empty replica: folder, head file, then its record (the record makes it exist). */
  static async create(
    options: LocalReplicaOptions & {
      volume: string;
      sizeBytes: number;
      now: Date;
      /** Another disk's replica root than `root`: recorded, so that open finds it. */
      on?: string;
    },
  ): Promise<LocalReplica> {
    assert(
      options.sizeBytes % BLOCK_SIZE === 0,
      `replica size ${options.sizeBytes} not block aligned`,
    );
    const id = randomUUID();
    const root = options.on ?? options.root;
    const dir = LocalReplica.dirOf(root, id);
    const head: LayerRecord = { id: randomUUID(), createdAt: options.now.toISOString() };
    try {
      await fs.promises.mkdir(dir, { recursive: true });
      await createLayerFile(dir, head.id, options.sizeBytes);
      await fsyncDir(dir);
      await fsyncDir(root);
    } catch (err) {
      await fs.promises.rm(dir, { recursive: true, force: true });
      throw ioError(`Cannot create replica files in ${dir}`, err);
    }
    const record: ReplicaRecord = {
      id,
      volume: options.volume,
      sizeBytes: options.sizeBytes,
      layers: [head],
      ...(options.on !== undefined && options.on !== options.root ? { root: options.on } : {}),
    };
    await options.spaces.replicas.put(id, record);
    return LocalReplica.open({ ...options, id });
  }

  static async open(options: LocalReplicaOptions & { id: string }): Promise<LocalReplica> {
    const record = await options.spaces.replicas.get(options.id);
    if (!record)
      throw new CorralError('NOT_FOUND', `Replica ${options.id} has no record on this host`);
    const dir = LocalReplica.dirOf(record.root ?? options.root, record.id);
    const blockCount = Math.ceil(record.sizeBytes / BLOCK_SIZE);
    const layers: OpenLayer[] = [];
    try {
      for (const layer of record.layers) {
        const fd = await new Promise<number>((resolve, reject) =>
          fs.open(layerPath(dir, layer.id), 'r+', (err, fd) => (err ? reject(err) : resolve(fd))),
        );
        const state = layerState(blockCount);
        const { map, sums } = state;
        layers.push({ record: layer, fd, ...state, slot: layers.length });
        for (const [key, bytes] of await options.spaces.bitmaps.entries(`${layer.id}/`)) {
          map.load(parseInt(key.slice(layer.id.length + 1), 16), bytes);
        }
        for (const [key, bytes] of await options.spaces.sums.entries(`${layer.id}/`)) {
          sums.load(parseInt(key.slice(layer.id.length + 1), 16), bytes);
        }
      }
    } catch (err) {
      await Promise.allSettled(layers.map((l) => closeFd(l.fd)));
      if (err instanceof CorralError) throw err;
      throw ioError(`Cannot open replica ${record.id} of volume ${record.volume}`, err);
    }
    const rev = await options.spaces.revisions.get(record.id);
    const kvRevision = rev ? Buffer.from(rev).readBigUInt64BE(0) : 0n;
    // The head's trailer is ahead of LevelDB after flushes that changed nothing but the counter;
    // LevelDB is ahead when the head has none yet (a new head, a volume just grown).
    const head = layers[layers.length - 1]!;
    const trailer = Buffer.alloc(BLOCK_SIZE);
    let inTrailer: bigint | undefined;
    try {
      await preadFull(head.fd, trailer, 0, BLOCK_SIZE, record.sizeBytes);
      inTrailer = decodeTrailer(trailer, head.record.id);
    } catch {
      // unreadable: LevelDB's counter stands
    }
    const revision = inTrailer !== undefined && inTrailer > kvRevision ? inTrailer : kvRevision;
    const replica = new LocalReplica(options.spaces, dir, record, layers, revision, kvRevision);
    replica.#mergeLimit = options.mergeLimit;
    if (options.clock) replica.#clock = options.clock;
    // Layer files no record names were being created or deleted when a crash came.
    const known = new Set(record.layers.map((l) => `${l.id}.layer`));
    for (const entry of await fs.promises.readdir(dir)) {
      if (entry.endsWith('.layer') && !known.has(entry))
        await fs.promises.rm(path.join(dir, entry), { force: true });
    }
    await replica.#recoverMarked();
    if (record.deleting) {
      const name = record.layers.find((l) => l.id === record.deleting)?.snapshot;
      if (name) await replica.deleteSnapshot(name);
    }
    return replica;
  }

  /** Removes the replica's record, bitmaps and files. */
  static async destroy(options: LocalReplicaOptions & { id: string }): Promise<void> {
    const record = await options.spaces.replicas.get(options.id);
    const dir = LocalReplica.dirOf(record?.root ?? options.root, options.id);
    if (record) {
      const batch = options.spaces.batch();
      for (const layer of record.layers) {
        for (const key of await options.spaces.bitmaps.keys(`${layer.id}/`)) {
          batch.del(options.spaces.bitmaps, key);
        }
        for (const key of await options.spaces.sums.keys(`${layer.id}/`)) {
          batch.del(options.spaces.sums, key);
        }
      }
      for (const key of await options.spaces.marks.keys(`${options.id}/`))
        batch.del(options.spaces.marks, key);
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

  /** Which source holds a block: a layer slot + 1, or ZERO_SOURCE. */
  #resolve(block: number): number {
    const cached = this.#index.get(block);
    if (cached !== UNRESOLVED) return cached;
    const regionIndex = Math.floor(block / BLOCKS_PER_CHUNK);
    const region = new Uint16Array(BLOCKS_PER_CHUNK).fill(ZERO_SOURCE);
    // Oldest first, so that a newer layer's state overrides what lies below it.
    for (const layer of this.#layers) {
      const source = layer.slot + 1;
      layer.map.forEachSet(regionIndex, (bit, state) => {
        region[bit] = state === DATA ? source : ZERO_SOURCE;
      });
    }
    this.#index.setRegion(regionIndex, region);
    return region[block % BLOCKS_PER_CHUNK]!;
  }

  #checkRange(offset: number, length: number): void {
    if (!(
      Number.isSafeInteger(offset) &&
      Number.isSafeInteger(length) &&
      offset >= 0 &&
      length >= 0 &&
      offset + length <= this.sizeBytes
    ))
      fail(`range ${offset}+${length} outside replica of ${this.sizeBytes} bytes`);
    if (this.#closed) fail(`replica ${this.id} is closed`);
  }

  async read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    this.#checkRange(offset, length);
    if (into !== undefined && into.length !== length)
      fail(`read buffer of ${into.length} bytes for ${length}`);
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
    if (this.#pending !== 0) return;
    for (const w of this.#drainWaiters.splice(0)) w();
    // Checked first: this runs after every operation, and splice would allocate each time.
    if (this.#retired.length > 0) {
      for (const l of this.#retired.splice(0)) closeFd(l.fd).catch(() => undefined);
    }
    if (this.#closed && !this.#fdsClosed) {
      this.#fdsClosed = true;
      for (const l of this.#layers) closeFd(l.fd).catch(() => undefined);
    }
  }

  /** Takes a layer out of use; its file descriptor closes once no operation can be using it. */
  #retire(layer: OpenLayer): void {
    this.#bySlot[layer.slot] = undefined;
    this.#retired.push(layer);
    this.#pending++;
    this.#leave();
  }

  abandon(): void {
    this.#closed = true;
    clearTimeout(this.#punchTimer);
    this.#lingerTimer?.cancel();
    this.#pending++;
    this.#leave();
  }

  /**
   * Reads `length` bytes of `layer`'s file at `fileOffset` into
   * `buf[at, +length)` and checks each block against its checksum; an edge
   * block asked for in part is read whole to be checked.
   */
  async #readRun(
    layer: OpenLayer,
    buf: Uint8Array,
    at: number,
    length: number,
    fileOffset: number,
    inWrite = false,
  ): Promise<void> {
    const first = Math.floor(fileOffset / BLOCK_SIZE);
    const end = fileOffset + length;
    const last = Math.ceil(end / BLOCK_SIZE);
    if (first * BLOCK_SIZE === fileOffset && last * BLOCK_SIZE === end) {
      await preadFull(layer.fd, buf, at, length, fileOffset);
      const view = buf.subarray(at, at + length);
      // Checked here, without another await, in the common case that every block matches.
      if (!layer.sums.allMatch(first, view, last - first))
        await this.#verify(layer, first, view, inWrite);
      return;
    }
    const whole = Buffer.allocUnsafe((last - first) * BLOCK_SIZE);
    await preadFull(layer.fd, whole, 0, whole.length, first * BLOCK_SIZE);
    if (!layer.sums.allMatch(first, whole, last - first))
      await this.#verify(layer, first, whole, inWrite);
    const skip = fileOffset - first * BLOCK_SIZE;
    buf.set(whole.subarray(skip, skip + length), at);
  }

  /**
   * Checks whole blocks read from `layer` against their sums. A mismatch
   * may be a read that raced a write to the same block (new bytes and the
   * old sum, or old bytes and the new sum): the overlapping writes under way
   * complete and those blocks are read again (8 rounds at most, at least
   * one). A mismatch that stays is DATA_CORRUPT. `inWrite`: the read is a read-modify-write's, which holds
   * the range lock: it waits only for writes that read nothing themselves
   * (waiting for one that waits for our lock would never end).
   */
  async #verify(
    layer: OpenLayer,
    firstBlock: number,
    data: Uint8Array,
    inWrite: boolean,
  ): Promise<void> {
    const bad = await this.#badBlocks(layer, firstBlock, data, inWrite);
    if (bad.length > 0)
      throw this.#corrupt(
        layer,
        bad.map((i) => firstBlock + i),
      );
  }

  /** Indexes (from `firstBlock`) of the blocks in `data` that fail their checksum (see #verify). */
  async #badBlocks(
    layer: OpenLayer,
    firstBlock: number,
    data: Uint8Array,
    inWrite = false,
  ): Promise<number[]> {
    let bad = layer.sums.mismatches(firstBlock, data, data.length / BLOCK_SIZE);
    for (let attempt = 0; bad.length > 0 && attempt < 8; attempt++) {
      const from = firstBlock + bad[0]!;
      const to = firstBlock + bad[bad.length - 1]! + 1;
      const racing = [...this.#inflight].filter(
        (w) => w.layer === layer && w.start < to && w.end > from && !(inWrite && w.reads),
      );
      // Read again at least once even with no write under way: the read may have seen the old
      // bytes just before a write completed and set the new sums. Real damage stays bad.
      if (racing.length === 0 && attempt > 0) break;
      // The writes that overlap complete (and set their sums) before the blocks are read again.
      await Promise.all(
        racing.map((w) => new Promise<void>((resolve) => (w.waiters ??= []).push(resolve))),
      );
      const again: number[] = [];
      for (const i of bad) {
        const view = data.subarray(i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE);
        await preadFull(layer.fd, view, 0, BLOCK_SIZE, (firstBlock + i) * BLOCK_SIZE);
        if (layer.sums.mismatches(firstBlock + i, view, 1).length > 0) again.push(i);
      }
      bad = again;
    }
    return bad;
  }

  /**
   * Scrub: reads every DATA block of every layer in [offset, +length) and
   * lists those that fail their checksum (a layer file that was truncated
   * reads as zeros there, and fails too).
   */
  async checkBlocks(offset: number, length: number): Promise<BadBlock[]> {
    this.#checkRange(offset, length);
    const first = Math.floor(offset / BLOCK_SIZE);
    const end = Math.ceil((offset + length) / BLOCK_SIZE);
    const out: BadBlock[] = [];
    this.#pending++;
    try {
      for (const layer of [...this.#layers]) {
        await this.#forEachData(layer, first, end, async (block, view) => {
          for (const x of await this.#badBlocks(layer, block, view)) {
            out.push({
              offset: (block + x) * BLOCK_SIZE,
              ...(layer.record.snapshot !== undefined ? { snapshot: layer.record.snapshot } : {}),
            });
          }
        });
      }
    } finally {
      this.#leave();
    }
    return out;
  }

  /**
   * Reads `layer`'s DATA blocks in [first, end) in runs of up to 1 MiB and
   * hands each run to `fn` with its first block (the view is reused).
   */
  async #forEachData(
    layer: OpenLayer,
    first: number,
    end: number,
    fn: (block: number, view: Buffer) => Promise<void> | void,
  ): Promise<void> {
    const buf = Buffer.allocUnsafe(256 * BLOCK_SIZE);
    for (let b = first; b < end; b += 256) {
      if (b % BLOCKS_PER_CHUNK === 0 && !layer.map.hasChunk(b / BLOCKS_PER_CHUNK)) {
        b += BLOCKS_PER_CHUNK - 256; // nothing in these 128 MiB
        continue;
      }
      const e = Math.min(b + 256, end);
      await forEachRun(
        e - b,
        (i) => layer.map.state(b + i) === DATA,
        async (i, j) => {
          const view = buf.subarray(0, (j - i) * BLOCK_SIZE);
          await preadFull(layer.fd, view, 0, view.length, (b + i) * BLOCK_SIZE);
          await fn(b + i, view);
        },
      );
    }
  }

  #corrupt(layer: OpenLayer, blocks: number[]): CorralError {
    const where = layer.record.snapshot ? `snapshot ${layer.record.snapshot}` : 'the head';
    const shown = blocks.slice(0, 8).map((b) => b * BLOCK_SIZE);
    return new CorralError(
      'DATA_CORRUPT',
      `Replica ${this.id} of volume ${this.#record.volume}: ${blocks.length} block(s) of ${where} do not match their checksums (offsets ${shown.join(', ')}${blocks.length > shown.length ? ', …' : ''})`,
    );
  }

  /** Fills `buf[bufOffset, +length)` with the volume's bytes at `offset`, through the chain. */
  async #readInto(
    buf: Uint8Array,
    bufOffset: number,
    offset: number,
    length: number,
    inWrite = false,
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
          const layer = this.#bySlot[source - 1];
          if (!layer) fail(`read index points at missing layer slot ${source - 1}`);
          pending.push(this.#readRun(layer, buf, at, runLength, runStart, inWrite));
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

  /** The write-intent mark of a region (see `Spaces.marks`). */
  #markKey(layer: OpenLayer, region: number): string {
    return `${this.id}/${layer.record.id}/${region.toString(16).padStart(8, '0')}`;
  }

  /**
   * Before blocks [start, end) of `layer` are written: their regions are
   * counted as being written, and marked durably if they were not (the
   * checksums of what follows may not be persisted before a crash). Returns
   * the function to call when the write is done.
   */
  #intend(
    layer: OpenLayer,
    start: number,
    end: number,
    aligned: boolean,
  ): (() => void) | Promise<() => void> {
    const first = Math.floor(start / BLOCKS_PER_CHUNK);
    const last = Math.floor((end - 1) / BLOCKS_PER_CHUNK);
    let unmarked = false;
    for (let r = first; r <= last; r++) {
      layer.writing[r]!++;
      layer.regions[r] = layer.regions[r]! | RECENT;
      layer.active.add(r);
      if ((layer.regions[r]! & MARKED) === 0) unmarked = true;
    }
    // An unaligned write reads its edge blocks first (a read-modify-write).
    const record: InflightWrite = { layer, start, end, reads: !aligned };
    this.#inflight.add(record);
    const done = () => {
      this.#inflight.delete(record);
      for (let r = first; r <= last; r++) {
        layer.writing[r]!--;
        layer.regions[r] = layer.regions[r]! | RECENT;
      }
      if (record.waiters) for (const w of record.waiters) w();
    };
    // Almost always: the regions are marked already, and the write goes on in this turn.
    if (!unmarked) return done;
    const batch = this.#spaces.batch();
    const marking: number[] = [];
    for (let r = first; r <= last; r++) {
      if ((layer.regions[r]! & MARKED) !== 0) continue;
      marking.push(r);
      batch.put(this.#spaces.marks, this.#markKey(layer, r), EMPTY);
    }
    return batch.write({ sync: true }).then(
      () => {
        for (const r of marking) layer.regions[r] = layer.regions[r]! | MARKED;
        return done;
      },
      (err: unknown) => {
        done();
        throw ioError(`Cannot mark replica ${this.id} for a write`, err);
      },
    );
  }

  /**
   * At open: regions still marked may hold writes whose sums never reached
   * the disk (a crash after the data, before the flush). Their DATA blocks'
   * sums are computed again from what the file holds — which the crash
   * semantics allow to be old, new or a mix per sector — and the marks go.
   */
  async #recoverMarked(): Promise<void> {
    const keys = await this.#spaces.marks.keys(`${this.id}/`);
    if (keys.length === 0) return;
    const batch = this.#spaces.batch();
    for (const key of keys) {
      const [, layerId, hex] = key.split('/') as [string, string, string];
      const layer = this.#layers.find((l) => l.record.id === layerId);
      if (layer) {
        const first = parseInt(hex, 16) * BLOCKS_PER_CHUNK;
        const end = Math.min(first + BLOCKS_PER_CHUNK, this.#blockCount);
        await this.#forEachData(layer, first, end, (block, view) =>
          layer.sums.setFrom(block, view, view.length / BLOCK_SIZE),
        );
        for (const [index, bytes] of layer.sums.takeDirty())
          batch.put(this.#spaces.sums, bitmapKey(layer.record.id, index), bytes);
      }
      batch.del(this.#spaces.marks, key);
    }
    await batch.write({ sync: true });
  }

  async write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    this.#checkRange(offset, data.length);
    if (data.length === 0) return;
    const end = offset + data.length;
    const startBlock = Math.floor(offset / BLOCK_SIZE);
    const endBlock = Math.ceil(end / BLOCK_SIZE);
    const head = this.#head;
    const aligned = offset % BLOCK_SIZE === 0 && end % BLOCK_SIZE === 0;
    if (this.#punchQueue.size > 0 || this.#punchReady.length > 0)
      this.#unpunch(head, startBlock, endBlock);
    const intent = this.#intend(head, startBlock, endBlock, aligned);
    const done = typeof intent === 'function' ? intent : await intent;
    try {
      await this.#write(head, offset, data, startBlock, endBlock, aligned, options?.hashes);
    } finally {
      done();
    }
    this.#unsynced.add(head);
    this.#unsyncedBytes += data.length;
    if (options?.fua) await this.flush();
    else if (this.#unsyncedBytes >= WRITE_BEHIND_BYTES) {
      // Write-behind: keep the dirty data of a replica small, so that a client's flush (and a
      // snapshot, a rebuild step) never waits for gigabytes of page cache to reach the disk.
      this.#unsyncedBytes = 0;
      this.flush().catch(() => undefined);
    }
  }

  async #write(
    head: OpenLayer,
    offset: number,
    data: Uint8Array,
    startBlock: number,
    endBlock: number,
    aligned: boolean,
    hashes: Uint32Array | undefined,
  ): Promise<void> {
    if (head !== this.#head) fail(`replica ${this.id}'s head changed under a write`);
    const unlocked = aligned && this.#mergeInto !== head && this.#punching === 0;
    this.#pending++;
    if (unlocked) this.#unlockedWrites++;
    try {
      try {
        if (unlocked) {
          await pwriteFull(head.fd, data, offset, this.#gate);
          head.sums.setFrom(startBlock, data, endBlock - startBlock, hashes);
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
      }
      if (this.#closed) fail(`replica ${this.id} was closed during a write`);
      this.#markBlocks(startBlock, endBlock, DATA);
    } finally {
      if (unlocked && --this.#unlockedWrites === 0) {
        for (const w of this.#unlockedWaiters.splice(0)) w();
      }
      this.#leave();
    }
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
    if (offset % BLOCK_SIZE !== 0) await this.#readInto(buf, 0, alignedStart, BLOCK_SIZE, true);
    if (end % BLOCK_SIZE !== 0 && (endBlock - 1 !== startBlock || offset % BLOCK_SIZE === 0)) {
      await this.#readInto(
        buf,
        buf.length - BLOCK_SIZE,
        (endBlock - 1) * BLOCK_SIZE,
        BLOCK_SIZE,
        true,
      );
    }
    buf.set(data, offset - alignedStart);
    await pwriteFull(head.fd, buf, alignedStart, this.#gate);
    head.sums.setFrom(startBlock, buf, endBlock - startBlock);
  }

  #markBlocks(startBlock: number, endBlock: number, state: typeof DATA | typeof ZERO): void {
    const head = this.#head;
    // On the base layer nothing lies below, so a zeroed block can simply be absent.
    const stored = state === ZERO && this.#layers.length === 1 ? ABSENT : state;
    const source = state === DATA ? head.slot + 1 : ZERO_SOURCE;
    // Zeroing blocks the head held: their runs are queued to be punched (one pass with the update).
    const punching = state === ZERO && punchHoles !== undefined && this.#punchFailure === undefined;
    let run = -1;
    for (let b = startBlock; b < endBlock; b++) {
      if (punching) {
        const held = head.map.state(b) === DATA;
        if (held && run < 0) run = b;
        else if (!held && run >= 0) {
          this.#queuePunch(head, run, b);
          run = -1;
        }
      }
      head.map.set(b, stored);
      this.#index.set(b, source);
    }
    if (run >= 0) this.#queuePunch(head, run, endBlock);
    this.#revision++;
  }

  #queuePunch(layer: OpenLayer, start: number, end: number): void {
    let ranges = this.#punchQueue.get(layer);
    if (!ranges) this.#punchQueue.set(layer, (ranges = new BlockRanges()));
    ranges.add(start, end);
    // A client that trims need not flush after (fstrim does not): a flush of our own makes the
    // trims durable, and so punchable, a moment later — one for a whole burst of discards.
    this.#punchTimer ??= setTimeout(() => {
      this.#punchTimer = undefined;
      if (!this.#closed && this.#punchQueue.size > 0) this.flush().catch(() => undefined);
    }, PUNCH_FLUSH_DELAY_MS).unref();
  }

  /** Blocks about to be written in `layer` must not be punched by a trim queued earlier. */
  #unpunch(layer: OpenLayer, start: number, end: number): void {
    this.#punchQueue.get(layer)?.subtract(start, end);
    for (const ready of this.#punchReady) ready.get(layer)?.subtract(start, end);
  }

  /**
   * Punches what a flush made durable as ZERO or ABSENT out of the layer
   * files, one syscall per run, in windows under the range lock. Runs in the
   * background of the flush; the file descriptors stay open meanwhile.
   */
  async #punch(ready: Map<OpenLayer, BlockRanges>): Promise<void> {
    this.#pending++;
    this.#punching++;
    try {
      if (this.#unlockedWrites > 0)
        await new Promise<void>((resolve) => this.#unlockedWaiters.push(resolve));
      for (const [layer, ranges] of ready) {
        for (const [start, end] of ranges.windows(PUNCH_WINDOW_BLOCKS)) {
          if (this.#closed || this.#bySlot[layer.slot] !== layer) break;
          const release = await this.#locks.acquire(start, end);
          try {
            const runs = ranges.within(start, end);
            if (runs.length === 0) continue;
            const bytes = new Float64Array(runs.length * 2);
            runs.forEach(([s, e], i) => {
              bytes[2 * i] = s * BLOCK_SIZE;
              bytes[2 * i + 1] = Math.min(e * BLOCK_SIZE, this.sizeBytes) - s * BLOCK_SIZE;
            });
            await punchHoles!(layer.fd, bytes);
          } finally {
            release();
          }
        }
      }
    } catch (err) {
      // Space not returned is no data lost: the blocks read as zeros from their state.
      this.#punchFailure = err instanceof Error ? err.message : String(err);
    } finally {
      this.#punchReady.splice(this.#punchReady.indexOf(ready), 1);
      this.#punching--;
      this.#leave();
    }
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
        if (this.#mergeInto === this.#head) {
          const release = await this.#locks.acquire(firstFull, lastFull);
          this.#markBlocks(firstFull, lastFull, ZERO);
          release();
        } else {
          this.#markBlocks(firstFull, lastFull, ZERO);
        }
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
    this.#unsyncedBytes = 0;
    const layers = [...this.#unsynced];
    this.#unsynced.clear();
    // What is written from now on is the next flush's: its regions stay marked. Marked regions
    // quiet for MARK_LINGER_MS (all, at close) lose their marks in this flush.
    const now = this.#clock.elapsedMs();
    let quietMarks = false;
    let lingering = false;
    for (const l of this.#layers)
      for (const r of l.active) {
        l.regions[r]! &= ~QUIET;
        if ((l.regions[r]! & RECENT) !== 0) {
          l.regions[r]! &= ~RECENT;
          l.writtenAt[r] = now;
        }
        if (l.regions[r] === MARKED && (this.#closing || now - l.writtenAt[r]! >= MARK_LINGER_MS)) {
          l.regions[r] = MARKED | QUIET;
          quietMarks = true;
        } else if ((l.regions[r]! & MARKED) !== 0) lingering = true;
        else if (l.regions[r] === 0 && l.writing[r] === 0) l.active.delete(r);
      }
    // The sums of a region that stays marked wait: at open after a crash they are computed
    // again from the data anyway. A commit's flush then writes 8 bytes to LevelDB, not a 4 KiB
    // sum chunk for every 4 MiB the database touched; they are written when the mark goes.
    const chunks = this.#layers.map((layer) => ({
      layer,
      dirty: layer.map.takeDirty(),
      sums: layer.sums.takeDirty((i) => layer.regions[sumChunkRegion(i)] !== MARKED),
    }));
    const revision = this.#revision;
    const commits = this.#commits.splice(0);
    // Trims up to here are in this flush's bitmaps: punched once those are durable, not before
    // (a crash in between would leave DATA blocks reading the hole's zeros).
    const punch = this.#punchQueue.size > 0 ? this.#punchQueue : undefined;
    if (punch) {
      this.#punchQueue = new Map();
      this.#punchReady.push(punch);
    }
    // Ordered: the batch may only follow the data sync. When nothing but the revision changed
    // (a database's commit: overwrites of allocated blocks change no bitmap, and the sums of
    // marked regions wait), the counter goes into the head's trailer instead, synced by the same
    // fdatasync as the data: one device flush, no LevelDB write. Each page is made durable on
    // its own, so the trailer may then count writes whose data a crash loses — unacknowledged
    // ones, which a crash may keep or lose anyway.
    const ordered =
      quietMarks ||
      commits.length > 0 ||
      punch !== undefined ||
      chunks.some(({ dirty, sums }) => dirty.length > 0 || sums.length > 0);
    const both = this.#revisionBothPlaces;
    this.#revisionBothPlaces = false;
    this.#pending++;
    try {
      const head = this.#head;
      let inTrailer = false;
      if ((both || !ordered) && revision !== this.#persistedRevision) {
        // Where the trailer cannot be written (a file size limit, a full disk before its block
        // was ever allocated) the counter goes to LevelDB as it did before trailers.
        inTrailer = await pwriteFull(
          head.fd,
          encodeTrailer(head.record.id, revision),
          this.sizeBytes,
          this.#gate,
        ).then(
          () => true,
          () => false,
        );
        if (inTrailer && !layers.includes(head)) layers.push(head);
      }
      const synced = Promise.all(layers.map((l) => fdatasync(l.fd)));
      if (ordered) await synced;
      const kvBatch = this.#spaces.batch();
      for (const commit of commits) commit(kvBatch);
      for (const { layer, dirty, sums } of chunks) {
        for (const [index, bytes] of dirty)
          kvBatch.put(this.#spaces.bitmaps, bitmapKey(layer.record.id, index), bytes);
        for (const [index, bytes] of sums)
          kvBatch.put(this.#spaces.sums, bitmapKey(layer.record.id, index), bytes);
      }
      // A region quiet since before this flush began, and still, has its data synced above and
      // its sums in this batch: its mark goes with them. (Taken out of memory now, so that a
      // write starting meanwhile marks it again, after this batch.)
      for (const l of quietMarks ? this.#layers : []) {
        for (const r of l.active) {
          if (l.regions[r] !== (MARKED | QUIET)) continue;
          if (l.writing[r] !== 0) {
            lingering = true;
            continue;
          }
          kvBatch.del(this.#spaces.marks, this.#markKey(l, r));
          l.regions[r] = 0;
          l.active.delete(r);
        }
      }
      if (lingering)
        this.#lingerTimer ??= this.#clock.after(MARK_LINGER_MS, () => {
          this.#lingerTimer = undefined;
          if (!this.#closed) this.flush().catch(() => undefined);
        });
      // An ordered batch brings LevelDB's counter up to date on the way; a flush with nothing
      // new to make durable writes nothing.
      const inKv =
        (both || !inTrailer) &&
        revision !== this.#kvRevision &&
        (ordered || revision !== this.#persistedRevision);
      if (inKv) kvBatch.put(this.#spaces.revisions, this.id, revisionBytes(revision));
      // Both settle before the flush ends: an fdatasync must not outlive the fd it syncs.
      const outcomes = await Promise.allSettled([synced, kvBatch.write({ sync: true })]);
      for (const o of outcomes) if (o.status === 'rejected') throw o.reason;
      this.#persistedRevision = revision;
      if (inKv) this.#kvRevision = revision;
      if (punch) void this.#punch(punch);
    } catch (err) {
      if (punch) {
        this.#punchReady.splice(this.#punchReady.indexOf(punch), 1);
        for (const [layer, ranges] of punch) {
          const queued = this.#punchQueue.get(layer);
          if (queued) queued.addAll(ranges);
          else this.#punchQueue.set(layer, ranges);
        }
      }
      // Keep the promise that the next flush retries what this one could not make durable.
      for (const l of layers) this.#unsynced.add(l);
      if (both) this.#revisionBothPlaces = true;
      for (const { layer, dirty, sums } of chunks) {
        layer.map.markDirty(dirty.map(([i]) => i));
        layer.sums.markDirty(sums.map(([i]) => i));
      }
      throw ioError(`Cannot flush replica ${this.id}`, err);
    } finally {
      this.#leave();
    }
  }

  /**
   * Puts the revision the head's trailer holds into `batch`, if LevelDB is
   * behind it: every batch that changes which file is the head, or where its
   * trailer sits, carries it (open reads the head's trailer only). Call the
   * result once the batch is written.
   */
  #revisionCaughtUp(batch: KvBatch): () => void {
    const persisted = this.#persistedRevision;
    if (persisted === this.#kvRevision) return () => undefined;
    batch.put(this.#spaces.revisions, this.id, revisionBytes(persisted));
    return () => {
      this.#kvRevision = persisted;
    };
  }

  /** Runs `prepare` inside the next flush's batch: after the data it depends on is durable. */
  async #commit(prepare: (batch: KvBatch) => void): Promise<void> {
    if (this.#closed) throw new CorralError('SHUTTING_DOWN', `replica ${this.id} is closing`);
    let done = false;
    this.#commits.push((batch) => {
      prepare(batch);
      done = true;
    });
    await this.flush();
    // A replica closed meanwhile flushes nothing: the caller must not act as if it had.
    if (!done)
      throw new CorralError(
        'SHUTTING_DOWN',
        `replica ${this.id} closed before the change was saved`,
      );
  }

  #checkChainIdle(what: string): void {
    assert(!this.#closed, `replica ${this.id} is closed`);
    if (this.#mergeInto) {
      throw new CorralError(
        'BUSY',
        `Cannot ${what}: a snapshot of volume ${this.#record.volume} is being deleted; try again when it is done`,
      );
    }
  }

  #snapshotIndex(name: string): number {
    const i = this.#layers.findIndex((l) => l.record.snapshot === name);
    if (i < 0)
      throw new CorralError(
        'NOT_FOUND',
        `Volume ${this.#record.volume} has no snapshot named ${name}`,
      );
    return i;
  }

  snapshots(): SnapshotInfo[] {
    const out: SnapshotInfo[] = [];
    let parent: string | undefined;
    for (const l of this.#layers) {
      const name = l.record.snapshot;
      if (name === undefined) continue;
      out.push({
        name,
        // When it was taken: the same on every replica (the engine passes one time to all).
        createdAt: l.record.snapshotAt ?? l.record.createdAt,
        parent,
        allocatedBytes: l.map.countData() * BLOCK_SIZE,
        sizeBytes: l.record.sizeBytes ?? this.sizeBytes,
      });
      parent = name;
    }
    return out;
  }

  async #newLayer(now: Date): Promise<OpenLayer> {
    const record: LayerRecord = { id: randomUUID(), createdAt: now.toISOString() };
    let slot = this.#bySlot.indexOf(undefined);
    if (slot < 0) slot = this.#bySlot.length;
    assert(slot < MAX_LAYERS, `replica ${this.id} has no free layer slot`);
    try {
      await createLayerFile(this.#dir, record.id, this.sizeBytes);
      await fsyncDir(this.#dir);
      const fd = await new Promise<number>((resolve, reject) =>
        fs.open(layerPath(this.#dir, record.id), 'r+', (err, fd) =>
          err ? reject(err) : resolve(fd),
        ),
      );
      return { record, fd, ...layerState(this.#blockCount), slot };
    } catch (err) {
      await fs.promises.rm(layerPath(this.#dir, record.id), { force: true });
      throw ioError(`Cannot create a layer for replica ${this.id}`, err);
    }
  }

  /**
   * Freezes the head as snapshot `name` and starts a new empty head. The
   * engine has paused I/O. Order: flush (the head's bits are durable), new
   * file, then the record naming both: a crash before the record leaves an
   * unnamed file, removed at the next open.
   */
  async snapshot(name: string, now: Date, sizeBytes?: number): Promise<void> {
    this.#checkChainIdle('take a snapshot');
    if (this.#layers.some((l) => l.record.snapshot === name)) {
      throw new CorralError(
        'ALREADY_EXISTS',
        `Volume ${this.#record.volume} already has a snapshot named ${name}`,
      );
    }
    if (this.#layers.length - 1 >= MAX_SNAPSHOTS) {
      throw new CorralError(
        'LIMIT_REACHED',
        `Volume ${this.#record.volume} has ${MAX_SNAPSHOTS} snapshots, the most it may have; delete some first`,
      );
    }
    await this.flush();
    const layer = await this.#newLayer(now);
    const layers = this.#record.layers.map((l, i, all) =>
      i === all.length - 1
        ? {
            ...l,
            snapshot: name,
            snapshotAt: now.toISOString(),
            ...(sizeBytes !== undefined && sizeBytes !== this.sizeBytes ? { sizeBytes } : {}),
          }
        : l,
    );
    const record: ReplicaRecord = { ...this.#record, layers: [...layers, layer.record] };
    try {
      const batch = this.#spaces.batch().put(this.#spaces.replicas, this.id, record);
      const caughtUp = this.#revisionCaughtUp(batch);
      await batch.write();
      caughtUp();
    } catch (err) {
      await closeFd(layer.fd).catch(() => undefined);
      await fs.promises.rm(layerPath(this.#dir, layer.record.id), { force: true });
      throw err;
    }
    this.#record = record;
    this.#head.record = layers[layers.length - 1]!;
    this.#layers.push(layer);
    this.#bySlot[layer.slot] = layer;
  }

  /**
   * Online expand (the engine has paused I/O). The record is the commit
   * point: the head's file grows first (a file shorter than the record reads
   * as zeros past its end anyway), then one put records the new size with
   * every older layer stamped with the size it had. In memory the bitmaps,
   * sums and read index grow; nothing is copied.
   */
  async expand(sizeBytes: number): Promise<void> {
    assert(sizeBytes % BLOCK_SIZE === 0, `replica size ${sizeBytes} not block aligned`);
    if (sizeBytes === this.sizeBytes) return;
    if (sizeBytes < this.sizeBytes)
      throw new CorralError(
        'INVALID_ARGUMENT',
        `Cannot shrink replica ${this.id} from ${this.sizeBytes} to ${sizeBytes} bytes`,
      );
    this.#checkChainIdle('expand it');
    // The head's trailer is about to lie inside the volume: its counter goes to LevelDB with
    // the new size, so it must be final first (the engine has paused I/O).
    await this.flush();
    const old = this.sizeBytes;
    const head = this.#head;
    try {
      await new Promise<void>((resolve, reject) =>
        fs.ftruncate(head.fd, sizeBytes, (err) => (err ? reject(err) : resolve())),
      );
    } catch (err) {
      throw ioError(`Cannot expand replica ${this.id}`, err);
    }
    const last = this.#record.layers.length - 1;
    const record: ReplicaRecord = {
      ...this.#record,
      sizeBytes,
      layers: this.#record.layers.map((l, i) =>
        i < last && l.sizeBytes === undefined ? { ...l, sizeBytes: old } : l,
      ),
    };
    const batch = this.#spaces.batch().put(this.#spaces.replicas, this.id, record);
    const caughtUp = this.#revisionCaughtUp(batch);
    await batch.write();
    caughtUp();
    this.#record = record;
    this.#layers.forEach((l, i) => (l.record = record.layers[i]!));
    const blockCount = Math.ceil(sizeBytes / BLOCK_SIZE);
    const regions = Math.ceil(blockCount / BLOCKS_PER_CHUNK);
    for (const l of this.#layers) {
      l.map.grow(blockCount);
      l.sums.grow(blockCount);
      const marks = new Uint8Array(regions);
      marks.set(l.regions);
      l.regions = marks;
      const writing = new Uint32Array(regions);
      writing.set(l.writing);
      l.writing = writing;
      const writtenAt = new Float64Array(regions);
      writtenAt.set(l.writtenAt);
      l.writtenAt = writtenAt;
    }
    this.#index.grow(blockCount);
    this.#blockCount = blockCount;
    this.sizeBytes = sizeBytes;
  }

  /**
   * Deletes snapshot `name` online by merging its blocks into its child
   * (the next layer up): only blocks the child lacks are copied, so space
   * held by data the child overwrote comes back when the file goes.
   * Crash safety: the record names the layer being deleted first; copies go
   * into the child's file with their bits in memory; one flush batch then
   * persists the child's bits and the chain without the layer; only then is
   * the file unlinked. A cut-off delete is simply done again at the next open.
   */
  async deleteSnapshot(name: string): Promise<void> {
    this.#checkChainIdle(`delete snapshot ${name}`);
    const i = this.#snapshotIndex(name);
    const gone = this.#layers[i]!;
    const into = this.#layers[i + 1]!;
    if (this.#record.deleting !== gone.record.id) {
      const record: ReplicaRecord = { ...this.#record, deleting: gone.record.id };
      await this.#spaces.replicas.put(this.id, record);
      this.#record = record;
    }
    this.#mergeInto = into;
    if (into === this.#head && this.#unlockedWrites > 0) {
      await new Promise<void>((resolve) => this.#unlockedWaiters.push(resolve));
    }
    this.#pending++;
    const limit = this.#mergeLimit;
    const pacer = limit ? new Pacer(limit.clock, limit.bytesPerSecond) : undefined;
    try {
      const intoHead = into === this.#head;
      for (let start = 0; start < this.#blockCount; start += MERGE_RUN_BLOCKS) {
        if (start % BLOCKS_PER_CHUNK === 0 && !gone.map.hasChunk(start / BLOCKS_PER_CHUNK)) {
          start += BLOCKS_PER_CHUNK - MERGE_RUN_BLOCKS; // nothing in these 128 MiB
          continue;
        }
        const end = Math.min(start + MERGE_RUN_BLOCKS, this.#blockCount);
        if (!gone.map.anyIn(start, end)) continue;
        // Into the head: client writes to these blocks wait, so none is overwritten by old data.
        const release = intoHead ? await this.#locks.acquire(start, end) : undefined;
        let copied = 0;
        try {
          copied = await this.#mergeRun(gone, into, i, start, end);
        } finally {
          release?.();
        }
        await pacer?.paced(copied);
      }
      this.#unsynced.add(into);
      const keys = await this.#spaces.bitmaps.keys(`${gone.record.id}/`);
      const sumKeys = await this.#spaces.sums.keys(`${gone.record.id}/`);
      // Everything but `deleting`: the delete is done.
      const record: ReplicaRecord = {
        ...this.#record,
        layers: this.#record.layers.filter((l) => l.id !== gone.record.id),
      };
      delete record.deleting;
      await this.#commit((batch) => {
        for (const key of keys) batch.del(this.#spaces.bitmaps, key);
        for (const key of sumKeys) batch.del(this.#spaces.sums, key);
        batch.put(this.#spaces.replicas, this.id, record);
      });
      this.#record = record;
      this.#layers.splice(i, 1);
      this.#retire(gone);
    } finally {
      this.#mergeInto = undefined;
      this.#leave();
    }
    await fs.promises.rm(layerPath(this.#dir, gone.record.id), { force: true });
  }

  /** Copies what `gone` has and `into` lacks in [start, end); returns the bytes copied. */
  async #mergeRun(
    gone: OpenLayer,
    into: OpenLayer,
    goneIndex: number,
    start: number,
    end: number,
  ): Promise<number> {
    let copied = 0;
    for (let b = start; b < end;) {
      const state = gone.map.state(b);
      if (state === ABSENT || into.map.state(b) !== ABSENT) {
        b++;
        continue;
      }
      if (state === ZERO) {
        // Above the base the child must keep hiding what lies below.
        if (goneIndex > 0) into.map.set(b, ZERO);
        b++;
        continue;
      }
      let e = b + 1;
      while (e < end && gone.map.state(e) === DATA && into.map.state(e) === ABSENT) e++;
      const buf = Buffer.allocUnsafe((e - b) * BLOCK_SIZE);
      // Checked on the way: a bad block must not move into the child under a good checksum.
      await this.#readRun(gone, buf, 0, buf.length, b * BLOCK_SIZE);
      await pwriteFull(into.fd, buf, b * BLOCK_SIZE, this.#gate);
      into.sums.setFrom(b, buf, e - b);
      for (let x = b; x < e; x++) {
        into.map.set(x, DATA);
        if (this.#index.get(x) === gone.slot + 1) this.#index.set(x, into.slot + 1);
      }
      copied += buf.length;
      b = e;
    }
    return copied;
  }

  /**
   * Replaces the head with a new empty head on top of snapshot `name`. The
   * engine has paused I/O. Snapshots newer than `name` would be lost, so
   * they are removed only when the caller says so.
   */
  async revert(
    name: string,
    now: Date,
    options: { discardNewer?: boolean } = {},
  ): Promise<string[]> {
    this.#checkChainIdle(`revert to snapshot ${name}`);
    const i = this.#snapshotIndex(name);
    const dropped = this.#layers.slice(i + 1);
    const newer = dropped.flatMap((l) => (l.record.snapshot ? [l.record.snapshot] : []));
    if (newer.length > 0 && !options.discardNewer) {
      throw new CorralError(
        'BUSY',
        `Cannot revert volume ${this.#record.volume} to ${name}: snapshots ${newer.join(', ')} are newer and would be deleted; confirm with --discard-newer`,
      );
    }
    const head = await this.#newLayer(now);
    const record: ReplicaRecord = {
      ...this.#record,
      layers: [...this.#record.layers.slice(0, i + 1), head.record],
    };
    const keys: string[] = [];
    const sumKeys: string[] = [];
    const markKeys: string[] = [];
    for (const l of dropped) {
      keys.push(...(await this.#spaces.bitmaps.keys(`${l.record.id}/`)));
      sumKeys.push(...(await this.#spaces.sums.keys(`${l.record.id}/`)));
      markKeys.push(...(await this.#spaces.marks.keys(`${this.id}/${l.record.id}/`)));
    }
    await this.#commit((batch) => {
      for (const key of keys) batch.del(this.#spaces.bitmaps, key);
      for (const key of sumKeys) batch.del(this.#spaces.sums, key);
      for (const key of markKeys) batch.del(this.#spaces.marks, key);
      batch.put(this.#spaces.replicas, this.id, record);
    });

    this.#record = record;
    this.#layers = [...this.#layers.slice(0, i + 1), head];
    this.#bySlot[head.slot] = head;
    for (const l of dropped) {
      this.#unsynced.delete(l);
      this.#retire(l);
    }
    this.#index.clear();
    this.#revision++;
    for (const l of dropped)
      await fs.promises.rm(layerPath(this.#dir, l.record.id), { force: true });
    return newer;
  }

  /** Reads snapshot `name` as it was taken (read-only exports and clones). */
  async readSnapshot(
    name: string,
    offset: number,
    length: number,
    into?: Uint8Array,
  ): Promise<Uint8Array> {
    this.#checkRange(offset, length);
    const top = this.#snapshotIndex(name);
    const out = into ?? Buffer.allocUnsafe(length);
    this.#pending++;
    try {
      const end = offset + length;
      // One pread per run of blocks held by the same layer (or one fill per run of zeros).
      for (let at = offset; at < end;) {
        let block = Math.floor(at / BLOCK_SIZE);
        const layer = this.#sourceBelow(top, block);
        let runEnd = Math.min((block + 1) * BLOCK_SIZE, end);
        while (runEnd < end && this.#sourceBelow(top, ++block) === layer)
          runEnd = Math.min((block + 1) * BLOCK_SIZE, end);
        if (layer) await this.#readRun(layer, out, at - offset, runEnd - at, at);
        else out.fill(0, at - offset, runEnd - offset);
        at = runEnd;
      }
    } finally {
      this.#leave();
    }
    return out;
  }

  /** The layer at or below `top` holding a block, or undefined when it reads as zeros. */
  #sourceBelow(top: number, block: number): OpenLayer | undefined {
    for (let i = top; i >= 0; i--) {
      const layer = this.#layers[i]!;
      const state = layer.map.state(block);
      if (state === DATA) return layer;
      if (state === ZERO) return undefined;
    }
    return undefined;
  }

  extentsSnapshot(name: string, offset: number, length: number): Extent[] {
    this.#checkRange(offset, length);
    const top = this.#snapshotIndex(name);
    const out: Extent[] = [];
    const end = offset + length;
    for (let at = offset; at < end;) {
      const block = Math.floor(at / BLOCK_SIZE);
      const blockEnd = Math.min((block + 1) * BLOCK_SIZE, end);
      const hole = this.#sourceBelow(top, block) === undefined;
      const last = out[out.length - 1];
      if (last && last.hole === hole) last.lengthBytes += blockEnd - at;
      else out.push({ lengthBytes: blockEnd - at, hole, zero: hole });
      at = blockEnd;
    }
    return out;
  }

  /**
   * Indexes of the `granuleBytes` blocks that any layer above snapshot `base`
   * (from the bottom when undefined) up to snapshot `top` touched: what may
   * differ between the two. From the bitmaps alone, no data is read.
   */
  touchedBlocks(base: string | undefined, top: string, granuleBytes: number): Set<number> {
    assert(granuleBytes % BLOCK_SIZE === 0, `granule of ${granuleBytes} bytes`);
    const topIndex = this.#snapshotIndex(top);
    const from = base === undefined ? 0 : this.#snapshotIndex(base) + 1;
    if (from > topIndex + 1) {
      throw new CorralError(
        'NOT_FOUND',
        `Snapshot ${base ?? ''} is not older than ${top} in volume ${this.#record.volume}`,
      );
    }
    const perGranule = granuleBytes / BLOCK_SIZE;
    const out = new Set<number>();
    const chunks = Math.ceil(this.#blockCount / BLOCKS_PER_CHUNK);
    for (let i = from; i <= topIndex; i++) {
      const map = this.#layers[i]!.map;
      for (let c = 0; c < chunks; c++) {
        if (!map.hasChunk(c)) continue;
        const first = c * BLOCKS_PER_CHUNK;
        map.forEachSet(c, (bit) => out.add(Math.floor((first + bit) / perGranule)));
      }
    }
    return out;
  }

  /** The snapshot layer `name` (not through the chain), for rebuild. */
  #layerOf(name: string): OpenLayer {
    const layer = this.#layers[this.#snapshotIndex(name)]!;
    return layer;
  }

  /**
   * For every `granuleBytes` block of snapshot layer `name` holding anything:
   * a SHA-256 of its block states and of the data of its DATA blocks. Two
   * replicas' layers are equal where these are: a rebuild copies the rest.
   */
  async layerDigests(
    name: string,
    offset: number,
    length: number,
    granuleBytes: number,
  ): Promise<Array<[number, string]>> {
    this.#checkRange(offset, length);
    assert(offset % granuleBytes === 0, 'digest ranges start on a granule');
    const layer = this.#layerOf(name);
    const perGranule = granuleBytes / BLOCK_SIZE;
    const granules = new Set<number>();
    const firstBlock = offset / BLOCK_SIZE;
    const endBlock = Math.ceil((offset + length) / BLOCK_SIZE);
    for (let c = Math.floor(firstBlock / BLOCKS_PER_CHUNK); c * BLOCKS_PER_CHUNK < endBlock; c++) {
      if (!layer.map.hasChunk(c)) continue;
      layer.map.forEachSet(c, (bit) => {
        const block = c * BLOCKS_PER_CHUNK + bit;
        if (block >= firstBlock && block < endBlock) granules.add(Math.floor(block / perGranule));
      });
    }
    const out: Array<[number, string]> = [];
    for (const g of [...granules].sort((a, b) => a - b)) {
      const offset = g * granuleBytes;
      const length = Math.min(granuleBytes, this.sizeBytes - offset);
      const { states, data } = await this.#layerChunk(name, offset, length, undefined, true);
      out.push([g, createHash('sha256').update(states).update(data).digest('hex')]);
    }
    return out;
  }

  /**
   * Block states (0 absent, 1 data, 2 zero) of a snapshot layer's range, and
   * the bytes of its DATA blocks in order — of the blocks `mask` selects
   * (a non-zero byte per block), or all.
   */
  readLayerChunk(
    name: string,
    offset: number,
    length: number,
    mask?: Uint8Array,
    into?: Uint8Array,
  ): Promise<{ states: Uint8Array; data: Uint8Array }> {
    return this.#layerChunk(name, offset, length, mask, false, into);
  }

  /**
   * `readLayerChunk`; with `poison`, a block that fails its checksum gets the
   * state POISONED instead of failing the read: its digest then matches no
   * healthy replica's, so a rebuild copies it (a scrubbed replica heals).
   */
  async #layerChunk(
    name: string,
    offset: number,
    length: number,
    mask: Uint8Array | undefined,
    poison: boolean,
    into?: Uint8Array,
  ): Promise<{ states: Uint8Array; data: Uint8Array }> {
    this.#checkRange(offset, length);
    assert(offset % BLOCK_SIZE === 0 && length % BLOCK_SIZE === 0, 'layer ranges are whole blocks');
    const layer = this.#layerOf(name);
    const first = offset / BLOCK_SIZE;
    const states = new Uint8Array(length / BLOCK_SIZE);
    const wanted = (i: number) => states[i] === DATA && (!mask || mask[i] !== 0);
    let dataBlocks = 0;
    for (let i = 0; i < states.length; i++) {
      states[i] = layer.map.state(first + i);
      if (wanted(i)) dataBlocks++;
    }
    const data =
      into && into.length >= dataBlocks * BLOCK_SIZE
        ? Buffer.from(into.buffer, into.byteOffset, dataBlocks * BLOCK_SIZE)
        : Buffer.allocUnsafe(dataBlocks * BLOCK_SIZE);
    this.#pending++;
    try {
      let at = 0;
      await forEachRun(states.length, wanted, async (i, j) => {
        const view = data.subarray(at, at + (j - i) * BLOCK_SIZE);
        await preadFull(layer.fd, view, 0, view.length, (first + i) * BLOCK_SIZE);
        const bad = layer.sums.mismatches(first + i, view, j - i);
        if (bad.length > 0) {
          if (!poison)
            throw this.#corrupt(
              layer,
              bad.map((x) => first + i + x),
            );
          for (const x of bad) states[i + x] = POISONED;
        }
        at += view.length;
      });
    } finally {
      this.#leave();
    }
    return { states, data };
  }

  /** Makes a snapshot layer's range equal to what `readLayerChunk` returned elsewhere (rebuild). */
  async writeLayerChunk(
    name: string,
    offset: number,
    states: Uint8Array,
    data: Uint8Array,
    mask?: Uint8Array,
  ): Promise<void> {
    this.#checkRange(offset, states.length * BLOCK_SIZE);
    assert(offset % BLOCK_SIZE === 0, 'layer ranges are whole blocks');
    const layer = this.#layerOf(name);
    const first = offset / BLOCK_SIZE;
    const chosen = (i: number) => !mask || mask[i] !== 0;
    const wanted = (i: number) => states[i] === DATA && chosen(i);
    // Blocks of a snapshot layer may be overwritten here: marked like a head write.
    this.#unpunch(layer, first, first + states.length);
    const intent = this.#intend(layer, first, first + states.length, true);
    const done = typeof intent === 'function' ? intent : await intent;
    // A punch of these blocks already under way finishes first.
    const release =
      this.#punching > 0 ? await this.#locks.acquire(first, first + states.length) : undefined;
    this.#pending++;
    try {
      let at = 0;
      await forEachRun(states.length, wanted, async (i, j) => {
        const run = data.subarray(at, at + (j - i) * BLOCK_SIZE);
        assert(run.length === (j - i) * BLOCK_SIZE, 'layer chunk data shorter than its states');
        await pwriteFull(layer.fd, run, (first + i) * BLOCK_SIZE, this.#gate);
        layer.sums.setFrom(first + i, run, j - i);
        at += run.length;
      });
    } catch (err) {
      throw ioError(`Cannot write layer ${name} of replica ${this.id}`, err);
    } finally {
      release?.();
      done();
      this.#leave();
    }
    for (let i = 0; i < states.length; i++) {
      if (!chosen(i)) continue;
      const state = states[i]!;
      assert(state === ABSENT || state === DATA || state === ZERO, `block state ${state}`);
      layer.map.set(first + i, state);
    }
    this.#unsynced.add(layer);
    // Blocks below the head changed: resolve reads afresh.
    this.#index.clear();
  }

  /**
   * 8 bytes per block of a snapshot layer's range: its state, then the first
   * 7 bytes of the SHA-256 of its data (DATA blocks). A rebuild copies the
   * blocks whose bytes differ, not whole granules.
   */
  async layerBlockDigests(name: string, offset: number, length: number): Promise<Uint8Array> {
    const { states, data } = await this.#layerChunk(name, offset, length, undefined, true);
    const out = Buffer.alloc(states.length * 8);
    let at = 0;
    for (let i = 0; i < states.length; i++) {
      out[i * 8] = states[i]!;
      if (states[i] === DATA || states[i] === POISONED) {
        createHash('sha256')
          .update(data.subarray(at, at + BLOCK_SIZE))
          .digest()
          .copy(out, i * 8 + 1, 0, 7);
        at += BLOCK_SIZE;
      }
    }
    return out;
  }

  layerSums(name: string, offset: number, length: number): Promise<Uint8Array> {
    this.#checkRange(offset, length);
    assert(offset % BLOCK_SIZE === 0 && length % BLOCK_SIZE === 0, 'layer ranges are whole blocks');
    const layer = this.#layerOf(name);
    const first = offset / BLOCK_SIZE;
    const count = length / BLOCK_SIZE;
    const out = Buffer.alloc(count * 5);
    for (let i = 0; i < count; i++) {
      const state = layer.map.state(first + i);
      out[i * 5] = state;
      if (state === DATA) out.writeUInt32LE(layer.sums.get(first + i) ?? 0, i * 5 + 1);
    }
    return Promise.resolve(out);
  }

  /** After a rebuild: the revision of the replica it was copied from, made durable. */
  async setRevision(revision: bigint): Promise<void> {
    this.#revision = revision;
    // The counter may go down here (a replica rebuilt in place from one that counted fewer
    // writes), and open takes the larger of trailer and LevelDB: both get it, in order.
    this.#revisionBothPlaces = true;
    await this.#commit(() => undefined);
  }

  /** SHA-256 per `granuleBytes` of the volume as seen at a snapshot (or now), for verify. */
  async viewDigests(
    snapshot: string | undefined,
    offset: number,
    length: number,
    granuleBytes: number,
  ): Promise<string[]> {
    this.#checkRange(offset, length);
    const out: string[] = [];
    const buf = Buffer.allocUnsafe(granuleBytes);
    for (let at = offset; at < offset + length; at += granuleBytes) {
      const n = Math.min(granuleBytes, offset + length - at);
      const view = buf.subarray(0, n);
      if (snapshot === undefined) await this.read(at, n, view);
      else await this.readSnapshot(snapshot, at, n, view);
      out.push(createHash('sha256').update(view).digest('hex'));
    }
    return out;
  }

  /**
   * The `Replica` contract: flushes, refuses new operations and waits for
   * those in flight, and lets go of the files — always, even when the flush
   * fails (then it rejects: the caller must not take the data as durable).
   * Once it returns nothing of this handle touches the files again, so
   * another handle (a newer engine's) can take the replica over without an
   * older write landing after its own.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closing = true;
    try {
      await this.flush();
    } finally {
      this.abandon();
    }
    if (this.#pending > 0) await new Promise<void>((resolve) => this.#drainWaiters.push(resolve));
  }
}

/** The counter as `rev:<replica-id>` holds it. */
function revisionBytes(revision: bigint): Buffer {
  const bytes = Buffer.alloc(8);
  bytes.writeBigUInt64BE(revision);
  return bytes;
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
