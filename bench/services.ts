/**
 * Volume services (`BENCH_ONLY=services`). Expand: how long growing a 1 TiB
 * sparse volume to 2 TiB takes (the API call, replicas and record included).
 * Trim: what a `fstrim` costs and how fast the space comes back:
 * ext4 on a loop device over a volume's FUSE image, a file of BENCH_TRIM_GIB
 * GiB (10 by default) written, deleted and trimmed; the daemon's CPU time
 * over the trim from /proc/<pid>/stat.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DaemonProcess } from '../test/helpers/daemon.ts';
import { mustRun, run } from '../test/helpers/run.ts';
import { cpuSeconds } from './proc.ts';

const GiB = 1024 ** 3;

async function diskUsage(dir: string): Promise<number> {
  return Number((await mustRun('du', ['-s', '--block-size=1', dir])).stdout.split('\t')[0]);
}

export async function trimBench(dir: string): Promise<string> {
  const gib = Number(process.env.BENCH_TRIM_GIB ?? 10);
  const d = await DaemonProcess.start({ dataDir: path.join(dir, 'corral') });
  const mnt = path.join(dir, 'mnt');
  await fs.promises.mkdir(mnt);
  let loop = '';
  try {
    const created = await d.cli([
      'volume',
      'create',
      'trim',
      '--size',
      `${gib + 2}G`,
      '--frontend',
      'fuse',
    ]);
    if (created.code !== 0) throw new Error(created.stderr);
    loop = (
      await mustRun('losetup', ['--find', '--show', path.join(d.dataDir, 'images', 'trim.img')])
    ).stdout.trim();
    await mustRun('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard', loop]);
    await mustRun('mount', [loop, mnt]);
    await mustRun(
      'fio',
      [
        '--name=fill',
        `--filename=${path.join(mnt, 'big')}`,
        '--rw=write',
        '--bs=1M',
        `--size=${gib}g`,
        '--end_fsync=1',
      ],
      { timeoutMs: 1_800_000 },
    );
    const replicas = path.join(d.dataDir, 'replicas');
    const full = await diskUsage(replicas);
    await fs.promises.rm(path.join(mnt, 'big'));
    await mustRun('sync', []);
    const pid = d.child.pid!;
    const cpuBefore = cpuSeconds(pid);
    const started = performance.now();
    const trimmed = (await mustRun('fstrim', ['-v', mnt], { timeoutMs: 600_000 })).stdout.trim();
    const fstrimS = (performance.now() - started) / 1000;
    let after = full;
    while (full - after < 0.95 * gib * GiB) {
      if (performance.now() - started > 300_000) throw new Error('space not returned in 5 min');
      await new Promise((r) => setTimeout(r, 100));
      after = await diskUsage(replicas);
    }
    const returnedS = (performance.now() - started) / 1000;
    const cpu = cpuSeconds(pid) - cpuBefore;
    return [
      `Measured ${new Date().toISOString().slice(0, 10)} by \`BENCH_ONLY=services npm run bench\`: ext4 on a loop device over a FUSE image, a ${gib} GiB file written, deleted, \`sync\`, \`fstrim\` (${trimmed}).`,
      '',
      '| fstrim (wall) | space back (wall, from the fstrim) | daemon CPU over it | on disk before → after |',
      '| ---: | ---: | ---: | ---: |',
      `| ${fstrimS.toFixed(2)} s | ${returnedS.toFixed(2)} s | ${cpu.toFixed(2)} s | ${(full / GiB).toFixed(2)} → ${(after / GiB).toFixed(2)} GiB |`,
    ].join('\n');
  } finally {
    await run('umount', [mnt]);
    if (loop) await run('losetup', ['-d', loop]);
    await d.stop('SIGTERM');
  }
}

export async function expandBench(dir: string): Promise<string> {
  const d = await DaemonProcess.start({ dataDir: path.join(dir, 'corral-expand') });
  try {
    const created = await d.cli(['volume', 'create', 'big', '--size', '1T']);
    if (created.code !== 0) throw new Error(created.stderr);
    await mustRun('qemu-io', [
      '-f',
      'raw',
      d.uri('big'),
      '-c',
      'write -P 1 0 64M',
      '-c',
      'write -P 2 1023G 64M',
    ]);
    const times: number[] = [];
    for (let i = 2; i <= 4; i++) {
      const started = performance.now();
      const r = await d.api_('POST', '/v1/volumes/big/expand', { size: `${i}T` });
      times.push(performance.now() - started);
      if (r.status !== 200) throw new Error(JSON.stringify(r.json));
    }
    const rss = Number(
      /VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${d.child.pid!}/status`, 'utf8'))![1],
    );
    return [
      `Measured ${new Date().toISOString().slice(0, 10)} by \`BENCH_ONLY=services npm run bench\`: a 1 TiB volume (one replica), 128 MiB written, expanded 1 → 2 → 3 → 4 TiB through the API.`,
      '',
      '| expand 1 → 2 TiB | 2 → 3 TiB | 3 → 4 TiB | daemon RSS after |',
      '| ---: | ---: | ---: | ---: |',
      `| ${times.map((t) => `${t.toFixed(0)} ms`).join(' | ')} | ${(rss / 1024).toFixed(0)} MiB |`,
    ].join('\n');
  } finally {
    await d.stop('SIGTERM');
  }
}
