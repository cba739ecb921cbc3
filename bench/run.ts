/**
 * `npm run bench`: fio over NBD against Corral (a 1-replica volume) and, in
 * the same run on the same disk, against nbdkit and qemu-nbd serving a file.
 * Prints IOPS/bandwidth and the ratios, and rewrites the results table in
 * docs/PERFORMANCE.md. BENCH_RUNTIME (seconds per job, default 10);
 * BENCH_FUSE=0 skips the FUSE table, BENCH_BACKUP=0 the backup table;
 * BENCH_REPLICATION=0 the 3-replica table, BENCH_METRICS=0 the metrics-cost table;
 * BENCH_TLS=0 the TLS-cost table;
 * BENCH_ONLY=backup|replication|metrics|tls|services|crypt|cpu|pgbench|commit runs one table alone
 * (cpu and pgbench only so: they start daemons of their own and take minutes).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { DaemonProcess, ROOT } from '../test/helpers/daemon.ts';
import { backupBench } from './backup.ts';
import { replicationBench } from './replication.ts';
import { expandBench, trimBench } from './services.ts';
import { tlsBench } from './tls.ts';
import { cryptBench } from './crypt.ts';
import { cpuBench } from './cpu.ts';
import { pgbenchBench } from './pgbench.ts';
import { commitBench } from './commit.ts';
import { median } from './proc.ts';
import { holdFreedMemory } from './memory.ts';
import { mustRun, waitFor } from '../test/helpers/run.ts';

const RUNTIME_S = Number(process.env.BENCH_RUNTIME ?? 10);
const SIZE = '1G';
const CHAIN_SNAPSHOTS = 100;

interface Job {
  name: string;
  rw: string;
  bs: string;
  iodepth: number;
  metric: 'iops' | 'bw';
}

const JOBS: Job[] = [
  { name: '4k randread QD32', rw: 'randread', bs: '4k', iodepth: 32, metric: 'iops' },
  { name: '4k randwrite QD32', rw: 'randwrite', bs: '4k', iodepth: 32, metric: 'iops' },
  { name: '1M read QD8', rw: 'read', bs: '1M', iodepth: 8, metric: 'bw' },
  { name: '1M write QD8', rw: 'write', bs: '1M', iodepth: 8, metric: 'bw' },
];

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

async function waitPort(port: number): Promise<void> {
  await waitFor(
    `port ${port}`,
    () =>
      new Promise<true | undefined>((resolve) => {
        const c = net.connect(port, '127.0.0.1', () => {
          c.destroy();
          resolve(true);
        });
        c.on('error', () => resolve(undefined));
      }),
  );
}

/**
 * Every write job starts from a clean, empty page cache. Measured on kernel 6.18: a file filled
 * by 1 MiB writes keeps large folios, and a 4 KiB write into one walks all of its buffer heads
 * (`ext4_block_write_begin` at 55 % of the server's CPU); whichever target happened to keep them
 * ran 4k randwrite at half speed (nbdkit 33k or 79–88k IOPS on the same file, by page cache
 * state alone). Reads keep the warm cache the prefill left: dropping it would measure the disk.
 */
async function settle(job: Job): Promise<void> {
  await mustRun('sync', []);
  if (job.rw.includes('write'))
    await fs.promises.writeFile('/proc/sys/vm/drop_caches', '3').catch(() => undefined);
}

/** Runs one fio job with `target` arguments (NBD URI or file) and returns IOPS or MB/s. */
async function runFio(target: string[], job: Job): Promise<number> {
  await settle(job);
  const { stdout } = await mustRun(
    'fio',
    [
      `--name=${job.rw}`,
      ...target,
      `--rw=${job.rw}`,
      `--bs=${job.bs}`,
      `--iodepth=${job.iodepth}`,
      `--size=${SIZE}`,
      '--time_based',
      `--runtime=${RUNTIME_S}`,
      '--ramp_time=1',
      '--output-format=json',
    ],
    { timeoutMs: (RUNTIME_S + 120) * 1000 },
  );
  const j = (
    JSON.parse(stdout.slice(stdout.indexOf('{'))) as {
      jobs: Array<Record<'read' | 'write', { iops: number; bw_bytes: number }>>;
    }
  ).jobs[0]!;
  const side = job.rw.includes('write') ? j.write : j.read;
  return job.metric === 'iops' ? side.iops : side.bw_bytes / 1e6;
}

