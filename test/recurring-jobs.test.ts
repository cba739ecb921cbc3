import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, describe, it } from 'node:test';
import type { Clock } from '../common/clock.ts';
import { Kv } from '../kv/kv.ts';
import { openSpaces } from '../kv/spaces.ts';
import { BackupService } from '../daemon/backups.ts';
import { EventLog } from '../daemon/events.ts';
import { JobScheduler, jobSnapshotPrefix } from '../daemon/jobs.ts';
import { Operations } from '../daemon/operations.ts';
import { VolumeManager } from '../daemon/volumes.ts';
import { LocalVolumeRecords } from '../daemon/volume-records.ts';

// Cron expressions are in the host's local time: pin it.
process.env.TZ = 'UTC';

const HOUR = 3_600_000;

/** The daemon's parts in this process, on a clock the test turns by hand. */
async function world(dir: string, startMs: number) {
  const kv = await Kv.open(path.join(dir, 'meta'));
  const spaces = openSpaces(kv);
  const time = { now: startMs };
  const clock: Clock = {
    nowMs: () => time.now,
    elapsedMs: () => time.now,
    setInterval: () => ({ cancel: () => undefined }),
    after: () => ({ cancel: () => undefined }),
    sleep: (ms) => new Promise((r) => setTimeout(r, ms)),
  };
  const events = new EventLog();
  const operations = new Operations(events);
  const volumes = new VolumeManager({
    spaces,
    records: new LocalVolumeRecords(spaces.volumes),
    replicaRoot: path.join(dir, 'replicas'),
    clock,
    events,
    hangTimeoutMs: 30_000,
    faultInjection: false,
    mergeBytesPerSecond: undefined,
    connections: () => 0,
    disconnect: () => undefined,
    imageHolders: () => Promise.resolve([]),
  });
  await volumes.start();
  const backups = new BackupService({
    volumes,
    operations,
    events,
    clock,
    defaultTarget: `file://${path.join(dir, 'store')}`,
    targetPolicy: { fileRoots: [dir], s3CredentialChain: false },
  });
  const jobs = new JobScheduler({ jobs: spaces.jobs, volumes, backups, operations, clock });
  return {
    time,
    events,
    volumes,
    backups,
    jobs,
    async close() {
      await volumes.stop();
      await kv.close();
    },
  };
}

