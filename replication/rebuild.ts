import { assert } from '../common/assert.ts';
import { BufferPool } from '../common/buffer-pool.ts';
import { concurrently } from '../common/concurrently.ts';
import { CorralError } from '../common/errors.ts';
import { Pacer } from '../common/pacer.ts';
import type { Clock } from '../common/clock.ts';
import { BLOCK_SIZE } from './block-device.ts';
import type { Replica } from './replica.ts';

/** Rebuild and verify compare in granules of this size, and ask for this much per request. */
export const GRANULE_BYTES = 1024 * 1024;
export const WINDOW_BYTES = 64 * 1024 * 1024;
/** Granules copied at once: round trips to both replicas overlap instead of adding up. */
const COPIES_IN_FLIGHT = 4;
/**
 * The granules in flight, read into buffers used again: a fresh 1 MiB buffer per granule (and a
 * second one joining it with its header) had the engine's garbage collector at 18 % of its CPU
 * during a rebuild.
 */
const copyBuffers = new BufferPool(2 * COPIES_IN_FLIGHT * GRANULE_BYTES);
assert(
  GRANULE_BYTES % BLOCK_SIZE === 0 && WINDOW_BYTES % GRANULE_BYTES === 0,
  'rebuild windows are whole granules of whole blocks',
);

export interface RebuildProgress {
  /** Bytes of layers compared so far, of `total`. */
  done: number;
  total: number;
  /** Bytes copied (data of differing granules): what a short absence keeps small. */
  bytesCopied: number;
  layers: number;
  layersSkipped: number;
  /** Replicas read from (`source` and `alsoFrom`). */
  sources: number;
}

export interface CopyOptions {
  clock: Clock;
  /** Copy no faster than this (bytes per second); undefined for no limit. */
  bytesPerSecond?: number;
  signal?: AbortSignal;
  onProgress?: (p: RebuildProgress) => void;
  /**
   * How many client requests the volume has taken so far: while it grows, the
   * copy yields (two granules at a time, at most BUSY_BYTES_PER_SECOND), so
   * that clients keep their latency; idle, it runs at full speed.
   */
  clientRequests?: () => number;
  /**
   * Other healthy replicas holding the same layers as `source`: granules are
   * read from them and `source` in turn, so that several disks and links
   * share the copy. Digests and checks stay `source`'s; a granule another one
   * gave that the check refuses is copied again from `source`.
   */
  alsoFrom?: readonly Replica[];
}

/** A rebuild's pace while clients use the volume (unless `--rebuild-rate` is lower). */
export const BUSY_BYTES_PER_SECOND = 150 * 1000 * 1000;
/** Copies in flight while clients use the volume. */
const BUSY_COPIES = 2;
/** How recent client requests must be for the copy to yield. */
const BUSY_WINDOW_MS = 50;

/**
 * Makes every snapshot layer of `target` equal to `source`'s: per granule,
 * the digests of both sides are compared and only differing granules are
 * copied, then checked again on the target. A layer the target already holds
 * unchanged costs its digests only. Both chains must name the same snapshots.
 */
