import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as delay } from 'node:timers/promises';
import { SyncWriteGate, SyncWriteGates, pwriteFull } from '../replication/file-io.ts';
import { DaemonProcess } from './helpers/daemon.ts';
import { CMD, RawNbd } from './helpers/nbd-client.ts';
import { mustRun, run, waitFor } from './helpers/run.ts';
import { mountExt4, type ScratchFs } from './helpers/scratch-fs.ts';

describe('writes on the event loop (SyncWriteGate)', () => {
  it('goes to the thread pool after two slow writes within a window, for a back-off that doubles while they stay slow', () => {
    let now = 0;
    const gate = new SyncWriteGate(1 << 20, 20, 1000, 1000, 4000, () => now);
    const told: Array<[number, number]> = [];
    gate.onBackoff = (took, backoff) => told.push([took, backoff]);
    const write = (ms: number) => gate.run(() => (now += ms));
    const tripped = (backoff: number, why: string) => {
      assert.equal(gate.allows(4096), false, why);
      now += backoff - 1;
      assert.equal(gate.allows(4096), false, `${why}: for ${backoff} ms`);
      now += 1;
      assert.equal(gate.allows(4096), true, `${why}: not longer`);
    };
    assert.equal(gate.allows(1 << 20), true);
    assert.equal(gate.allows((1 << 20) + 1), false, 'past its size: always the pool');
    write(30);
    now += 1500;
    write(30);
    assert.equal(
      gate.allows(4096),
      true,
      'slow writes a window apart (preempted, most often): nothing',
    );
    write(1);
    write(1);
    write(30);
    assert.deepEqual(told, [[30, 1000]], 'fast writes in between do not hide the second');
    tripped(1000, 'two slow writes within the window');
    write(30);
    write(30);
    tripped(2000, 'slow again at once: twice the back-off');
    write(30);
    write(30);
    tripped(4000, 'and again');
    write(30);
    write(30);
    tripped(4000, 'no more than the longest');
    now += 4000;
    write(30);
    write(30);
    tripped(1000, 'calm for as long as the last back-off: back to the start');
    write(30);
    assert.throws(() =>
      gate.run(() => {
        now += 30;
        throw new Error('EIO');
      }),
    );
    assert.equal(gate.allows(4096), false, 'a slow write that failed counts too');
    assert.equal(gate.backoffs, 6);
    assert.deepEqual(
      told.map(([, backoff]) => backoff),
      [1000, 2000, 4000, 4000, 1000, 2000],
    );
  });

  it('backs off per disk: a slow disk sends its own writes to the pool, not the others', () => {
    let now = 0;
    const gates = new SyncWriteGates(
      () => new SyncWriteGate(1 << 20, 20, 1000, 1000, 60_000, () => now),
    );
    const told: Array<[string, number]> = [];
    gates.onBackoff = (root, took) => told.push([root, took]);
    const [slow, fast] = [gates.for('/disk/a/replicas'), gates.for('/disk/b/replicas')];
    assert.equal(gates.for('/disk/a/replicas'), slow, 'one gate per root');
    for (const took of [30, 1, 30]) slow.run(() => (now += took));
    assert.equal(slow.allows(4096), false, 'the slow disk backs off');
    assert.equal(fast.allows(4096), true, 'the other disk writes on the loop still');
    assert.deepEqual(told, [['/disk/a/replicas', 30]]);
    assert.deepEqual(gates.backoffs(), [
      ['/disk/a/replicas', 1],
      ['/disk/b/replicas', 0],
    ]);
  });

  // A frozen filesystem blocks every write until it is thawed: a real stall, as
  // dirty-page throttling on a slow disk is, without needing a slow disk.
  describe('on a frozen ext4', () => {
    let disk: ScratchFs | undefined;
    let mnt = '';
    let fd = -1;
    before(async () => {
      disk = await mountExt4('freeze', 64 << 20);
      mnt = disk.mnt;
      fd = fs.openSync(path.join(mnt, 'data'), 'w+');
    });
    after(async () => {
      await run('fsfreeze', ['--unfreeze', mnt]);
      if (fd >= 0) fs.closeSync(fd);
      await disk?.remove();
    });

    it('stalls the loop for two writes, then keeps turning while the next ones wait', async () => {
      const gate = new SyncWriteGate(1 << 20, 20, 1000, 60_000);
      const data = [randomBytes(1 << 20), randomBytes(1 << 20), randomBytes(1 << 20)] as const;
      const start = performance.now();
      for (const [i, bytes] of data.slice(0, 2).entries()) {
        await mustRun('fsfreeze', ['--freeze', mnt]);
        // Thawed by another process: this one's loop is blocked inside the write.
        const thaw = run('sh', ['-c', `sleep 0.2; fsfreeze --unfreeze ${mnt}`]);
        const t = performance.now();
        await pwriteFull(fd, bytes, i << 20, gate);
        assert.ok(performance.now() - t >= 150, 'the write waited for the thaw');
        await thaw;
        assert.equal(gate.allows(4096), i === 0, `after ${i + 1} slow writes`);
      }

      await mustRun('fsfreeze', ['--freeze', mnt]);
      // Had this write gone on the loop, nothing would thaw it: the fallback ends the test.
      const fallback = spawn('sh', ['-c', `sleep 10; fsfreeze --unfreeze ${mnt}`], {
        detached: true,
        stdio: 'ignore',
      });
      try {
        const pending = pwriteFull(fd, data[2], 2 << 20, gate);
        const turned = await Promise.race([pending.then(() => 'written'), delay(50, 'turning')]);
        assert.equal(turned, 'turning', 'the loop turned while the write waited in the pool');
        await mustRun('fsfreeze', ['--unfreeze', mnt]);
        await pending;
        assert.ok(performance.now() - start < 5000, 'thawed by the test, not by the fallback');
      } finally {
        process.kill(-fallback.pid!, 'SIGKILL');
      }

      const back = Buffer.alloc(3 << 20);
      assert.equal(fs.readSync(fd, back, 0, back.length, 0), back.length);
      data.forEach((d, i) =>
        assert.ok(back.subarray(i << 20, (i + 1) << 20).equals(d), `write ${i}`),
      );
    });
  });
  // The same through a daemon whose data disk freezes under a client's writes: the API still
  // answers, the operator is told, and nothing written is lost.
  describe('a daemon on a disk that freezes', () => {
    let disk: ScratchFs | undefined;
    let mnt = '';
    let daemon: DaemonProcess | undefined;
    before(async () => {
      disk = await mountExt4('freeze', 256 << 20);
      mnt = disk.mnt;
      daemon = await DaemonProcess.start({ dataDir: path.join(mnt, 'data') });
      await daemon.createVolume('f', '16M');
    });
    after(async () => {
      await run('fsfreeze', ['--unfreeze', mnt]);
      await daemon?.cleanup();
      await disk?.remove();
    });

    it('sends writes off the event loop after two stall, says so, and keeps the API answering', async () => {
      const d = daemon!;
      // Bounded: a loop stuck in a frozen write would never answer, and the thaw comes after.
      const health = async () =>
        (await fetch(`${d.api}/v1/health`, { signal: AbortSignal.timeout(5000) })).status;
      const c = await RawNbd.connect({ port: d.nbdPort });
      await c.greet();
      await c.go('f');
      const data = [0, 1, 2, 3].map(() => randomBytes(1 << 20));
      const write = async (i: number) => {
        c.request(CMD.WRITE, i << 20, 1 << 20, { payload: data[i]! });
        assert.equal((await c.reply()).error, 0, `write ${i}`);
      };
      // Allocated and flushed before the freeze: what follows is overwrites, data alone.
      for (const i of [0, 1, 2]) await write(i);
      c.request(CMD.FLUSH, 0, 0);
      assert.equal((await c.reply()).error, 0);
      for (const i of [0, 1]) {
        await mustRun('fsfreeze', ['--freeze', mnt]);
        const thaw = run('sh', ['-c', `sleep 0.2; fsfreeze --unfreeze ${mnt}`]);
        await write(i);
        await thaw;
      }
      const root = path.join(mnt, 'data');
      await waitFor('the warning', () =>
        Promise.resolve(d.stderr.includes(`two writes under ${root}`) ? true : undefined),
      );
      const metrics = await fetch(`${d.api}/metrics`, {
        headers: { authorization: `Bearer ${d.token}` },
      });
      const counted = [
        ...(await metrics.text()).matchAll(
          /^corral_write_backoffs_total\{root="([^"]*)"\} (\d+)$/gm,
        ),
      ];
      assert.deepEqual(
        counted.filter(([, , n]) => n !== '0').map(([, at, n]) => [at!.startsWith(root), n]),
        [[true, '1']],
        'one back-off, counted for the frozen disk',
      );

      await mustRun('fsfreeze', ['--freeze', mnt]);
      try {
        c.request(CMD.WRITE, 2 << 20, 1 << 20, { payload: data[3]! });
        const pending = c.reply();
        const answered = await Promise.race([
          pending.then(() => 'answered'),
          delay(300, 'waiting'),
        ]);
        assert.equal(answered, 'waiting', 'the write waits for the disk');
        assert.equal(await health(), 200, 'while the API answers');
        await mustRun('fsfreeze', ['--unfreeze', mnt]);
        assert.equal((await pending).error, 0);
      } finally {
        await run('fsfreeze', ['--unfreeze', mnt]);
      }
      c.request(CMD.READ, 0, 3 << 20);
      const back = await c.reply(3 << 20);
      assert.equal(back.error, 0);
      assert.ok(back.data.equals(Buffer.concat([data[0]!, data[1]!, data[3]!])));
      c.close();
    });
  });
});
