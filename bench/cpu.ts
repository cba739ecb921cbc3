/**
 * CPU per byte and per I/O, per process (`BENCH_ONLY=cpu npm run bench`):
 * three daemons sharing a cluster secret, a 1-replica and a 3-replica volume
 * on daemon 1, nbdkit serving a file on the same disk, fio over NBD. For
 * each job the user+system time of every process (`/proc/<pid>/stat`) and
 * fio's own; on one 2-core machine throughput mostly measures contention,
 * CPU per byte is what decides it when every host has its own cores. Then
 * 4 KiB QD1 write latency (fio's percentiles), and what idle volumes cost.
 * Last, the writes again with each measured process alone on a core
 * (onACoreOfItsOwn), set against the 1-replica daemon at the same rate.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { TestCluster } from '../test/helpers/cluster.ts';
import { freePort, mustRun, waitFor } from '../test/helpers/run.ts';
import { cpuSeconds } from './proc.ts';

interface CpuJob {
  name: string;
  rw: string;
  bs: string;
  iodepth: number;
  /** fio's rate cap (`--rate=400000000` bytes/s, `--rate_iops=9000`), to compare processes at one load. */
  rate?: string;
}

const JOBS: CpuJob[] = [
  { name: '1M write QD8', rw: 'write', bs: '1M', iodepth: 8 },
  { name: '4k randwrite QD32', rw: 'randwrite', bs: '4k', iodepth: 32 },
  { name: '1M read QD8', rw: 'read', bs: '1M', iodepth: 8 },
  { name: '4k randread QD32', rw: 'randread', bs: '4k', iodepth: 32 },
];
const QD1: CpuJob = { name: '4k randwrite QD1', rw: 'randwrite', bs: '4k', iodepth: 1 };

interface Sample {
  /** MB/s or IOPS, as the job is measured. */
  bytes: number;
  ios: number;
  seconds: number;
  /** CPU seconds of each process over the job, by label; `fio` from its own report. */
  cpu: Record<string, number>;
  p50us: number;
  p99us: number;
}

interface FioSide {
  io_bytes: number;
  total_ios: number;
  runtime: number;
  clat_ns: { percentile?: Record<string, number> };
}

async function runJob(
  uri: string,
  job: CpuJob,
  processes: Record<string, number>,
  runtimeS: number,
  fioCpus?: string,
): Promise<Sample> {
  await mustRun('sync', []);
  // Every target starts from the same page-cache state (see settle() in run.ts).
  if (job.rw.includes('write'))
    await fs.promises.writeFile('/proc/sys/vm/drop_caches', '3').catch(() => undefined);
  const before = Object.fromEntries(
    Object.entries(processes).map(([k, pid]) => [k, cpuSeconds(pid)]),
  );
  const fio = [
    `--name=${job.rw}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${job.rw}`,
    `--bs=${job.bs}`,
    `--iodepth=${job.iodepth}`,
    ...(job.rate === undefined ? [] : [job.rate]),
    '--size=1G',
    '--time_based',
    `--runtime=${runtimeS}`,
    '--output-format=json',
  ];
  const { stdout } = await mustRun(
    fioCpus === undefined ? 'fio' : 'taskset',
    fioCpus === undefined ? fio : ['-c', fioCpus, 'fio', ...fio],
    { timeoutMs: (runtimeS + 120) * 1000 },
  );
  const cpu = Object.fromEntries(
    Object.entries(processes).map(([k, pid]) => [k, cpuSeconds(pid) - before[k]!]),
  );
  const j = (
    JSON.parse(stdout.slice(stdout.indexOf('{'))) as {
      jobs: Array<Record<'read' | 'write', FioSide> & { usr_cpu: number; sys_cpu: number }>;
    }
  ).jobs[0]!;
  const side = job.rw.includes('write') ? j.write : j.read;
  const seconds = side.runtime / 1000;
  cpu.fio = ((j.usr_cpu + j.sys_cpu) / 100) * seconds;
  const pct = side.clat_ns.percentile ?? {};
  return {
    bytes: side.io_bytes,
    ios: side.total_ios,
    seconds,
    cpu,
    p50us: (pct['50.000000'] ?? 0) / 1000,
    p99us: (pct['99.000000'] ?? 0) / 1000,
  };
}

