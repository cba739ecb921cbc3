import type {
  BlockDevice,
  Capabilities,
  Extent,
  WriteOptions,
  ZeroOptions,
} from './block-device.ts';
import type { Replica, SnapshotInfo, ScrubReport } from './replica.ts';
import type { CopyOptions, Difference, RebuildProgress } from './rebuild.ts';
import type { ReplicaStatus, SupervisedEngine } from './supervisor.ts';

export type FaultMode = 'none' | 'throw' | 'hang';

/**
 * A filter (docs/CONTRIBUTING.md, after nbdkit) for tests of engine isolation: 'throw' makes
 * the next operations fail like a bug would (a plain Error), 'hang' makes
 * them never complete. Enabled only with CORRAL_FAULT_INJECTION=1.
 */
export class FaultFilter implements SupervisedEngine {
  mode: FaultMode = 'none';
  readonly #next: SupervisedEngine;
  readonly sizeBytes: number;

  constructor(next: SupervisedEngine) {
    this.#next = next;
    this.sizeBytes = next.sizeBytes;
  }

  #gate(): Promise<void> {
    if (this.mode === 'throw') return Promise.reject(new Error('injected engine fault'));
    if (this.mode === 'hang') return new Promise<void>(() => undefined);
    return Promise.resolve();
  }

  capabilities(): Capabilities {
    return this.#next.capabilities();
  }
  async read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    await this.#gate();
    return this.#next.read(offset, length, into);
  }
  async write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    await this.#gate();
    return this.#next.write(offset, data, options);
  }
  async flush(): Promise<void> {
    await this.#gate();
    return this.#next.flush();
  }
  async trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    await this.#gate();
    return this.#next.trim(offset, length, options);
  }
  async zero(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    await this.#gate();
    return this.#next.zero(offset, length, options);
  }
  async extents(offset: number, length: number): Promise<Extent[]> {
    await this.#gate();
    return this.#next.extents(offset, length);
  }
  close(): Promise<void> {
    return this.#next.close();
  }
  abandon(): void {
    this.#next.abandon();
  }
  noticeFailures(): Promise<void> {
    return this.#next.noticeFailures();
  }

  replicaModes(): ReplicaStatus[] {
    return this.#next.replicaModes();
  }
  snapshots(): SnapshotInfo[] {
    return this.#next.snapshots();
  }
  snapshot(name: string, now: Date): Promise<SnapshotInfo> {
    return this.#next.snapshot(name, now);
  }
  deleteSnapshot(name: string): Promise<void> {
    return this.#next.deleteSnapshot(name);
  }
  revert(name: string, now: Date, options?: { discardNewer?: boolean }): Promise<string[]> {
    return this.#next.revert(name, now, options);
  }
  snapshotDevice(name: string): BlockDevice {
    return this.#next.snapshotDevice(name);
  }
  touchedBlocks(base: string | undefined, top: string, granuleBytes: number): Promise<Set<number>> {
    return this.#next.touchedBlocks(base, top, granuleBytes);
  }
  rebuild(
    target: Replica,
    options: CopyOptions & { replaces?: string; snapshotName: string; now: Date },
  ): Promise<RebuildProgress> {
    return this.#next.rebuild(target, options);
  }
  removeReplica(id: string): Replica {
    return this.#next.removeReplica(id);
  }
  scrub(onProgress?: (done: number, total: number) => void): Promise<ScrubReport[]> {
    return this.#next.scrub(onProgress);
  }
  verify(onProgress?: (done: number, total: number) => void): Promise<Difference[]> {
    return this.#next.verify(onProgress);
  }
}