export async function copyLayers(
  source: Replica,
  target: Replica,
  sizeBytes: number,
  options: CopyOptions,
): Promise<RebuildProgress> {
  const names = source.snapshots().map((s) => s.name);
  const progress: RebuildProgress = {
    done: 0,
    total: names.length * sizeBytes,
    bytesCopied: 0,
    layers: names.length,
    layersSkipped: 0,
    sources: 1 + (options.alsoFrom?.length ?? 0),
  };
  const pacer = new Pacer(options.clock, options.bytesPerSecond);
  const clients = {
    count: options.clientRequests?.() ?? 0,
    atMs: options.clock.elapsedMs(),
    busy: false,
  };
  /** Whether clients sent requests within the last window (sampled: many copies may ask). */
  const busy = (): boolean => {
    if (!options.clientRequests) return false;
    const now = options.clock.elapsedMs();
    if (now - clients.atMs >= BUSY_WINDOW_MS) {
      const count = options.clientRequests();
      clients.busy = count !== clients.count;
      clients.count = count;
      clients.atMs = now;
    }
    return clients.busy;
  };
  /** After a copy, while clients are busy: paced to BUSY_BYTES_PER_SECOND over BUSY_COPIES. */
  const yieldToClients = async (bytes: number, startedMs: number): Promise<void> => {
    if (!busy()) return;
    const perCopy = BUSY_BYTES_PER_SECOND / BUSY_COPIES;
    const wait = (bytes / perCopy) * 1000 - (options.clock.elapsedMs() - startedMs);
    if (wait > 1) await options.clock.sleep(wait);
  };
  /**
   * COPIES_IN_FLIGHT copies at a time, BUSY_COPIES while clients are busy
   * (the other workers wait a window, then look again).
   */
  const copies = (count: number, copyOne: (i: number) => Promise<void>): Promise<void> =>
    concurrently(count, COPIES_IN_FLIGHT, copyOne, (worker) =>
      worker >= BUSY_COPIES && busy() ? options.clock.sleep(BUSY_WINDOW_MS) : undefined,
    );
  const sources = [source, ...(options.alsoFrom ?? [])];
  for (const name of names) {
    let copiedHere = 0;
    for (let offset = 0; offset < sizeBytes; offset += WINDOW_BYTES) {
      if (options.signal?.aborted)
        throw new CorralError('SHUTTING_DOWN', `Rebuild of replica ${target.id} was stopped`);
      const length = Math.min(WINDOW_BYTES, sizeBytes - offset);
      const copy = async (
        g: number,
        mask: Uint8Array | undefined,
        from = sources[g % sources.length]!,
      ): Promise<void> => {
        const startedMs = options.clock.elapsedMs();
        const at = g * GRANULE_BYTES;
        const n = Math.min(GRANULE_BYTES, sizeBytes - at);
        let buffer = copyBuffers.acquire(n);
        let chunk: { states: Uint8Array; data: Uint8Array };
        try {
          chunk = await from.readLayerChunk(name, at, n, mask, buffer);
        } catch (err) {
          // Another source that fails (its node died) leaves the copy to the first.
          if (from === source) throw err;
          buffer = copyBuffers.acquire(n);
          chunk = await source.readLayerChunk(name, at, n, mask, buffer);
        }
        await target.writeLayerChunk(name, at, chunk.states, chunk.data, mask);
        // Only after success: a failed copy's buffer may still be on its way somewhere.
        copyBuffers.release(buffer);
        progress.bytesCopied += chunk.data.length;
        copiedHere += chunk.data.length;
        await pacer.paced(chunk.data.length);
        await yieldToClients(chunk.data.length, startedMs);
      };
      /** Granules the check refused copied again from `source`, when others served some. */
      const recopied = async (granules: number[]): Promise<boolean> => {
        if (granules.length === 0 || sources.length === 1) return false;
        for (const g of granules) await copy(g, undefined, source);
        return true;
      };
      const [theirSums, mySums] = await Promise.all([
        target.layerSums(name, offset, length),
        source.layerSums(name, offset, length),
      ]);
      if (holdsNothing(theirSums) && !lacksSums(mySums)) {
        // A window the target holds nothing of (a new replica's): what the source holds is
        // copied whole, unhashed, and checked against the source's block checksums after.
        const todo = granulesHolding(mySums, offset);
        await copies(todo.length, (i) => copy(todo[i]!, undefined));
        if (todo.length > 0) {
          const sums = () => target.layerSums(name, offset, length);
          let after = await sums();
          if (await recopied(differingGranules(mySums, after, offset))) after = await sums();
          const bad = firstDifference(mySums, after);
          if (bad !== undefined)
            throw new CorralError(
              'IO_ERROR',
              `Rebuild of replica ${target.id}: layer ${name} at ${offset + bad * BLOCK_SIZE} differs from the source after the copy`,
            );
        }
      } else {
        const [want, have] = await Promise.all([
          source.layerDigests(name, offset, length, GRANULE_BYTES),
          target.layerDigests(name, offset, length, GRANULE_BYTES),
        ]);
        const wanted = new Map(want);
        const held = new Map(have);
        const differing = new Set<number>();
        for (const [g, d] of want) if (held.get(g) !== d) differing.add(g);
        for (const [g] of have) if (!wanted.has(g)) differing.add(g);
        const todo = [...differing].sort((a, b) => a - b);
        await copies(todo.length, async (i) => {
          const g = todo[i]!;
          const at = g * GRANULE_BYTES;
          const n = Math.min(GRANULE_BYTES, sizeBytes - at);
          // Within a granule the target holds data in, only the blocks whose state or bytes
          // differ travel; one it holds none in is copied whole.
          await copy(
            g,
            held.has(g) ? await differingBlocks(source, target, name, at, n) : undefined,
          );
        });
        if (differing.size > 0) {
          // Verified by checksum: the target's granules must now digest as the source's.
          const digests = async () =>
            new Map(await target.layerDigests(name, offset, length, GRANULE_BYTES));
          let after = await digests();
          if (await recopied([...differing].filter((g) => after.get(g) !== wanted.get(g))))
            after = await digests();
          for (const g of differing) {
            if (after.get(g) !== wanted.get(g))
              throw new CorralError(
                'IO_ERROR',
                `Rebuild of replica ${target.id}: layer ${name} at ${g * GRANULE_BYTES} differs from the source after the copy`,
              );
          }
        }
      }
      progress.done += length;
      options.onProgress?.({ ...progress });
    }
    if (copiedHere === 0) progress.layersSkipped++;
  }
  return progress;
}

