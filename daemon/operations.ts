import { randomBytes } from 'node:crypto';
import { CorralError } from '../common/errors.ts';
import type { EventLog } from './events.ts';

export interface OperationProgress {
  phase: string;
  done: number;
  total: number;
  bytes: number;
}

export interface Operation {
  id: string;
  kind: string;
  volume?: string;
  /** What it works on, for people: a backup name, a target. */
  subject: string;
  state: 'running' | 'succeeded' | 'failed';
  progress: OperationProgress;
  startedAt: string;
  endedAt?: string;
  /** Bytes per second over the whole run so far. */
  bytesPerSecond: number;
  result?: unknown;
  error?: { code: string; message: string };
}

/**
 * Long work (backup, restore, backup delete, recurring jobs): each run is an
 * operation the API shows while it runs (`GET /v1/operations/:id`) and
 * records as events when it starts and ends. Bounded: old finished ones go.
 */
export class Operations {
  readonly #ops = new Map<string, Operation>();
  readonly #events: EventLog;
  readonly #keep: number;

  /** In a cluster, ids name the node (`op-n1_…`): a call on another node is sent here. */
  readonly #node: string | undefined;
  /** Hears of every operation as it ends (the metrics count them). */
  onFinish?: (op: Operation) => void;

  constructor(events: EventLog, keep = 200, node?: string) {
    this.#events = events;
    this.#keep = keep;
    this.#node = node;
  }

  /** Starts `work` now and returns its operation at once; `work` reports progress through `update`. */
  start<T>(
    kind: string,
    subject: string,
    volume: string | undefined,
    work: (update: (p: OperationProgress) => void) => Promise<T>,
    describe: (result: T) => string,
  ): { operation: Operation; done: Promise<T> } {
    const op: Operation = {
      id: `op-${this.#node !== undefined ? `${this.#node}_` : ''}${randomBytes(6).toString('hex')}`,
      kind,
      subject,
      ...(volume !== undefined ? { volume } : {}),
      state: 'running',
      progress: { phase: 'starting', done: 0, total: 0, bytes: 0 },
      startedAt: new Date().toISOString(),
      bytesPerSecond: 0,
    };
    this.#ops.set(op.id, op);
    this.#trim();
    const started = Date.now();
    this.#events.add({
      type: `${kind}-started`,
      ...(volume !== undefined ? { volume } : {}),
      message: `${subject} (operation ${op.id})`,
    });
    const update = (p: OperationProgress): void => {
      op.progress = p;
      const seconds = (Date.now() - started) / 1000;
      op.bytesPerSecond = seconds > 0 ? Math.round(p.bytes / seconds) : 0;
    };
    const done = (async () => {
      try {
        const result = await work(update);
        op.state = 'succeeded';
        op.result = result;
        this.#events.add({
          type: `${kind}-succeeded`,
          ...(volume !== undefined ? { volume } : {}),
          message: `${subject}: ${describe(result)}`,
        });
        return result;
      } catch (err) {
        op.state = 'failed';
        op.error = {
          code: err instanceof CorralError ? err.code : 'INTERNAL',
          message: err instanceof Error ? err.message : String(err),
        };
        this.#events.add({
          type: `${kind}-failed`,
          ...(volume !== undefined ? { volume } : {}),
          message: `${subject}: ${op.error.message}`,
        });
        throw err;
      } finally {
        op.endedAt = new Date().toISOString();
        const seconds = (Date.now() - started) / 1000;
        op.bytesPerSecond = seconds > 0 ? Math.round(op.progress.bytes / seconds) : 0;
        this.onFinish?.(op);
      }
    })();
    // The caller may not wait; the outcome is in the operation and the events.
    done.catch(() => undefined);
    return { operation: op, done };
  }

  get(id: string): Operation {
    const op = this.#ops.get(id);
    if (!op) throw new CorralError('NOT_FOUND', `No operation ${id}`);
    return op;
  }

  list(): Operation[] {
    return [...this.#ops.values()];
  }

  #trim(): void {
    if (this.#ops.size <= this.#keep) return;
    for (const [id, op] of this.#ops) {
      if (this.#ops.size <= this.#keep) break;
      if (op.state !== 'running') this.#ops.delete(id);
    }
  }
}

/** The node an operation id names (`op-<node>_<hex>`), if any. */
export function operationNode(id: string): string | undefined {
  const m = /^op-([a-z0-9][a-z0-9.-]*)_[0-9a-f]+$/.exec(id);
  return m?.[1];
}
