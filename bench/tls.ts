/**
 * What TLS costs, for `npm run bench`: (1) the fio jobs over NBD on one
 * daemon with `--nbd-tls on`, through `nbds://` and through `nbd://` to the
 * same volume, alternating, medians of 3; (2) the 3-replica volume on three
 * daemons whose API and replica streams run TLS, against three plain ones,
 * with the CPU time per GB written of the engine's daemon and of a replica's
 * (from /proc/<pid>/stat), which is what TLS costs when each host has its own
 * cores.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import { TestCa } from '../test/helpers/certs.ts';
import { CLUSTER_SECRET } from '../test/helpers/cluster.ts';
import { DaemonProcess } from '../test/helpers/daemon.ts';
import { freePorts, mustRun } from '../test/helpers/run.ts';
import { cpuSeconds, median } from './proc.ts';
import type { BenchJob } from './replication.ts';

/**
 * fio's nbd engine (and nbdfuse) refuse URIs that name local files, so
 * `tls-certificates=DIR` is out: the bench CA joins the system's trust store
 * (GnuTLS reads it when a URI names none) for the run, and leaves it after.
 */
async function trustSystemWide(caFile: string): Promise<() => Promise<void>> {
  const anchor = '/usr/local/share/ca-certificates/corral-bench.crt';
  await fs.promises.copyFile(caFile, anchor);
  await mustRun('update-ca-certificates', []);
  return async () => {
    await fs.promises.rm(anchor, { force: true });
    await mustRun('update-ca-certificates', ['--fresh']);
  };
}

const RUNTIME_S = Number(process.env.BENCH_RUNTIME ?? 10);

async function threeDaemons(tls: boolean, ca: TestCa): Promise<DaemonProcess[]> {
  const ports = await freePorts(3);
  const scheme = tls ? 'https' : 'http';
  const urls = ports.map((p) => `${scheme}://127.0.0.1:${p}`);
  const daemons: DaemonProcess[] = [];
  for (let i = 0; i < 3; i++) {
    const cert = tls
      ? await ca.issue(`b${i}`, `b${i}`, { ou: 'node', ips: ['127.0.0.1'] })
      : undefined;
    daemons.push(
      await DaemonProcess.start({
        ...(tls ? { caFile: ca.ca.cert } : { env: { CORRAL_CLUSTER_SECRET: CLUSTER_SECRET } }),
        args: [
          '--listen',
          `127.0.0.1:${ports[i]}`,
          ...urls.filter((_, j) => j !== i).flatMap((u) => ['--peer', u]),
          ...(cert ? ['--tls-cert', cert.cert, '--tls-key', cert.key, '--tls-ca', ca.ca.cert] : []),
        ],
      }),
    );
  }
  return daemons;
}

