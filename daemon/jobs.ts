import { randomBytes } from 'node:crypto';
import { Cron } from 'croner';
import type { Clock } from '../common/clock.ts';
import { CorralError, quoted } from '../common/errors.ts';
import type { JobRecord } from '../kv/spaces.ts';
import type { BackupService } from './backups.ts';
import type { Operations } from './operations.ts';
import { validateVolumeName } from './names.ts';
import type { VolumeManager } from './volumes.ts';

export interface JobInfo extends JobRecord {
  nextRunAt: string | undefined;
}

/** Retention counts above this would keep more snapshots than a chain serves well. */
const MAX_RETAIN = 250;
/** How often the scheduler looks for due jobs. */
const TICK_MS = 1000;

function parseCron(expr: unknown): Cron {
  if (typeof expr !== 'string' || expr.trim() === '')
    throw new CorralError('INVALID_ARGUMENT', 'cron must be a cron expression like "0 * * * *"');
  try {
    return new Cron(expr, { paused: true });
  } catch (err) {
    throw new CorralError(
      'INVALID_ARGUMENT',
      `Invalid cron expression ${quoted(expr)}: ${err instanceof Error ? err.message : String(err)}`,
    );
  }
}

/** The prefix of the snapshots a job takes: how retention finds its own and no one else's. */
export function jobSnapshotPrefix(id: string): string {
  return `job-${id}-`;
}

/** Where job records live: the host's LevelDB, or etcd in a cluster (kv/etcd-space.ts). */
export interface JobStore {
  get(id: string): Promise<JobRecord | undefined>;
  put(id: string, job: JobRecord): Promise<void>;
  del(id: string): Promise<void>;
  entries(): Promise<Array<[string, JobRecord]>>;
}

/**
 * Recurring snapshot and backup jobs: records that survive restarts (in
 * LevelDB, or in a cluster in etcd, where a job follows its volume: the
 * node serving the volume runs it), cron expressions through croner (host
 * local time), runs as operations with events. Time comes from the Clock,
 * so a test drives it. A run missed while the daemon was down runs once at
 * the next start.
 */
export class JobScheduler {
  readonly #jobs: JobStore;
  /** Whether this node runs a volume's jobs (in a cluster: it serves the volume). */
  readonly #runsHere: (volume: string) => Promise<boolean>;
  readonly #volumes: VolumeManager;
  readonly #backups: BackupService;
  readonly #operations: Operations;
  readonly #clock: Clock;
  readonly #running = new Set<string>();
  #timer: { cancel(): void } | undefined;
  #ticking: Promise<void> | undefined;

  constructor(options: {
    jobs: JobStore;
    runsHere?: (volume: string) => Promise<boolean>;
    volumes: VolumeManager;
    backups: BackupService;
    operations: Operations;
    clock: Clock;
  }) {
    this.#jobs = options.jobs;
    this.#runsHere = options.runsHere ?? (() => Promise.resolve(true));
    this.#volumes = options.volumes;
    this.#backups = options.backups;
    this.#operations = options.operations;
    this.#clock = options.clock;
  }

