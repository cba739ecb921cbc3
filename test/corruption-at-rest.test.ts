import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, describe, it } from 'node:test';
import { TestCluster } from './helpers/cluster.ts';
import { DaemonProcess } from './helpers/daemon.ts';
import { CMD, RawNbd } from './helpers/nbd-client.ts';
import { mustRun, run, waitFor } from './helpers/run.ts';

async function readBack(d: DaemonProcess, volume: string, offset: number, length: number) {
  const c = await RawNbd.connect({ port: d.nbdPort });
  try {
    await c.greet();
    await c.go(volume, { structured: false });
    c.request(CMD.READ, offset, length);
    const r = await c.reply(length);
    assert.equal(r.error, 0, `read of ${volume} at ${offset} failed with errno ${r.error}`);
    return r.data;
  } finally {
    c.close();
  }
}

interface ReplicaRow {
  id: string;
  location: string;
  mode: string;
}
interface ScrubResult {
  replicas: Array<{
    replica: string;
    bad: Array<{ offset: number; snapshot?: string }>;
    failed: boolean;
  }>;
}

const MiB = 1024 * 1024;

/** Flips one byte of a file in place (through the page cache, as a bad disk or a stray write would). */
async function flipByte(file: string, offset: number): Promise<void> {
  const fh = await fs.promises.open(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, offset);
    b[0] = b[0]! ^ 0x5a;
    await fh.write(b, 0, 1, offset);
  } finally {
    await fh.close();
  }
}

/** The layer files of every replica in a data dir, with the byte each holds at `offset`. */
async function layerFiles(
  dataDir: string,
  offset: number,
): Promise<Array<{ file: string; byte: number }>> {
  const out: Array<{ file: string; byte: number }> = [];
  const root = path.join(dataDir, 'replicas');
  for (const dir of await fs.promises.readdir(root)) {
    for (const f of await fs.promises.readdir(path.join(root, dir))) {
      if (!f.endsWith('.layer')) continue;
      const file = path.join(root, dir, f);
      const fh = await fs.promises.open(file, 'r');
      const b = Buffer.alloc(1);
      await fh.read(b, 0, 1, offset);
      await fh.close();
      out.push({ file, byte: b[0]! });
    }
  }
  return out;
}

function qemuRead(uri: string, pattern: number, offset: number, length: number) {
  return run('qemu-io', [
    '-f',
    'raw',
    '-r',
    uri,
    '-c',
    `read -P 0x${pattern.toString(16)} ${offset} ${length}`,
  ]);
}

async function scrub(
  d: DaemonProcess,
  volume: string,
): Promise<{ code: number | null; result: ScrubResult }> {
  const r = await d.cli(['volume', 'scrub', volume, '--json']);
  return { code: r.code, result: JSON.parse(r.stdout) as ScrubResult };
}

