import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import type { JobInfo } from './jobs.ts';
import type { Operation } from './operations.ts';
import type { IoKind, IoObserver } from '../replication/supervisor.ts';
import { syncWrites } from '../replication/file-io.ts';
import type { NodeInfo } from './node-info.ts';
import type { VolumeInfo } from './volume-info.ts';

/** Latency buckets, in seconds: 50 µs (a cached 4k read) to 2.5 s (a flush behind a slow disk). */
const LATENCY_BUCKETS = [
  0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
];

const KINDS: IoKind[] = ['read', 'write', 'flush', 'trim', 'zero'];
const KIND_COUNT = KINDS.length;
const KIND_INDEX: Record<IoKind, number> = { read: 0, write: 1, flush: 2, trim: 3, zero: 4 };

/**
 * One volume's requests, summed where they happen: a few numbers and an
 * array of bucket counts per kind, so that a request costs tens of
 * nanoseconds; the text Prometheus reads is made from them at scrape time.
 */
class VolumeMeter {
  readonly ops = new Float64Array(KIND_COUNT);
  readonly bytes = new Float64Array(KIND_COUNT);
  readonly errors = new Float64Array(KIND_COUNT);
  readonly sums = new Float64Array(KIND_COUNT);
  /** Per kind, the count of requests in each latency bucket (not cumulative), +Inf last. */
  readonly buckets = Array.from(
    { length: KIND_COUNT },
    () => new Float64Array(LATENCY_BUCKETS.length + 1),
  );

  observe(k: number, bytes: number, seconds: number, failed: boolean): void {
    if (failed) {
      this.errors[k]!++;
      return;
    }
    this.ops[k]!++;
    this.bytes[k]! += bytes;
    this.sums[k]! += seconds;
    let i = 0;
    while (i < LATENCY_BUCKETS.length && seconds > LATENCY_BUCKETS[i]!) i++;
    this.buckets[k]![i]!++;
  }

  quantiles(k: number): { p50: number; p99: number } {
    const counts = this.buckets[k]!;
    const total = this.ops[k]!;
    const at = (q: number) => {
      if (total === 0) return 0;
      let seen = 0;
      for (let i = 0; i < counts.length; i++) {
        seen += counts[i]!;
        if (seen >= q * total) return LATENCY_BUCKETS[i] ?? Infinity;
      }
      return Infinity;
    };
    return { p50: at(0.5), p99: at(0.99) };
  }
}

/** A metric as prom-client's registry formats it (what `get()` of its own metrics returns). */
interface MetricValue {
  value: number;
  labels: Record<string, string>;
  metricName?: string;
}

/** One volume's totals, as `volume stats` shows them. */
export interface VolumeStats {
  volume: string;
  readOps: number;
  writeOps: number;
  readBytes: number;
  writeBytes: number;
  flushOps: number;
  errors: number;
  /** Latency quantiles estimated from the histogram (upper bucket bounds, seconds). */
  readLatency: { p50: number; p99: number };
  writeLatency: { p50: number; p99: number };
}

/**
 * The daemon's Prometheus metrics (`GET /metrics`): per volume, requests,
 * bytes and errors by kind as counters and latency as histograms (what
 * Prometheus rates and quantiles are made from), its state and replicas'
 * modes as gauges read when scraped; per node, capacity and free space;
 * the process's CPU and memory. Labels are volume, kind, replica, state
 * and a disk's replica root only: a bounded set, never per request or per block.
 */
export class Metrics {
  readonly registry = new Registry();
  readonly #meters = new Map<string, VolumeMeter>();

  readonly #operations: Counter<'kind' | 'volume' | 'outcome'>;
  readonly #operationBytes: Counter<'kind' | 'volume'>;
  readonly #lastSuccess: Gauge<'kind' | 'volume'>;

