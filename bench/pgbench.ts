/**
 * A database on Corral (`BENCH_ONLY=pgbench npm run bench`): PostgreSQL's
 * pgbench (TPC-B-like, synchronous commit) on ext4 over a loop device over
 * a volume's FUSE image, against the same on a loop device over a plain file
 * on the same disk; 1 and 3 replicas (three daemons); then the 3-replica
 * volume again while one of its replicas is rebuilt. Both loop devices use
 * direct I/O (no second page cache). Debian's `postgresql` is installed here
 * when missing, not by CI. BENCH_PG_SCALE (default 50), BENCH_PG_SECONDS
 * (default 60).
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { TestCluster } from '../test/helpers/cluster.ts';
import { freePort, mustRun, run } from '../test/helpers/run.ts';
import { cpuSeconds, machineShare, machineTicks } from './proc.ts';
import { rebuildOne } from './replication.ts';

const SCALE = Number(process.env.BENCH_PG_SCALE ?? 50);
const SECONDS = Number(process.env.BENCH_PG_SECONDS ?? 60);
const CLIENTS = 8;
const THREADS = 2;

interface Result {
  tps: number;
  latencyMs: number;
  transactions: number;
  /** Shares of all cores over the run: CPU-bound runs are busy, latency-bound ones wait. */
  machine: { busy: number; iowait: number };
  /** CPU seconds of each daemon over the run. */
  cpu: Record<string, number>;
}

/** The directory of PostgreSQL's programs, installing Debian's package first if need be. */
async function postgresBin(): Promise<string> {
  const find = () =>
    fs
      .readdirSync('/usr/lib/postgresql', { withFileTypes: true })
      .filter((e) => e.isDirectory())
      .map((e) => path.join('/usr/lib/postgresql', e.name, 'bin'))
      .find((bin) => fs.existsSync(path.join(bin, 'pgbench')));
  const found = fs.existsSync('/usr/lib/postgresql') ? find() : undefined;
  if (found) return found;
  console.error('pgbench: installing Debian postgresql');
  await mustRun('apt-get', ['install', '-y', '-qq', '--no-install-recommends', 'postgresql'], {
    env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
    timeoutMs: 900_000,
  });
  const bin = find();
  if (!bin) throw new Error('postgresql installed, but no pgbench under /usr/lib/postgresql');
  return bin;
}

/** PostgreSQL refuses to run as root: its programs run as the `postgres` user. */
function asPostgres(bin: string, program: string, args: string[], timeoutMs = 900_000) {
  return mustRun('runuser', ['-u', 'postgres', '--', path.join(bin, program), ...args], {
    timeoutMs,
  });
}

/** A loop device (direct I/O) over `image`, ext4 on it, PostgreSQL on that; `fn` gets its port. */
async function withPostgres<T>(
  bin: string,
  image: string,
  fn: (port: number) => Promise<T>,
): Promise<T> {
  const loop = (
    await mustRun('losetup', ['--find', '--show', '--direct-io=on', image])
  ).stdout.trim();
  // Outside the bench's own (private) directory: the postgres user must reach it.
  const mnt = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-pg-'));
  await fs.promises.chmod(mnt, 0o755);
  const data = path.join(mnt, 'pgdata');
  let mounted = false;
  let started = false;
  try {
    await mustRun('mkfs.ext4', ['-q', '-F', loop]);
    await mustRun('mount', [loop, mnt]);
    mounted = true;
    await mustRun('install', ['-d', '-o', 'postgres', '-g', 'postgres', data]);
    await asPostgres(bin, 'initdb', ['-D', data, '--no-instructions', '-A', 'trust']);
    const port = await freePort();
    await asPostgres(bin, 'pg_ctl', [
      '-D',
      data,
      '-w',
      '-l',
      path.join(data, 'server.log'),
      '-o',
      `-p ${port} -k /tmp -c listen_addresses=''`,
      'start',
    ]);
    started = true;
    const t0 = Date.now();
    await asPostgres(bin, 'pgbench', [
      '-h',
      '/tmp',
      '-p',
      String(port),
      '-i',
      '-q',
      '-s',
      String(SCALE),
      'postgres',
    ]);
    console.error(
      `pgbench: ${image}: initialised scale ${SCALE} in ${((Date.now() - t0) / 1000).toFixed(1)} s`,
    );
    await mustRun('sync', []);
    return await fn(port);
  } finally {
    if (started)
      await run('runuser', [
        '-u',
        'postgres',
        '--',
        path.join(bin, 'pg_ctl'),
        '-D',
        data,
        '-m',
        'fast',
        'stop',
      ]);
    if (mounted) await run('umount', [mnt]);
    await run('losetup', ['-d', loop]);
    await fs.promises.rm(mnt, { recursive: true, force: true });
  }
}