describe('corruption at rest', () => {
  const cleanups: Array<() => Promise<void>> = [];
  after(async () => {
    for (const c of cleanups) await c();
  });

  it('one replica: a flipped or truncated block is an I/O error and an event, never wrong data', async () => {
    let d = await DaemonProcess.start();
    cleanups.push(() => d.cleanup());
    await d.createVolume('v', '64M');
    await mustRun('qemu-io', ['-f', 'raw', d.uri('v'), '-c', 'write -P 0x11 0 4M']);
    assert.equal((await d.cli(['snapshot', 'create', 'v', 's1'])).code, 0);
    await mustRun('qemu-io', ['-f', 'raw', d.uri('v'), '-c', 'write -P 0x22 0 1M']);
    await d.stop();
    const files = await layerFiles(d.dataDir, 0);
    const head = files.find((f) => f.byte === 0x22)!.file;
    const snap = files.find((f) => f.byte === 0x11)!.file;
    await flipByte(head, 8192 + 100); // block 2 of the head
    await flipByte(snap, 2 * MiB + 5); // seen through the head, and in v@s1
    d = await d.restart();

    const bad = await qemuRead(d.uri('v'), 0x22, 8192, 4096);
    assert.notEqual(bad.code, 0, 'the flipped head block does not read');
    assert.match(bad.stdout + bad.stderr, /Input\/output error/);
    assert.notEqual((await qemuRead(d.uri('v'), 0x11, 2 * MiB, 4096)).code, 0);
    assert.notEqual((await qemuRead(d.uri('v@s1'), 0x11, 2 * MiB, 4096)).code, 0);
    // Every other block reads as written, and a read covering a bad block and good ones fails whole.
    assert.equal((await qemuRead(d.uri('v'), 0x22, 0, 8192)).code, 0);
    assert.equal((await qemuRead(d.uri('v'), 0x22, 12288, MiB - 12288)).code, 0);
    assert.equal((await qemuRead(d.uri('v'), 0x11, MiB, MiB)).code, 0);
    assert.equal((await qemuRead(d.uri('v'), 0x11, 2 * MiB + 4096, 2 * MiB - 4096)).code, 0);
    assert.notEqual((await qemuRead(d.uri('v'), 0x11, MiB, 2 * MiB)).code, 0);

    const events = (await d.api_<{ events: Array<{ type: string }> }>('GET', '/v1/events')).json
      .events;
    assert.ok(
      events.some((e) => e.type === 'data-corrupt'),
      JSON.stringify(events),
    );
    const modes = (await d.api_<{ replicas: ReplicaRow[] }>('GET', '/v1/volumes/v/replicas')).json
      .replicas;
    assert.deepEqual(
      modes.map((r) => r.mode),
      ['RW'],
      'the only replica still serves the good blocks',
    );

    const s = await scrub(d, 'v');
    assert.equal(s.code, 3, 'scrub exits 3 when it finds bad blocks');
    assert.deepEqual(
      s.result.replicas[0]!.bad.sort((a, b) => a.offset - b.offset),
      [{ offset: 8192 }, { offset: 2 * MiB, snapshot: 's1' }],
    );
    assert.equal(s.result.replicas[0]!.failed, false, 'no clean replica to rebuild from');

    // A layer cut short reads as zeros past its end: those blocks fail their checksums too.
    await d.stop();
    await fs.promises.truncate(snap, 3 * MiB);
    d = await d.restart();
    assert.notEqual((await qemuRead(d.uri('v'), 0x11, 3 * MiB, 4096)).code, 0);
    assert.equal((await qemuRead(d.uri('v'), 0x11, MiB, MiB)).code, 0);
  });

  it('a SIGKILL between an overwrite and its flush never reads as corruption', async () => {
    let d = await DaemonProcess.start();
    cleanups.push(() => d.cleanup());
    await d.createVolume('k', '64M');
    await mustRun('qemu-io', ['-f', 'raw', d.uri('k'), '-c', 'write -P 0x44 0 2M']);
    // Overwritten and not flushed: the new bytes reach the file (page cache), their
    // checksums do not reach LevelDB before the kill.
    const c = await RawNbd.connect({ port: d.nbdPort });
    await c.greet();
    await c.go('k');
    c.request(CMD.WRITE, 0, 2 * MiB, { payload: Buffer.alloc(2 * MiB, 0x55) });
    assert.equal((await c.reply()).error, 0);
    await d.kill();
    c.close();
    d = await d.restart();
    const got = await readBack(d, 'k', 0, 2 * MiB);
    for (let b = 0; b < 2 * MiB; b += 4096) {
      const first = got[b]!;
      assert.ok(first === 0x44 || first === 0x55, `block at ${b}: old or new`);
    }
    assert.equal((await scrub(d, 'k')).code, 0, 'no block fails its checksum');
  });

  it('reads racing writes to the same blocks never fail their checksums', async () => {
    const d = await DaemonProcess.start();
    cleanups.push(() => d.cleanup());
    await d.createVolume('r', '64M');
    const open = async () => {
      const c = await RawNbd.connect({ port: d.nbdPort });
      await c.greet();
      await c.go('r', { structured: false });
      return c;
    };
    const [w, r] = [await open(), await open()];
    // Many 1 MiB writes and reads of the same blocks in flight at once (the pool threads run
    // them side by side): a read may see a write's bytes before the write has set their sums.
    for (let round = 0; round < 6; round++) {
      for (let i = 0; i < 32; i++) {
        w.request(CMD.WRITE, (i % 16) * MiB, MiB, { payload: Buffer.alloc(MiB, round * 32 + i) });
        r.request(CMD.READ, (i % 16) * MiB, MiB);
      }
      for (let i = 0; i < 32; i++) {
        assert.equal((await w.reply()).error, 0);
        const read = await r.reply(MiB);
        assert.equal(read.error, 0, `round ${round}: a read racing a write is not corruption`);
      }
    }
    // Read-modify-writes (unaligned) racing aligned writes to their edge blocks, with reads
    // beside them: an edge read that sees a racing write's bytes waits for that write only
    // (waiting for every write under way, its own included, hung until the watchdog: EIO).
    const u = await open();
    for (let round = 0; round < 40; round++) {
      for (let i = 0; i < 8; i++) {
        u.request(CMD.WRITE, 100 + i * 8192, 8192, { payload: Buffer.alloc(8192, i) });
        w.request(CMD.WRITE, (i * 2 + 1) * 4096, 4096, { payload: Buffer.alloc(4096, 0x80 + i) });
        r.request(CMD.READ, 0, 64 * 1024);
      }
      for (let i = 0; i < 8; i++) {
        assert.equal((await u.reply()).error, 0, `round ${round}: unaligned write`);
        assert.equal((await w.reply()).error, 0, `round ${round}: aligned write`);
        assert.equal((await r.reply(64 * 1024)).error, 0, `round ${round}: read`);
      }
    }
    u.close();
    w.close();
    r.close();
  });

  it('three replicas: a bad block is read from a good replica, scrub finds the rest, rebuilds repair both', async () => {
    const c = await TestCluster.start(3, ['--rebuild-delay', '300', '--replica-timeout', '3000']);
    cleanups.push(() => c.cleanup());
    const d1 = c.daemons[0]!;
    assert.equal(
      (await d1.cli(['volume', 'create', 'pg', '--size', '64M', '--replicas', '3'])).code,
      0,
    );
    await mustRun('qemu-io', ['-f', 'raw', d1.uri('pg'), '-c', 'write -P 0x33 0 8M']);
    const allRw = () =>
      waitFor(
        '3 RW replicas',
        async () => {
          const r = (await d1.api_<{ replicas: ReplicaRow[] }>('GET', '/v1/volumes/pg/replicas'))
            .json.replicas;
          return r.length === 3 && r.every((x) => x.mode === 'RW') ? r : undefined;
        },
        60_000,
      );
    await allRw();

    // The engine's own replica goes bad under a running daemon: reads come from a peer.
    // The layer holding the data (a rebuild may have added an empty head beside it).
    const local = (await layerFiles(d1.dataDir, 0)).find((f) => f.byte === 0x33);
    await flipByte(local!.file, 4 * MiB + 10);
    assert.equal(
      (await qemuRead(d1.uri('pg'), 0x33, 0, 8 * MiB)).code,
      0,
      'the client sees good data',
    );
    await allRw(); // the local replica went ERR and was rebuilt in place
    assert.equal((await qemuRead(d1.uri('pg'), 0x33, 0, 8 * MiB)).code, 0);

    // A peer's replica goes bad where nobody reads: scrub finds it and the rebuild repairs it.
    const peer = (await layerFiles(c.daemons[1]!.dataDir, 0)).find((f) => f.byte === 0x33);
    await flipByte(peer!.file, MiB + 77);
    const found = await scrub(d1, 'pg');
    assert.equal(found.code, 3);
    const badOnes = found.result.replicas.filter((r) => r.bad.length > 0);
    assert.equal(badOnes.length, 1);
    // (In the layer that holds it: after the rebuild above, a rebuild-* snapshot.)
    assert.deepEqual(
      badOnes[0]!.bad.map((b) => b.offset),
      [MiB],
    );
    assert.equal(badOnes[0]!.failed, true);
    await allRw();
    const again = await scrub(d1, 'pg');
    assert.equal(again.code, 0, JSON.stringify(again.result));
    const v = await d1.cli(['volume', 'verify', 'pg', '--json']);
    assert.equal(v.code, 0, v.stdout + v.stderr);
    // Progress counts the volume once, however many snapshots were compared (two here).
    const ops = (
      await d1.api_<{
        operations: Array<{
          kind: string;
          progress: { done: number; total: number; bytes: number };
        }>;
      }>('GET', '/v1/operations')
    ).json.operations.filter((o) => o.kind === 'verify');
    const last = ops[ops.length - 1]!.progress;
    assert.deepEqual([last.done, last.total], [64 * MiB, 64 * MiB]);
    assert.ok(last.bytes > 64 * MiB, 'every view was read');
    assert.equal((await qemuRead(d1.uri('pg'), 0x33, 0, 8 * MiB)).code, 0);
  });
});
