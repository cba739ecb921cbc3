import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { DaemonProcess } from './helpers/daemon.ts';
import { CMD, NBD_ENOSPC, RawNbd } from './helpers/nbd-client.ts';
import { mustRun } from './helpers/run.ts';
import { mountTmpfs, type ScratchFs } from './helpers/scratch-fs.ts';

describe('a full disk', () => {
  let disk: ScratchFs;
  let mnt: string;
  let daemon: DaemonProcess;

  before(async () => {
    disk = await mountTmpfs('full', '48m');
    mnt = disk.mnt;
    daemon = await DaemonProcess.start({ dataDir: path.join(mnt, 'data') });
    await daemon.createVolume('v', '300M'); // sparse: larger than the disk
  });
  after(async () => {
    await daemon.cleanup();
    await disk.remove();
  });

  it('answers ENOSPC, loses nothing flushed, and writes again once space is back', async () => {
    const c = await RawNbd.connect({ port: daemon.nbdPort });
    await c.greet();
    await c.go('v');
    const first = Buffer.alloc(1024 * 1024, 0x5e);
    c.request(CMD.WRITE, 0, first.length, { payload: first });
    assert.equal((await c.reply()).error, 0);
    c.request(CMD.FLUSH, 0, 0);
    assert.equal((await c.reply()).error, 0);
    // A ballast file takes most of what is left.
    const ballast = path.join(mnt, 'ballast');
    const { bavail, bsize } = await fs.promises.statfs(mnt);
    await mustRun('fallocate', ['-l', String(bavail * bsize - 8 * 1024 * 1024), ballast]);
    let sawEnospc = false;
    for (let i = 1; i < 64 && !sawEnospc; i++) {
      c.request(CMD.WRITE, i * 1024 * 1024, first.length, {
        payload: Buffer.alloc(first.length, i),
      });
      const r = await c.reply();
      if (r.error !== 0) {
        assert.equal(r.error, NBD_ENOSPC, 'a full disk is ENOSPC, not EIO');
        sawEnospc = true;
      }
    }
    assert.ok(sawEnospc, 'the disk filled up');
    const volume = (
      await daemon.api_<{ replicas: Array<{ mode: string }> }>('GET', '/v1/volumes/v')
    ).json;
    assert.deepEqual(
      volume.replicas.map((r) => r.mode),
      ['RW'],
      'the only replica is not dropped for a full disk',
    );
    c.request(CMD.READ, 0, first.length);
    assert.ok((await c.reply()).data.equals(first), 'flushed data is intact');
    await fs.promises.rm(ballast);
    c.request(CMD.WRITE, 200 * 1024 * 1024, 65536, { payload: Buffer.alloc(65536, 0x77) });
    assert.equal((await c.reply()).error, 0, 'writes work again once space is back');
    c.request(CMD.FLUSH, 0, 0);
    assert.equal((await c.reply()).error, 0);
    c.close();
  });

  it('keeps metadata written after the disk was full through a SIGKILL', async () => {
    const c = await RawNbd.connect({ port: daemon.nbdPort });
    await c.greet();
    await c.go('v');
    // Data written, then the disk fills to the last block, then a flush: the data is already
    // in place (tmpfs), and the metadata write that records it fails part way.
    const data = Buffer.alloc(1024 * 1024, 0x4d);
    c.request(CMD.WRITE, 64 * 1024 * 1024, data.length, { payload: data });
    assert.equal((await c.reply()).error, 0);
    const ballast = path.join(mnt, 'ballast');
    const { bavail, bsize } = await fs.promises.statfs(mnt);
    await mustRun('fallocate', ['-l', String(bavail * bsize), ballast]);
    c.request(CMD.FLUSH, 0, 0);
    const flushed = await c.reply();
    assert.notEqual(flushed.error, 0, 'a flush into a full disk fails');
    const refused = await daemon.api_<{ error: { code: string; message: string } }>(
      'POST',
      '/v1/volumes',
      { name: 'w0', size: '64M' },
    );
    assert.equal(refused.status, 507, JSON.stringify(refused.json));
    assert.equal(refused.json.error.code, 'NO_SPACE');
    assert.match(refused.json.error.message, /full|no space/);
    // Space comes back; what is acknowledged from now on must survive a SIGKILL.
    await fs.promises.rm(ballast);
    const after = Buffer.alloc(1024 * 1024, 0xa7);
    c.request(CMD.WRITE, 300 * 1024 * 1024 - after.length, after.length, { payload: after });
    assert.equal((await c.reply()).error, 0);
    c.request(CMD.FLUSH, 0, 0);
    assert.equal((await c.reply()).error, 0);
    c.close();
    const created = await daemon.api_('POST', '/v1/volumes', { name: 'w1', size: '64M' });
    assert.equal(created.status, 201, JSON.stringify(created.json));
    await daemon.kill();
    daemon = await daemon.restart();
    const list = await daemon.api_<{ volumes: Array<{ name: string }> }>('GET', '/v1/volumes');
    assert.ok(
      list.json.volumes.some((v) => v.name === 'w1'),
      `volume created after the disk was full survives: ${JSON.stringify(list.json)}`,
    );
    const r = await RawNbd.connect({ port: daemon.nbdPort });
    await r.greet();
    await r.go('v');
    r.request(CMD.READ, 300 * 1024 * 1024 - after.length, after.length);
    const got = await r.reply(after.length);
    assert.equal(got.error, 0);
    assert.ok(got.data.equals(after), 'the write flushed after the disk was full survives');
    r.close();
  });
});
