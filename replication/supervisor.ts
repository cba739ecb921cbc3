import type { Clock } from '../common/clock.ts';
import { Qos, type QosLimits } from './qos.ts';
import { CorralError } from '../common/errors.ts';
import {
  readOnlyDevice,
  type BlockDevice,
  type Capabilities,
  type Extent,
  type WriteOptions,
  type ZeroOptions,
} from './block-device.ts';
import type { Replica, ReplicaMode, ScrubReport, SnapshotInfo } from './replica.ts';
import type { CopyOptions, Difference, RebuildProgress } from './rebuild.ts';

export interface ReplicaStatus {
  id: string;
  location: string;
  mode: ReplicaMode;
  revision: string;
  rebuild?: RebuildProgress;
}

/** What the supervisor runs: an engine, seen as a block device it can tear down. */
export interface SupervisedEngine extends BlockDevice {
  /** Graceful: flush and close. */
  close(): Promise<void>;
  /** After a fault: persist nothing more, release resources once idle. */
  abandon(): void;
  replicaModes(): ReplicaStatus[];
  /** How many replicas there are when all are healthy; else undefined (see Engine). */
  healthyCount(): number | undefined;
  /** Sets replicas whose connection died while idle to ERR (see Engine). */
  noticeFailures(): Promise<void>;
  snapshots(): SnapshotInfo[];
  snapshot(name: string, now: Date): Promise<SnapshotInfo>;
  deleteSnapshot(name: string): Promise<void>;
  revert(name: string, now: Date, options?: { discardNewer?: boolean }): Promise<string[]>;
  snapshotDevice(name: string): BlockDevice;
  /** Grows the volume online (every replica); never shrinks. */
  expand(sizeBytes: number): Promise<void>;
  touchedBlocks(base: string | undefined, top: string, granuleBytes: number): Promise<Set<number>>;
  rebuild(
    target: Replica,
    options: CopyOptions & { replaces?: string; snapshotName: string; now: Date },
  ): Promise<RebuildProgress>;
  removeReplica(id: string): Replica;
  verify(onProgress?: (done: number, total: number) => void): Promise<Difference[]>;
  scrub(onProgress?: (done: number, total: number) => void): Promise<ScrubReport[]>;
}

export interface SupervisorEvent {
  type: 'engine-crashed' | 'engine-restarted' | 'engine-failed';
  volume: string;
  message: string;
}

export interface SupervisorOptions {
  volume: string;
  sizeBytes: number;
  start: () => Promise<SupervisedEngine>;
  clock: Clock;
  /** An operation older than this means the engine hangs; it is restarted. */
  hangTimeoutMs: number;
  /** Restarts allowed in a row before the volume is left failed. */
  maxRestarts?: number;
  onEvent?: (event: SupervisorEvent) => void;
  /** Hears of every client request as it ends (metrics, stats). */
  onIo?: IoObserver;
  /** The volume's I/O limits at start (`setQos` changes them live). */
  qos?: QosLimits;
}

/** What a client request was: its kind, bytes moved, seconds taken, and whether it failed. */
export type IoObserver = (kind: IoKind, bytes: number, seconds: number, failed: boolean) => void;
export type IoKind = 'read' | 'write' | 'flush' | 'trim' | 'zero';

interface Generation {
  engine: SupervisedEngine;
  /** Operations under way, by id, with the start time and how to end them if the engine dies. */
  inflight: Map<number, { startMs: number; reject: (err: Error) => void }>;
  dead: boolean;
}

/**
 * Per-volume isolation in the daemon's process (docs/ARCHITECTURE.md,
 * "Engine isolation"): every operation of one volume runs through its own
 * supervisor. An error that is not a CorralError (a bug, a failed assertion)
 * or an operation that hangs past `hangTimeoutMs` kills that volume's engine
 * only: its pending operations fail with EIO, the engine is reopened from
 * disk (as after a crash: unflushed writes may be gone) and I/O resumes.
 * Other volumes never notice.
 */
export class Supervisor implements BlockDevice {
  readonly volume: string;
  readonly #options: SupervisorOptions;
  /** Until the first engine is up (then its size: an expand grows it). */
  readonly #initialSize: number;
  #current: Generation | undefined;
  #ready: Promise<Generation>;
  #stopped = false;
  #restarts = 0;
  #consecutiveFailures = 0;
  #watchdog: { cancel(): void };
  #capabilities: Capabilities | undefined;
  readonly #qos: Qos;

