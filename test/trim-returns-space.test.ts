import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, describe, it } from 'node:test';
import { BlockRanges } from '../replication/block-ranges.ts';
import { LocalReplica } from '../replication/local-replica.ts';
import { punchHoles } from '../replication/punch.ts';
import { DaemonProcess } from './helpers/daemon.ts';
import { closeReplicaEnv, newReplica, replicaEnv } from './helpers/replica-env.ts';
import { prng } from './helpers/prng.ts';
import { mustRun, run, waitFor } from './helpers/run.ts';

const MiB = 1024 * 1024;

/** Bytes the files under `dir` take on disk (du), not their apparent size. */
async function diskUsage(dir: string): Promise<number> {
  const out = (await mustRun('du', ['-s', '--block-size=1', dir])).stdout;
  return Number(out.split('\t')[0]);
}

describe('the runs a trim leaves to punch', () => {
  it('add and subtract equal a bitmap model (300 seeds)', () => {
    for (let seed = 1; seed <= 300; seed++) {
      const random = prng(seed);
      const int = (n: number) => Math.floor(random() * n);
      const model = new Uint8Array(200);
      const ranges = new BlockRanges();
      for (let step = 0; step < 200; step++) {
        const start = int(200);
        const end = Math.min(200, start + int(30));
        if (int(3) === 0) {
          ranges.subtract(start, end);
          model.fill(0, start, end);
        } else {
          ranges.add(start, end);
          model.fill(1, start, end);
        }
        const lo = int(200);
        const hi = lo + int(60);
        const got = new Uint8Array(200);
        for (const [s, e] of ranges.within(lo, hi)) {
          assert.ok(s < e, `seed ${seed}: empty run`);
          got.fill(1, s, e);
        }
        const want = new Uint8Array(200);
        want.set(model.subarray(lo, Math.min(hi, 200)), lo);
        assert.deepEqual(got, want, `seed ${seed} step ${step}`);
      }
      // Runs never touch: each is as long as it can be (one syscall per run).
      const all = ranges.within(0, 200);
      for (let i = 1; i < all.length; i++) assert.ok(all[i]![0] > all[i - 1]![1], `seed ${seed}`);
    }
  });
});

describe('punching under concurrent writes', () => {
  it('the native punch is built and loaded (setup builds it)', () => {
    assert.equal(typeof punchHoles, 'function');
  });

  for (const seed of [1, 2, 3, 4])
    it(`trims, writes and flushes in flight together equal a model, also after a reopen (seed ${seed})`, async () => {
      const env = await replicaEnv();
      try {
        const size = 8 * MiB;
        const blocks = size / 4096;
        let replica = await newReplica(env, size);
        const random = prng(seed);
        const int = (n: number) => Math.floor(random() * n);
        const model = Buffer.alloc(size);
        let fill = 0;
        for (let round = 0; round < 30; round++) {
          // Requests of one round never overlap (their order is not defined); the punches of
          // earlier rounds' flushes run under this round's writes: the race that matters.
          const ops: Array<Promise<void>> = [];
          const used = new Uint8Array(blocks);
          for (let i = 0; i < 40; i++) {
            const first = int(blocks);
            const count = Math.min(blocks - first, 1 + int(64));
            if (used.subarray(first, first + count).some((u) => u !== 0)) continue;
            used.fill(1, first, first + count);
            const [start, length] = [first * 4096, count * 4096];
            const r = random();
            if (r < 0.55) {
              const data = Buffer.alloc(length, (fill = (fill % 250) + 1));
              data.copy(model, start);
              ops.push(replica.write(start, data));
            } else if (r < 0.9) {
              model.fill(0, start, start + length);
              ops.push(replica.trim(start, length));
            } else ops.push(replica.flush());
          }
          await Promise.all(ops);
          if (round % 10 === 9) {
            await replica.close();
            replica = await LocalReplica.open({
              spaces: env.spaces,
              root: env.root,
              id: replica.id,
            });
          }
        }
        assert.ok(Buffer.from(await replica.read(0, size)).equals(model), `seed ${seed}`);
        await replica.close();
      } finally {
        await closeReplicaEnv(env);
      }
    });
});

