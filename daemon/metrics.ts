import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { IoKind, IoObserver } from '../replication/supervisor.ts';
import type { NodeInfo } from './node-info.ts';
import type { VolumeInfo } from './volumes.ts';

/** Latency buckets, in seconds: 50 µs (a cached 4k read) to 2.5 s (a flush behind a slow disk). */
const LATENCY_BUCKETS = [
  0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
];

/** The counters of one volume, bound to its label once (no label lookup per request). */
type Labels = 'volume' | 'kind';
type CounterChild = ReturnType<Counter<Labels>['labels']>;
type HistogramChild = ReturnType<Histogram<Labels>['labels']>;
interface VolumeMeters {
  ops: Record<IoKind, CounterChild>;
  bytes: Record<IoKind, CounterChild>;
  errors: Record<IoKind, CounterChild>;
  latency: Record<IoKind, HistogramChild>;
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

const KINDS: IoKind[] = ['read', 'write', 'flush', 'trim', 'zero'];

/**
 * The daemon's Prometheus metrics (`GET /metrics`): per volume, requests,
 * bytes and errors by kind as counters and latency as histograms (what
 * Prometheus rates and quantiles are made from), its state and replicas'
 * modes as gauges read when scraped; per node, capacity and free space;
 * the process's CPU and memory. Labels are volume, kind, replica and
 * state only: a bounded set, never per request or per block.
 */
export class Metrics {
  readonly registry = new Registry();
  readonly #ops: Counter<'volume' | 'kind'>;
  readonly #bytes: Counter<'volume' | 'kind'>;
  readonly #errors: Counter<'volume' | 'kind'>;
  readonly #latency: Histogram<'volume' | 'kind'>;
  readonly #meters = new Map<string, VolumeMeters>();

  constructor(source: { volumes: () => Promise<VolumeInfo[]>; node: () => Promise<NodeInfo> }) {
    const registers = [this.registry];
    collectDefaultMetrics({ register: this.registry });
    this.#ops = new Counter({
      name: 'corral_volume_ops_total',
      help: 'Client requests to a volume, by kind (read, write, flush, trim, zero)',
      labelNames: ['volume', 'kind'],
      registers,
    });
    this.#bytes = new Counter({
      name: 'corral_volume_bytes_total',
      help: 'Bytes of client requests to a volume, by kind',
      labelNames: ['volume', 'kind'],
      registers,
    });
    this.#errors = new Counter({
      name: 'corral_volume_errors_total',
      help: 'Client requests to a volume that failed, by kind',
      labelNames: ['volume', 'kind'],
      registers,
    });
    this.#latency = new Histogram({
      name: 'corral_volume_latency_seconds',
      help: 'Time from a request reaching the volume to its answer, by kind',
      labelNames: ['volume', 'kind'],
      buckets: LATENCY_BUCKETS,
      registers,
    });
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

  /** The observer a volume's supervisor calls at the end of every client request. */
  observer(volume: string): IoObserver {
    const m = this.#metersOf(volume);
    return (kind, bytes, seconds, failed) => {
      if (failed) {
        m.errors[kind].inc();
        return;
      }
      m.ops[kind].inc();
      if (bytes > 0) m.bytes[kind].inc(bytes);
      m.latency[kind].observe(seconds);
    };
  }

  #metersOf(volume: string): VolumeMeters {
    let m = this.#meters.get(volume);
    if (!m) {
      const each = <T>(f: (kind: IoKind) => T) =>
        Object.fromEntries(KINDS.map((k) => [k, f(k)])) as Record<IoKind, T>;
      m = {
        ops: each((kind) => this.#ops.labels({ volume, kind })),
        bytes: each((kind) => this.#bytes.labels({ volume, kind })),
        errors: each((kind) => this.#errors.labels({ volume, kind })),
        latency: each((kind) => this.#latency.labels({ volume, kind })),
      };
      this.#meters.set(volume, m);
    }
    return m;
  }

  /** A removed volume's series go (the label set stays bounded by the volumes that exist). */
  forget(volume: string): void {
    this.#meters.delete(volume);
    for (const kind of KINDS) {
      this.#ops.remove({ volume, kind });
      this.#bytes.remove({ volume, kind });
      this.#errors.remove({ volume, kind });
      this.#latency.remove({ volume, kind });
    }
  }

  /** One volume's totals from the same counters (`GET /v1/volumes/:name/stats`). */
  async stats(volume: string): Promise<VolumeStats> {
    const value = async (c: Counter<'volume' | 'kind'>, kind: IoKind) =>
      (await c.get()).values.find((v) => v.labels.volume === volume && v.labels.kind === kind)
        ?.value ?? 0;
    const latency = await this.#latency.get();
    const quantiles = (kind: IoKind) => {
      const buckets = latency.values
        .filter(
          (v) =>
            v.labels.volume === volume &&
            v.labels.kind === kind &&
            v.metricName === 'corral_volume_latency_seconds_bucket',
        )
        .map((v) => {
          const le = (v.labels as Record<string, string | number | undefined>).le;
          return { le: le === '+Inf' ? Infinity : Number(le), count: v.value };
        })
        .sort((a, b) => a.le - b.le);
      const total = buckets.at(-1)?.count ?? 0;
      const at = (q: number) =>
        total === 0 ? 0 : (buckets.find((b) => b.count >= q * total)?.le ?? Infinity);
      return { p50: at(0.5), p99: at(0.99) };
    };
    let errors = 0;
    for (const kind of KINDS) errors += await value(this.#errors, kind);
    return {
      volume,
      readOps: await value(this.#ops, 'read'),
      writeOps: await value(this.#ops, 'write'),
      readBytes: await value(this.#bytes, 'read'),
      writeBytes: await value(this.#bytes, 'write'),
      flushOps: await value(this.#ops, 'flush'),
      errors,
      readLatency: quantiles('read'),
      writeLatency: quantiles('write'),
    };
  }
}
