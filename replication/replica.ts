import type { BlockOps, Extent } from './block-device.ts';

export interface SnapshotInfo {
  name: string;
  createdAt: string;
  /** The snapshot below, if any. */
  parent: string | undefined;
  /** Bytes of data this layer holds itself. */
  allocatedBytes: number;
  /** The volume's size when it was taken: a later expand does not change it. */
  sizeBytes: number;
}

export type ReplicaMode = 'RW' | 'WO' | 'ERR';

/** What a scrub found on one replica; `failed`: set to ERR, to be rebuilt from a clean one. */
export interface ScrubReport {
  replica: string;
  location: string;
  bad: BadBlock[];
  failed: boolean;
}

/** A block that failed its checksum: in a snapshot layer, or in the head when `snapshot` is absent. */
export interface BadBlock {
  offset: number;
  snapshot?: string;
}

/**
 * How the engine reaches one copy of a volume, local or remote alike: block
 * I/O on the head, the snapshot chain, and what rebuild, scrub and verify
 * use. Inputs are already validated by the engine (in range); a replica asserts.
 */
export interface Replica extends BlockOps, ChainOps, CopyOps {
  readonly id: string;
  /** Where it lives: 'local' or a peer's URL. Reads prefer local replicas. */
  readonly location: string;
  readonly sizeBytes: number;
  /** Grows with every write; persisted with each flush. */
  revision(): bigint;
  /** Why it cannot serve any more (a replica across the network whose connection died), if so. */
  readonly failure?: string | undefined;
  /**
   * Flushes, then releases files and connections — always, even when the
   * flush fails; then it rejects, because what was written since the last
   * flush may not be durable. A second call is harmless.
   */
  close(): Promise<void>;
  /** After an engine fault: persist nothing more; release resources once idle. */
  abandon(): void;
  /**
   * Grows the replica to `sizeBytes` (the same size again is done already);
   * the caller has paused I/O. Atomic: after a crash the replica has either size.
   */
  expand(sizeBytes: number): Promise<void>;
}

/** The snapshot chain: freeze, merge away, go back, read what a snapshot holds. */
export interface ChainOps {
  snapshots(): SnapshotInfo[];
  /**
   * Freezes the head as a snapshot; the caller has paused I/O. `sizeBytes`:
   * the snapshot's size when it is not the replica's (a rebuild copying an
   * older snapshot of an expanded volume).
   */
  snapshot(name: string, now: Date, sizeBytes?: number): Promise<void>;
  /** Removes a snapshot online, its data merged into the next layer. */
  deleteSnapshot(name: string): Promise<void>;
  /** A new head on top of the snapshot; returns the newer snapshots it removed. The caller has paused I/O. */
  revert(name: string, now: Date, options?: { discardNewer?: boolean }): Promise<string[]>;
  readSnapshot(
    name: string,
    offset: number,
    length: number,
    into?: Uint8Array,
  ): Promise<Uint8Array>;
  extentsSnapshot(name: string, offset: number, length: number): Extent[] | Promise<Extent[]>;
  /** Indexes of `granuleBytes` blocks touched by layers above `base` (or any) up to `top`. */
  touchedBlocks(
    base: string | undefined,
    top: string,
    granuleBytes: number,
  ): Set<number> | Promise<Set<number>>;
}

/** What rebuild, scrub and verify need beyond the chain: layers compared and copied block by block. */
export interface CopyOps {
  /** Rebuild: per granule of snapshot layer `name` holding anything, a digest of its states and data. */
  layerDigests(
    name: string,
    offset: number,
    length: number,
    granuleBytes: number,
  ): Promise<Array<[number, string]>>;
  /**
   * Rebuild: a snapshot layer's block states (0 absent, 1 data, 2 zero) and its DATA blocks'
   * bytes — read into `into` (at least `length` bytes) where the replica can, else into a
   * buffer of its own.
   */
  readLayerChunk(
    name: string,
    offset: number,
    length: number,
    mask?: Uint8Array,
    into?: Uint8Array,
  ): Promise<{ states: Uint8Array; data: Uint8Array }>;
  /** Rebuild: makes a snapshot layer's range (the blocks `mask` selects) equal to `readLayerChunk`'s answer elsewhere. */
  writeLayerChunk(
    name: string,
    offset: number,
    states: Uint8Array,
    data: Uint8Array,
    mask?: Uint8Array,
  ): Promise<void>;
  /** Rebuild: 8 bytes per block (state, 7 bytes of its data's SHA-256). */
  layerBlockDigests(name: string, offset: number, length: number): Promise<Uint8Array>;
  /**
   * Rebuild: 5 bytes per block of a snapshot layer's range, from memory (no
   * data read): its state, then its stored checksum (uint32 LE; 0 when it
   * holds no data or its sum is unknown). A copy into a replica that held
   * nothing there is checked against these.
   */
  layerSums(name: string, offset: number, length: number): Promise<Uint8Array>;
  /** Rebuild: takes the source's revision once the copy is complete, durably. */
  setRevision(revision: bigint): Promise<void>;
  /** Scrub: every layer's DATA blocks in the range read and checked against their checksums. */
  checkBlocks(offset: number, length: number): Promise<BadBlock[]>;
  /** Verify: SHA-256 per granule of the volume at a snapshot (undefined: now). */
  viewDigests(
    snapshot: string | undefined,
    offset: number,
    length: number,
    granuleBytes: number,
  ): Promise<string[]>;
}