function fio(uri: string, job: Job): Promise<number> {
  return runFio(['--ioengine=nbd', `--uri=${uri}`], job);
}

async function prefill(uri: string): Promise<void> {
  await mustRun(
    'fio',
    [
      '--name=fill',
      '--ioengine=nbd',
      `--uri=${uri}`,
      '--rw=write',
      '--bs=1M',
      '--iodepth=8',
      `--size=${SIZE}`,
    ],
    {
      timeoutMs: 600_000,
    },
  );
}

interface LoopJob extends Job {
  engine: 'libaio' | 'psync';
}

const LOOP_JOBS: LoopJob[] = [
  ...JOBS.map((j) => ({ ...j, engine: 'libaio' as const })),
  ...JOBS.map((j) => ({
    ...j,
    engine: 'psync' as const,
    iodepth: 1,
    name: j.name.replace(/QD\d+/, 'QD1'),
  })),
];

function fioFile(file: string, job: LoopJob): Promise<number> {
  return runFio([`--filename=${file}`, `--ioengine=${job.engine}`, '--direct=1'], job);
}

/** fio on a loop device over the FUSE image, against a loop device over the same volume through NBD (nbdfuse). */
async function fuseBench(corral: DaemonProcess, dir: string): Promise<string> {
  const created = await corral.api_('POST', '/v1/volumes', {
    name: 'fuseb',
    size: SIZE,
    frontend: 'fuse',
  });
  if (created.status !== 201)
    throw new Error(`cannot create the FUSE volume: ${JSON.stringify(created.json)}`);
  await prefill(corral.uri('fuseb'));
  const image = path.join(corral.dataDir, 'images', 'fuseb.img');
  const nbdDir = path.join(dir, 'nbdfuse');
  await fs.promises.mkdir(nbdDir);
  const nbdfuse = spawn('nbdfuse', [nbdDir, corral.uri('fuseb')], { stdio: 'ignore' });
  const loops: string[] = [];
  try {
    await waitFor('nbdfuse', async () =>
      (await fs.promises.stat(path.join(nbdDir, 'nbd')).catch(() => undefined))?.size
        ? true
        : undefined,
    );
    for (const file of [image, path.join(nbdDir, 'nbd')]) {
      // direct-io on both loops: neither side may answer reads from the page cache.
      loops.push(
        (await mustRun('losetup', ['--find', '--show', '--direct-io=on', file])).stdout.trim(),
      );
    }
    await mustRun('sync', []);
    const lines = [
      '| job (fio on a loop device, direct=1) | over the FUSE image | over NBD (nbdfuse) | FUSE / NBD |',
      '| --- | ---: | ---: | ---: |',
    ];
    for (const job of LOOP_JOBS) {
      const viaFuse = await fioFile(loops[0]!, job);
      const viaNbd = await fioFile(loops[1]!, job);
      const unit = job.metric === 'iops' ? ' IOPS' : ' MB/s';
      console.error(
        `${job.engine} ${job.name.padEnd(18)} fuse ${viaFuse.toFixed(0)} nbd ${viaNbd.toFixed(0)}${unit}`,
      );
      lines.push(
        `| ${job.engine} ${job.name} | ${viaFuse.toFixed(0)}${unit} | ${viaNbd.toFixed(0)}${unit} | ${(viaFuse / viaNbd).toFixed(2)} |`,
      );
    }
    return lines.join('\n');
  } finally {
    for (const loop of loops) await mustRun('losetup', ['-d', loop]).catch(() => undefined);
    await mustRun('fusermount', ['-u', nbdDir]).catch(() => undefined);
    nbdfuse.kill('SIGTERM');
  }
}

/**
 * What the metrics cost: the 4k jobs on two daemons side by side, one with
 * `--metrics off`, alternating, three rounds, medians.
 */
