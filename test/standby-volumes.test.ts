import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, describe, it } from 'node:test';
import { isCorralError } from '../common/errors.ts';
import { Kv } from '../kv/kv.ts';
import { openSpaces } from '../kv/spaces.ts';
import { NbdServer } from '../nbd/server.ts';
import { BackupService, type BackupSummary } from '../daemon/backups.ts';
import { EventLog } from '../daemon/events.ts';
import { Operations } from '../daemon/operations.ts';
import { StandbyService } from '../daemon/standby.ts';
import { VolumeManager } from '../daemon/volumes.ts';
import { LocalVolumeRecords } from '../daemon/volume-records.ts';
import { assertSameBytes, sha256OfExport } from './helpers/export-data.ts';
import { handClock } from './helpers/hand-clock.ts';
import { prng } from './helpers/prng.ts';
import { DaemonProcess } from './helpers/daemon.ts';
import { mustRun, run, waitFor } from './helpers/run.ts';

const MiB = 1024 * 1024;
const POLL_S = 30;
/** How often the source is backed up in this test. */
const BACKUP_EVERY_MS = 10 * 60_000;

/** The daemon's parts in this process, on a clock the test turns, served over NBD. */
async function world(dir: string) {
  const kv = await Kv.open(path.join(dir, 'meta'));
  const spaces = openSpaces(kv);
  const clock = handClock(Date.parse('2026-03-01T00:00:00Z'));
  const events = new EventLog();
  const operations = new Operations(events);
  const late: { nbd?: NbdServer } = {};
  const volumes = new VolumeManager({
    spaces,
    records: new LocalVolumeRecords(spaces.volumes),
    replicaRoot: path.join(dir, 'replicas'),
    clock,
    events,
    hangTimeoutMs: 30_000,
    faultInjection: false,
    mergeBytesPerSecond: undefined,
    connections: (name) => late.nbd?.connectionsTo(name) ?? 0,
    disconnect: (name) => late.nbd?.disconnect(name),
    imageHolders: () => Promise.resolve([]),
  });
  await volumes.start();
  const target = `file://${path.join(dir, 'store')}`;
  const backups = new BackupService({
    volumes,
    operations,
    events,
    clock,
    defaultTarget: target,
    targetPolicy: { fileRoots: [dir], s3CredentialChain: false },
  });
  const standby = new StandbyService({ volumes, backups, operations, events, clock });
  standby.start();
  const nbd = new NbdServer({
    exports: {
      names: () => volumes.attachedNames(),
      lookup: (name) => volumes.device(name),
      permits: () => true,
    },
    log: { warn: () => undefined },
  });
  late.nbd = nbd;
  const socket = path.join(dir, 'nbd.sock');
  await nbd.listenUnix(socket);
  return {
    clock,
    events,
    volumes,
    backups,
    standby,
    target,
    uri: (exportName: string) => `nbd+unix:///${exportName}?socket=${socket}`,
    async backup(volume: string, key?: string): Promise<BackupSummary> {
      const { done } = await backups.create({ volume, ...(key ? { key } : {}) });
      return done;
    },
    async close() {
      await standby.stop();
      await nbd.close();
      await volumes.stop();
      await kv.close();
    },
  };
}

type World = Awaited<ReturnType<typeof world>>;

/** Random writes over the volume, a few 2 MiB backup blocks zeroed whole (no block in the backup). */
async function churn(w: World, volume: string, random: () => number): Promise<void> {
  const dev = w.volumes.device(volume)!;
  const blocks = dev.sizeBytes / (2 * MiB);
  for (let i = 0; i < 6; i++) {
    const length = (1 + Math.floor(random() * 64)) * 4096;
    const offset = Math.floor(random() * ((dev.sizeBytes - length) / 4096)) * 4096;
    await dev.write(offset, randomBytes(length));
  }
  const zeroed = Math.floor(random() * blocks);
  await dev.zero(zeroed * 2 * MiB, 2 * MiB);
}

async function standbyOf(w: World, name: string) {
  const info = await w.volumes.get(name);
  assert.ok(info.standby, `${name} is a standby`);
  return info.standby;
}

/** Turns the clock to the next poll and waits until the standby holds `backup`. */
async function pollUntilHeld(w: World, name: string, backup: string): Promise<void> {
  await w.clock.advance(1000);
  await waitFor(`standby ${name} to hold ${backup}`, async () => {
    const s = await standbyOf(w, name);
    return s.backup === backup && s.applying === undefined ? true : undefined;
  }).catch((err: unknown) => {
    const last = w.events.list().slice(-4);
    throw new Error(`${String(err)}; last events: ${JSON.stringify(last)}`);
  });
}

