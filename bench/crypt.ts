/**
 * What encryption at rest costs (`BENCH_ONLY=crypt`): the fio jobs over NBD
 * on one daemon against a plain and an encrypted volume (both prefilled),
 * alternating, medians of 3, with the daemon's CPU per I/O or per GB from
 * /proc/<pid>/stat — what decides throughput when the host has cores to spare.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { DaemonProcess } from '../test/helpers/daemon.ts';
import { cpuSeconds, median } from './proc.ts';
import type { BenchJob } from './replication.ts';

export async function cryptBench<J extends BenchJob>(
  dir: string,
  jobs: J[],
  fio: (uri: string, job: J) => Promise<number>,
  prefill: (uri: string) => Promise<void>,
  runtimeS: number,
): Promise<string> {
  const d = await DaemonProcess.start({ dataDir: path.join(dir, 'corral-crypt') });
  try {
    const key = path.join(dir, 'bench.key');
    fs.writeFileSync(key, randomBytes(64), { mode: 0o600 });
    for (const [name, extra] of [
      ['plain', []],
      ['vault', ['--encrypt', '--key-file', key]],
    ] as const) {
      const r = await d.cli(['volume', 'create', name, '--size', '1G', ...extra]);
      if (r.code !== 0) throw new Error(r.stderr);
      await prefill(d.uri(name));
    }
    const rows: string[] = [];
    for (const job of jobs) {
      const value: Record<'plain' | 'vault', number[]> = { plain: [], vault: [] };
      const cpu: Record<'plain' | 'vault', number[]> = { plain: [], vault: [] };
      for (let i = 0; i < 3; i++)
        for (const which of i % 2 === 0
          ? (['plain', 'vault'] as const)
          : (['vault', 'plain'] as const)) {
          const before = cpuSeconds(d.child.pid!);
          const v = await fio(d.uri(which), job);
          const used = cpuSeconds(d.child.pid!) - before;
          value[which].push(v);
          // The work done while the CPU was counted: the measured rate over the run and its ramp.
          const work = v * (runtimeS + 1);
          cpu[which].push(job.metric === 'iops' ? (used / work) * 1e6 : used / (work / 1000));
        }
      const unit = job.metric === 'iops' ? 'IOPS' : 'MB/s';
      const cost = (x: number) =>
        job.metric === 'iops' ? `${x.toFixed(1)} µs/IO` : `${x.toFixed(2)} CPU-s/GB`;
      const [p, v] = [median(value.plain), median(value.vault)];
      rows.push(
        `| ${job.name} | ${p.toFixed(0)} ${unit} | ${v.toFixed(0)} ${unit} | ${(v / p).toFixed(2)} | ${cost(median(cpu.plain))} | ${cost(median(cpu.vault))} |`,
      );
      console.error(`${job.name}: plain ${p.toFixed(0)}, encrypted ${v.toFixed(0)}`);
    }
    return [
      `Measured ${new Date().toISOString().slice(0, 10)} by \`BENCH_ONLY=crypt npm run bench\`: one daemon, a plain and an encrypted 1 GiB volume, ${runtimeS} s per job, alternating, medians of 3.`,
      '',
      '| job | plain | encrypted | encrypted / plain | daemon CPU, plain | daemon CPU, encrypted |',
      '| --- | ---: | ---: | ---: | ---: | ---: |',
      ...rows,
    ].join('\n');
  } finally {
    await d.stop('SIGTERM');
  }
}