/** One pgbench run; with `progress`, pgbench's per-second lines are passed on as they come. */
async function pgbench(
  bin: string,
  port: number,
  processes: Record<string, number>,
  seconds: number,
  progress?: (line: string) => void,
): Promise<Result> {
  const before = Object.fromEntries(Object.entries(processes).map(([k, p]) => [k, cpuSeconds(p)]));
  const ticks = machineTicks();
  const args = ['-h', '/tmp', '-p', String(port), '-c', String(CLIENTS), '-j', String(THREADS)];
  args.push('-T', String(seconds), ...(progress ? ['-P', '1'] : []), 'postgres');
  const child = spawn('runuser', ['-u', 'postgres', '--', path.join(bin, 'pgbench'), ...args]);
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => {
    err += d.toString();
    for (let i = err.indexOf('\n'); i >= 0; i = err.indexOf('\n')) {
      progress?.(err.slice(0, i));
      err = err.slice(i + 1);
    }
  });
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  if (code !== 0) throw new Error(`pgbench exited ${code}\n${out}\n${err}`);
  const cpu = Object.fromEntries(
    Object.entries(processes).map(([k, p]) => [k, cpuSeconds(p) - before[k]!]),
  );
  const machine = machineShare(ticks, machineTicks());
  const number = (re: RegExp) => {
    const m = re.exec(out);
    if (!m) throw new Error(`pgbench said nothing matching ${re}:\n${out}`);
    return Number(m[1]);
  };
  return {
    tps: number(/tps = ([\d.]+)/),
    latencyMs: number(/latency average = ([\d.]+) ms/),
    transactions: number(/number of transactions actually processed: (\d+)/),
    cpu,
    machine,
  };
}

interface Second {
  at: number;
  tps: number;
  latencyMs: number;
}

/** pgbench's `progress: 12.0 s, 812.3 tps, lat 9.8 ms stddev 4.1, 0 failed` lines. */
function parseProgress(line: string): Second | undefined {
  const m = /progress: ([\d.]+) s, ([\d.]+) tps, lat ([\d.]+) ms/.exec(line);
  return m ? { at: Number(m[1]), tps: Number(m[2]), latencyMs: Number(m[3]) } : undefined;
}

const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / Math.max(xs.length, 1);