/** `layerSums` bytes per block: the state, then the checksum. */
const SUM_BYTES = 5;

/** True when every block of a `layerSums` answer is absent (ABSENT is 0). */
function holdsNothing(sums: Uint8Array): boolean {
  for (let i = 0; i < sums.length; i += SUM_BYTES) if (sums[i] !== 0) return false;
  return true;
}

/** True when a DATA block (state 1) has no known checksum: such a copy is checked by digests. */
function lacksSums(sums: Uint8Array): boolean {
  for (let i = 0; i < sums.length; i += SUM_BYTES)
    if (
      sums[i] === 1 &&
      sums[i + 1] === 0 &&
      sums[i + 2] === 0 &&
      sums[i + 3] === 0 &&
      sums[i + 4] === 0
    )
      return true;
  return false;
}

/** The granules (volume-wide indexes) of a window starting at `offset` with any block not absent. */
function granulesHolding(sums: Uint8Array, offset: number): number[] {
  const out: number[] = [];
  for (let b = 0; b * SUM_BYTES < sums.length; b++) {
    if (sums[b * SUM_BYTES] === 0) continue;
    const g = granuleOf(offset, b);
    if (out.at(-1) !== g) out.push(g);
  }
  return out;
}

/** The granule (volume-wide index) of block `b` of a window starting at `offset`. */
function granuleOf(offset: number, b: number): number {
  return Math.floor((offset + b * BLOCK_SIZE) / GRANULE_BYTES);
}

/** The first block whose state or checksum differs between two `layerSums` answers. */
function firstDifference(a: Uint8Array, b: Uint8Array): number | undefined {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return Math.floor(i / SUM_BYTES);
  return undefined;
}

/** The granules (volume-wide indexes) of a window at `offset` where two `layerSums` answers differ. */
function differingGranules(a: Uint8Array, b: Uint8Array, offset: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < a.length; i++) {
    if (a[i] === b[i]) continue;
    const g = granuleOf(offset, Math.floor(i / SUM_BYTES));
    if (out.at(-1) !== g) out.push(g);
  }
  return out;
}

/** A byte per block of the range: 1 where the two layers' block state or digest differ. */
async function differingBlocks(
  source: Replica,
  target: Replica,
  name: string,
  at: number,
  n: number,
): Promise<Uint8Array> {
  const [mine, theirs] = await Promise.all([
    source.layerBlockDigests(name, at, n),
    target.layerBlockDigests(name, at, n),
  ]);
  const mask = new Uint8Array(n / BLOCK_SIZE);
  for (let b = 0; b < mask.length; b++) {
    for (let k = b * 8; k < b * 8 + 8; k++) {
      if (mine[k] !== theirs[k]) {
        mask[b] = 1;
        break;
      }
    }
  }
  return mask;
}

export interface Difference {
  /** Snapshot name, or undefined for the live volume. */
  snapshot: string | undefined;
  offset: number;
  length: number;
  /** Replica ids whose bytes differ from the first replica's. */
  replicas: string[];
}

/**
 * Compares every view (each snapshot and the live volume) of the replicas,
 * granule by granule, from digests the replicas compute where they live.
 * `quiesce` runs around each window of the live volume so that writes in
 * flight do not show up as differences.
 */
export async function compareReplicas(
  replicas: Replica[],
  sizeBytes: number,
  quiesce: <T>(fn: () => Promise<T>) => Promise<T>,
  onProgress?: (done: number, total: number) => void,
): Promise<Difference[]> {
  const views: Array<string | undefined> = [
    ...replicas[0]!.snapshots().map((s) => s.name),
    undefined,
  ];
  const out: Difference[] = [];
  let done = 0;
  for (const view of views) {
    for (let offset = 0; offset < sizeBytes; offset += WINDOW_BYTES) {
      const length = Math.min(WINDOW_BYTES, sizeBytes - offset);
      const digest = () =>
        Promise.all(replicas.map((r) => r.viewDigests(view, offset, length, GRANULE_BYTES)));
      const all = view === undefined ? await quiesce(digest) : await digest();
      const first = all[0]!;
      first.forEach((d, i) => {
        const differ = replicas.filter((_, k) => all[k]![i] !== d).map((r) => r.id);
        if (differ.length === 0) return;
        const at = offset + i * GRANULE_BYTES;
        const last = out[out.length - 1];
        if (
          last &&
          last.snapshot === view &&
          last.offset + last.length === at &&
          last.replicas.join() === differ.join()
        )
          last.length += Math.min(GRANULE_BYTES, sizeBytes - at);
        else
          out.push({
            snapshot: view,
            offset: at,
            length: Math.min(GRANULE_BYTES, sizeBytes - at),
            replicas: differ,
          });
      });
      done += length;
      onProgress?.(done, views.length * sizeBytes);
    }
  }
  return out;
}
