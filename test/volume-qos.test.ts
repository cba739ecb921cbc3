import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { Qos } from '../replication/qos.ts';
import type { Clock } from '../common/clock.ts';
import { DaemonProcess } from './helpers/daemon.ts';
import { run } from './helpers/run.ts';

interface FioJob {
  read: { iops: number; bw_bytes: number };
  write: { iops: number; bw_bytes: number };
}

/** One fio job over NBD for `seconds`; its IOPS and bytes per second (read + write). */
async function fio(
  uri: string,
  seconds: number,
  rw: string,
  bs: string,
  extra: string[] = [],
): Promise<{ iops: number; bytesPerSecond: number }> {
  const r = await run(
    'fio',
    [
      '--name=qos',
      '--ioengine=nbd',
      `--uri=${uri}`,
      `--rw=${rw}`,
      `--bs=${bs}`,
      '--iodepth=16',
      '--size=64m',
      '--time_based=1',
      `--runtime=${seconds}`,
      '--output-format=json',
      ...extra,
    ],
    { timeoutMs: (seconds + 60) * 1000 },
  );
  assert.equal(r.code, 0, r.stderr);
  // fio may print a notice before its JSON.
  const json = r.stdout.slice(r.stdout.indexOf('{'));
  const job = (JSON.parse(json) as { jobs: FioJob[] }).jobs[0]!;
  return {
    iops: job.read.iops + job.write.iops,
    bytesPerSecond: job.read.bw_bytes + job.write.bw_bytes,
  };
}

/** A clock the test turns by hand: `after` callbacks run when their time has come. */
function handClock() {
  let now = 0;
  const timers: Array<{ at: number; fn: () => void; cancelled: boolean }> = [];
  const clock: Clock = {
    nowMs: () => now,
    elapsedMs: () => now,
    setInterval: () => ({ cancel: () => undefined }),
    after: (ms, fn) => {
      const t = { at: now + ms, fn, cancelled: false };
      timers.push(t);
      return { cancel: () => (t.cancelled = true) };
    },
    sleep: () => Promise.resolve(),
  };
  const advance = async (ms: number) => {
    const until = now + ms;
    for (;;) {
      const due = timers
        .filter((t) => !t.cancelled && t.at <= until)
        .sort((a, b) => a.at - b.at)[0];
      if (!due) break;
      now = Math.max(now, due.at);
      due.cancelled = true;
      due.fn();
      await Promise.resolve();
    }
    now = until;
    await new Promise((r) => setImmediate(r));
  };
  return { clock, advance };
}

describe('the token buckets', () => {
  it('admit in order at the limit, take a live change at once, and let everything go when limits go', async () => {
    const { clock, advance } = handClock();
    const qos = new Qos(clock, { iops: 100 });
    const done: number[] = [];
    const admitted = (i: number, write: boolean) => {
      const wait = qos.admit(write, 4096);
      if (wait) void wait.then(() => done.push(i));
      else done.push(i);
    };
    for (let i = 0; i < 300; i++) admitted(i, i % 2 === 0);
    await advance(0);
    // A tenth of a second's worth goes at once.
    assert.equal(done.length, 10);
    await advance(1000);
    assert.ok(done.length >= 109 && done.length <= 111, `after 1 s: ${done.length}`);
    assert.deepEqual(
      done,
      [...done].sort((a, b) => a - b),
      'in the order they came',
    );
    qos.set({ iops: 1000 });
    await advance(100);
    assert.ok(done.length >= 200 && done.length <= 212, `after the change: ${done.length}`);
    qos.set({});
    await advance(0);
    assert.equal(done.length, 300);
    assert.equal(qos.admit(true, 1 << 20), undefined, 'no limit: no wait');
  });

  it('read and write limits apply to their direction only, bandwidth by bytes', async () => {
    const { clock, advance } = handClock();
    const qos = new Qos(clock, { writeBandwidth: 10 * 1024 * 1024, burst: 1 });
    let reads = 0;
    let writes = 0;
    for (let i = 0; i < 50; i++) {
      const r = qos.admit(false, 1 << 20);
      if (r) void r.then(() => reads++);
      else reads++;
    }
    for (let i = 0; i < 50; i++) {
      const w = qos.admit(true, 1 << 20);
      if (w) void w.then(() => writes++);
      else writes++;
    }
    await advance(0);
    assert.equal(reads, 50);
    assert.ok(writes >= 10 && writes <= 11, `writes at once: ${writes}`);
    await advance(2000);
    assert.ok(writes >= 30 && writes <= 32, `writes after 2 s: ${writes}`);
  });
});