export async function pgbenchBench(dir: string): Promise<string> {
  const bin = await postgresBin();
  const cluster = await TestCluster.start(3, ['--rebuild-delay', '1000']);
  try {
    const d1 = cluster.daemons[0]!;
    const pids = Object.fromEntries(cluster.daemons.map((d, i) => [`d${i + 1}`, d.child.pid!]));
    const results: Array<[string, Result]> = [];
    const plain = path.join(dir, 'plain.img');
    await mustRun('truncate', ['-s', '4G', plain]);
    results.push([
      'plain file',
      await withPostgres(bin, plain, (port) => pgbench(bin, port, pids, SECONDS)),
    ]);
    await fs.promises.rm(plain);
    let rebuildRow = '';
    for (const [name, replicas] of [
      ['one', 1],
      ['three', 3],
    ] as const) {
      const r = await d1.api_('POST', '/v1/volumes', {
        name,
        size: '4G',
        replicas,
        frontend: 'fuse',
      });
      if (r.status !== 201) throw new Error(`create ${name}: ${JSON.stringify(r.json)}`);
      const image = path.join(d1.dataDir, 'images', `${name}.img`);
      await withPostgres(bin, image, async (port) => {
        results.push([
          `Corral, ${replicas} replica${replicas > 1 ? 's' : ''}`,
          await pgbench(bin, port, pids, SECONDS),
        ]);
        if (replicas === 3) rebuildRow = await duringRebuild(bin, port, pids, d1);
      });
    }
    const base = results[0]![1];
    const rows = [
      `| target (pgbench -c ${CLIENTS} -j ${THREADS} -T ${SECONDS}, scale ${SCALE}) | TPS | latency avg | TPS vs plain file | daemon CPU ms per transaction (d1 / d2 / d3) | cores busy (iowait) |`,
      '| --- | ---: | ---: | ---: | ---: | ---: |',
      ...results.map(
        ([label, r]) =>
          `| ${label} | ${r.tps.toFixed(0)} | ${r.latencyMs.toFixed(2)} ms | ${(r.tps / base.tps).toFixed(2)}× | ${
            label === 'plain file'
              ? '—'
              : Object.values(r.cpu)
                  .map((c) => ((c * 1000) / r.transactions).toFixed(2))
                  .join(' / ')
          } | ${(r.machine.busy * 100).toFixed(0)} % (${(r.machine.iowait * 100).toFixed(0)} %) |`,
      ),
    ];
    return `${rows.join('\n')}\n\n${rebuildRow}`;
  } finally {
    await cluster.cleanup();
  }
}

/**
 * pgbench on the 3-replica volume while one replica is taken out and rebuilt: latency in the
 * seconds the rebuild runs against the seconds before it started, and the rebuild's rate.
 */
async function duringRebuild(
  bin: string,
  port: number,
  pids: Record<string, number>,
  d1: Parameters<typeof rebuildOne>[0],
): Promise<string> {
  const seconds: Array<Second & { wall: number }> = [];
  const bench = pgbench(bin, port, pids, SECONDS, (line) => {
    const s = parseProgress(line);
    if (s) seconds.push({ ...s, wall: Date.now() });
  });
  // A steady state first, then the rebuild, which must end before pgbench does.
  await new Promise((r) => setTimeout(r, 15_000));
  const op = await rebuildOne(d1, 'three');
  const total = await bench;
  const from = Date.parse(op.startedAt);
  const to = Date.parse(op.endedAt!);
  const before = seconds.filter((s) => s.wall < from && s.at > 2);
  const during = seconds.filter((s) => s.wall > from && s.wall <= to + 1000);
  for (const s of seconds)
    console.error(
      `pgbench: ${((s.wall - from) / 1000).toFixed(1)} s from the rebuild's start: ${s.tps.toFixed(0)} tps, ${s.latencyMs.toFixed(1)} ms`,
    );
  const rebuildS = (to - from) / 1000;
  const mb = (op.result?.bytesCopied ?? 0) / 1e6;
  const latBefore = mean(before.map((s) => s.latencyMs));
  const latDuring = mean(during.map((s) => s.latencyMs));
  return [
    '| pgbench on 3 replicas while one is rebuilt | TPS | latency avg | latency vs before |',
    '| --- | ---: | ---: | ---: |',
    `| the ${before.length} s before the rebuild | ${mean(before.map((s) => s.tps)).toFixed(0)} | ${latBefore.toFixed(2)} ms | 1.00× |`,
    `| the ${during.length} s of the rebuild (${op.state}: ${mb.toFixed(0)} MB in ${rebuildS.toFixed(1)} s, ${(mb / rebuildS).toFixed(0)} MB/s) | ${mean(during.map((s) => s.tps)).toFixed(0)} | ${latDuring.toFixed(2)} ms | ${(latDuring / latBefore).toFixed(2)}× |`,
    `| the whole run | ${total.tps.toFixed(0)} | ${total.latencyMs.toFixed(2)} ms | |`,
  ].join('\n');
}
