import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { DaemonProcess } from './helpers/daemon.ts';
import { CMD, NBD_EINVAL, NBD_ENOSPC, RawNbd } from './helpers/nbd-client.ts';
import { mustRun } from './helpers/run.ts';

const REP_ERR_UNSUP = 0x80000001;
const REP_ERR_INVALID = 0x80000003;
const REP_ERR_UNKNOWN = 0x80000006;
const REP_ACK = 1;
const SIZE = 16 * 1024 * 1024;

describe('malformed and hostile NBD clients', () => {
  let daemon: DaemonProcess;

  before(async () => {
    daemon = await DaemonProcess.start();
    await daemon.createVolume('v', '16M');
    await daemon.createVolume('other', '16M');
  });
  after(() => daemon.cleanup());

  async function session(structured = true): Promise<RawNbd> {
    const c = await RawNbd.connect({ port: daemon.nbdPort });
    await c.greet();
    await c.go('v', { structured });
    return c;
  }

  /** The daemon still serves everyone: a real client reads and writes another export. */
  async function stillServing(): Promise<void> {
    await mustRun('qemu-io', [
      '-f',
      'raw',
      daemon.uri('other'),
      '-c',
      'write -P 0x3c 0 64k',
      '-c',
      'read -P 0x3c 0 64k',
    ]);
  }

  it('closes a handshake with unknown client flags', async () => {
    const c = await RawNbd.connect({ port: daemon.nbdPort });
    await c.greet(0x80);
    await c.waitClosed();
    await stillServing();
  });

  it('closes a connection that sends a bad option magic', async () => {
    const c = await RawNbd.connect({ port: daemon.nbdPort });
    await c.greet();
    c.sendOption(7, Buffer.alloc(6), 0x1234n);
    await c.waitClosed();
    await stillServing();
  });

  it('answers an unknown option with ERR_UNSUP and goes on negotiating', async () => {
    const c = await RawNbd.connect({ port: daemon.nbdPort });
    await c.greet();
    c.sendOption(999, Buffer.from('junk'));
    const r = await c.readOptionReply();
    assert.equal(r.option, 999);
    assert.equal(r.type, REP_ERR_UNSUP);
    assert.equal(await c.go('v'), BigInt(SIZE));
    c.close();
  });

  it('answers malformed GO data with ERR_INVALID and an unknown export with ERR_UNKNOWN', async () => {
    const c = await RawNbd.connect({ port: daemon.nbdPort });
    await c.greet();
    const bad = Buffer.alloc(8);
    bad.writeUInt32BE(100, 0); // name longer than the data
    c.sendOption(7, bad);
    assert.equal((await c.readOptionReply()).type, REP_ERR_INVALID);
    const name = Buffer.from('missing');
    const data = Buffer.alloc(4 + name.length + 2);
    data.writeUInt32BE(name.length, 0);
    name.copy(data, 4);
    c.sendOption(7, data);
    const r = await c.readOptionReply();
    assert.equal(r.type, REP_ERR_UNKNOWN);
    assert.match(r.data.toString(), /missing/);
    c.sendOption(3); // LIST still works afterwards
    const names: string[] = [];
    for (;;) {
      const l = await c.readOptionReply();
      if (l.type === REP_ACK) break;
      names.push(l.data.subarray(4).toString());
    }
    assert.deepEqual(names.sort(), ['other', 'v']);
    c.close();
  });

  it('refuses SET_META_CONTEXT before structured replies', async () => {
    const c = await RawNbd.connect({ port: daemon.nbdPort });
    await c.greet();
    c.sendOption(10, Buffer.alloc(8));
    assert.equal((await c.readOptionReply()).type, REP_ERR_INVALID);
    c.close();
  });

  it('drops a client that never finishes the handshake, and serves others meanwhile', async () => {
    const c = await RawNbd.connect({ port: daemon.nbdPort });
    await c.read(18); // greeting, then silence
    await stillServing();
    assert.equal(c.closed, false);
    c.close();
  });

  it('answers an unknown command with EINVAL and keeps the connection', async () => {
    const c = await session();
    const cookie = c.request(42, 0, 4096);
    const r = await c.reply();
    assert.equal(r.cookie, cookie);
    assert.equal(r.error, NBD_EINVAL);
    c.request(CMD.READ, 0, 4096);
    assert.equal((await c.reply()).error, 0);
    c.close();
  });

  it('answers an unknown flag with EINVAL', async () => {
    const c = await session();
    c.request(CMD.FLUSH, 0, 0, { flags: 0x40 });
    assert.equal((await c.reply()).error, NBD_EINVAL);
    c.close();
  });

  it('consumes an oversized write, answers EINVAL, and stays in step', async () => {
    const c = await session(false);
    const length = 33 * 1024 * 1024;
    c.request(CMD.WRITE, 0, length, { payload: Buffer.alloc(length, 0x99) });
    assert.equal((await c.reply()).error, NBD_EINVAL);
    const data = randomBytes(4096);
    c.request(CMD.WRITE, 8192, 4096, { payload: data });
    assert.equal((await c.reply()).error, 0);
    c.request(CMD.READ, 8192, 4096);
    const r = await c.reply(4096);
    assert.ok(r.data.equals(data));
    c.request(CMD.READ, 0, 4096);
    assert.ok(
      (await c.reply(4096)).data.every((b) => b !== 0x99),
      'the rejected payload was not written',
    );
    c.close();
  });

  it('answers out-of-range requests with the errors the spec names', async () => {
    const c = await session();
    c.request(CMD.READ, SIZE - 4096, 8192);
    assert.equal((await c.reply()).error, NBD_EINVAL);
    c.request(CMD.WRITE, SIZE, 4096, { payload: Buffer.alloc(4096) });
    assert.equal((await c.reply()).error, NBD_ENOSPC);
    c.request(CMD.TRIM, SIZE - 4096, 8192);
    assert.equal((await c.reply()).error, NBD_EINVAL);
    c.request(CMD.WRITE_ZEROES, 2n ** 63n, 4096);
    assert.equal((await c.reply()).error, NBD_ENOSPC);
    c.request(CMD.BLOCK_STATUS, 0xffffffffffffffffn, 1);
    assert.equal((await c.reply()).error, NBD_EINVAL);
    c.request(CMD.READ, 0, 32 * 1024 * 1024 + 1);
    assert.equal((await c.reply()).error, NBD_EINVAL);
    c.close();
  });

  it('refuses BLOCK_STATUS without a negotiated context', async () => {
    const c = await session(false);
    c.request(CMD.BLOCK_STATUS, 0, 4096);
    assert.equal((await c.reply()).error, NBD_EINVAL);
    c.close();
  });

  it('closes a connection that sends a bad request magic', async () => {
    const c = await session();
    c.request(CMD.READ, 0, 4096, { magic: 0xdeadbeef });
    await c.waitClosed();
    await stillServing();
  });

  it('survives a client that disconnects in the middle of a write payload', async () => {
    const c = await session();
    const header = Buffer.alloc(28);
    header.writeUInt32BE(0x25609513, 0);
    header.writeUInt16BE(CMD.WRITE, 6);
    header.writeUInt32BE(1024 * 1024, 24);
    c.write(Buffer.concat([header, Buffer.alloc(100_000, 0x42)]));
    c.close();
    await stillServing();
    const check = await session(false);
    check.request(CMD.READ, 0, 4096);
    assert.ok(
      (await check.reply(4096)).data.every((b) => b !== 0x42),
      'a partial write is never applied',
    );
    check.close();
  });

  it('gives a single extent for BLOCK_STATUS with REQ_ONE', async () => {
    const c = await session();
    const at = 4 * 1024 * 1024;
    c.request(CMD.WRITE, at, 8192, { payload: Buffer.alloc(8192, 1) });
    await c.reply();
    c.request(CMD.BLOCK_STATUS, at, 1024 * 1024, { flags: 8 });
    const r = await c.reply();
    assert.equal(r.type, 5);
    assert.equal(r.data.length, 4 + 8, 'one descriptor');
    assert.equal(r.data.readUInt32BE(4), 8192);
    assert.equal(r.data.readUInt32BE(8), 0, 'allocated');
    c.close();
  });
});
