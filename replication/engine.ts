import { assert } from '../common/assert.ts';
import { CorralError, isCorralError } from '../common/errors.ts';
import {
  BLOCK_SIZE,
  MAX_REQUEST_BYTES,
  readOnlyDevice,
  type BlockDevice,
  type Capabilities,
  type Extent,
  type WriteOptions,
  type ZeroOptions,
} from './block-device.ts';
import { hashBlocks } from './block-hash.ts';
import type { Replica, ReplicaMode, ScrubReport, SnapshotInfo } from './replica.ts';
import type { ReplicaStatus, SupervisedEngine } from './supervisor.ts';
import {
  compareReplicas,
  copyLayers,
  type CopyOptions,
  type Difference,
  type RebuildProgress,
} from './rebuild.ts';

function isUserError(err: unknown): boolean {
  return (
    isCorralError(err, 'NOT_FOUND') ||
    isCorralError(err, 'ALREADY_EXISTS') ||
    isCorralError(err, 'BUSY') ||
    isCorralError(err, 'LIMIT_REACHED') ||
    isCorralError(err, 'INVALID_ARGUMENT')
  );
}

export interface EngineEvent {
  type:
    | 'replica-error'
    | 'replica-behind'
    | 'replica-removed'
    | 'volume-salvaged'
    | 'data-corrupt'
    | 'engine-fenced';
  volume: string;
  replica: string;
  message: string;
}

export interface EngineOptions {
  volume: string;
  sizeBytes: number;
  replicas: Replica[];
  /**
   * Replicas known to be unusable at start (unreachable), with why: they
   * begin in ERR. Of the others, those whose revision is below the highest
   * missed writes and begin in ERR too, until a rebuild replaces them.
   */
  failed?: Map<Replica, string>;
  /**
   * Replicas recorded as failed earlier: they begin in ERR too, unless no
   * other replica can serve (then the freshest are salvaged).
   */
  suspect?: Set<Replica>;
  readOnly?: boolean;
  onEvent?: (event: EngineEvent) => void;
  /**
   * Records durably that a replica failed (true) or was rebuilt (false); the
   * record's failed replicas come back in `failed` at the next start.
   */
  markFailed?: (replicaId: string, failed: boolean) => Promise<void>;
}

interface Member {
  replica: Replica;
  mode: ReplicaMode;
}

/**
 * One volume's controller: validates every request once, mirrors writes to
 * all RW and WO replicas in parallel, reads from one RW replica (local first),
 * and drops a failing replica to ERR while at least one RW replica remains.
 */
export class Engine implements SupervisedEngine {
  readonly volume: string;
  /** Grows with an online expand. */
  sizeBytes: number;
  readonly #readOnly: boolean;
  readonly #members: Member[];
  readonly #onEvent: (event: EngineEvent) => void;
  readonly #markFailed: (replicaId: string, failed: boolean) => Promise<void>;
  #gate: Promise<void> | undefined;
  /** The rebuild under way: snapshot operations wait for it (the chains must hold still). */
  #rebuilding: { replica: string; progress: RebuildProgress } | undefined;
  #inflight = 0;
  /** Client requests admitted so far: a rebuild watches it to yield to clients. */
  #admitted = 0;
  /**
   * Set when a replica's failure could not be recorded (the store refused:
   * a newer engine owns the volume, or it does not answer): from then on
   * every request fails. Writing on to the replicas left would acknowledge
   * writes that the volume's owner may never see (docs/ARCHITECTURE.md,
   * "Engine ownership and fencing").
   */
  #fenced: CorralError | undefined;
  /**
   * Replica failures being recorded. A write that succeeds on the replicas
   * left is not acknowledged before these are durable: the failed replica
   * missed it too, and until the record says so a restart could trust it
   * (a write racing the one that found the failure was once acknowledged on
   * the engine's own replica alone while the record could not be written).
   */
  readonly #marking = new Set<Promise<void>>();
  readonly #idleWaiters: Array<() => void> = [];