export async function tlsBench<J extends BenchJob & { rw: string; bs: string }>(
  jobs: J[],
  fio: (uri: string, job: J) => Promise<number>,
  prefill: (uri: string) => Promise<void>,
): Promise<string> {
  const ca = await TestCa.create('corral-bench-ca');
  try {
    const node = await ca.issue('n1', 'n1', { ou: 'node', ips: ['127.0.0.1'] });
    const rows = [
      '| job | NBD plain | NBD TLS | TLS / plain | 3 replicas plain | 3 replicas TLS | TLS / plain |',
      '| --- | ---: | ---: | ---: | ---: | ---: | ---: |',
    ];
    const nbd = new Map<string, [number, number]>();
    /** The daemon's CPU per unit of work (µs per I/O, or CPU-s per GB), plain and TLS. */
    const nbdCpu = new Map<string, Record<'plain' | 'tls', number[]>>();
    const d = await DaemonProcess.start({
      caFile: ca.ca.cert,
      args: ['--tls-cert', node.cert, '--tls-key', node.key, '--nbd-tls', 'on'],
    });
    const untrust = await trustSystemWide(ca.ca.cert);
    try {
      await d.createVolume('t', '1G');
      await prefill(d.uri('t'));
      const secure = `nbds://127.0.0.1:${d.nbdPort}/t`;
      for (const job of jobs) {
        const s: Record<'plain' | 'tls', number[]> = { plain: [], tls: [] };
        const cpu: Record<'plain' | 'tls', number[]> = { plain: [], tls: [] };
        for (let i = 0; i < 3; i++)
          for (const which of i % 2 === 0
            ? (['plain', 'tls'] as const)
            : (['tls', 'plain'] as const)) {
            const before = cpuSeconds(d.child.pid!);
            const value = await fio(which === 'tls' ? secure : d.uri('t'), job);
            const used = cpuSeconds(d.child.pid!) - before;
            s[which].push(value);
            // The work done while the CPU was counted: the measured rate over the run and its ramp.
            const work = value * (RUNTIME_S + 1);
            cpu[which].push(job.metric === 'iops' ? (used / work) * 1e6 : used / (work / 1000));
          }
        nbd.set(job.name, [median(s.plain), median(s.tls)]);
        nbdCpu.set(job.name, cpu);
        console.error(
          `${job.name}: NBD plain ${median(s.plain).toFixed(0)}, TLS ${median(s.tls).toFixed(0)}`,
        );
      }
    } finally {
      await untrust();
      await d.stop('SIGTERM');
    }
    const replicated = new Map<string, [number, number]>();
    const cpu: Record<'plain' | 'tls', { engine: number; replica: number } | undefined> = {
      plain: undefined,
      tls: undefined,
    };
    for (const tls of [false, true]) {
      const daemons = await threeDaemons(tls, ca);
      try {
        const d1 = daemons[0]!;
        const r = await d1.api_('POST', '/v1/volumes', { name: 'three', size: '1G', replicas: 3 });
        if (r.status !== 201) throw new Error(`create three: ${JSON.stringify(r.json)}`);
        await prefill(d1.uri('three'));
        for (const job of jobs) {
          const before = daemons.map((x) => cpuSeconds(x.child.pid!));
          const value = await fio(d1.uri('three'), job);
          const after = daemons.map((x) => cpuSeconds(x.child.pid!));
          const row = replicated.get(job.name) ?? [0, 0];
          row[tls ? 1 : 0] = value;
          replicated.set(job.name, row);
          if (job.rw === 'write' && job.bs === '1M') {
            // MB/s × the job's seconds is the bytes written; CPU seconds per GB from there.
            const gb = (value * (RUNTIME_S + 1)) / 1000;
            cpu[tls ? 'tls' : 'plain'] = {
              engine: (after[0]! - before[0]!) / gb,
              replica: (after[1]! - before[1]!) / gb,
            };
          }
          console.error(`${job.name}: 3 replicas ${tls ? 'TLS' : 'plain'} ${value.toFixed(0)}`);
        }
      } finally {
        for (const x of daemons) await x.cleanup();
      }
    }
    for (const job of jobs) {
      const unit = job.metric === 'iops' ? ' IOPS' : ' MB/s';
      const [np, nt] = nbd.get(job.name)!;
      const [rp, rt] = replicated.get(job.name)!;
      rows.push(
        `| ${job.name} | ${np.toFixed(0)}${unit} | ${nt.toFixed(0)}${unit} | ${(nt / np).toFixed(2)} | ${rp.toFixed(0)}${unit} | ${rt.toFixed(0)}${unit} | ${(rt / rp).toFixed(2)} |`,
      );
    }
    rows.push(
      '',
      "The NBD daemon's own CPU for the same runs (what decides throughput when fio's TLS has cores of its own):",
      '',
      '| job | daemon CPU, plain | daemon CPU, TLS | TLS / plain |',
      '| --- | ---: | ---: | ---: |',
    );
    for (const job of jobs) {
      const c = nbdCpu.get(job.name)!;
      const unit = job.metric === 'iops' ? ' µs/IO' : ' CPU-s/GB';
      const [p, t] = [median(c.plain), median(c.tls)];
      rows.push(
        `| ${job.name} | ${p.toFixed(job.metric === 'iops' ? 1 : 2)}${unit} | ${t.toFixed(job.metric === 'iops' ? 1 : 2)}${unit} | ${(t / p).toFixed(2)} |`,
      );
    }
    const c = (x: { engine: number; replica: number } | undefined) =>
      x
        ? `engine daemon ${x.engine.toFixed(2)}, a replica daemon ${x.replica.toFixed(2)} CPU-s/GB`
        : 'n/a';
    rows.push(
      '',
      `1M write QD8 on 3 replicas, CPU per GB written (${os.cpus().length} cores shared by three daemons and fio): plain ${c(cpu.plain)}; TLS ${c(cpu.tls)}.`,
    );
    return rows.join('\n');
  } finally {
    await ca.cleanup();
  }
}
