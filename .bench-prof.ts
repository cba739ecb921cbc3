import { DaemonProcess } from './test/helpers/daemon.ts';
import { mustRun } from './test/helpers/run.ts';
import { cpuSeconds } from './bench/proc.ts';
import * as fs from 'node:fs';
const prof = process.env.PROF === '1';
const d = await DaemonProcess.start({ env: prof ? { NODE_OPTIONS: '--cpu-prof --cpu-prof-dir=/tmp/prof' } : {} });
try {
  await d.createVolume('v', '1G');
  const fio = (rw: string, bs: string, qd: number, extra: string[] = []) => mustRun('fio', ['--name=x', '--ioengine=nbd', `--uri=${d.uri('v')}`, `--rw=${rw}`, `--bs=${bs}`, `--iodepth=${qd}`, '--size=1G', ...extra, '--output-format=json']);
  await fio('write', '1M', 8);
  for (const [rw, bs, qd] of [['write', '1M', 8], ['randwrite', '4k', 32]] as const) {
    await mustRun('sync', []);
    await fs.promises.writeFile('/proc/sys/vm/drop_caches', '3');
    const c0 = cpuSeconds(d.child.pid!);
    const { stdout } = await fio(rw, bs, qd, ['--time_based', '--runtime=6']);
    const c1 = cpuSeconds(d.child.pid!);
    const j = JSON.parse(stdout.slice(stdout.indexOf('{'))).jobs[0].write;
    console.log(rw, bs, `${(j.bw_bytes / 1e6).toFixed(0)} MB/s`, `${(j.iops / 1000).toFixed(1)}k IOPS`, `${((c1 - c0) / (j.io_bytes / 1e9)).toFixed(2)} CPU-s/GB`, `${(((c1 - c0) * 1e6) / j.total_ios).toFixed(1)} us/IO`);
  }
} finally {
  await d.stop('SIGTERM');
  await d.cleanup();
}