describe('standby volumes follow a volume’s backups on a clock the test turns', () => {
  const dirs: string[] = [];
  after(async () => {
    for (const d of dirs) await fs.promises.rm(d, { recursive: true, force: true });
  });

  it('restores the newest backup, applies each newer one at its poll, refuses writes, survives a cut-off apply, activates', async () => {
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-standby-'));
    dirs.push(dir);
    const w = await world(dir);
    const random = prng(16);
    try {
      await w.volumes.create({ name: 'db1', size: '32M' });
      await churn(w, 'db1', random);
      let b = await w.backup('db1');

      // No backups yet of another volume: refused, nothing made.
      await assert.rejects(
        w.standby.create({ name: 'nope', from: `${w.target}?volume=other` }),
        (e) => isCorralError(e, 'NOT_FOUND'),
      );
      await assert.rejects(w.volumes.get('nope'), (e) => isCorralError(e, 'NOT_FOUND'));

      const made = await w.standby.create({
        name: 'dr',
        from: `${w.target}?volume=db1`,
        pollSeconds: POLL_S,
      });
      const info = await made.done;
      assert.equal(info.standby?.backup, b.name);
      assert.equal(info.standby?.pollSeconds, POLL_S);
      await assertSameBytes(w.uri('dr'), w.uri(`db1@${b.snapshot}`));

      // Read-only while standby: a client's write fails and changes nothing.
      const before = await sha256OfExport(w.uri('dr'));
      const write = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 64k', w.uri('dr')]);
      assert.notEqual(write.code, 0, 'a write to a standby is refused');
      assert.equal(await sha256OfExport(w.uri('dr')), before);
      await assert.rejects(w.volumes.device('dr')!.write(0, Buffer.alloc(4096, 1)), (e) =>
        isCorralError(e, 'READ_ONLY'),
      );
      await assert.rejects(w.volumes.expand('dr', '64M'), (e) => isCorralError(e, 'READ_ONLY'));

      for (let round = 1; round <= 3; round++) {
        await w.clock.advance(BACKUP_EVERY_MS - POLL_S * 1000);
        if (round === 2) await w.volumes.expand('db1', '48M');
        await churn(w, 'db1', random);
        const held = b;
        b = await w.backup('db1');
        // Not due yet: the standby still holds the backup before.
        await w.clock.advance(POLL_S * 1000 - 2000);
        assert.equal((await standbyOf(w, 'dr')).backup, held.name, `round ${round}: early`);
        await w.clock.advance(1000);
        await pollUntilHeld(w, 'dr', b.name);
        assert.equal((await w.volumes.get('dr')).sizeBytes, b.sizeBytes, `round ${round}: size`);
        await assertSameBytes(w.uri('dr'), w.uri(`db1@${b.snapshot}`));
      }
      const applied = w.events.list().filter((e) => e.type === 'standby-apply-succeeded');
      assert.equal(applied.length, 3);
      // Incremental: a round changes a few 2 MiB blocks, never the whole volume.
      for (const e of applied) {
        const written = Number(/(\d+) blocks written/.exec(e.message)?.[1]);
        assert.ok(written > 0 && written <= 8, e.message);
      }
      const s = await standbyOf(w, 'dr');
      assert.equal(s.rpoSeconds, POLL_S + BACKUP_EVERY_MS / 1000, 'RPO: poll + backup interval');
      assert.ok(s.behindSeconds !== undefined && s.behindSeconds <= POLL_S + 1);

      // An apply cut off half way (a block is missing from the store): reads are refused
      // rather than show a mix, activation too; the next poll rewrites it whole.
      await w.clock.advance(BACKUP_EVERY_MS - POLL_S * 1000);
      await churn(w, 'db1', random);
      const held = b;
      b = await w.backup('db1');
      const store = await w.backups.store(w.target);
      const older = new Set((await store.backupConfig('db1', held.name))!.blocks.map(([, h]) => h));
      const fresh = (await store.backupConfig('db1', b.name))!.blocks
        .map(([, h]) => h)
        .filter((h) => !older.has(h));
      assert.ok(fresh.length >= 2);
      const hidden = await findFile(path.join(dir, 'store'), fresh.at(-1)!);
      await fs.promises.rename(hidden, `${hidden}.away`);
      await w.clock.advance(POLL_S * 1000);
      await waitFor('the apply to fail', () =>
        w.events.list().some((e) => e.type === 'standby-apply-failed') ? true : undefined,
      );
      assert.equal((await standbyOf(w, 'dr')).applying, b.name);
      await assert.rejects(w.volumes.device('dr')!.read(0, 4096), (e) =>
        isCorralError(e, 'UNAVAILABLE'),
      );
      await assert.rejects(w.standby.activate('dr'), (e) => isCorralError(e, 'UNAVAILABLE'));
      await fs.promises.rename(`${hidden}.away`, hidden);
      await w.clock.advance(POLL_S * 1000 - 1000);
      await pollUntilHeld(w, 'dr', b.name);
      await assertSameBytes(w.uri('dr'), w.uri(`db1@${b.snapshot}`));

      // Activate: writable at the last backup; the source does not change.
      const source = await sha256OfExport(w.uri('db1'));
      const active = await w.standby.activate('dr');
      assert.equal(active.standby, undefined);
      assert.equal(active.state, 'attached');
      await assertSameBytes(w.uri('dr'), w.uri(`db1@${b.snapshot}`));
      const wrote = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 1M', w.uri('dr')]);
      assert.equal(wrote.code, 0, wrote.stderr);
      const back = await w.volumes.device('dr')!.read(0, MiB);
      assert.ok(back.every((x) => x === 0x5a));
      assert.equal(await sha256OfExport(w.uri('db1')), source, 'the source is unchanged');
      // Activated: no more polls (a newer backup is not applied).
      await w.clock.advance(BACKUP_EVERY_MS);
      await churn(w, 'db1', random);
      await w.backup('db1');
      await w.clock.advance(POLL_S * 1000 * 2);
      const after = await w.volumes.device('dr')!.read(0, MiB);
      assert.ok(after.every((x) => x === 0x5a));
      await assert.rejects(w.standby.activate('dr'), (e) => isCorralError(e, 'INVALID_ARGUMENT'));
    } finally {
      await w.close();
    }
  });

  it('follows encrypted backups with their key; without it or with a wrong one nothing is made', async () => {
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-standby-key-'));
    dirs.push(dir);
    const w = await world(dir);
    const key = randomBytes(32).toString('base64');
    try {
      await w.volumes.create({ name: 'vault', size: '16M' });
      await churn(w, 'vault', prng(7));
      let b = await w.backup('vault', key);
      await assert.rejects(
        w.standby.create({ name: 'dr', from: 'vault' }),
        (e) => isCorralError(e, 'FORBIDDEN') && /is encrypted/.test(e.message),
      );
      await assert.rejects(
        w.standby.create({ name: 'dr', from: 'vault', key: randomBytes(32).toString('base64') }),
        (e) => isCorralError(e, 'FORBIDDEN') && /Wrong key/.test(e.message),
      );
      await assert.rejects(w.volumes.get('dr'), (e) => isCorralError(e, 'NOT_FOUND'));
      await (
        await w.standby.create({ name: 'dr', from: 'vault', pollSeconds: 5, key })
      ).done;
      await assertSameBytes(w.uri('dr'), w.uri(`vault@${b.snapshot}`));
      await w.clock.advance(60_000);
      await churn(w, 'vault', prng(8));
      b = await w.backup('vault', key);
      await w.clock.advance(4000);
      await pollUntilHeld(w, 'dr', b.name);
      await assertSameBytes(w.uri('dr'), w.uri(`vault@${b.snapshot}`));
    } finally {
      await w.close();
    }
  });

  it('a disk that fills during an apply: the apply fails as NO_SPACE, the standby shows nothing half-applied, and the next poll once space is back applies it whole', async () => {
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-standby-full-'));
    dirs.push(dir);
    // The replicas' disk is small; the metadata and the backup store live elsewhere.
    const disk = path.join(dir, 'replicas');
    await fs.promises.mkdir(disk);
    await mustRun('mount', ['-t', 'tmpfs', '-o', 'size=32m', 'tmpfs', disk]);
    const w = await world(dir);
    try {
      await w.volumes.create({ name: 'db', size: '16M' });
      const src = w.volumes.device('db')!;
      await src.write(0, randomBytes(4 * MiB));
      const first = await w.backup('db');
      await (
        await w.standby.create({ name: 'dr', from: 'db', pollSeconds: POLL_S })
      ).done;
      await assertSameBytes(w.uri('dr'), w.uri(`db@${first.snapshot}`));
      // The next backup (named by the second: the clock moves, less than a poll interval)
      // changes 8 MiB the standby holds nothing of: its apply needs new space.
      await w.clock.advance(5000);
      await src.write(8 * MiB, randomBytes(8 * MiB));
      const second = await w.backup('db');
      const { bavail, bsize } = await fs.promises.statfs(disk);
      const ballast = path.join(disk, 'ballast');
      await mustRun('fallocate', ['-l', String(bavail * bsize - MiB), ballast]);

      await assert.rejects(w.standby.poll('dr'), (e) => isCorralError(e, 'NO_SPACE'));
      assert.equal((await standbyOf(w, 'dr')).applying, second.name);
      await assert.rejects(w.volumes.device('dr')!.read(0, 4096), (e) =>
        isCorralError(e, 'UNAVAILABLE'),
      );
      await assert.rejects(w.standby.activate('dr'), (e) => isCorralError(e, 'UNAVAILABLE'));
      // The source lost nothing either.
      await assertSameBytes(w.uri('db'), w.uri(`db@${second.snapshot}`));

      await fs.promises.rm(ballast);
      assert.equal(await w.standby.poll('dr'), second.name);
      assert.equal((await standbyOf(w, 'dr')).applying, undefined);
      await assertSameBytes(w.uri('dr'), w.uri(`db@${second.snapshot}`));
    } finally {
      await w.close();
      await run('umount', [disk]);
    }
  });

  it('from the CLI on a real daemon: follows with a 1 s poll, keeps following after a SIGKILL, activates', async () => {
    let d = await DaemonProcess.start();
    try {
      await d.createVolume('db1', '32M');
      const json = async <T>(args: string[]): Promise<T> => {
        const r = await d.cli([...args, '--json']);
        assert.equal(r.code, 0, `corral ${args.join(' ')}: ${r.stderr}`);
        return JSON.parse(r.stdout) as T;
      };
      const write = (pattern: number, offset: string) =>
        mustRun('qemu-io', ['-f', 'raw', '-c', `write -P ${pattern} ${offset} 1M`, d.uri('db1')]);
      await write(0x11, '0');
      await json(['backup', 'create', 'db1']);

      const bad = await d.cli(['volume', 'create', 'x', '--standby-from', 'file:///tmp/s?v=1']);
      assert.notEqual(bad.code, 0);
      assert.match(bad.stderr, /names no volume: add \?volume=NAME/);
      const badPoll = await d.cli([
        'volume',
        'create',
        'x',
        '--standby-from',
        'db1',
        '--poll',
        'soon',
      ]);
      assert.equal(badPoll.code, 2);
      assert.match(badPoll.stderr, /--poll takes a duration/);

      const made = await d.cli(['volume', 'create', 'dr', '--standby-from', 'db1', '--poll', '1s']);
      assert.equal(made.code, 0, made.stderr);
      assert.match(made.stdout, /standby: follows file:\/\/\S+\?volume=db1 every 1s/);

      const follows = async (label: string) => {
        const b = await json<{ name: string; snapshot: string }>(['backup', 'create', 'db1']);
        await waitFor(`the standby to hold ${label}`, async () => {
          const v = await json<{ standby?: { backup?: string } }>(['volume', 'get', 'dr']);
          return v.standby?.backup === b.name ? true : undefined;
        });
        await assertSameBytes(d.unixUri('dr'), d.unixUri(`db1@${b.snapshot}`));
      };
      await write(0x22, '5M');
      await follows('the second backup');
      await d.kill();
      d = await d.restart();
      await write(0x33, '20M');
      await follows('a backup taken after a restart');

      const activated = await d.cli(['volume', 'activate', 'dr']);
      assert.equal(activated.code, 0, activated.stderr);
      await mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 0 1M', d.uri('dr')]);
      const v = await json<{ standby?: unknown; state: string }>(['volume', 'get', 'dr']);
      assert.equal(v.standby, undefined);
      assert.equal(v.state, 'attached');
      const read = await mustRun('qemu-io', ['-f', 'raw', '-c', 'read -P 0x44 0 1M', d.uri('dr')]);
      assert.doesNotMatch(read.stdout, /Pattern verification failed/);
    } finally {
      await d.cleanup();
    }
  });
});

/** The file in `dir` (recursively) whose name holds `part`. */
async function findFile(dir: string, part: string): Promise<string> {
  for (const entry of await fs.promises.readdir(dir, { recursive: true, withFileTypes: true }))
    if (entry.isFile() && entry.name.includes(part)) return path.join(entry.parentPath, entry.name);
  throw new Error(`no file named *${part}* under ${dir}`);
}
