import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, describe, it } from 'node:test';
import { LocalReplica } from '../replication/local-replica.ts';
import { handClock } from './helpers/hand-clock.ts';
import { closeReplicaEnv, replicaEnv, type ReplicaEnv } from './helpers/replica-env.ts';
import { mustRun, waitFor } from './helpers/run.ts';
import { mountTmpfs } from './helpers/scratch-fs.ts';

const MiB = 1024 * 1024;
/** Two 128 MiB regions. */
const SIZE = 256 * MiB;
/** How long a write-intent mark lingers after its region's last write (local-replica.ts). */
const LINGER_MS = 5000;

/**
 * A database commits with a write and a flush into the same region, over and over. The flush
 * ordering that keeps such a commit to one sync's latency — marks that linger, sums that wait
 * while their region is marked, the data sync and the revision's batch at once — must still read
 * back exactly what was flushed after a crash (a replica abandoned without its closing flush, as
 * a SIGKILL leaves it), and must still clear its marks so that recovery stays short.
 */
describe('flush ordering: marks linger, sums wait, a crash still reads what was flushed', () => {
  const envs: ReplicaEnv[] = [];
  after(async () => {
    for (const e of envs) await closeReplicaEnv(e);
  });

  /** `root`: where the layer files go, when not beside LevelDB. */
  async function world(root?: string) {
    const env = await replicaEnv();
    envs.push(env);
    if (root) env.root = root;
    const clock = handClock(Date.parse('2026-12-03T00:00:00Z'));
    const replica = await LocalReplica.create({
      spaces: env.spaces,
      root: env.root,
      volume: 'v',
      sizeBytes: SIZE,
      now: new Date(),
      clock,
    });
    const marks = () => env.spaces.marks.keys(`${replica.id}/`);
    const sums = async () => (await env.spaces.sums.entries()).length;
    /** The revision counter LevelDB holds for the replica (0 before any). */
    const inKv = async () => {
      const bytes = await env.spaces.revisions.get(replica.id);
      return bytes ? Buffer.from(bytes).readBigUInt64BE(0) : 0n;
    };
    const reopen = async (): Promise<LocalReplica> => {
      const r = await LocalReplica.open({
        spaces: env.spaces,
        root: env.root,
        id: replica.id,
        clock,
      });
      env.open.push(r);
      return r;
    };
    return { env, clock, replica, marks, sums, inKv, reopen };
  }

  it('a region written and flushed keeps its mark and defers its sums until quiet, then clears both at once', async () => {
    const { clock, replica, marks, sums, env } = await world();
    env.open.push(replica);
    await replica.write(0, Buffer.alloc(MiB, 0x11));
    await replica.flush();
    assert.equal((await marks()).length, 1, 'the region stays marked after its flush');
    assert.equal(await sums(), 0, 'its sums wait while it is marked');
    // A commit: the same region again, and a flush that changes no bitmap.
    await replica.write(0, Buffer.alloc(8192, 0x12));
    await replica.flush();
    await clock.advance(LINGER_MS - 1);
    assert.equal((await marks()).length, 1, 'still marked before it has been quiet long enough');
    await clock.advance(1);
    await waitFor('the lingering mark cleared by a flush of its own', async () =>
      (await marks()).length === 0 ? true : undefined,
    );
    assert.equal(await sums(), 1, 'the sums of the region were written with the mark cleared');
    // The region in the other half of the volume was never written: never marked.
    await replica.write(200 * MiB, Buffer.alloc(4096, 0x13));
    await replica.close();
    assert.deepEqual(await marks(), [], 'close clears the marks of every region, lingering or not');
    assert.equal(await sums(), 2);
  });

  it('a crash after flushes that left the mark and deferred the sums reads back the flushed bytes, checked', async () => {
    const { clock, replica, marks, reopen, env } = await world();
    await replica.write(0, Buffer.alloc(2 * MiB, 0x21));
    await replica.flush();
    // Quiet: the mark goes and the sums of 0x21 reach LevelDB.
    await clock.advance(LINGER_MS);
    await waitFor('mark cleared', async () => ((await marks()).length === 0 ? true : undefined));
    // Overwritten and flushed (marked again first): the sums of 0x22 are not in LevelDB.
    await replica.write(0, Buffer.alloc(MiB, 0x22));
    await replica.flush();
    await replica.write(MiB, Buffer.alloc(4096, 0x23));
    await replica.flush();
    replica.abandon();
    assert.equal((await marks()).length, 1, 'the crash left the region marked');

    const again = await reopen();
    const got = await again.read(0, 2 * MiB);
    assert.ok(
      got.subarray(0, MiB).every((b) => b === 0x22),
      'the flushed overwrite',
    );
    assert.ok(
      got.subarray(MiB, MiB + 4096).every((b) => b === 0x23),
      'the flushed commit',
    );
    assert.ok(
      got.subarray(MiB + 4096).every((b) => b === 0x21),
      'the older bytes around it',
    );
    assert.deepEqual(await marks(), [], 'recovery cleared the mark');
    // The sums were computed again from the data, not left unknown: a flipped byte is caught.
    await again.close();
    const dir = LocalReplica.dirOf(env.root, again.id);
    const layer = (await fs.promises.readdir(dir)).find((f) => f.endsWith('.layer'))!;
    const fh = await fs.promises.open(path.join(dir, layer), 'r+');
    await fh.write(Buffer.from([0x99]), 0, 1, 4096 + 7);
    await fh.close();
    const third = await reopen();
    await assert.rejects(third.read(4096, 4096), /checksum/i);
  });

  it("a commit's revision rides in the head's trailer: no LevelDB write, a crash reopens at it, a damaged trailer falls back", async () => {
    const { replica, reopen, env, inKv } = await world();
    await replica.write(0, Buffer.alloc(MiB, 0x31));
    await replica.flush();
    const first = replica.revision();
    assert.equal(await inKv(), first, 'a flush that set bits wrote the counter to LevelDB');
    for (let i = 0; i < 3; i++) {
      await replica.write(8192, Buffer.alloc(4096, 0x32 + i));
      await replica.flush();
    }
    const committed = replica.revision();
    assert.ok(committed > first);
    assert.equal(await inKv(), first, 'the commits wrote nothing to LevelDB');
    replica.abandon();

    const again = await reopen();
    assert.equal(again.revision(), committed, "reopened at the trailer's counter");
    const got = await again.read(8192, 4096);
    assert.ok(
      got.every((b) => b === 0x34),
      'and with the last commit',
    );
    again.abandon();

    // A trailer that does not check out is ignored: LevelDB's counter stands, nothing else moves.
    const dir = LocalReplica.dirOf(env.root, replica.id);
    const layer = (await fs.promises.readdir(dir)).find((f) => f.endsWith('.layer'))!;
    const fh = await fs.promises.open(path.join(dir, layer), 'r+');
    await fh.write(Buffer.from([0xff]), 0, 1, SIZE + 9);
    await fh.close();
    const third = await reopen();
    assert.equal(third.revision(), first, 'a damaged trailer falls back to LevelDB');
    assert.ok((await third.read(8192, 4096)).every((b) => b === 0x34));
    await third.close();
  });

  it('a counter set lower (a rebuild from a replica that counted fewer writes) is what a reopen finds', async () => {
    const { replica, reopen } = await world();
    await replica.write(0, Buffer.alloc(MiB, 0x51));
    await replica.flush();
    for (let i = 0; i < 5; i++) {
      await replica.write(0, Buffer.alloc(4096, 0x52 + i));
      await replica.flush();
    }
    // A snapshot brings LevelDB up to the trailer; one more commit puts the trailer ahead again.
    await replica.snapshot('s', new Date());
    await replica.write(0, Buffer.alloc(4096, 0x5f));
    await replica.flush();
    const high = replica.revision();
    // Lower than the trailer's and than LevelDB's: open takes the larger of the two.
    await replica.setRevision(1n);
    replica.abandon();
    const again = await reopen();
    assert.equal(again.revision(), 1n, `not ${high}, the counter before`);
    await again.close();
  });

  it("a snapshot and an expand carry the trailer's counter into LevelDB before the head changes or grows", async () => {
    const { replica, reopen, inKv } = await world();
    await replica.write(0, Buffer.alloc(MiB, 0x41));
    await replica.flush();
    await replica.write(0, Buffer.alloc(4096, 0x42));
    await replica.flush();
    const beforeSnapshot = replica.revision();
    assert.ok((await inKv()) < beforeSnapshot, 'the commit left LevelDB behind');
    // The new head has no trailer: LevelDB must hold the counter the old head's trailer held.
    await replica.snapshot('s1', new Date());
    assert.equal(await inKv(), beforeSnapshot);
    replica.abandon();
    const again = await reopen();
    assert.equal(again.revision(), beforeSnapshot, 'a snapshot keeps the counter');

    await again.write(0, Buffer.alloc(4096, 0x43));
    await again.flush();
    await again.write(0, Buffer.alloc(4096, 0x44));
    await again.flush();
    const beforeExpand = again.revision();
    assert.ok((await inKv()) < beforeExpand, 'the commit after the snapshot left LevelDB behind');
    // The trailer at the old end is now inside the volume: the counter moves with the size.
    await again.expand(2 * SIZE);
    assert.equal(await inKv(), beforeExpand);
    again.abandon();
    const third = await reopen();
    assert.equal(third.revision(), beforeExpand, 'an expand keeps the counter');
    const got = await third.read(0, 8192);
    assert.ok(got.subarray(0, 4096).every((b) => b === 0x44));
    assert.ok(got.subarray(4096).every((b) => b === 0x41));
    assert.ok(
      (await third.read(SIZE, 4096)).every((b) => b === 0),
      'the old trailer block reads as the zeros it is to the volume',
    );
    await third.close();
  });

  it('a commit whose trailer finds the disk full puts the counter in LevelDB: a crash still reopens at it', async () => {
    // The layer files on a small tmpfs, LevelDB on the disk beside it: the layers' disk fills.
    const disk = await mountTmpfs('trailer-full', '8m');
    const mnt = disk.mnt;
    try {
      const { replica, reopen, inKv } = await world(path.join(mnt, 'replicas'));
      await replica.write(0, Buffer.alloc(MiB, 0x61));
      await replica.flush();
      // Everything left goes to a ballast: the trailer's block, never written yet, finds no room.
      const { bavail, bsize } = await fs.promises.statfs(mnt);
      await mustRun('fallocate', ['-l', String(bavail * bsize), path.join(mnt, 'ballast')]);
      assert.equal((await fs.promises.statfs(mnt)).bavail, 0);
      // A commit: an overwrite of a block the file holds (no new space) and a flush.
      await replica.write(8192, Buffer.alloc(4096, 0x62));
      await replica.flush();
      const committed = replica.revision();
      assert.equal(await inKv(), committed, 'the counter went to LevelDB');
      replica.abandon();
      const again = await reopen();
      assert.equal(again.revision(), committed, 'a crash reopens at the committed counter');
      const got = await again.read(0, 3 * 4096);
      assert.ok(got.subarray(0, 8192).every((b) => b === 0x61));
      assert.ok(
        got.subarray(8192).every((b) => b === 0x62),
        'with the commit',
      );
      await again.close();
    } finally {
      await disk.remove();
    }
  });
});