  constructor(source: {
    volumes: () => Promise<VolumeInfo[]>;
    node: () => Promise<NodeInfo>;
    jobs?: () => Promise<JobInfo[]>;
  }) {
    const registers = [this.registry];
    // Long work (backups, restores, rebuilds, verify, scrub, deletes): counted as it ends.
    this.#operations = new Counter({
      name: 'corral_operations_total',
      help: 'Long operations that ended, by kind (backup, restore, rebuild, ...), volume and outcome',
      labelNames: ['kind', 'volume', 'outcome'],
      registers,
    });
    this.#operationBytes = new Counter({
      name: 'corral_operation_bytes_total',
      help: 'Bytes long operations moved (a backup: bytes stored in the target; a rebuild: copied)',
      labelNames: ['kind', 'volume'],
      registers,
    });
    this.#lastSuccess = new Gauge({
      name: 'corral_operation_last_success_timestamp_seconds',
      help: 'When an operation of this kind last succeeded on the volume (Unix time)',
      labelNames: ['kind', 'volume'],
      registers,
    });
    const jobs = source.jobs;
    if (jobs) {
      const lastRun = new Gauge({
        name: 'corral_job_last_run_timestamp_seconds',
        help: 'When a recurring job last ran (Unix time), with its outcome',
        labelNames: ['job', 'volume', 'task', 'outcome'],
        registers,
        collect: async () => {
          lastRun.reset();
          for (const j of await jobs())
            if (j.lastRunAt !== undefined)
              lastRun.set(
                {
                  job: j.id,
                  volume: j.volume,
                  task: j.task,
                  outcome: j.lastOutcome?.startsWith('failed') === true ? 'failed' : 'succeeded',
                },
                Date.parse(j.lastRunAt) / 1000,
              );
        },
      });
    }
    // The event-loop lag histogram samples with a timer: prom-client's 10 ms default woke an
    // idle daemon 100 times a second (most of its idle CPU); 10 a second still shows a stall.
    collectDefaultMetrics({ register: this.registry, eventLoopMonitoringPrecision: 100 });
    const perKind = (name: string, help: string, pick: (m: VolumeMeter) => Float64Array): void =>
      this.#register(name, help, 'counter', () =>
        [...this.#meters].flatMap(([volume, m]) =>
          KINDS.map((kind, k) => ({ value: pick(m)[k]!, labels: { volume, kind } })),
        ),
      );
    perKind(
      'corral_volume_ops_total',
      'Client requests to a volume, by kind (read, write, flush, trim, zero)',
      (m) => m.ops,
    );
    perKind(
      'corral_volume_bytes_total',
      'Bytes of client requests to a volume, by kind',
      (m) => m.bytes,
    );
    perKind(
      'corral_volume_errors_total',
      'Client requests to a volume that failed, by kind',
      (m) => m.errors,
    );
    this.#register(
      'corral_write_backoffs_total',
      'Times a disk’s writes were sent off the event loop for a while: two took too long within a second (a disk that falls behind), by replica root',
      'counter',
      () => syncWrites.backoffs().map(([root, value]) => ({ value, labels: { root } })),
    );
    const latency = 'corral_volume_latency_seconds';
    this.#register(
      latency,
      'Time from a request reaching the volume to its answer, by kind',
      'histogram',
      () =>
        [...this.#meters].flatMap(([volume, m]) =>
          KINDS.flatMap((kind, k) => {
            const labels = { volume, kind };
            let cumulative = 0;
            const buckets = [...LATENCY_BUCKETS, Infinity].map((le, i) => {
              cumulative += m.buckets[k]![i]!;
              return {
                value: cumulative,
                labels: { ...labels, le: le === Infinity ? '+Inf' : String(le) },
                metricName: `${latency}_bucket`,
              };
            });
            return [
              ...buckets,
              { value: m.sums[k]!, labels, metricName: `${latency}_sum` },
              { value: m.ops[k]!, labels, metricName: `${latency}_count` },
            ];
          }),
        ),
    );
    const size = new Gauge({
      name: 'corral_volume_size_bytes',
      help: 'A volume’s size',
      labelNames: ['volume'],
      registers,
    });
    const state = new Gauge({
      name: 'corral_volume_state',
      help: 'A volume’s state: 1 for the one it is in (healthy, degraded, faulted, detached)',
      labelNames: ['volume', 'state'],
      registers,
    });
    const replicas = new Gauge({
      name: 'corral_volume_replicas',
      help: 'A volume’s replicas by mode (RW, WO, ERR)',
      labelNames: ['volume', 'mode'],
      registers,
    });
    const rebuild = new Gauge({
      name: 'corral_replica_rebuild_progress_ratio',
      help: 'How far a replica’s rebuild is (0 to 1), while it runs',
      labelNames: ['volume', 'replica'],
      registers,
    });
    const free = new Gauge({
      name: 'corral_node_free_bytes',
      help: 'Free space on this node’s data disk',
      registers,
    });
    // Gauges are read when Prometheus scrapes, from the same views the API shows.
    const collect = async () => {
      const n = await source.node();
      capacity.set(n.totalBytes);
      free.set(n.freeBytes);
      const volumes = await source.volumes();
      for (const g of [size, state, replicas, rebuild]) g.reset();
      for (const v of volumes) {
        size.set({ volume: v.name }, v.sizeBytes);
        const rw = v.replicas.filter((r) => r.mode === 'RW').length;
        const now =
          v.state !== 'attached'
            ? v.state === 'detached'
              ? 'detached'
              : 'faulted'
            : rw === 0
              ? 'faulted'
              : rw < v.replicaCount
                ? 'degraded'
                : 'healthy';
        for (const s of ['healthy', 'degraded', 'faulted', 'detached'])
          state.set({ volume: v.name, state: s }, s === now ? 1 : 0);
        for (const mode of ['RW', 'WO', 'ERR'])
          replicas.set({ volume: v.name, mode }, v.replicas.filter((r) => r.mode === mode).length);
        for (const r of v.replicas)
          if (r.rebuild && r.rebuild.total > 0)
            rebuild.set({ volume: v.name, replica: r.id }, r.rebuild.done / r.rebuild.total);
      }
    };
    const capacity = new Gauge({
      name: 'corral_node_capacity_bytes',
      help: 'The size of this node’s data disk',
      registers,
      collect,
    });
  }

  /** An operation ended: counted by kind, volume and outcome; its bytes and success time kept. */
  operationEnded(op: Operation): void {
    const volume = op.volume ?? '';
    this.#operations.inc({ kind: op.kind, volume, outcome: op.state });
    if (op.state !== 'succeeded') return;
    const bytes = operationBytes(op);
    if (bytes > 0) this.#operationBytes.inc({ kind: op.kind, volume }, bytes);
    this.#lastSuccess.set({ kind: op.kind, volume }, Date.parse(op.endedAt ?? '') / 1000 || 0);
  }

  /** A metric made from the meters when Prometheus scrapes. */
  #register(
    name: string,
    help: string,
    type: 'counter' | 'histogram',
    values: () => MetricValue[],
  ): void {
    const metric = {
      name,
      help,
      type,
      aggregator: 'sum',
      get: () => Promise.resolve({ name, help, type, aggregator: 'sum', values: values() }),
    };
    this.registry.registerMetric(metric as unknown as Parameters<Registry['registerMetric']>[0]);
  }

  /** The observer a volume's supervisor calls at the end of every client request. */
  observer(volume: string): IoObserver {
    let m = this.#meters.get(volume);
    if (!m) {
      m = new VolumeMeter();
      this.#meters.set(volume, m);
    }
    const meter = m;
    return (kind, bytes, seconds, failed) =>
      meter.observe(KIND_INDEX[kind], bytes, seconds, failed);
  }

  /** A removed volume's series go (the label set stays bounded by the volumes that exist). */
  forget(volume: string): void {
    this.#meters.delete(volume);
  }

  /** One volume's totals from the same meters (`GET /v1/volumes/:name/stats`). */
  stats(volume: string): Promise<VolumeStats> {
    const m = this.#meters.get(volume) ?? new VolumeMeter();
    const sum = (a: Float64Array) => a.reduce((x, y) => x + y, 0);
    return Promise.resolve({
      volume,
      readOps: m.ops[KIND_INDEX.read]!,
      writeOps: m.ops[KIND_INDEX.write]!,
      readBytes: m.bytes[KIND_INDEX.read]!,
      writeBytes: m.bytes[KIND_INDEX.write]!,
      flushOps: m.ops[KIND_INDEX.flush]!,
      errors: sum(m.errors),
      readLatency: m.quantiles(KIND_INDEX.read),
      writeLatency: m.quantiles(KIND_INDEX.write),
    });
  }
}

/** What an operation moved: a backup's bytes stored, a rebuild's bytes copied, else its progress. */
function operationBytes(op: Operation): number {
  const r = op.result as
    { stats?: { bytesStored?: unknown }; bytesCopied?: unknown } | undefined | null;
  if (typeof r?.stats?.bytesStored === 'number') return r.stats.bytesStored;
  if (typeof r?.bytesCopied === 'number') return r.bytesCopied;
  return op.progress.bytes;
}