async function metricsBench(dir: string): Promise<string> {
  const on = await DaemonProcess.start({ dataDir: path.join(dir, 'metrics-on') });
  const off = await DaemonProcess.start({
    dataDir: path.join(dir, 'metrics-off'),
    args: ['--metrics', 'off'],
  });
  try {
    for (const d of [on, off]) {
      await d.createVolume('m', SIZE);
      await prefill(d.uri('m'));
    }
    await mustRun('sync', []);
    const rows = ['| job | metrics on | metrics off | on / off |', '| --- | ---: | ---: | ---: |'];
    for (const job of JOBS.slice(0, 2)) {
      const samples: Record<'on' | 'off', number[]> = { on: [], off: [] };
      for (let i = 0; i < 3; i++) {
        const order: Array<'on' | 'off'> = i % 2 === 0 ? ['on', 'off'] : ['off', 'on'];
        for (const which of order)
          samples[which].push(await fio((which === 'on' ? on : off).uri('m'), job));
      }
      const a = median(samples.on);
      const b = median(samples.off);
      console.error(`${job.name}: metrics on ${a.toFixed(0)}, off ${b.toFixed(0)} IOPS`);
      rows.push(
        `| ${job.name} | ${a.toFixed(0)} IOPS | ${b.toFixed(0)} IOPS | ${(a / b).toFixed(2)} |`,
      );
    }
    return rows.join('\n');
  } finally {
    await on.stop('SIGTERM');
    await off.stop('SIGTERM');
  }
}

async function writeMetricsTable(table: string): Promise<void> {
  const stamp = `Measured ${new Date().toISOString().slice(0, 10)} by \`npm run bench\` (Node ${process.version}, ${os.cpus().length} cores; two daemons side by side, alternating, medians of 3 runs of ${RUNTIME_S} s).`;
  await replaceSection(
    path.join(ROOT, 'docs', 'PERFORMANCE.md'),
    'bench-metrics',
    `${stamp}\n\n${table}`,
  );
}

async function replaceSection(doc: string, name: string, content: string): Promise<boolean> {
  const text = await fs.promises.readFile(doc, 'utf8').catch(() => '');
  const begin = `<!-- ${name}:begin -->`;
  const end = `<!-- ${name}:end -->`;
  if (!text.includes(begin) || !text.includes(end)) return false;
  await fs.promises.writeFile(
    doc,
    text.slice(0, text.indexOf(begin) + begin.length) +
      `\n${content}\n` +
      text.slice(text.indexOf(end)),
  );
  return true;
}

const today = (): string => new Date().toISOString().slice(0, 10);

/** Tables that BENCH_ONLY runs alone: how each is measured, and its section of PERFORMANCE.md. */
const ALONE: Record<
  string,
  { section: string; measure: (dir: string) => Promise<string>; stamp?: () => string }
> = {
  crypt: {
    section: 'bench-crypt',
    measure: (dir) => cryptBench(dir, JOBS, fio, prefill, RUNTIME_S),
  },
  services: {
    section: 'bench-services',
    measure: async (dir) => `${await expandBench(dir)}\n\n${await trimBench(dir)}`,
  },
  cpu: {
    section: 'bench-cpu',
    measure: (dir) => cpuBench(dir, Number(process.env.BENCH_RUNTIME ?? 8), prefill),
    stamp: () =>
      `Measured ${today()} by \`BENCH_ONLY=cpu npm run bench\` (Node ${process.version}, ${os.cpus().length} cores; three daemons with a shared secret, fio over NBD on daemon 1, ${process.env.BENCH_RUNTIME ?? 8} s per job).`,
  },
  commit: {
    section: 'bench-commit',
    measure: commitBench,
    stamp: () =>
      `Measured ${today()} by \`BENCH_ONLY=commit npm run bench\` (Node ${process.version}, ${os.cpus().length} cores; one replica in the bench process, 3000 commits each).`,
  },
  pgbench: {
    section: 'bench-pgbench',
    measure: pgbenchBench,
    stamp: () =>
      `Measured ${today()} by \`BENCH_ONLY=pgbench npm run bench\` (PostgreSQL's pgbench, Node ${process.version}, ${os.cpus().length} cores; three daemons, postgres and pgbench share them).`,
  },
};