  start(): void {
    this.#timer = this.#clock.setInterval(() => {
      this.#ticking ??= this.runDue().finally(() => (this.#ticking = undefined));
    }, TICK_MS);
  }

  async stop(): Promise<void> {
    this.#timer?.cancel();
    await this.#ticking;
  }

  async add(input: {
    volume: unknown;
    cron: unknown;
    task: unknown;
    retain?: unknown;
    target?: unknown;
  }): Promise<JobInfo> {
    const volume = validateVolumeName(input.volume);
    await this.#volumes.get(volume);
    parseCron(input.cron);
    if (input.task !== 'snapshot' && input.task !== 'backup' && input.task !== 'scrub')
      throw new CorralError('INVALID_ARGUMENT', 'task must be snapshot, backup or scrub');
    // A scrub keeps nothing: its retain is 1 whatever is asked.
    const retain = input.task === 'scrub' && input.retain === undefined ? 1 : input.retain;
    if (
      typeof retain !== 'number' ||
      !Number.isInteger(retain) ||
      retain < 1 ||
      retain > MAX_RETAIN
    )
      throw new CorralError(
        'INVALID_ARGUMENT',
        `retain must be a whole number from 1 to ${MAX_RETAIN}, got ${quoted(retain)}`,
      );
    if (input.target !== undefined) {
      if (input.task !== 'backup')
        throw new CorralError('INVALID_ARGUMENT', 'only backup jobs take a target');
      await this.#backups.store(input.target);
    }
    const record: JobRecord = {
      id: randomBytes(4).toString('hex'),
      volume,
      cron: input.cron as string,
      task: input.task,
      retain,
      createdAt: new Date(this.#clock.nowMs()).toISOString(),
      ...(typeof input.target === 'string' ? { target: input.target } : {}),
    };
    await this.#jobs.put(record.id, record);
    return this.#info(record);
  }

  async list(): Promise<JobInfo[]> {
    return (await this.#jobs.entries()).map(([, j]) => this.#info(j));
  }

  async remove(id: string): Promise<void> {
    if (!(await this.#jobs.get(id))) throw new CorralError('NOT_FOUND', `No job ${id}`);
    await this.#jobs.del(id);
  }

  #next(job: JobRecord): Date | undefined {
    const from = new Date(job.lastRunAt ?? job.createdAt);
    return parseCron(job.cron).nextRun(from) ?? undefined;
  }

  #info(job: JobRecord): JobInfo {
    return { ...job, nextRunAt: this.#next(job)?.toISOString() };
  }

  /** Runs every job whose time has come (once each, however many runs were missed). */
  async runDue(): Promise<void> {
    const now = this.#clock.nowMs();
    for (const [, job] of await this.#jobs.entries()) {
      const next = this.#next(job);
      if (!next || next.getTime() > now || this.#running.has(job.id)) continue;
      if (!(await this.#runsHere(job.volume))) continue;
      this.#running.add(job.id);
      try {
        await this.#run(job, new Date(now));
      } finally {
        this.#running.delete(job.id);
      }
    }
  }

  async #run(job: JobRecord, now: Date): Promise<void> {
    const { done } = this.#operations.start(
      'job',
      `${job.task} job ${job.id}`,
      job.volume,
      () =>
        job.task === 'snapshot'
          ? this.#snapshotRun(job, now)
          : job.task === 'backup'
            ? this.#backupRun(job, now)
            : this.#scrubRun(job),
      (outcome) => outcome,
    );
    let outcome: string;
    try {
      outcome = await done;
    } catch (err) {
      outcome = `failed: ${err instanceof Error ? err.message : String(err)}`;
    }
    // The job may have been removed while it ran.
    if (await this.#jobs.get(job.id))
      await this.#jobs.put(job.id, {
        ...job,
        lastRunAt: now.toISOString(),
        lastOutcome: outcome,
      });
  }

  #snapshotName(job: JobRecord, now: Date): string {
    const stamp = now.toISOString().replace(/[-:]/g, '').replace('T', '-').slice(0, 15);
    return `${jobSnapshotPrefix(job.id)}${stamp}`;
  }

  /** The job's own snapshots, oldest first. */
  async #ownSnapshots(job: JobRecord): Promise<string[]> {
    return (await this.#volumes.snapshots(job.volume))
      .filter((s) => s.name.startsWith(jobSnapshotPrefix(job.id)))
      .sort((a, b) => a.createdAt.localeCompare(b.createdAt))
      .map((s) => s.name);
  }

  async #snapshotRun(job: JobRecord, now: Date): Promise<string> {
    const name = this.#snapshotName(job, now);
    await this.#volumes.createSnapshot(job.volume, name);
    const own = await this.#ownSnapshots(job);
    const old = own.slice(0, Math.max(0, own.length - job.retain));
    for (const snap of old) await this.#volumes.deleteSnapshot(job.volume, snap);
    return `snapshot ${name}; ${old.length} old snapshot(s) deleted, ${own.length - old.length} kept`;
  }

  /** Every block of the volume checked; bad replicas are rebuilt (VolumeManager.scrubNow). */
  async #scrubRun(job: JobRecord): Promise<string> {
    const reports = await this.#volumes.scrubNow(job.volume);
    const bad = reports.filter((r) => r.bad.length > 0);
    if (bad.length === 0) return `${reports.length} replica(s) clean`;
    return bad
      .map(
        (r) =>
          `replica ${r.replica}: ${r.bad.length} bad block(s)${r.failed ? ', rebuilt from a clean replica' : ', no clean replica'}`,
      )
      .join('; ');
  }

  async #backupRun(job: JobRecord, now: Date): Promise<string> {
    const snapshot = this.#snapshotName(job, now);
    await this.#volumes.createSnapshot(job.volume, snapshot);
    const { done } = await this.#backups.create({
      volume: job.volume,
      snapshot,
      ...(job.target !== undefined ? { target: job.target } : {}),
      labels: { job: job.id },
    });
    const backup = await done;
    // Keep only the newest snapshot of the job: the base of the next incremental backup.
    for (const snap of (await this.#ownSnapshots(job)).slice(0, -1))
      await this.#volumes.deleteSnapshot(job.volume, snap);
    const own = (await this.#backups.list({ target: job.target, volume: job.volume })).filter(
      (b) => b.labels.job === job.id,
    );
    const old = own.slice(0, Math.max(0, own.length - job.retain));
    for (const b of old) await (await this.#backups.remove(b.url)).done;
    return `backup ${backup.name} (${backup.stats.blocksStored} new blocks); ${old.length} old backup(s) deleted, ${own.length - old.length} kept`;
  }
}
