import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, describe, it } from 'node:test';
import { DaemonProcess } from './helpers/daemon.ts';
import { CMD, RawNbd } from './helpers/nbd-client.ts';
import { mustRun } from './helpers/run.ts';

async function readBack(
  daemon: DaemonProcess,
  volume: string,
  offset: number,
  length: number,
): Promise<Buffer> {
  const client = await RawNbd.connect({ port: daemon.nbdPort });
  await client.greet();
  await client.go(volume, { structured: false });
  client.request(CMD.READ, offset, length);
  const reply = await client.reply(length);
  assert.equal(reply.error, 0);
  client.close();
  return reply.data;
}

describe('data survives daemon restarts', () => {
  const daemons: DaemonProcess[] = [];
  after(async () => {
    for (const d of daemons) await d.stop('SIGKILL');
    if (daemons[0]) await daemons[0].cleanup();
  });

  it('after SIGTERM: everything written is there (graceful stop flushes)', async () => {
    const d1 = await DaemonProcess.start();
    daemons.push(d1);
    await d1.createVolume('v', '256M');
    await mustRun('qemu-io', [
      '-f',
      'raw',
      d1.uri('v'),
      '-c',
      'write -P 0x61 0 4M',
      '-c',
      'write -P 0x62 100M 1M',
      '-c',
      'write -P 0x63 1000 3000',
    ]);
    const stopped = await d1.stop('SIGTERM');
    assert.equal(stopped.code, 0, 'graceful stop exits 0');
    const d2 = await d1.restart();
    daemons.push(d2);
    await mustRun('qemu-io', [
      '-f',
      'raw',
      d2.uri('v'),
      '-c',
      'read -P 0x61 0 1000',
      '-c',
      'read -P 0x63 1000 3000',
      '-c',
      'read -P 0x61 4000 4190304',
      '-c',
      'read -P 0x62 100M 1M',
      '-c',
      'read -P 0 4M 1M',
    ]);
    await d2.stop('SIGKILL');
  });

  it('after SIGKILL: writes acknowledged before a FLUSH are there; unflushed ones read old or new, never garbage', async () => {
    const d1 = await (daemons[0] as DaemonProcess).restart();
    daemons.push(d1);
    await d1.createVolume('k', '64M');
    const client = await RawNbd.connect({ port: d1.nbdPort });
    await client.greet();
    await client.go('k');
    const flushed = randomBytes(1024 * 1024);
    const partial = randomBytes(1000);
    // Overlapping writes in flight together have no order in NBD: one at a time.
    client.request(CMD.WRITE, 0, flushed.length, { payload: flushed });
    assert.equal((await client.reply()).error, 0);
    client.request(CMD.WRITE, 5 * 4096 + 24, partial.length, { payload: partial });
    assert.equal((await client.reply()).error, 0);
    client.request(CMD.FLUSH, 0, 0);
    assert.equal((await client.reply()).error, 0);
    // Written after the flush and never flushed: may be lost, must not be torn into garbage.
    const later = Buffer.alloc(64 * 1024, 0xee);
    client.request(CMD.WRITE, 2 * 1024 * 1024, later.length, { payload: later });
    assert.equal((await client.reply()).error, 0);
    // Kill with the connection still open: no DISC, no graceful flush.
    await d1.kill();
    client.close();

    const d2 = await d1.restart();
    daemons.push(d2);
    const expected = Buffer.from(flushed);
    partial.copy(expected, 5 * 4096 + 24);
    assert.ok(
      (await readBack(d2, 'k', 0, flushed.length)).equals(expected),
      'flushed data intact after SIGKILL',
    );
    const after = await readBack(d2, 'k', 2 * 1024 * 1024, later.length);
    for (let block = 0; block < later.length; block += 4096) {
      const b = after.subarray(block, block + 4096);
      assert.ok(
        b.every((x) => x === 0) || b.every((x) => x === 0xee),
        `block ${block / 4096} is old or new content`,
      );
    }
    await d2.stop('SIGKILL');
  });

  it('after SIGKILL: a FUA write is durable without a flush', async () => {
    const d1 = await (daemons[0] as DaemonProcess).restart();
    daemons.push(d1);
    await d1.createVolume('f', '16M');
    const client = await RawNbd.connect({ port: d1.nbdPort });
    await client.greet();
    await client.go('f');
    const data = randomBytes(128 * 1024);
    client.request(CMD.WRITE, 4096, data.length, { payload: data, flags: 1 /* FUA */ });
    assert.equal((await client.reply()).error, 0);
    await d1.kill();
    client.close();
    const d2 = await d1.restart();
    daemons.push(d2);
    assert.ok((await readBack(d2, 'f', 4096, data.length)).equals(data));
  });
});