describe('trim returns space to the host', () => {
  const cleanups: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanups.reverse()) await c().catch(() => undefined);
  });

  it('NBD trims of 512 MiB free ≥ 90 % of it; reads give zeros; the snapshot below keeps its data', async () => {
    const d = await DaemonProcess.start();
    cleanups.push(() => d.cleanup());
    assert.equal((await d.cli(['volume', 'create', 'thin', '--size', '1G'])).code, 0);
    const uri = d.uri('thin');
    await mustRun('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x11 0 64M']);
    assert.equal((await d.cli(['snapshot', 'create', 'thin', 's1'])).code, 0);
    await mustRun('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x22 64M 512M', '-c', 'flush']);
    const replicas = path.join(d.dataDir, 'replicas');
    const full = await diskUsage(replicas);
    assert.ok(full >= 570 * MiB, `written: ${full} bytes on disk`);

    // In pieces, as a filesystem's discards come: they coalesce into few punches.
    const discards: string[] = [];
    for (let at = 0; at < 1024; at += 16) discards.push('-c', `discard ${at}M 16M`);
    await mustRun('qemu-io', ['-f', 'raw', uri, ...discards, '-c', 'flush']);
    const freed = await waitFor('the trimmed space to be returned', async () => {
      const now = await diskUsage(replicas);
      return full - now >= 0.9 * 512 * MiB ? full - now : undefined;
    });
    assert.ok(freed <= full);
    await mustRun('qemu-io', ['-f', 'raw', '-r', uri, '-c', 'read -P 0 0 1G']);
    // The snapshot's layer is not the head's: its 64 MiB stay.
    await mustRun('qemu-io', [
      '-f',
      'raw',
      '-r',
      d.uri('thin@s1'),
      '-c',
      'read -P 0x11 0 64M',
      '-c',
      'read -P 0 64M 960M',
    ]);
    // A write after the punch lands and reads back, also after a restart.
    await mustRun('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x33 100M 4M', '-c', 'flush']);
    await d.kill();
    const again = await d.restart();
    cleanups.push(() => again.cleanup());
    await mustRun('qemu-io', [
      '-f',
      'raw',
      '-r',
      again.uri('thin'),
      '-c',
      'read -P 0 0 100M',
      '-c',
      'read -P 0x33 100M 4M',
      '-c',
      'read -P 0 104M 920M',
    ]);
  });

  it("fstrim of ext4 over a FUSE image and a loop device returns the deleted files' space", async () => {
    const d = await DaemonProcess.start();
    cleanups.push(() => d.cleanup());
    assert.equal(
      (await d.cli(['volume', 'create', 'fs', '--size', '1G', '--frontend', 'fuse'])).code,
      0,
    );
    const image = path.join(d.dataDir, 'images', 'fs.img');
    const loop = (await mustRun('losetup', ['--find', '--show', image])).stdout.trim();
    cleanups.push(() => run('losetup', ['-d', loop]));
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-trim-'));
    cleanups.push(async () => {
      await run('umount', ['-l', dir]);
      await fs.promises.rm(dir, { recursive: true, force: true });
    });
    await mustRun('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard', loop]);
    await mustRun('mount', [loop, dir]);
    const random = prng(7);
    const chunk = Buffer.alloc(MiB);
    const file = await fs.promises.open(path.join(dir, 'big.bin'), 'w');
    for (let i = 0; i < 512; i++) {
      for (let j = 0; j < chunk.length; j += 4) chunk.writeUInt32LE((random() * 2 ** 32) >>> 0, j);
      await file.write(chunk);
    }
    await file.sync();
    await file.close();
    await mustRun('sync', []);
    const replicas = path.join(d.dataDir, 'replicas');
    const full = await diskUsage(replicas);
    assert.ok(full >= 512 * MiB, `written: ${full} bytes on disk`);
    await fs.promises.rm(path.join(dir, 'big.bin'));
    // Blocks freed in ext4's running journal transaction are not trimmed until it commits.
    await mustRun('sync', []);
    await mustRun('fstrim', [dir]);
    await waitFor("the deleted file's space to be returned", async () =>
      full - (await diskUsage(replicas)) >= 0.9 * 512 * MiB ? true : undefined,
    );
    await mustRun('umount', [dir]);
    const fsck = await run('e2fsck', ['-f', '-n', loop]);
    assert.equal(fsck.code, 0, fsck.stdout + fsck.stderr);
  });
});