const perGB = (s: Sample, who: string): number => s.cpu[who]! / (s.bytes / 1e9);
const perIo = (s: Sample, who: string): number => (s.cpu[who]! * 1e6) / s.ios;

/** Every thread of a process onto these CPUs; threads it starts later inherit them. */
async function pin(pid: number, cpus: string): Promise<void> {
  await mustRun('taskset', ['-a', '-p', '-c', cpus, String(pid)]);
}

function rss(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m?.[1] ?? 0) * 1024;
}

export async function cpuBench(
  dir: string,
  runtimeS: number,
  prefill: (uri: string) => Promise<void>,
): Promise<string> {
  const cluster = await TestCluster.start(3);
  const file = path.join(dir, 'nbdkit.img');
  await mustRun('truncate', ['-s', '1G', file]);
  const port = await freePort();
  const nbdkit = spawn('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), 'file', file], {
    stdio: 'ignore',
  });
  try {
    const [d1, d2, d3] = cluster.daemons as [
      (typeof cluster.daemons)[0],
      (typeof cluster.daemons)[0],
      (typeof cluster.daemons)[0],
    ];
    const kit = `nbd://127.0.0.1:${port}/`;
    await waitFor('nbdkit', async () =>
      (await mustRun('nbdinfo', ['--size', kit]).catch(() => undefined)) ? true : undefined,
    );
    for (const [name, replicas] of [
      ['one', 1],
      ['two', 2],
      ['three', 3],
    ] as const) {
      const r = await d1.api_('POST', '/v1/volumes', { name, size: '1G', replicas });
      if (r.status !== 201) throw new Error(`create ${name}: ${JSON.stringify(r.json)}`);
    }
    for (const uri of [kit, d1.uri('one'), d1.uri('two'), d1.uri('three')]) await prefill(uri);
    const pids = {
      nbdkit: nbdkit.pid!,
      d1: d1.child.pid!,
      d2: d2.child.pid!,
      d3: d3.child.pid!,
    };
    const rows = [
      '| job | nbdkit | Corral, 1 replica | Corral, 3 replicas: engine daemon | each replica daemon | fio (nbdkit / 1 / 3) |',
      '| --- | ---: | ---: | ---: | ---: | ---: |',
    ];
    const measured = new Map<string, { kit: Sample; one: Sample; three: Sample }>();
    for (const job of [...JOBS, QD1]) {
      const kitS = await runJob(kit, job, pids, runtimeS);
      const one = await runJob(d1.uri('one'), job, pids, runtimeS);
      const three = await runJob(d1.uri('three'), job, pids, runtimeS);
      measured.set(job.name, { kit: kitS, one, three });
      const big = job.bs === '1M';
      const rate = (s: Sample) =>
        big
          ? `${(s.bytes / 1e6 / s.seconds).toFixed(0)} MB/s`
          : `${(s.ios / s.seconds / 1000).toFixed(1)}k IOPS`;
      const cost = (s: Sample, who: string) =>
        big ? `${perGB(s, who).toFixed(2)} CPU-s/GB` : `${perIo(s, who).toFixed(1)} µs/IO`;
      const replicaCost = big
        ? `${perGB(three, 'd2').toFixed(2)}–${perGB(three, 'd3').toFixed(2)} CPU-s/GB`
        : `${perIo(three, 'd2').toFixed(1)}–${perIo(three, 'd3').toFixed(1)} µs/IO`;
      const fioCost = [kitS, one, three]
        .map((s) => (big ? perGB(s, 'fio').toFixed(2) : perIo(s, 'fio').toFixed(1)))
        .join(' / ');
      const lat =
        job.iodepth === 1
          ? (s: Sample) => `, p50 ${s.p50us.toFixed(0)} µs, p99 ${s.p99us.toFixed(0)} µs`
          : () => '';
      rows.push(
        `| ${job.name} | ${rate(kitS)}, ${cost(kitS, 'nbdkit')}${lat(kitS)} | ${rate(one)}, ${cost(one, 'd1')}${lat(one)} | ${rate(three)}, ${cost(three, 'd1')}${lat(three)} | ${replicaCost} | ${fioCost} |`,
      );
      console.error(rows.at(-1));
    }
    const w1 = measured.get('1M write QD8')!;
    const w4 = measured.get('4k randwrite QD32')!;
    const q1 = measured.get(QD1.name)!;
    const replicaOf = (s: Sample, gb: boolean) =>
      Math.max(...['d2', 'd3'].map((d) => (gb ? perGB(s, d) : perIo(s, d))));
    const figures: Array<[string, string, string]> = [
      [
        '1-replica daemon CPU per GB, 1M writes, vs nbdkit',
        (perGB(w1.one, 'd1') / perGB(w1.kit, 'nbdkit')).toFixed(2) + '×',
        '≤ 1.5×',
      ],
      [
        '1-replica CPU µs per 4 KiB write vs nbdkit',
        (perIo(w4.one, 'd1') / perIo(w4.kit, 'nbdkit')).toFixed(2) + '×',
        '≤ 1.3×',
      ],
      [
        '3 replicas: engine daemon CPU per byte vs its 1-replica cost (1M / 4k)',
        `${(perGB(w1.three, 'd1') / perGB(w1.one, 'd1')).toFixed(2)}× / ${(perIo(w4.three, 'd1') / perIo(w4.one, 'd1')).toFixed(2)}×`,
        '≤ 1.8× / ≤ 1.8×',
      ],
      [
        '3 replicas: a replica daemon CPU per byte vs the 1-replica daemon (1M / 4k; the higher of two)',
        `${(replicaOf(w1.three, true) / perGB(w1.one, 'd1')).toFixed(2)}× / ${(replicaOf(w4.three, false) / perIo(w4.one, 'd1')).toFixed(2)}×`,
        '≤ 1.0× / ≤ 0.8×',
      ],
      [
        '1M write QD8 throughput vs nbdkit (1 replica)',
        `${(w1.one.bytes / w1.one.seconds / (w1.kit.bytes / w1.kit.seconds)).toFixed(2)}×`,
        '≥ 0.6×',
      ],
      [
        '4k QD1 write latency p99, 3 replicas vs 1',
        `${(q1.three.p99us / q1.one.p99us).toFixed(2)}× (${q1.one.p99us.toFixed(0)} → ${q1.three.p99us.toFixed(0)} µs)`,
        '≤ 2.5×',
      ],
    ];
    // Idle volumes: 100 more attached on daemon 1, nothing reading or writing them.
    const rssBefore = rss(pids.d1);
    for (let i = 0; i < 100; i++) {
      const r = await d1.api_('POST', '/v1/volumes', { name: `idle${i}`, size: '1G' });
      if (r.status !== 201) throw new Error(`create idle${i}: ${JSON.stringify(r.json)}`);
    }
    await new Promise((r) => setTimeout(r, 2000));
    const cpu0 = cpuSeconds(pids.d1);
    const idleS = 10;
    await new Promise((r) => setTimeout(r, idleS * 1000));
    const idleCpu = cpuSeconds(pids.d1) - cpu0;
    const perVolume = (rss(pids.d1) - rssBefore) / 100;
    figures.push([
      '100 idle attached volumes on one daemon',
      `${(perVolume / 1024).toFixed(0)} KiB RSS each, ${((idleCpu / idleS) * 100).toFixed(2)} % of a core in total`,
      '≤ 2 MiB each, < 1 % of a core',
    ]);
    for (let i = 0; i < 100; i++) {
      const r = await d1.api_('DELETE', `/v1/volumes/idle${i}`);
      if (r.status >= 300) throw new Error(`delete idle${i}: ${JSON.stringify(r.json)}`);
    }
    const alone = await onACoreOfItsOwn(pids, runtimeS, [
      ['nbdkit', 'nbdkit', kit],
      ['1 replica: its daemon', 'd1', d1.uri('one')],
      ['2 replicas: engine daemon (sends each byte once)', 'd1', d1.uri('two')],
      ['3 replicas: engine daemon', 'd1', d1.uri('three'), '≤ 1.8× / ≤ 1.8×'],
      ['3 replicas: a replica daemon', 'd2', d1.uri('three'), '≤ 1.0× / ≤ 0.8×'],
    ]);
    return [
      ...rows,
      '',
      '| figure | measured | target |',
      '| --- | ---: | ---: |',
      ...figures.map(([a, b, c]) => `| ${a} | ${b} | ${c} |`),
      '',
      ...alone,
    ].join('\n');
  } finally {
    nbdkit.kill('SIGTERM');
    await cluster.cleanup();
  }
}

