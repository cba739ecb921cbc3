import type { BlockOps } from './block-device.ts';

export type ReplicaMode = 'RW' | 'WO' | 'ERR';

/**
 * How the engine reaches one copy of a volume, local or remote alike.
 * Inputs are already validated by the engine (in range); a replica asserts.
 */
export interface Replica extends BlockOps {
  readonly id: string;
  /** Where it lives: 'local' or a peer's URL. Reads prefer local replicas. */
  readonly location: string;
  readonly sizeBytes: number;
  /** Grows with every write; persisted with each flush. */
  revision(): bigint;
  /** Flushes, then releases files and connections. */
  close(): Promise<void>;
  /** After an engine fault: persist nothing more; release resources once idle. */
  abandon(): void;
}
