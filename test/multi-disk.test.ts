import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, describe, it } from 'node:test';
import { DaemonProcess } from './helpers/daemon.ts';
import { verifyingFio } from './helpers/fio.ts';
import { mustRun, run, waitFor } from './helpers/run.ts';

interface DiskRow {
  path: string;
  tags: string[];
  replicas: number;
  freeBytes: number;
  state: string;
}

interface Volume {
  replicas: Array<{ id: string; mode: string }>;
}

describe('several disks per host', () => {
  const cleanups: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanups.reverse()) await c().catch(() => undefined);
  });

  /** A small filesystem of its own (tmpfs), as a disk. */
  async function disk(sizeMiB: number): Promise<string> {
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-disk-'));
    await mustRun('mount', ['-t', 'tmpfs', '-o', `size=${sizeMiB}m`, 'tmpfs', dir]);
    cleanups.push(async () => {
      await run('umount', ['-l', dir]);
      await fs.promises.rm(dir, { recursive: true, force: true });
    });
    return dir;
  }

  async function disks(d: DaemonProcess): Promise<DiskRow[]> {
    const nodes = JSON.parse(
      (
        await mustRun(process.execPath, ['bin/corral.js', 'node', 'ls', '--json'], {
          env: { ...process.env, CORRAL_API: d.api, CORRAL_TOKEN: d.token },
        })
      ).stdout,
    ) as Array<{ disks: DiskRow[] }>;
    return nodes[0]!.disks;
  }

  it('spreads replicas over disks by free space, selects by tag, and moves a replica off a disk that fills', async () => {
    const a = await disk(200);
    const b = await disk(150);
    const c = await disk(100);
    const d = await DaemonProcess.start({
      args: [
        '--disk',
        `${a}:tag=fast`,
        '--disk',
        `${b}:tag=fast,big`,
        '--disk',
        `${c}:tag=fast`,
        '--rebuild-delay',
        '500',
      ],
    });
    cleanups.push(() => d.cleanup());
    const byPath = (rows: DiskRow[]) => new Map(rows.map((r) => [r.path, r]));

    // Four replicas of one volume: four disks, one each (two copies never share a disk).
    const spread = await d.cli([
      'volume',
      'create',
      'spread',
      '--size',
      '16M',
      '--replicas',
      '4',
      '--allow-same-host',
    ]);
    assert.equal(spread.code, 0, spread.stderr);
    let rows = await disks(d);
    assert.equal(rows.length, 4);
    assert.deepEqual(
      rows.map((r) => r.replicas),
      [1, 1, 1, 1],
    );
    assert.deepEqual(byPath(rows).get(b)!.tags, ['fast', 'big']);
    assert.equal((await d.cli(['volume', 'rm', 'spread'])).code, 0);

    // A tag selects the disks; among them the one with the most room.
    const tagged = await d.cli(['volume', 'create', 'quick', '--size', '16M', '--disk-tag', 'big']);
    assert.equal(tagged.code, 0, tagged.stderr);
    assert.equal(byPath(await disks(d)).get(b)!.replicas, 1);
    const none = await d.cli(['volume', 'create', 'no', '--size', '16M', '--disk-tag', 'nosuch']);
    assert.equal(none.code, 1);
    assert.match(none.stderr, /No disk of this host is tagged nosuch/);
    assert.equal((await d.cli(['volume', 'rm', 'quick'])).code, 0);

    // Two replicas on the fast disks with the most room (a, then b); a then fills up.
    const created = await d.cli([
      'volume',
      'create',
      'db',
      '--size',
      '64M',
      '--replicas',
      '2',
      '--allow-same-host',
      '--disk-tag',
      'fast',
    ]);
    assert.equal(created.code, 0, created.stderr);
    rows = await disks(d);
    assert.equal(byPath(rows).get(a)!.replicas, 1);
    assert.equal(byPath(rows).get(b)!.replicas, 1);
    await mustRun('fallocate', [
      '-l',
      `${byPath(rows).get(a)!.freeBytes - 8 * 1024 * 1024}`,
      path.join(a, 'ballast'),
    ]);
    const fio = await verifyingFio(d.uri('db'), '48m');
    assert.equal(fio.code, 0, fio.stdout + fio.stderr);
    assert.match(fio.stdout, /err= 0/);
    // The replica on the full disk went to ERR; the repair loop rebuilt it on c.
    await waitFor(
      'a replica on the third disk',
      async () => {
        const v = (await d.api_<Volume>('GET', '/v1/volumes/db')).json;
        const onC = byPath(await disks(d)).get(c)!.replicas;
        return onC === 1 && v.replicas.length === 2 && v.replicas.every((r) => r.mode === 'RW')
          ? true
          : undefined;
      },
      60_000,
    );
    rows = await disks(d);
    assert.equal(byPath(rows).get(a)!.replicas, 0, 'the failed replica is gone from the full disk');
    const verified = await d.cli(['volume', 'verify', 'db', '--json']);
    assert.equal(verified.code, 0, verified.stdout + verified.stderr);
    assert.match((await d.cli(['events'])).stdout, /replica-moved/);
    // What fio wrote reads back from the replicas that are left.
    const again = await run('fio', [
      '--name=steady',
      '--ioengine=nbd',
      `--uri=${d.uri('db')}`,
      '--rw=randwrite',
      '--bs=4k',
      '--size=48m',
      '--verify=crc32c',
      '--verify_only=1',
      '--verify_fatal=1',
    ]);
    assert.equal(again.code, 0, again.stdout + again.stderr);
  });
});