describe('I/O limits on a daemon, measured by fio', () => {
  let d: DaemonProcess | undefined;
  after(async () => {
    await d?.cleanup();
  });

  it('2000 IOPS and 100 MB/s hold within 10 %; an unlimited neighbour keeps its speed (as beside the same load limited by its client); a live change acts within a second', async (t) => {
    d = await DaemonProcess.start();
    const daemon = d;
    const create = async (args: string[]) => {
      const r = await daemon.cli(['volume', 'create', ...args]);
      assert.equal(r.code, 0, r.stderr);
    };
    await create(['slow', '--size', '64M', '--iops-limit', '2000']);
    await create(['wide', '--size', '64M', '--bandwidth-limit', '100M']);
    await create(['free', '--size', '64M']);

    const limited = await fio(daemon.uri('slow'), 10, 'randrw', '4k');
    assert.ok(limited.iops >= 1800 && limited.iops <= 2200, `2000 IOPS limit: ${limited.iops}`);
    const bw = await fio(daemon.uri('wide'), 10, 'write', '1M');
    t.diagnostic(
      `2000 IOPS limit: ${limited.iops.toFixed(0)}; 100M/s limit: ${(bw.bytesPerSecond / 2 ** 20).toFixed(1)} MiB/s`,
    );
    assert.ok(
      bw.bytesPerSecond >= 90e6 * 1.048576 * 0.999 && bw.bytesPerSecond <= 110e6 * 1.048576,
      `100 MiB/s limit: ${bw.bytesPerSecond}`,
    );

    // Two cores shared by the daemon and every fio: a neighbour's client costs CPU however it
    // is limited. So the unlimited volume beside one limited by Corral is compared with it beside
    // the same load limited by fio itself (--rate_iops): QoS must cost nothing on top.
    await create(['noisy', '--size', '64M']);
    const beside = async (neighbour: string, extra: string[]) =>
      (
        await Promise.all([
          fio(daemon.uri('free'), 5, 'randread', '4k'),
          fio(daemon.uri(neighbour), 5, 'randrw', '4k', extra),
        ])
      )[0];
    // Alternated, best of two each: this VM's speed can halve for seconds (a CI run measured
    // 25.6k beside the client-limited load, then 15.6k beside the Corral-limited one, everything
    // at half its usual rate), and one slow spell must not decide the comparison.
    const fastest = (runs: Array<{ iops: number }>) =>
      runs.reduce((a, b) => (b.iops > a.iops ? b : a));
    const clientRuns: Array<{ iops: number }> = [];
    const corralRuns: Array<{ iops: number }> = [];
    for (let i = 0; i < 2; i++) {
      clientRuns.push(await beside('noisy', ['--rate_iops=1000,1000']));
      corralRuns.push(await beside('slow', []));
    }
    const byClient = fastest(clientRuns);
    const byCorral = fastest(corralRuns);
    const unlimited = await beside('noisy', []);
    t.diagnostic(
      `unlimited volume beside: 2000 IOPS limited by fio ${byClient.iops.toFixed(0)} IOPS, by Corral ${byCorral.iops.toFixed(0)}, an unlimited neighbour ${unlimited.iops.toFixed(0)}`,
    );
    // Between runs of one build the two measured 0.90-1.08 of each other (CI and three local
    // runs); a limiter that costs real CPU, or lets the neighbour through, lands far below:
    // the unlimited neighbour leaves a third.
    assert.ok(
      byCorral.iops >= byClient.iops * 0.8,
      `beside a neighbour limited by Corral ${byCorral.iops} IOPS, by fio ${byClient.iops}`,
    );
    assert.ok(unlimited.iops < byCorral.iops * 0.7, 'an unlimited neighbour takes more');

    // Live: from 2000 to 500 while fio runs; its next second shows it.
    const watched = run(
      'fio',
      [
        '--name=live',
        '--ioengine=nbd',
        `--uri=${daemon.uri('slow')}`,
        '--rw=randread',
        '--bs=4k',
        '--iodepth=16',
        '--size=64m',
        '--time_based=1',
        '--runtime=4',
        '--output-format=json',
      ],
      { timeoutMs: 60_000 },
    );
    await new Promise((r) => setTimeout(r, 1500));
    const set = await daemon.cli(['volume', 'set', 'slow', '--iops-limit', '500', '--json']);
    assert.equal(set.code, 0, set.stderr);
    assert.equal((JSON.parse(set.stdout) as { qos: { iops: number } }).qos.iops, 500);
    const changed = Date.now();
    const stats = async () =>
      (await daemon.api_<{ readOps: number }>('GET', '/v1/volumes/slow/stats')).json.readOps;
    // The second after the change (from the daemon's own counters).
    await new Promise((r) => setTimeout(r, 1000 - (Date.now() - changed)));
    const a = await stats();
    await new Promise((r) => setTimeout(r, 1000));
    const b = await stats();
    t.diagnostic(`the second after a change to 500 IOPS: ${b - a} reads`);
    assert.ok(b - a >= 400 && b - a <= 600, `the second after the change: ${b - a} reads`);
    assert.equal((await watched).code, 0);
  });
});

describe('long jobs kept to their rate', () => {
  let d: DaemonProcess | undefined;
  after(async () => {
    await d?.cleanup();
  });

  it('--backup-rate paces what a backup reads and what a restore writes', async () => {
    d = await DaemonProcess.start({ args: ['--backup-rate', '32M'] });
    const daemon = d;
    assert.equal((await daemon.cli(['volume', 'create', 'src', '--size', '64M'])).code, 0);
    const filled = await run('qemu-io', [
      '-f',
      'raw',
      daemon.uri('src'),
      '-c',
      'write -P 0x3c 0 48M',
    ]);
    assert.equal(filled.code, 0, filled.stderr);
    const timed = async (args: string[]) => {
      const t0 = performance.now();
      const r = await daemon.cli(args);
      assert.equal(r.code, 0, r.stderr);
      return { seconds: (performance.now() - t0) / 1000, stdout: r.stdout };
    };
    const backup = await timed(['backup', 'create', 'src', '--json']);
    // 48 MiB at 32 MiB/s: at least 1.5 s (minus the first piece, which goes at once).
    assert.ok(backup.seconds >= 1.3, `backup of 48 MiB at 32M/s took ${backup.seconds} s`);
    const name = (JSON.parse(backup.stdout) as { name: string }).name;
    const restore = await timed(['backup', 'restore', name, 'copy']);
    assert.ok(restore.seconds >= 1.3, `restore of 48 MiB at 32M/s took ${restore.seconds} s`);
    const check = await run('qemu-io', [
      '-f',
      'raw',
      '-r',
      daemon.uri('copy'),
      '-c',
      'read -P 0x3c 0 48M',
      '-c',
      'read -P 0 48M 16M',
    ]);
    assert.equal(check.code, 0, check.stdout + check.stderr);
  });
});