  private constructor(options: SupervisorOptions, first: SupervisedEngine) {
    this.volume = options.volume;
    this.#initialSize = options.sizeBytes;
    this.#qos = new Qos(options.clock, options.qos);
    this.#options = options;
    const gen = this.#generation(first);
    this.#current = gen;
    this.#ready = Promise.resolve(gen);
    this.#capabilities = first.capabilities();
    this.#watchdog = options.clock.setInterval(
      () => this.#checkHangs(),
      Math.max(50, options.hangTimeoutMs / 4),
    );
  }

  static async start(options: SupervisorOptions): Promise<Supervisor> {
    return new Supervisor(options, await options.start());
  }

  get restarts(): number {
    return this.#restarts;
  }

  get engine(): SupervisedEngine | undefined {
    return this.#current?.engine;
  }

  /** New I/O limits, in effect for the next request (and those waiting). */
  setQos(limits: QosLimits): void {
    this.#qos.set(limits);
  }

  /** The current engine's: an online expand grows it, a restarted engine reads it from the record. */
  get sizeBytes(): number {
    return this.#current?.engine.sizeBytes ?? this.#initialSize;
  }

  #generation(engine: SupervisedEngine): Generation {
    return { engine, inflight: new Map(), dead: false };
  }

  capabilities(): Capabilities {
    if (!this.#capabilities)
      throw new CorralError('ENGINE_FAILED', `volume ${this.volume} has no engine`);
    return this.#capabilities;
  }

  #drained: (() => void) | undefined;
  #nextOpId = 0;

  /**
   * Runs one operation on the current engine. A client request (`io`) is
   * also timed for `onIo`, in the same frame: no extra promise per request.
   */
  async #run<T>(
    what: string,
    fn: (engine: SupervisedEngine) => Promise<T>,
    io?: { kind: IoKind; bytes: number },
  ): Promise<T> {
    // Over its limits a request waits here, in order, before the engine sees it (the hang
    // watchdog does not count the wait). Flushes, trims and zeroes are not limited.
    if (io && this.#qos.limited && (io.kind === 'read' || io.kind === 'write')) {
      const wait = this.#qos.admit(io.kind === 'write', io.bytes);
      if (wait) await wait;
    }
    if (this.#stopped) {
      if (io) this.#options.onIo?.(io.kind, io.bytes, 0, true);
      throw new CorralError('SHUTTING_DOWN', `Cannot ${what}: volume ${this.volume} is detaching`);
    }
    const gen = this.#current ?? (await this.#ready);
    if (gen.dead) return this.#run(what, fn, io);
    const id = this.#nextOpId++;
    const observe = io && this.#options.onIo;
    const t0 = observe ? performance.now() : 0;
    let failed = true;
    try {
      // Not Promise.race with a long-lived promise: every race would leave a reaction on it.
      const out = await new Promise<T>((resolve, reject) => {
        gen.inflight.set(id, { startMs: this.#options.clock.nowMs(), reject });
        fn(gen.engine).then(resolve, reject);
      });
      failed = false;
      return out;
    } catch (err) {
      throw this.#failure(gen, what, err);
    } finally {
      gen.inflight.delete(id);
      if (gen.inflight.size === 0) this.#drained?.();
      if (observe) observe(io.kind, io.bytes, (performance.now() - t0) / 1000, failed);
    }
  }

  /** A CorralError is the operation's own failure; anything else is a bug that ends this engine. */
  #failure(gen: Generation, what: string, err: unknown): CorralError {
    if (err instanceof CorralError) return err;
    this.#crashed(gen, err instanceof Error ? err : new Error(String(err)));
    return new CorralError(
      'ENGINE_FAILED',
      `Cannot ${what}: the engine of volume ${this.volume} failed and restarts`,
      {
        cause: err,
      },
    );
  }

  #checkHangs(): void {
    const gen = this.#current;
    if (!gen || gen.dead) return;
    const now = this.#options.clock.nowMs();
    for (const op of gen.inflight.values()) {
      if (now - op.startMs > this.#options.hangTimeoutMs) {
        this.#crashed(
          gen,
          new Error(`an operation has not completed in ${this.#options.hangTimeoutMs} ms`),
        );
        return;
      }
    }
  }

  #crashed(gen: Generation, err: Error): void {
    if (gen.dead) return;
    gen.dead = true;
    const failure = new CorralError(
      'ENGINE_FAILED',
      `engine of volume ${this.volume} failed: ${err.message}`,
      {
        cause: err,
      },
    );
    for (const op of gen.inflight.values()) op.reject(failure);
    gen.engine.abandon();
    this.#current = undefined;
    this.#options.onEvent?.({ type: 'engine-crashed', volume: this.volume, message: err.message });
    if (this.#stopped) return;
    this.#ready = this.#restart();
    this.#ready.catch(() => undefined);
  }

  async #restart(): Promise<Generation> {
    const max = this.#options.maxRestarts ?? 5;
    for (;;) {
      if (this.#stopped)
        throw new CorralError('SHUTTING_DOWN', `volume ${this.volume} is detaching`);
      try {
        const engine = await this.#options.start();
        const gen = this.#generation(engine);
        this.#current = gen;
        this.#restarts++;
        this.#consecutiveFailures = 0;
        this.#options.onEvent?.({
          type: 'engine-restarted',
          volume: this.volume,
          message: `restart ${this.#restarts}`,
        });
        return gen;
      } catch (err) {
        this.#consecutiveFailures++;
        if (this.#consecutiveFailures >= max) {
          const message = `engine of volume ${this.volume} could not be restarted: ${err instanceof Error ? err.message : String(err)}`;
          this.#options.onEvent?.({ type: 'engine-failed', volume: this.volume, message });
          throw new CorralError('ENGINE_FAILED', message, { cause: err });
        }
      }
    }
  }

  read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    return this.#run('read', (e) => e.read(offset, length, into), { kind: 'read', bytes: length });
  }
  write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    return this.#run('write', (e) => e.write(offset, data, options), {
      kind: 'write',
      bytes: data.length,
    });
  }
  flush(): Promise<void> {
    return this.#run('flush', (e) => e.flush(), { kind: 'flush', bytes: 0 });
  }
  trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    return this.#run('trim', (e) => e.trim(offset, length, options), {
      kind: 'trim',
      bytes: length,
    });
  }
  zero(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return this.#run('write zeroes', (e) => e.zero(offset, length, options), {
      kind: 'zero',
      bytes: length,
    });
  }
  extents(offset: number, length: number): Promise<Extent[]> {
    return this.#run('map', (e) => e.extents(offset, length));
  }

  /**
   * A read-only view of snapshot `name` whose every request goes through
   * this supervisor like the volume's own (the hang watchdog applies, and
   * after an engine restart it reads from the new engine).
   */
  snapshotDevice(name: string): BlockDevice {
    const view = (e: SupervisedEngine) => e.snapshotDevice(name);
    // The snapshot's own size (it keeps the one it was taken at).
    const size =
      this.#current?.engine.snapshots().find((s) => s.name === name)?.sizeBytes ?? this.sizeBytes;
    return readOnlyDevice(`snapshot ${this.volume}@${name}`, {
      sizeBytes: size,
      capabilities: () => this.capabilities(),
      read: (offset, length, into) =>
        this.#run(`read ${this.volume}@${name}`, (e) => view(e).read(offset, length, into)),
      extents: (offset, length) =>
        this.#run(`map ${this.volume}@${name}`, (e) => view(e).extents(offset, length)),
    });
  }

  #controls = 0;
  readonly #controlWaiters: Array<() => void> = [];

  /**
   * Runs a control operation (snapshot, delete, revert) on the current
   * engine. Not under the hang watchdog: merging a large snapshot is slow
   * but not stuck. Detach waits for it.
   */
  async control<T>(what: string, fn: (engine: SupervisedEngine) => Promise<T> | T): Promise<T> {
    if (this.#stopped)
      throw new CorralError('SHUTTING_DOWN', `Cannot ${what}: volume ${this.volume} is detaching`);
    const gen = this.#current ?? (await this.#ready);
    this.#controls++;
    try {
      return await fn(gen.engine);
    } catch (err) {
      throw this.#failure(gen, what, err);
    } finally {
      this.#controls--;
      if (this.#controls === 0) for (const w of this.#controlWaiters.splice(0)) w();
    }
  }

  /** Flushes and closes the engine; later calls fail with SHUTTING_DOWN. */
  async stop(): Promise<void> {
    if (this.#stopped) return;
    const gen = this.#current ?? (await this.#ready.catch(() => undefined));
    this.#stopped = true;
    this.#watchdog.cancel();
    if (!gen || gen.dead) return;
    // Operations already admitted finish first: closing under them would lose acknowledged writes.
    if (gen.inflight.size > 0) await new Promise<void>((resolve) => (this.#drained = resolve));
    if (this.#controls > 0)
      await new Promise<void>((resolve) => this.#controlWaiters.push(resolve));
    await gen.engine.close();
  }
}