  constructor(options: EngineOptions) {
    assert(options.replicas.length > 0, `volume ${options.volume} has no replica`);
    this.volume = options.volume;
    this.sizeBytes = options.sizeBytes;
    this.#readOnly = options.readOnly ?? false;
    this.#onEvent = options.onEvent ?? (() => undefined);
    this.#markFailed = options.markFailed ?? (() => Promise.resolve());
    const failed = options.failed ?? new Map<Replica, string>();
    const suspect = options.suspect ?? new Set<Replica>();
    const reachable = options.replicas.filter((r) => !failed.has(r));
    const trusted = reachable.filter((r) => !suspect.has(r));
    // Salvage: when every reachable replica had been set to ERR once (the last healthy one
    // failed too), the freshest of them serve rather than no volume at all.
    const salvage = trusted.length === 0 && reachable.length > 0;
    const pool = salvage ? reachable : trusted;
    if (salvage)
      this.#onEvent({
        type: 'volume-salvaged',
        volume: this.volume,
        replica: '',
        message: `every reachable replica had failed once; the freshest of ${reachable.length} serve`,
      });
    const freshest = pool.reduce((max, r) => (r.revision() > max ? r.revision() : max), 0n);
    // The chain of the freshest replica (local first) is the volume's: one that differs is not trusted.
    const chainOf = (r: Replica) =>
      r
        .snapshots()
        .map((s) => `${s.name}@${s.createdAt}`)
        .join('|');
    const reference = pool
      .filter((r) => r.revision() === freshest)
      .sort((a, b) => Number(b.location === 'local') - Number(a.location === 'local'))[0];
    const chain = reference ? chainOf(reference) : '';
    this.#members = options.replicas
      .map((replica): Member => {
        const why = failed.get(replica);
        if (why !== undefined) {
          this.#onEvent({
            type: 'replica-error',
            volume: this.volume,
            replica: replica.id,
            message: why,
          });
          return { replica, mode: 'ERR' };
        }
        if (suspect.has(replica) && !salvage) {
          this.#onEvent({
            type: 'replica-error',
            volume: this.volume,
            replica: replica.id,
            message: 'it failed before and has not been rebuilt since',
          });
          return { replica, mode: 'ERR' };
        }
        if (replica.revision() < freshest) {
          this.#onEvent({
            type: 'replica-behind',
            volume: this.volume,
            replica: replica.id,
            message: `revision ${replica.revision()} is behind ${freshest}: it missed writes and is not trusted until rebuilt`,
          });
          return { replica, mode: 'ERR' };
        }
        if (chainOf(replica) !== chain) {
          this.#onEvent({
            type: 'replica-behind',
            volume: this.volume,
            replica: replica.id,
            message: `its snapshots differ from the volume's: not trusted until rebuilt`,
          });
          return { replica, mode: 'ERR' };
        }
        return { replica, mode: 'RW' };
      })
      // Local replicas first: reads go to the first RW member.
      .sort(
        (a, b) => Number(b.replica.location === 'local') - Number(a.replica.location === 'local'),
      );
  }

  capabilities(): Capabilities {
    return {
      readOnly: this.#readOnly,
      flush: true,
      fua: true,
      trim: true,
      zero: true,
      extents: true,
      multiConn: true,
    };
  }

  replicaModes(): ReplicaStatus[] {
    return this.#members.map((m) => ({
      id: m.replica.id,
      location: m.replica.location,
      mode: m.mode,
      revision: m.replica.revision().toString(),
      ...(this.#rebuilding?.replica === m.replica.id
        ? { rebuild: { ...this.#rebuilding.progress } }
        : {}),
    }));
  }

  /**
   * How many replicas serve reads and writes, when all of them do and none
   * has a failure waiting to be noticed; else undefined. The repair loop's
   * look at a healthy volume, without allocating.
   */
  healthyCount(): number | undefined {
    for (const m of this.#members)
      if (m.mode !== 'RW' || m.replica.failure !== undefined) return undefined;
    return this.#members.length;
  }

  /** The operation changing or reading the chains now (snapshot, delete, revert, rebuild, verify). */
  #chainOp: string | undefined;

  /**
   * Chain operations run one at a time. The volume manager already queues
   * them per volume; this refuses what slips past it (a revert interleaved
   * with a delete's merge once left a replica with no head).
   */
  async #alone<T>(what: string, fn: () => Promise<T>): Promise<T> {
    if (this.#chainOp !== undefined)
      throw new CorralError(
        'BUSY',
        `Cannot ${what}: volume ${this.volume} is busy (${this.#chainOp}); try again when it is done`,
      );
    this.#chainOp = what;
    try {
      return await fn();
    } finally {
      this.#chainOp = undefined;
    }
  }

  /**
   * Adds `target` — a new replica, or one back from an absence — in place of
   * the replica `replaces`, and rebuilds it (docs/ARCHITECTURE.md, "Rebuild"):
   * its chain is aligned with a healthy replica's; I/O pauses while every
   * replica takes snapshot `snapshotName` and the target joins in WO mode (it
   * gets every write from then on); then the snapshot layers it lacks are
   * copied granule by granule where digests differ, checked, and the target
   * takes the source's revision and turns RW.
   */
  async rebuild(
    target: Replica,
    options: CopyOptions & { replaces?: string; snapshotName: string; now: Date },
  ): Promise<RebuildProgress> {
    return this.#alone(`rebuild replica ${target.id}`, () => this.#rebuild(target, options));
  }

  async #rebuild(
    target: Replica,
    options: CopyOptions & { replaces?: string; snapshotName: string; now: Date },
  ): Promise<RebuildProgress> {
    const source = this.#firstReadable('rebuild a replica');
    const progress: RebuildProgress = {
      done: 0,
      total: 0,
      bytesCopied: 0,
      layers: 0,
      layersSkipped: 0,
      sources: 1,
    };
    this.#rebuilding = { replica: target.id, progress };
    let member: Member | undefined;
    try {
      const key = (s: SnapshotInfo) => `${s.name}@${s.createdAt}`;
      const wanted = source.replica.snapshots().map(key);
      // Snapshots deleted while the target was away: merge them away there too.
      for (const s of target.snapshots())
        if (!wanted.includes(key(s))) await target.deleteSnapshot(s.name);
      const kept = target.snapshots().map(key);
      if (kept.join('|') !== wanted.slice(0, kept.length).join('|'))
        throw new CorralError(
          'IO_ERROR',
          `Replica ${target.id}'s snapshots (${kept.join(', ') || 'none'}) cannot be lined up with volume ${this.volume}'s (${wanted.join(', ') || 'none'}); replace it with a new replica`,
        );
      const resume = await this.#pause();
      try {
        // A replica away during an expand comes back smaller: it grows first.
        if (target.sizeBytes < this.sizeBytes) await target.expand(this.sizeBytes);
        await this.#mirror('take the rebuild snapshot', (r) =>
          r.snapshot(options.snapshotName, options.now),
        );
        // The first missing snapshot freezes the target's stale head: its blocks are
        // compared, not copied blind. The others start empty. Each keeps its own size.
        for (const s of source.replica.snapshots().slice(kept.length))
          await target.snapshot(s.name, new Date(s.createdAt), s.sizeBytes);
        if (options.replaces !== undefined) {
          const old = this.#members.findIndex((m) => m.replica.id === options.replaces);
          if (old >= 0) {
            const [gone] = this.#members.splice(old, 1);
            if (gone && gone.replica !== target) gone.replica.abandon();
          }
        }
        member = { replica: target, mode: 'WO' };
        this.#members.push(member);
      } finally {
        resume();
      }
      // A source on this host is read in place, the cheapest copy there is (a second source
      // across the network added a receive per byte: 455 → 386 MB/s here). With none here,
      // every byte crosses the network anyway, and every healthy replica with the source's
      // chain serves part of it (360-371 → 402-409 MB/s, each source's load halved).
      const chain = source.replica.snapshots().map(key).join('|');
      const alsoFrom =
        source.replica.location === 'local'
          ? []
          : this.#members
              .filter(
                (m) =>
                  m.mode === 'RW' &&
                  m !== source &&
                  m !== member &&
                  m.replica.snapshots().map(key).join('|') === chain,
              )
              .map((m) => m.replica);
      const copied = await copyLayers(source.replica, target, this.sizeBytes, {
        ...options,
        alsoFrom,
        clientRequests: () => this.#admitted,
        onProgress: (p) => {
          Object.assign(progress, p);
          options.onProgress?.(p);
        },
      });
      const finish = await this.#pause();
      try {
        if (member.mode !== 'WO')
          throw new CorralError('IO_ERROR', `Replica ${target.id} failed while it was rebuilt`);
        await this.#mirror('flush after rebuild', (r) => r.flush());
        await target.setRevision(source.replica.revision());
        await this.#markFailed(target.id, false);
        member.mode = 'RW';
      } finally {
        finish();
      }
      return copied;
    } catch (err) {
      if (member) await this.#fail(member, err);
      throw err;
    } finally {
      this.#rebuilding = undefined;
    }
  }

  /**
   * Sets to ERR, as a request would have, the replicas whose connection died
   * while no request went to them: an idle volume whose replica's node died
   * must show it and get it rebuilt (the repair loop calls this).
   */
  async noticeFailures(): Promise<void> {
    for (const m of this.#members) {
      const why = m.mode === 'ERR' ? undefined : m.replica.failure;
      if (why !== undefined) await this.#fail(m, new CorralError('IO_ERROR', why));
    }
  }

  /** Takes a replica out of the volume (the last healthy one cannot go). */
  removeReplica(id: string): Replica {
    const i = this.#members.findIndex((m) => m.replica.id === id);
    if (i < 0) throw new CorralError('NOT_FOUND', `Volume ${this.volume} has no replica ${id}`);
    const m = this.#members[i]!;
    if (m.mode === 'RW' && this.#members.filter((x) => x.mode === 'RW').length === 1)
      throw new CorralError(
        'BUSY',
        `Cannot remove replica ${id}: it is the last healthy replica of volume ${this.volume}`,
      );
    if (this.#rebuilding?.replica === id)
      throw new CorralError('BUSY', `Cannot remove replica ${id} while it is rebuilt`);
    this.#members.splice(i, 1);
    m.replica.abandon();
    this.#onEvent({
      type: 'replica-removed',
      volume: this.volume,
      replica: id,
      message: 'removed',
    });
    return m.replica;
  }

  /** Compares every healthy replica's chain and live volume; lists what differs. */
  async verify(onProgress?: (done: number, total: number) => void): Promise<Difference[]> {
    const healthy = this.#members.filter((m) => m.mode === 'RW').map((m) => m.replica);
    if (healthy.length === 0) throw this.#noReplica('verify');
    return this.#alone('verify', () => this.#verify(healthy, onProgress));
  }

  #verify(
    healthy: Replica[],
    onProgress: ((done: number, total: number) => void) | undefined,
  ): Promise<Difference[]> {
    return compareReplicas(
      healthy,
      this.sizeBytes,
      async (fn) => {
        const resume = await this.#pause();
        try {
          return await fn();
        } finally {
          resume();
        }
      },
      onProgress,
    );
  }

  #check(
    what: string,
    offset: number,
    length: number,
    maxLength = Number.MAX_SAFE_INTEGER,
    sizeBytes = this.sizeBytes,
  ): void {
    if (
      !Number.isSafeInteger(offset) ||
      !Number.isSafeInteger(length) ||
      offset < 0 ||
      length < 0
    ) {
      throw new CorralError(
        'INVALID_ARGUMENT',
        `Cannot ${what} ${length} bytes at offset ${offset}: not a valid range`,
      );
    }
    if (length > maxLength) {
      throw new CorralError(
        'INVALID_ARGUMENT',
        `Cannot ${what} ${length} bytes at once: the limit is ${maxLength}`,
      );
    }
    if (offset + length > sizeBytes) {
      throw new CorralError(
        'OUT_OF_RANGE',
        `Cannot ${what} ${length} bytes at offset ${offset}: volume ${this.volume} is ${sizeBytes} bytes`,
      );
    }
  }

  #checkWritable(what: string): void {
    if (this.#readOnly)
      throw new CorralError('READ_ONLY', `Cannot ${what}: volume ${this.volume} is read-only`);
  }

  /**
   * Every data operation passes here: while a snapshot or revert switches
   * the chain, new operations wait and those in flight finish first.
   */
  /** Why this engine stopped serving, when it did (see `#fenced`). */
  get fenced(): CorralError | undefined {
    return this.#fenced;
  }

  async #admit<T>(op: () => Promise<T>): Promise<T> {
    while (this.#gate) await this.#gate;
    if (this.#fenced) throw this.#fenced;
    this.#inflight++;
    this.#admitted++;
    try {
      return await op();
    } finally {
      this.#inflight--;
      if (this.#inflight === 0) for (const w of this.#idleWaiters.splice(0)) w();
    }
  }

  /** Stops admitting operations and waits for those in flight; returns the function that resumes. */
  async #pause(): Promise<() => void> {
    while (this.#gate) await this.#gate;
    let resume!: () => void;
    this.#gate = new Promise<void>((resolve) => (resume = resolve));
    if (this.#inflight > 0) await new Promise<void>((resolve) => this.#idleWaiters.push(resolve));
    return () => {
      this.#gate = undefined;
      resume();
    };
  }

  read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    return this.#admit(() => this.#read(offset, length, into));
  }

  async #read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    this.#check('read', offset, length, MAX_REQUEST_BYTES);
    for (;;) {
      const member = this.#members.find((m) => m.mode === 'RW');
      if (!member) throw this.#noReplica('read');
      try {
        return await member.replica.read(offset, length, into);
      } catch (err) {
        // A block that fails its checksum on the last healthy replica is an I/O error for
        // this read only: the rest of the volume still serves (never the bad bytes).
        if (isCorralError(err, 'DATA_CORRUPT') && this.#readableCount() === 1) {
          this.#onEvent({
            type: 'data-corrupt',
            volume: this.volume,
            replica: member.replica.id,
            message: err.message,
          });
          throw err;
        }
        await this.#fail(member, err);
      }
    }
  }

  async write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    this.#checkWritable('write');
    this.#check('write', offset, data.length, MAX_REQUEST_BYTES);
    const hashed = this.#withHashes(offset, data, options);
    return this.#admit(() => this.#mirror('write', (r) => r.write(offset, data, hashed)));
  }

  /**
   * An aligned write to several replicas carries the XXH32 of each of its blocks,
   * computed once here: a replica on this host keeps them as its block checksums, and
   * the stream to each other one checksums its payload from them (each hashed it before).
   */
  #withHashes(
    offset: number,
    data: Uint8Array,
    options: WriteOptions | undefined,
  ): WriteOptions | undefined {
    if (
      this.#members.length < 2 ||
      data.length === 0 ||
      offset % BLOCK_SIZE !== 0 ||
      data.length % BLOCK_SIZE !== 0 ||
      options?.hashes
    )
      return options;
    const hashes = new Uint32Array(data.length / BLOCK_SIZE);
    hashBlocks(data, hashes);
    return { ...options, hashes };
  }

  flush(): Promise<void> {
    return this.#admit(() => this.#mirror('flush', (r) => r.flush()));
  }

  async trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    this.#checkWritable('trim');
    this.#check('trim', offset, length);
    return this.#admit(() => this.#mirror('trim', (r) => r.trim(offset, length, options)));
  }

  async zero(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    this.#checkWritable('write zeroes');
    this.#check('write zeroes', offset, length);
    return this.#admit(() => this.#mirror('write zeroes', (r) => r.zero(offset, length, options)));
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    return this.#admit(() => this.#extents(offset, length));
  }

  async #extents(offset: number, length: number): Promise<Extent[]> {
    this.#check('map', offset, length);
    for (;;) {
      const member = this.#members.find((m) => m.mode === 'RW');
      if (!member) throw this.#noReplica('map');
      try {
        return await member.replica.extents(offset, length);
      } catch (err) {
        await this.#fail(member, err);
      }
    }
  }

  /**
   * Runs one operation on every RW and WO replica in parallel. Succeeds when
   * every replica still healthy afterwards has it. If every replica failed
   * with "no space", the replicas still agree (none holds the write), so the
   * client gets ENOSPC and no replica is dropped.
   */
  async #mirror(
    what: string,
    op: (replica: Replica) => Promise<void>,
    options: { userErrors?: boolean } = {},
  ): Promise<void> {
    const targets = this.#members.filter((m) => m.mode !== 'ERR');
    if (!targets.some((m) => m.mode === 'RW')) throw this.#noReplica(what);
    // Remote replicas first: their part only queues bytes on a socket, while a local write
    // copies into the page cache on this thread (synchronously, up to 1 MiB) and, started
    // first, would hold the sends back by that long.
    const remote = targets.map((m) => (m.replica.location === 'local' ? undefined : op(m.replica)));
    const results = await Promise.allSettled(targets.map((m, i) => remote[i] ?? op(m.replica)));
    const failures = results.flatMap((r, i) =>
      r.status === 'rejected' ? [{ member: targets[i]!, err: r.reason as unknown }] : [],
    );
    if (failures.length === 0) {
      if (this.#marking.size > 0 || this.#fenced) await this.#failuresRecorded();
      return;
    }
    // A refusal every replica agrees on (no such snapshot, name taken, busy) is the caller's error.
    if (
      options.userErrors &&
      failures.length === targets.length &&
      failures.every((f) => isUserError(f.err))
    ) {
      throw failures[0]!.err;
    }
    // A full disk everywhere, or a partial write over a block that fails its checksum on every
    // replica: the request fails, the replicas stay (nothing they hold got worse).
    if (
      failures.length === targets.length &&
      failures.every(
        (f) => isCorralError(f.err, 'NO_SPACE') || isCorralError(f.err, 'DATA_CORRUPT'),
      )
    ) {
      throw failures[0]!.err;
    }
    await Promise.all(failures.map((f) => this.#fail(f.member, f.err)));
    if (!this.#members.some((m) => m.mode === 'RW')) {
      throw this.#noReplica(what, failures[0]?.err);
    }
    await this.#failuresRecorded();
  }

  /** Waits until every replica failure found so far is recorded; throws if the engine was fenced. */
  async #failuresRecorded(): Promise<void> {
    while (this.#marking.size > 0) await Promise.allSettled([...this.#marking]);
    if (this.#fenced) throw this.#fenced;
  }

  /**
   * Sets a replica to ERR and makes that durable before the operation that
   * found it answers: a replica that missed a write must never be trusted
   * again after a crash, even if its revision counter (persisted at flushes
   * only) looks current.
   */
  async #fail(member: Member, err: unknown): Promise<void> {
    if (member.mode === 'ERR') return;
    member.mode = 'ERR';
    const message = err instanceof Error ? err.message : String(err);
    this.#onEvent({
      type: 'replica-error',
      volume: this.volume,
      replica: member.replica.id,
      message,
    });
    const marked = this.#markFailed(member.replica.id, true);
    this.#marking.add(marked);
    try {
      await marked;
    } catch (recordErr) {
      this.#fenced ??= new CorralError(
        'IO_ERROR',
        `Volume ${this.volume} stopped serving: replica ${member.replica.id} failed and that could not be recorded (${recordErr instanceof Error ? recordErr.message : String(recordErr)})`,
        { cause: recordErr },
      );
      this.#onEvent({
        type: 'engine-fenced',
        volume: this.volume,
        replica: member.replica.id,
        message: this.#fenced.message,
      });
      throw this.#fenced;
    } finally {
      this.#marking.delete(marked);
    }
  }

  #noReplica(what: string, cause?: unknown): CorralError {
    return new CorralError(
      'NO_HEALTHY_REPLICA',
      `Cannot ${what}: volume ${this.volume} has no healthy replica left`,
      {
        cause,
      },
    );
  }

  #readableCount(): number {
    return this.#members.filter((m) => m.mode === 'RW').length;
  }

  /**
   * Reads every block of every healthy replica and checks it against its
   * checksum, window by window. A replica with bad blocks is set to ERR when
   * another one is clean (the repair loop then rebuilds it: its bad blocks'
   * digests match nobody's, so they are copied from a good replica); on the
   * last healthy replica they are reported and stay readable as I/O errors.
   */
  async scrub(onProgress?: (done: number, total: number) => void): Promise<ScrubReport[]> {
    const members = this.#members.filter((m) => m.mode === 'RW');
    if (members.length === 0) throw this.#noReplica('scrub');
    return this.#alone('scrub', async () => {
      const reports: ScrubReport[] = members.map((m) => ({
        replica: m.replica.id,
        location: m.replica.location,
        bad: [],
        failed: false,
      }));
      const window = 64 * 1024 * 1024;
      for (let at = 0; at < this.sizeBytes; at += window) {
        const length = Math.min(window, this.sizeBytes - at);
        const found = await Promise.all(
          members.map((m) =>
            m.mode === 'RW' ? m.replica.checkBlocks(at, length) : Promise.resolve([]),
          ),
        );
        found.forEach((bad, i) => reports[i]!.bad.push(...bad));
        onProgress?.(at + length, this.sizeBytes);
      }
      const clean = reports.filter((r) => r.bad.length === 0).length;
      for (const [i, report] of reports.entries()) {
        if (report.bad.length === 0) continue;
        const message = `${report.bad.length} block(s) fail their checksums (first at offset ${report.bad[0]!.offset}${report.bad[0]!.snapshot ? ` of snapshot ${report.bad[0]!.snapshot}` : ''})`;
        this.#onEvent({
          type: 'data-corrupt',
          volume: this.volume,
          replica: report.replica,
          message,
        });
        if (clean > 0) {
          await this.#fail(members[i]!, new CorralError('DATA_CORRUPT', message));
          report.failed = true;
        }
      }
      return reports;
    });
  }

  #firstReadable(what: string): Member {
    const member = this.#members.find((m) => m.mode === 'RW');
    if (!member) throw this.#noReplica(what);
    return member;
  }

  snapshots(): SnapshotInfo[] {
    return this.#firstReadable('list snapshots').replica.snapshots();
  }

  /** A crash-consistent snapshot: I/O pauses while every replica switches its head. */
  async snapshot(name: string, now: Date): Promise<SnapshotInfo> {
    await this.#alone(`take snapshot ${name}`, async () => {
      const resume = await this.#pause();
      try {
        await this.#mirror('take a snapshot', (r) => r.snapshot(name, now), { userErrors: true });
      } finally {
        resume();
      }
    });
    const info = this.snapshots().find((s) => s.name === name);
    assert(info, `snapshot ${name} missing after it was taken`);
    return info;
  }

  /**
   * Online expand: I/O pauses while every replica grows (each atomically),
   * then the volume has the new size. A replica that fails to grow goes to
   * ERR and is rebuilt, at the new size, like any other failure.
   */
  async expand(sizeBytes: number): Promise<void> {
    if (sizeBytes < this.sizeBytes)
      throw new CorralError(
        'INVALID_ARGUMENT',
        `Volume ${this.volume} is ${this.sizeBytes} bytes: a volume cannot shrink`,
      );
    await this.#alone('expand', async () => {
      const resume = await this.#pause();
      try {
        await this.#mirror('expand', (r) => r.expand(sizeBytes), { userErrors: true });
        this.sizeBytes = sizeBytes;
      } finally {
        resume();
      }
    });
  }

  /** Online: the merge runs beside I/O. */
  async deleteSnapshot(name: string): Promise<void> {
    await this.#alone(`delete snapshot ${name}`, () =>
      this.#mirror(`delete snapshot ${name}`, (r) => r.deleteSnapshot(name), {
        userErrors: true,
      }),
    );
  }

  async revert(
    name: string,
    now: Date,
    options: { discardNewer?: boolean } = {},
  ): Promise<string[]> {
    return this.#alone(`revert to ${name}`, async () => {
      const resume = await this.#pause();
      try {
        let removed: string[] = [];
        await this.#mirror(
          `revert to ${name}`,
          async (r) => {
            removed = await r.revert(name, now, options);
          },
          { userErrors: true },
        );
        return removed;
      } finally {
        resume();
      }
    });
  }

  /** A read-only view of one snapshot, for exports and clones. */
  snapshotDevice(name: string): BlockDevice {
    const info = this.snapshots().find((s) => s.name === name);
    if (!info) {
      throw new CorralError('NOT_FOUND', `Volume ${this.volume} has no snapshot named ${name}`);
    }
    // A snapshot keeps the size it was taken at, whatever the volume grew to since.
    const size = info.sizeBytes;
    return readOnlyDevice(`snapshot ${this.volume}@${name}`, {
      sizeBytes: size,
      capabilities: () => this.capabilities(),
      // async: a bad range rejects, as every other BlockDevice method does, never throws.
      read: async (offset, length, into) => {
        this.#check('read', offset, length, MAX_REQUEST_BYTES, size);
        return this.#firstReadable('read').replica.readSnapshot(name, offset, length, into);
      },
      extents: async (offset, length) => {
        this.#check('map', offset, length, Number.MAX_SAFE_INTEGER, size);
        return this.#firstReadable('map').replica.extentsSnapshot(name, offset, length);
      },
    });
  }

  /**
   * The `granuleBytes` blocks that may differ between snapshot `base` and
   * snapshot `top` (all blocks holding data when `base` is undefined), from
   * the layer bitmaps: what an incremental backup reads.
   */
  async touchedBlocks(
    base: string | undefined,
    top: string,
    granuleBytes: number,
  ): Promise<Set<number>> {
    return this.#firstReadable('compare snapshots').replica.touchedBlocks(base, top, granuleBytes);
  }

  abandon(): void {
    for (const m of this.#members) m.replica.abandon();
  }

  /**
   * Flushes and closes every replica still in use. A replica that cannot
   * flush fails as in any flush (set to ERR, recorded, rebuilt later); one in
   * ERR is only let go. Rejects when no replica could flush.
   */
  async close(): Promise<void> {
    let flushed: Error | undefined;
    try {
      // Flushed here, and again by each replica's close: this flush records a replica that
      // fails it as failed (as any mirrored request does), so that it is not trusted at the
      // next start; the replica's own one, with nothing left to sync, clears its lingering
      // write-intent marks.
      await this.#mirror('flush before closing', (r) => r.flush());
    } catch (err) {
      flushed = err instanceof Error ? err : new Error(String(err));
    }
    const results = await Promise.allSettled(
      this.#members.map((m) => {
        if (m.mode !== 'ERR' && flushed === undefined) return m.replica.close();
        m.replica.abandon();
        return Promise.resolve();
      }),
    );
    if (flushed !== undefined) throw flushed;
    const failed = results.find((r) => r.status === 'rejected');
    if (failed && failed.status === 'rejected') throw failed.reason;
  }
}