async function main(): Promise<void> {
  await holdFreedMemory();
  const dir = await fs.promises.mkdtemp(path.join(ROOT, '.bench-'));
  const children: ChildProcess[] = [];
  const results = new Map<string, number[]>();
  let chainIops = 0;
  let flatIops = 0;
  let fuseTable = '';
  let backupTable = '';
  let replicationTable = '';
  let metricsTable = '';
  let tlsTable = '';
  let corral: DaemonProcess | undefined;
  if (process.env.BENCH_ONLY === 'replication') {
    const table = await replicationBench(JOBS, fio, prefill);
    console.log(`\n${table}`);
    await writeSection('bench-replication', table);
    await fs.promises.rm(dir, { recursive: true, force: true });
    return;
  }
  if (process.env.BENCH_ONLY === 'tls') {
    const table = await tlsBench(JOBS, fio, prefill);
    console.log(`\n${table}`);
    await writeSection('bench-tls', table);
    await fs.promises.rm(dir, { recursive: true, force: true });
    return;
  }
  const alone = ALONE[process.env.BENCH_ONLY ?? ''];
  if (alone) {
    try {
      const table = await alone.measure(dir);
      console.log(`\n${table}`);
      const stamp = alone.stamp?.();
      await replaceSection(
        path.join(ROOT, 'docs', 'PERFORMANCE.md'),
        alone.section,
        stamp ? `${stamp}\n\n${table}` : table,
      );
    } finally {
      await fs.promises.rm(dir, { recursive: true, force: true });
    }
    return;
  }
  if (process.env.BENCH_ONLY === 'metrics') {
    try {
      const table = await metricsBench(dir);
      console.log(`\n${table}`);
      await writeMetricsTable(table);
    } finally {
      await fs.promises.rm(dir, { recursive: true, force: true });
    }
    return;
  }
  if (process.env.BENCH_ONLY === 'backup') {
    try {
      // The backup table's stores live in the bench's directory, outside the data dir.
      corral = await DaemonProcess.start({
        dataDir: path.join(dir, 'corral'),
        args: ['--backup-root', dir],
      });
      backupTable = await backupBench(corral, dir);
    } finally {
      await corral?.stop('SIGTERM');
      await fs.promises.rm(dir, { recursive: true, force: true });
    }
    await writeBackupTable(backupTable);
    return;
  }
  try {
    // The backup table's stores live in the bench's directory, outside the data dir.
    corral = await DaemonProcess.start({
      dataDir: path.join(dir, 'corral'),
      args: ['--backup-root', dir],
    });
    await corral.createVolume('bench', SIZE);
    const file = path.join(dir, 'baseline.img');
    await mustRun('truncate', ['-s', SIZE, file]);

    const nbdkitPort = await freePort();
    children.push(
      spawn('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(nbdkitPort), 'file', file], {
        stdio: 'ignore',
      }),
    );
    const qemuPort = await freePort();
    const qemuFile = path.join(dir, 'qemu.img');
    await mustRun('truncate', ['-s', SIZE, qemuFile]);
    children.push(
      spawn(
        'qemu-nbd',
        [
          '-f',
          'raw',
          '-b',
          '127.0.0.1',
          '-p',
          String(qemuPort),
          '-x',
          'bench',
          '--persistent',
          '--shared=8',
          qemuFile,
        ],
        { stdio: 'ignore' },
      ),
    );
    await waitPort(nbdkitPort);
    await waitPort(qemuPort);

    const targets: Array<[string, string]> = [
      ['corral', corral.uri('bench')],
      ['nbdkit', `nbd://127.0.0.1:${nbdkitPort}/`],
      ['qemu-nbd', `nbd://127.0.0.1:${qemuPort}/bench`],
    ];
    for (const [, uri] of targets) await prefill(uri);
    // A volume whose data is spread over a chain of 100 snapshots, for the read-index row.
    await corral.createVolume('chain', SIZE);
    await prefill(corral.uri('chain'));
    for (let i = 0; i < CHAIN_SNAPSHOTS; i++) {
      const offsetMiB = (i * 37) % 1000;
      await mustRun('qemu-io', [
        '-f',
        'raw',
        corral.uri('chain'),
        '-c',
        `write -P ${i % 250} ${offsetMiB}M 8M`,
      ]);
      await corral.api_('POST', '/v1/volumes/chain/snapshots', { name: `s${i}` });
    }
    // Dirty pages draining to disk in the background would skew whatever runs first.
    await mustRun('sync', []);
    // The chain row first, in a quiet system (before the write jobs leave dirty pages behind),
    // alternating with the one-layer volume; the median of three samples each, since single
    // samples on this VM swing by a third.
    const chainJob = JOBS[0]!;
    await mustRun('sync', []);
    const samples: Record<'chain' | 'bench', number[]> = { chain: [], bench: [] };
    for (let i = 0; i < 3; i++) {
      const order: Array<'chain' | 'bench'> = i % 2 === 0 ? ['chain', 'bench'] : ['bench', 'chain'];
      for (const volume of order) {
        const iops = await fio(corral.uri(volume), chainJob);
        console.error(`  ${volume} ${iops.toFixed(0)} IOPS`);
        samples[volume].push(iops);
      }
    }
    chainIops = median(samples.chain);
    flatIops = median(samples.bench);
    console.error(
      `${chainJob.name}: one layer ${flatIops.toFixed(0)} IOPS, ${CHAIN_SNAPSHOTS} snapshots ${chainIops.toFixed(0)} IOPS`,
    );
    for (const job of JOBS) {
      const row: number[] = [];
      for (const [name, uri] of targets) {
        const value = await fio(uri, job);
        row.push(value);
        console.error(
          `${job.name.padEnd(18)} ${name.padEnd(9)} ${value.toFixed(0)} ${job.metric === 'iops' ? 'IOPS' : 'MB/s'}`,
        );
      }
      results.set(job.name, row);
    }
    if (process.env.BENCH_FUSE !== '0') fuseTable = await fuseBench(corral, dir);
    if (process.env.BENCH_BACKUP !== '0') backupTable = await backupBench(corral, dir);
    if (process.env.BENCH_REPLICATION !== '0')
      replicationTable = await replicationBench(JOBS, fio, prefill);
    if (process.env.BENCH_METRICS !== '0') metricsTable = await metricsBench(dir);
    if (process.env.BENCH_TLS !== '0') tlsTable = await tlsBench(JOBS, fio, prefill);
  } finally {
    for (const c of children) c.kill('SIGTERM');
    await corral?.stop('SIGTERM');
    await fs.promises.rm(dir, { recursive: true, force: true });
  }

  const lines = [
    `| job | Corral | nbdkit file | qemu-nbd | Corral / nbdkit | Corral / qemu-nbd |`,
    `| --- | ---: | ---: | ---: | ---: | ---: |`,
  ];
  for (const job of JOBS) {
    const [c, k, q] = results.get(job.name)!;
    const unit = job.metric === 'iops' ? ' IOPS' : ' MB/s';
    lines.push(
      `| ${job.name} | ${c!.toFixed(0)}${unit} | ${k!.toFixed(0)}${unit} | ${q!.toFixed(0)}${unit} | ${(c! / k!).toFixed(2)} | ${(c! / q!).toFixed(2)} |`,
    );
  }
  lines.push(
    '',
    `4k randread QD32 on a volume whose data spans ${CHAIN_SNAPSHOTS} snapshots: ${chainIops.toFixed(0)} IOPS against ${flatIops.toFixed(0)} IOPS on a one-layer volume measured beside it (medians of 3: ${(chainIops / flatIops).toFixed(2)}×).`,
  );
  const table = lines.join('\n');
  console.log(table);
  const stamp = `Measured ${new Date().toISOString().slice(0, 10)} by \`npm run bench\` (Node ${process.version}, ${os.cpus().length} cores, fio ioengine=nbd over TCP loopback, ${SIZE} volume/file, ${RUNTIME_S} s per job).`;
  const doc = path.join(ROOT, 'docs', 'PERFORMANCE.md');
  if (await replaceSection(doc, 'bench', `${stamp}\n\n${table}`))
    console.log(`\nupdated ${path.relative(ROOT, doc)}`);
  if (fuseTable) {
    console.log(`\n${fuseTable}`);
    await replaceSection(doc, 'bench-fuse', `${stamp}\n\n${fuseTable}`);
  }
  await writeBackupTable(backupTable);
  if (replicationTable) {
    console.log(`\n${replicationTable}`);
    await writeSection('bench-replication', replicationTable);
  }
  if (metricsTable) {
    console.log(`\n${metricsTable}`);
    await writeMetricsTable(metricsTable);
  }
  if (tlsTable) {
    console.log(`\n${tlsTable}`);
    await writeSection('bench-tls', tlsTable);
  }
}

async function writeSection(name: string, table: string): Promise<void> {
  const stamp = `Measured ${new Date().toISOString().slice(0, 10)} by \`npm run bench\` (Node ${process.version}, ${os.cpus().length} cores; three daemons on this machine, fio ioengine=nbd on daemon 1, ${RUNTIME_S} s per job).`;
  await replaceSection(path.join(ROOT, 'docs', 'PERFORMANCE.md'), name, `${stamp}\n\n${table}`);
}

async function writeBackupTable(table: string): Promise<void> {
  if (!table) return;
  console.log(`\n${table}`);
  const stamp = `Measured ${new Date().toISOString().slice(0, 10)} by \`npm run bench\` (Node ${process.version}, ${os.cpus().length} cores; a 1 GiB volume backed up to a directory on the same disk).`;
  await replaceSection(
    path.join(ROOT, 'docs', 'PERFORMANCE.md'),
    'bench-backup',
    `${stamp}\n\n${table}`,
  );
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
