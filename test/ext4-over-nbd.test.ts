import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, describe, it } from 'node:test';
import { DaemonProcess } from './helpers/daemon.ts';
import { NbdFuseLoop } from './helpers/nbdfuse.ts';
import { mustRun, run } from './helpers/run.ts';

describe('ext4 on a volume, attached through nbdfuse and a loop device', () => {
  const cleanups: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanups.reverse()) await c().catch(() => undefined);
  });

  it('mkfs, write files, SIGKILL the daemon after umount, e2fsck clean, every checksum matches', async () => {
    let daemon = await DaemonProcess.start();
    const first = daemon;
    cleanups.push(() => first.cleanup());
    await daemon.createVolume('fs1', '512M');
    const mnt = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-mnt-'));
    cleanups.push(() => fs.promises.rm(mnt, { recursive: true, force: true }));

    let loop = await NbdFuseLoop.attach(daemon.uri('fs1'));
    cleanups.push(() => run('umount', [mnt]).then(() => loop.detach()));
    await mustRun('mkfs.ext4', ['-q', '-F', loop.device]);
    await mustRun('mount', [loop.device, mnt]);
    const sums = new Map<string, string>();
    for (let i = 0; i < 200; i++) {
      const data = randomBytes(Math.floor(Math.random() * 256 * 1024));
      const name = `f${i}.bin`;
      await fs.promises.writeFile(path.join(mnt, name), data);
      sums.set(name, createHash('sha256').update(data).digest('hex'));
    }
    await mustRun('sync', []);
    await mustRun('umount', [mnt]);
    await loop.detach();

    // umount flushed the loop device, nbdfuse sent FLUSH: nothing may be lost, even to SIGKILL.
    await daemon.kill();
    daemon = await daemon.restart();
    const second = daemon;
    cleanups.push(() => second.stop('SIGKILL'));

    loop = await NbdFuseLoop.attach(daemon.uri('fs1'));
    const fsck = await run('e2fsck', ['-fn', loop.device]);
    assert.equal(fsck.code, 0, `e2fsck found problems:\n${fsck.stdout}${fsck.stderr}`);
    await mustRun('mount', [loop.device, mnt]);
    for (const [name, sum] of sums) {
      const data = await fs.promises.readFile(path.join(mnt, name));
      assert.equal(createHash('sha256').update(data).digest('hex'), sum, name);
    }
    await mustRun('umount', [mnt]);
    await loop.detach();
  });
});
