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
  it('goes to the thread pool for its back-off after one slow write, and past its size', () => {
    let now = 0;
    const gate = new SyncWriteGate(1 << 20, 5, 1000, () => now);
    assert.equal(gate.allows(1 << 20), true);
    assert.equal(gate.allows((1 << 20) + 1), false);
    gate.run(() => (now += 4));
    assert.equal(gate.allows(4096), true, 'a write under the threshold changes nothing');
    gate.run(() => (now += 6));
    assert.equal(gate.allows(4096), false);
    now += 999;
    assert.equal(gate.allows(4096), false);
    now += 1;
    assert.equal(gate.allows(4096), true);
    assert.throws(() =>
      gate.run(() => {
        now += 10;
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

    it('stalls the loop for one write, then keeps turning while the next ones wait', async () => {
      const gate = new SyncWriteGate(1 << 20, 5, 60_000);
      const first = randomBytes(1 << 20);
      const second = randomBytes(1 << 20);
      await mustRun('fsfreeze', ['--freeze', mnt]);
      // Thawed by another process: this one's loop is blocked inside the write.
      const thaw = run('sh', ['-c', `sleep 0.3; fsfreeze --unfreeze ${mnt}`]);
      const start = performance.now();
      await pwriteFull(fd, first, 0, gate);
      assert.ok(performance.now() - start >= 250, 'the first write waited for the thaw');
      await thaw;
      assert.equal(gate.allows(4096), false);

      await mustRun('fsfreeze', ['--freeze', mnt]);
      // Had this write gone on the loop, nothing would thaw it: the fallback ends the test.
      const fallback = spawn('sh', ['-c', `sleep 10; fsfreeze --unfreeze ${mnt}`], {
        detached: true,
        stdio: 'ignore',
      });
      const pending = pwriteFull(fd, second, 1 << 20, gate);
      const turned = await Promise.race([pending.then(() => 'written'), delay(50, 'turning')]);
      assert.equal(turned, 'turning', 'the loop turned while the write waited in the pool');
      await mustRun('fsfreeze', ['--unfreeze', mnt]);
      await pending;
      assert.ok(performance.now() - start < 5000, 'thawed by the test, not by the fallback');

      const back = Buffer.alloc(2 << 20);
      assert.equal(fs.readSync(fd, back, 0, back.length, 0), back.length);
      assert.ok(back.subarray(0, 1 << 20).equals(first));
      assert.ok(back.subarray(1 << 20).equals(second));
      process.kill(-fallback.pid!, 'SIGKILL');
    });
  });
});
