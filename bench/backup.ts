/**
 * Backup and restore throughput, for `npm run bench`: a 1 GiB volume full of
 * data backed up to a directory on the same disk (full, then incremental
 * after 64 MiB of scattered writes, which a standby made from the full one
 * applies), then restored into a new volume.
 */
import { randomBytes } from 'node:crypto';
import * as path from 'node:path';
import type { Operation } from '../daemon/operations.ts';
import type { DaemonProcess } from '../test/helpers/daemon.ts';
import { mustRun } from '../test/helpers/run.ts';

const MiB = 1024 * 1024;

interface Timed<T> {
  seconds: number;
  result: T;
}

async function timed<T>(fn: () => Promise<T>): Promise<Timed<T>> {
  const start = performance.now();
  const result = await fn();
  return { seconds: (performance.now() - start) / 1000, result };
}

interface BackupResult {
  name: string;
  stats: { blocksRead: number; blocksStored: number; bytesStored: number };
}

async function waitOp<T>(d: DaemonProcess, method: string, route: string, body: unknown) {
  const r = await d.api_<{ result: T; error?: unknown }>(method, `${route}?wait=true`, body);
  if (r.status !== 200)
    throw new Error(`${method} ${route}: ${r.status} ${JSON.stringify(r.json)}`);
  return r.json.result;
}

function fill(uri: string, extra: string[]): Promise<unknown> {
  return mustRun(
    'fio',
    [
      '--name=fill',
      '--ioengine=nbd',
      `--uri=${uri}`,
      '--bs=1M',
      '--iodepth=8',
      '--refill_buffers',
      '--randrepeat=0',
      ...extra,
    ],
    { timeoutMs: 600_000 },
  );
}

/** Returns a Markdown table. */
export async function backupBench(corral: DaemonProcess, dir: string): Promise<string> {
  const rows: string[] = [
    '| data | full backup | incremental (64 MiB changed) | standby applies it | restore | stored |',
    '| --- | ---: | ---: | ---: | ---: | ---: |',
  ];
  // A backup key, as the CLI sends it: encrypted backups seal every block with AES-256-GCM.
  const key = randomBytes(64).toString('base64');
  for (const [label, compress, sealed] of [
    ['random (incompressible)', 0, false],
    ['half compressible', 50, false],
    ['random, encrypted backup', 0, true],
    ['half compressible, encrypted backup', 50, true],
  ] as const) {
    const volume = `bk${compress}${sealed ? 'e' : ''}`;
    const target = `file://${path.join(dir, `store-${compress}${sealed ? 'e' : ''}`)}`;
    const keyed = sealed ? { key } : {};
    await corral.createVolume(volume, '1G');
    const mix = compress ? [`--buffer_compress_percentage=${compress}`] : [];
    await fill(corral.uri(volume), ['--rw=write', '--size=1G', ...mix]);
    await mustRun('sync', []);
    const full = await timed(() =>
      waitOp<BackupResult>(corral, 'POST', '/v1/backups', { volume, target, ...keyed }),
    );
    // A standby follows the volume's backups: made from the full one, it applies the incremental.
    await waitOp(corral, 'POST', '/v1/volumes', {
      name: `${volume}-dr`,
      standbyFrom: `${target}?volume=${volume}`,
      pollSeconds: 1,
      ...keyed,
    });
    await fill(corral.uri(volume), ['--rw=randwrite', '--io_size=64M', '--size=1G', ...mix]);
    await mustRun('sync', []);
    const incr = await timed(() =>
      waitOp<BackupResult>(corral, 'POST', '/v1/backups', { volume, target, ...keyed }),
    );
    const apply = await standbyApply(corral, `${volume}-dr`);
    const restore = await timed(() =>
      waitOp<unknown>(corral, 'POST', '/v1/restores', {
        backup: full.result.name,
        volume: `${volume}-restored`,
        target,
        ...keyed,
      }),
    );
    const mbps = (bytes: number, s: number) => `${(bytes / MiB / s).toFixed(0)} MB/s`;
    const incrBytes = incr.result.stats.blocksRead * 2 * MiB;
    rows.push(
      `| ${label} | ${mbps(1024 * MiB, full.seconds)} (${full.seconds.toFixed(1)} s) | ${mbps(incrBytes, incr.seconds)} (${incr.result.stats.blocksRead} blocks read, ${incr.seconds.toFixed(2)} s) | ${mbps(apply.bytes, apply.seconds)} (${apply.seconds.toFixed(2)} s) | ${mbps(1024 * MiB, restore.seconds)} (${restore.seconds.toFixed(1)} s) | ${(full.result.stats.bytesStored / MiB).toFixed(0)} MiB |`,
    );
    console.error(rows.at(-1));
    await corral.api_('DELETE', `/v1/volumes/${volume}-restored`);
    await corral.api_('DELETE', `/v1/volumes/${volume}-dr`);
    await corral.api_('DELETE', `/v1/volumes/${volume}`);
  }
  return rows.join('\n');
}

/** Waits for a standby's first apply and returns its duration and the bytes it wrote. */
async function standbyApply(
  corral: DaemonProcess,
  volume: string,
): Promise<{ seconds: number; bytes: number }> {
  const deadline = Date.now() + 600_000;
  for (;;) {
    const { json } = await corral.api_<{ operations: Operation[] }>('GET', '/v1/operations');
    const op = json.operations.find((o) => o.kind === 'standby-apply' && o.volume === volume);
    if (op?.state === 'failed') throw new Error(`standby apply: ${op.error?.message}`);
    if (op?.state === 'succeeded' && op.endedAt)
      return {
        seconds: (Date.parse(op.endedAt) - Date.parse(op.startedAt)) / 1000,
        bytes: op.progress.bytes,
      };
    if (Date.now() > deadline) throw new Error(`no standby apply on ${volume}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
