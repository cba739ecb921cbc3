import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as delay } from 'node:timers/promises';
import { SyncWriteGate, pwriteFull } from '../replication/file-io.ts';
import { mustRun, run } from './helpers/run.ts';

describe('writes on the event loop (SyncWriteGate)', () => {
  it('goes to the thread pool after two slow writes in a row, for a back-off that doubles while they stay slow', () => {
    let now = 0;
    const gate = new SyncWriteGate(1 << 20, 20, 1000, 4000, () => now);
    const write = (ms: number) => gate.run(() => (now += ms));
    assert.equal(gate.allows(1 << 20), true);
    assert.equal(gate.allows((1 << 20) + 1), false, 'past its size: always the pool');
    write(30);
    write(1);
    write(30);
    assert.equal(
      gate.allows(4096),
      true,
      'slow writes apart (preempted, most often) change nothing',
    );
    write(30);
    assert.equal(gate.allows(4096), false, 'two in a row');
    now += 999;
    assert.equal(gate.allows(4096), false);
    now += 1;
    assert.equal(gate.allows(4096), true);
    write(30);
    write(30);
    now += 1999;
    assert.equal(gate.allows(4096), false, 'slow again at once: twice the back-off');
    now += 1;
    write(30);
    write(30);
    now += 3999;
    assert.equal(gate.allows(4096), false, 'and no more than the longest');
    now += 1;
    write(1);
    write(30);
    write(30);
    now += 1000;
    assert.equal(gate.allows(4096), true, 'a fast write brought the back-off down to its start');
    write(30);
    assert.throws(() =>
      gate.run(() => {
        now += 30;
        throw new Error('EIO');
      }),
    );
    assert.equal(gate.allows(4096), false, 'a slow write that failed counts too');
  });

  // A frozen filesystem blocks every write until it is thawed: a real stall, as
  // dirty-page throttling on a slow disk is, without needing a slow disk.
  describe('on a frozen ext4', () => {
    let dir = '';
    let mnt = '';
    let fd = -1;
    before(async () => {
      dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-freeze-'));
      mnt = path.join(dir, 'mnt');
      await fs.promises.mkdir(mnt);
      const image = path.join(dir, 'fs.img');
      await fs.promises.writeFile(image, '');
      await fs.promises.truncate(image, 64 << 20);
      await mustRun('mkfs.ext4', ['-q', '-F', image]);
      await mustRun('mount', ['-o', 'loop', image, mnt]);
      fd = fs.openSync(path.join(mnt, 'data'), 'w+');
    });
    after(async () => {
      await run('fsfreeze', ['--unfreeze', mnt]);
      if (fd >= 0) fs.closeSync(fd);
      await run('umount', [mnt]);
      await fs.promises.rm(dir, { recursive: true, force: true });
    });

    it('stalls the loop for two writes, then keeps turning while the next ones wait', async () => {
      const gate = new SyncWriteGate(1 << 20, 20, 60_000);
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
});