describe('recurring jobs on a clock the test controls', () => {
  const dirs: string[] = [];
  after(async () => {
    for (const d of dirs) await fs.promises.rm(d, { recursive: true, force: true });
  });

  it('hourly snapshots keep the newest N; daily backups keep N; runs survive a restart', async () => {
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-jobs-'));
    dirs.push(dir);
    let w = await world(dir, Date.parse('2026-01-01T00:00:00Z'));
    await w.volumes.create({ name: 'db', size: '64M' });
    const dev = () => w.volumes.device('db')!;
    const snap = await w.jobs.add({ volume: 'db', cron: '0 * * * *', task: 'snapshot', retain: 3 });
    assert.equal(snap.nextRunAt, '2026-01-01T01:00:00.000Z');

    const own = async () =>
      (await w.volumes.snapshots('db'))
        .filter((s) => s.name.startsWith(jobSnapshotPrefix(snap.id)))
        .map((s) => s.name);
    for (let hour = 1; hour <= 6; hour++) {
      await dev().write(0, Buffer.alloc(4096, hour));
      w.time.now += HOUR - 60_000; // a minute early: not due yet
      await w.jobs.runDue();
      assert.equal((await own()).length, Math.min(hour - 1, 3), `hour ${hour}, early`);
      w.time.now += 60_000;
      await w.jobs.runDue();
      assert.equal((await own()).length, Math.min(hour, 3), `hour ${hour}`);
    }
    const kept = await own();
    assert.deepEqual(
      kept.map((n) => n.slice(-6)),
      ['040000', '050000', '060000'],
      'the newest three are kept',
    );
    // Each kept snapshot holds what was written before its run.
    for (const [i, name] of kept.entries()) {
      const eng = w.volumes.snapshotAccess('db', name);
      const block = await eng.read(0, 4096);
      eng.release();
      assert.equal(block[0], 4 + i);
    }
    assert.equal(w.events.list().filter((e) => e.type === 'job-succeeded').length, 6);

    // Daily backups at 03:00, keep two.
    const daily = await w.jobs.add({ volume: 'db', cron: '0 3 * * *', task: 'backup', retain: 2 });
    await w.jobs.remove(snap.id);
    const results: string[] = [];
    for (let day = 0; day < 4; day++) {
      await dev().write(4096 * (day + 1) * 1024, Buffer.alloc(4096, 0x40 + day));
      w.time.now = Date.parse(`2026-01-0${2 + day}T03:00:00Z`);
      await w.jobs.runDue();
      const job = (await w.jobs.list()).find((j) => j.id === daily.id)!;
      results.push(job.lastOutcome ?? '');
    }
    assert.match(
      results[0]!,
      /^backup backup-\S+ \(\d+ new blocks\); 0 old backup\(s\) deleted, 1 kept$/,
    );
    assert.match(results[3]!, /1 old backup\(s\) deleted, 2 kept$/);
    const list = await w.backups.list({});
    assert.equal(list.length, 2);
    assert.deepEqual(
      list.map((b) => b.createdAt),
      ['2026-01-04T03:00:00.000Z', '2026-01-05T03:00:00.000Z'],
    );
    // Incremental: one 4 KiB write a day means one block read.
    assert.equal(list[1]!.stats.blocksRead, 1);
    const jobSnaps = (await w.volumes.snapshots('db')).filter((s) =>
      s.name.startsWith(jobSnapshotPrefix(daily.id)),
    );
    assert.equal(jobSnaps.length, 1, 'only the base of the next incremental backup is kept');

    // The job survives a restart; a run missed while down happens once.
    await w.close();
    w = await world(dir, Date.parse('2026-01-09T12:00:00Z'));
    const [again] = await w.jobs.list();
    assert.equal(again?.id, daily.id);
    assert.equal(again?.lastRunAt, '2026-01-05T03:00:00.000Z');
    await w.jobs.runDue();
    await w.jobs.runDue();
    assert.equal(w.events.list().filter((e) => e.type === 'job-succeeded').length, 1);
    assert.equal((await w.jobs.list())[0]?.nextRunAt, '2026-01-10T03:00:00.000Z');
    await w.close();
  });

  it('a weekly scrub job finds a block damaged on disk and says so', async () => {
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-jobs-'));
    dirs.push(dir);
    const w = await world(dir, Date.parse('2026-01-04T00:00:00Z')); // a Sunday
    await w.volumes.create({ name: 's', size: '16M' });
    await w.volumes.device('s')!.write(0, Buffer.alloc(65536, 0x61));
    await w.volumes.device('s')!.flush();
    const job = await w.jobs.add({ volume: 's', cron: '0 4 * * 0', task: 'scrub' });
    assert.equal(job.nextRunAt, '2026-01-04T04:00:00.000Z');
    w.time.now += 4 * HOUR;
    await w.jobs.runDue();
    assert.match((await w.jobs.list())[0]!.lastOutcome ?? '', /1 replica\(s\) clean/);
    // One byte of the layer file changes behind the daemon's back.
    const [replica] = await fs.promises.readdir(path.join(dir, 'replicas'));
    const [layer] = await fs.promises.readdir(path.join(dir, 'replicas', replica!));
    const fh = await fs.promises.open(path.join(dir, 'replicas', replica!, layer!), 'r+');
    await fh.write(Buffer.from([0x62]), 0, 1, 12345);
    await fh.close();
    w.time.now += 7 * 24 * HOUR;
    await w.jobs.runDue();
    assert.match(
      (await w.jobs.list())[0]!.lastOutcome ?? '',
      /replica .*: 1 bad block\(s\), no clean replica/,
    );
    assert.ok(w.events.list().some((e) => e.type === 'data-corrupt'));
    await w.close();
  });

  it('refuses bad jobs with clear errors', async () => {
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-jobs-'));
    dirs.push(dir);
    const w = await world(dir, Date.now());
    await w.volumes.create({ name: 'v', size: '16M' });
    const bad = async (input: Record<string, unknown>, message: RegExp) =>
      assert.rejects(
        w.jobs.add({ volume: 'v', cron: '0 * * * *', task: 'snapshot', retain: 1, ...input }),
        message,
      );
    await bad({ cron: 'every hour' }, /Invalid cron expression "every hour"/);
    await bad({ cron: '61 * * * *' }, /Invalid cron expression.*minute/);
    await bad({ task: 'defrag' }, /task must be snapshot, backup or scrub/);
    await bad({ retain: 0 }, /retain must be a whole number from 1/);
    await bad({ retain: 2.5 }, /retain must be a whole number/);
    await bad({ volume: 'nope' }, /No volume named nope/);
    await bad({ target: 'file:///tmp/x' }, /only backup jobs take a target/);
    await bad({ task: 'backup', target: 'gopher://x' }, /Unsupported backup target/);
    await assert.rejects(w.jobs.remove('feedbeef'), /No job feedbeef/);
    assert.deepEqual(await w.jobs.list(), []);
    await w.close();
  });
});
