import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, describe, it } from 'node:test';
import { TestCluster } from './helpers/cluster.ts';
import { DaemonProcess } from './helpers/daemon.ts';
import { sha256OfExport } from './helpers/export-data.ts';
import { prng } from './helpers/prng.ts';
import { mustRun, run, waitFor } from './helpers/run.ts';

const MiB = 1024 * 1024;

interface Volume {
  name: string;
  sizeBytes: number;
  replicas: Array<{ id: string; mode: string; location: string }>;
}

async function nbdSize(uri: string): Promise<number> {
  return Number((await mustRun('nbdinfo', ['--size', uri])).stdout.trim());
}

describe('online expand', () => {
  const cleanups: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanups.reverse()) await c().catch(() => undefined);
  });

  async function daemon(dataDir?: string): Promise<DaemonProcess> {
    const d = await DaemonProcess.start(dataDir ? { dataDir } : {});
    cleanups.push(() => d.cleanup());
    return d;
  }

  it('ext4 over a FUSE image and a loop device: grows under fio verify, losetup -c, resize2fs, e2fsck clean', async () => {
    const d = await daemon();
    const created = await d.cli(['volume', 'create', 'fs', '--size', '1G', '--frontend', 'fuse']);
    assert.equal(created.code, 0, created.stderr);
    const image = path.join(d.dataDir, 'images', 'fs.img');
    const loop = (await mustRun('losetup', ['--find', '--show', image])).stdout.trim();
    cleanups.push(() => run('losetup', ['-d', loop]));
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-grow-'));
    cleanups.push(async () => {
      await run('umount', ['-l', dir]);
      await fs.promises.rm(dir, { recursive: true, force: true });
    });
    await mustRun('mkfs.ext4', ['-q', '-F', loop]);
    await mustRun('mount', [loop, dir]);
    const fio = run(
      'fio',
      [
        '--name=grow',
        `--filename=${path.join(dir, 'data')}`,
        '--rw=randwrite',
        '--bs=16k',
        '--size=256m',
        '--iodepth=8',
        '--ioengine=libaio',
        '--direct=1',
        '--verify=crc32c',
        '--verify_fatal=1',
      ],
      { timeoutMs: 300_000 },
    );
    // While fio writes: the volume grows, the image with it, the loop device after -c.
    const grown = await d.cli(['volume', 'expand', 'fs', '--size', '2G', '--json']);
    assert.equal(grown.code, 0, grown.stderr);
    assert.equal((JSON.parse(grown.stdout) as Volume).sizeBytes, 2 * 1024 * MiB);
    assert.equal((await fs.promises.stat(image)).size, 2 * 1024 * MiB);
    await mustRun('losetup', ['-c', loop]);
    assert.equal(
      Number((await mustRun('blockdev', ['--getsize64', loop])).stdout.trim()),
      2 * 1024 * MiB,
    );
    const done = await fio;
    assert.equal(done.code, 0, done.stdout + done.stderr);
    assert.match(done.stdout, /err= 0/);
    // Growing a mounted ext4 needs CAP_SYS_RESOURCE, which a container may lack: the
    // filesystem grows offline here, over the device that grew while mounted.
    await mustRun('umount', [dir]);
    await mustRun('e2fsck', ['-f', '-y', loop]);
    await mustRun('resize2fs', [loop]);
    await mustRun('mount', [loop, dir]);
    const df = (await mustRun('df', ['--block-size=1M', '--output=size', dir])).stdout;
    assert.ok(Number(df.split('\n')[1]) > 1900, `df after resize2fs: ${df}`);
    await mustRun('umount', [dir]);
    const fsck = await run('e2fsck', ['-f', '-n', loop]);
    assert.equal(fsck.code, 0, fsck.stdout + fsck.stderr);
    // Shrinking is refused, and changes nothing.
    const shrink = await d.cli(['volume', 'expand', 'fs', '--size', '1G']);
    assert.equal(shrink.code, 1);
    assert.match(shrink.stderr, /cannot shrink/);
    assert.equal((await fs.promises.stat(image)).size, 2 * 1024 * MiB);
  });

  it('over NBD with two replicas: new clients see the new size, snapshots and their backups keep theirs', async () => {
    const d = await daemon();
    const created = await d.cli([
      'volume',
      'create',
      'nb',
      '--size',
      '64M',
      '--replicas',
      '2',
      '--allow-same-host',
    ]);
    assert.equal(created.code, 0, created.stderr);
    await mustRun('qemu-io', ['-f', 'raw', d.uri('nb'), '-c', 'write -P 0x5 0 64M']);
    assert.equal((await d.cli(['snapshot', 'create', 'nb', 's1'])).code, 0);
    const old = await d.cli(['backup', 'create', 'nb', '--snapshot', 's1', '--json']);
    assert.equal(old.code, 0, old.stderr);
    const oldBackup = (JSON.parse(old.stdout) as { name: string }).name;

    assert.equal((await d.cli(['volume', 'expand', 'nb', '--size', '128M'])).code, 0);
    assert.equal(await nbdSize(d.uri('nb')), 128 * MiB);
    assert.equal(await nbdSize(d.uri('nb@s1')), 64 * MiB);
    await mustRun('qemu-io', [
      '-f',
      'raw',
      d.uri('nb'),
      '-c',
      'read -P 0x5 0 64M',
      '-c',
      'read -P 0 64M 64M',
      '-c',
      'write -P 0x6 100M 4M',
    ]);
    assert.equal((await d.cli(['snapshot', 'create', 'nb', 's2'])).code, 0);
    assert.equal(await nbdSize(d.uri('nb@s2')), 128 * MiB);

    // Backups: the one taken before restores at the old size, one taken after at the new.
    const fresh = await d.cli(['backup', 'create', 'nb', '--snapshot', 's2', '--json']);
    assert.equal(fresh.code, 0, fresh.stderr);
    const newBackup = (JSON.parse(fresh.stdout) as { name: string }).name;
    assert.equal((await d.cli(['backup', 'restore', oldBackup, 'nb-old'])).code, 0);
    assert.equal((await d.cli(['backup', 'restore', newBackup, 'nb-new'])).code, 0);
    assert.equal(await nbdSize(d.uri('nb-old')), 64 * MiB);
    assert.equal(await nbdSize(d.uri('nb-new')), 128 * MiB);
    assert.equal(await sha256OfExport(d.uri('nb-old')), await sha256OfExport(d.uri('nb@s1')));
    assert.equal(await sha256OfExport(d.uri('nb-new')), await sha256OfExport(d.uri('nb@s2')));
  });

  it('a replica away during the expand comes back smaller and is rebuilt, each snapshot at its size', async () => {
    const cluster = await TestCluster.start(2, [
      '--rebuild-delay',
      '500',
      '--replica-timeout',
      '1500',
    ]);
    cleanups.push(() => cluster.cleanup());
    const d1 = cluster.daemons[0]!;
    const created = await d1.cli(['volume', 'create', 'away', '--size', '64M', '--replicas', '2']);
    assert.equal(created.code, 0, created.stderr);
    await mustRun('qemu-io', ['-f', 'raw', d1.uri('away'), '-c', 'write -P 0x5 0 64M']);
    assert.equal((await d1.cli(['snapshot', 'create', 'away', 's1'])).code, 0);
    await cluster.daemons[1]!.kill();
    assert.equal((await d1.cli(['volume', 'expand', 'away', '--size', '128M'])).code, 0);
    await mustRun('qemu-io', ['-f', 'raw', d1.uri('away'), '-c', 'write -P 0x6 100M 4M']);
    assert.equal((await d1.cli(['snapshot', 'create', 'away', 's2'])).code, 0);
    await cluster.restart(1);
    await waitFor(
      'the replica that missed the expand to be rebuilt',
      async () => {
        const v = (await d1.api_<Volume>('GET', '/v1/volumes/away')).json;
        return v.replicas.length === 2 && v.replicas.every((r) => r.mode === 'RW')
          ? true
          : undefined;
      },
      60_000,
    );
    const verified = await d1.cli(['volume', 'verify', 'away', '--json']);
    assert.equal(verified.code, 0, verified.stdout + verified.stderr);
    // The rebuilt replica alone serves: the sizes and the data are its own.
    const local = (
      await d1.api_<Volume & { replicas: Array<{ location: string }> }>('GET', '/v1/volumes/away')
    ).json.replicas.find((r) => r.location === 'local')!;
    assert.equal((await d1.api_('DELETE', `/v1/volumes/away/replicas/${local.id}`)).status, 204);
    assert.equal(await nbdSize(d1.uri('away')), 128 * MiB);
    assert.equal(await nbdSize(d1.uri('away@s1')), 64 * MiB);
    assert.equal(await nbdSize(d1.uri('away@s2')), 128 * MiB);
    await mustRun('qemu-io', [
      '-f',
      'raw',
      '-r',
      d1.uri('away'),
      '-c',
      'read -P 0x5 0 64M',
      '-c',
      'read -P 0 64M 36M',
      '-c',
      'read -P 0x6 100M 4M',
    ]);
    await mustRun('qemu-io', ['-f', 'raw', '-r', d1.uri('away@s1'), '-c', 'read -P 0x5 0 64M']);
  });

  it('SIGKILL mid-expand leaves one size or the other, never a mix, and loses nothing', async () => {
    let d = await daemon();
    const created = await d.cli([
      'volume',
      'create',
      'k',
      '--size',
      '32M',
      '--replicas',
      '2',
      '--allow-same-host',
    ]);
    assert.equal(created.code, 0, created.stderr);
    await mustRun('qemu-io', ['-f', 'raw', d.uri('k'), '-c', 'write -P 0x7 0 32M']);
    const random = prng(11);
    let size = 32;
    for (let round = 0; round < 6; round++) {
      const target = size + 16;
      const asked = d
        .api_('POST', '/v1/volumes/k/expand', { size: `${target}M` })
        .catch(() => undefined);
      await new Promise((r) => setTimeout(r, random() * 40));
      await d.kill();
      await asked;
      d = await daemon(d.dataDir);
      const v = (await d.api_<Volume>('GET', '/v1/volumes/k')).json;
      assert.ok(
        v.sizeBytes === size * MiB || v.sizeBytes === target * MiB,
        `round ${round}: ${v.sizeBytes}`,
      );
      assert.equal(await nbdSize(d.uri('k')), v.sizeBytes, `round ${round}`);
      assert.ok(
        v.replicas.every((r) => r.mode === 'RW'),
        JSON.stringify(v.replicas),
      );
      const verified = await d.cli(['volume', 'verify', 'k', '--json']);
      assert.equal(verified.code, 0, `round ${round}: ${verified.stdout}${verified.stderr}`);
      await mustRun('qemu-io', [
        '-f',
        'raw',
        '-r',
        d.uri('k'),
        '-c',
        'read -P 0x7 0 32M',
        '-c',
        `read -P 0 32M ${v.sizeBytes / MiB - 32}M`,
      ]);
      // Asking again finishes it.
      assert.equal((await d.cli(['volume', 'expand', 'k', '--size', `${target}M`])).code, 0);
      size = target;
    }
  });
});