/** A job's sample and the measured process's CPU per GB (1 MiB) or per I/O (4 KiB). */
interface Measured {
  s: Sample;
  cost: number;
}

/**
 * The same writes with the measured process alone on CPU 1 and everything
 * else (fio, the other daemons, nbdkit) on CPU 0: as near as one 2-core
 * machine comes to a host of its own, so that its CPU per byte does not
 * carry the cost of sharing a core with the processes it talks to. A
 * process's CPU per byte also falls as its load rises (more bytes per
 * wake-up), and here a replicated layout runs at what the busy other core
 * lets through: so each layout is set against the 1-replica daemon alone at
 * the rate that layout reached, the same work at the same load. Loopback
 * still charges a receiver's TCP processing to the sender's CPU.
 */
async function onACoreOfItsOwn(
  pids: Record<string, number>,
  runtimeS: number,
  /** nbdkit, the 1-replica daemon, then the replicated layouts with their targets. */
  layouts: Array<[label: string, who: string, uri: string, target?: string]>,
): Promise<string[]> {
  const [kit, one, ...replicated] = layouts as [
    (typeof layouts)[0],
    (typeof layouts)[0],
    ...typeof layouts,
  ];
  const [big, small] = [JOBS[0]!, JOBS[1]!];
  const measure = async ([, who, uri]: (typeof layouts)[0], job: CpuJob): Promise<Measured> => {
    for (const [name, pid] of Object.entries(pids)) await pin(pid, name === who ? '1' : '0');
    const s = await runJob(uri, job, pids, runtimeS, '0');
    return { s, cost: job.bs === '1M' ? perGB(s, who) : perIo(s, who) };
  };
  const rateOf = (s: Sample, job: CpuJob): CpuJob =>
    job.bs === '1M'
      ? { ...job, rate: `--rate=${Math.floor(s.bytes / s.seconds)}` }
      : { ...job, rate: `--rate_iops=${Math.floor(s.ios / s.seconds)}` };
  const show = (m: Measured, job: CpuJob) =>
    job.bs === '1M'
      ? `${m.cost.toFixed(2)} CPU-s/GB at ${(m.s.bytes / 1e6 / m.s.seconds).toFixed(0)} MB/s`
      : `${m.cost.toFixed(1)} µs/IO at ${(m.s.ios / m.s.seconds / 1000).toFixed(1)}k IOPS`;
  const rows = [
    '| on a core of its own (the rest and fio on the other) | 1M write QD8 | the 1-replica daemon at that rate | 4k randwrite QD32 | the 1-replica daemon at that rate |',
    '| --- | ---: | ---: | ---: | ---: |',
  ];
  const figures: string[] = [];
  try {
    const full: Measured[] = [];
    for (const layout of [kit, one]) {
      const [a, b] = [await measure(layout, big), await measure(layout, small)];
      full.push(a, b);
      rows.push(`| ${layout[0]} | ${show(a, big)} | | ${show(b, small)} | |`);
      console.error(rows.at(-1));
    }
    const [kitBig, kitSmall, oneBig, oneSmall] = full as [Measured, Measured, Measured, Measured];
    figures.push(
      `| 1-replica daemon vs nbdkit, each at full speed | ${(oneBig.cost / kitBig.cost).toFixed(2)}× / ${(oneSmall.cost / kitSmall.cost).toFixed(2)}× | ≤ 1.5× / ≤ 1.3× |`,
    );
    for (const layout of replicated) {
      const cells: string[] = [];
      const ratios: string[] = [];
      for (const job of [big, small]) {
        const it = await measure(layout, job);
        const base = await measure(one, rateOf(it.s, job));
        cells.push(show(it, job), show(base, job));
        ratios.push(`${(it.cost / base.cost).toFixed(2)}×`);
      }
      rows.push(`| ${layout[0]} | ${cells.join(' | ')} |`);
      console.error(rows.at(-1));
      figures.push(
        `| ${layout[0]} vs the 1-replica daemon | ${ratios.join(' / ')} | ${layout[3] ?? '—'} |`,
      );
    }
  } finally {
    for (const pid of Object.values(pids)) await pin(pid, '0,1');
  }
  return [
    ...rows,
    '',
    '| figure, each on a core of its own, at the same rate (1M / 4k) | measured | target |',
    '| --- | ---: | ---: |',
    ...figures,
  ];
}
