import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { GetObjectCommand } from '@aws-sdk/client-s3';
import { MULTIPART_THRESHOLD } from '../backup/s3-target.ts';
import { openTarget } from '../backup/open-target.ts';
import { DaemonProcess } from './helpers/daemon.ts';
import { assertSameBytes, sha256OfExport, sha256OfImage } from './helpers/export-data.ts';
import { mustRun, run } from './helpers/run.ts';
import { S3_ENV, S3Server } from './helpers/s3.ts';

const MiB = 1024 * 1024;

interface Summary {
  name: string;
  volume: string;
  snapshot: string;
  blocks: number;
  url: string;
  stats: { blocksRead: number; blocksStored: number; bytesStored: number };
}

/** What the test sees of a store, read without Corral's code: files, or S3 objects. */
interface StoreView {
  target: string;
  blockHashes(): Promise<Set<string>>;
  listedHashes(volume: string, backup: string): Promise<Set<string>>;
}

function fileView(dir: string): StoreView {
  const root = path.join(dir, 'backupstore');
  return {
    target: `file://${dir}`,
    async blockHashes() {
      const files = (await fs.promises.readdir(path.join(root, 'blocks'), { recursive: true }))
        .map(String)
        .filter((f) => f.endsWith('.blk'));
      return new Set(files.map((f) => path.basename(f, '.blk')));
    },
    async listedHashes(volume, backup) {
      const cfg = JSON.parse(
        await fs.promises.readFile(
          path.join(root, 'volumes', volume, 'backups', `${backup}.cfg`),
          'utf8',
        ),
      ) as { blocks: Array<[number, string]> };
      return new Set(cfg.blocks.map(([, h]) => h));
    },
  };
}

function s3View(s3: S3Server, prefix: string): StoreView {
  return {
    target: s3.target(prefix),
    async blockHashes() {
      const keys = await s3.keys(`${prefix}/backupstore/blocks/`);
      return new Set(keys.filter((k) => k.endsWith('.blk')).map((k) => path.basename(k, '.blk')));
    },
    async listedHashes(volume, backup) {
      const out = await s3.client.send(
        new GetObjectCommand({
          Bucket: s3.bucket,
          Key: `${prefix}/backupstore/volumes/${volume}/backups/${backup}.cfg`,
        }),
      );
      const cfg = JSON.parse(await out.Body!.transformToString()) as {
        blocks: Array<[number, string]>;
      };
      return new Set(cfg.blocks.map(([, h]) => h));
    },
  };
}

describe('backups to a directory and to S3, restored bit for bit', () => {
  const cleanups: Array<() => Promise<void>> = [];
  let s3: S3Server;
  let work: string;
  before(async () => {
    s3 = await S3Server.start();
    cleanups.push(() => s3.stop());
    work = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-backup-'));
    cleanups.push(() => fs.promises.rm(work, { recursive: true, force: true }));
  });
  after(async () => {
    for (const c of cleanups.reverse()) await c();
  });

  async function daemon(args: string[] = []): Promise<DaemonProcess> {
    // The test's stores lie in its work dir: a root the daemons may write backups to.
    const d = await DaemonProcess.start({ args: ['--backup-root', work, ...args], env: S3_ENV });
    cleanups.push(() => d.cleanup());
    return d;
  }

  async function cliJson<T>(d: DaemonProcess, args: string[]): Promise<T> {
    const r = await d.cli([...args, '--json']);
    assert.equal(r.code, 0, `corral ${args.join(' ')}: ${r.stderr}`);
    return JSON.parse(r.stdout) as T;
  }

  for (const kind of ['file', 's3'] as const) {
    it(`${kind}: incremental, deduplicated across volumes, delete collects garbage, restores on a fresh daemon`, async () => {
      const view = kind === 'file' ? fileView(path.join(work, 'store')) : s3View(s3, 'team/corral');
      const T = ['--target', view.target];
      const d = await daemon();
      await d.createVolume('src', '256M');
      const data1 = randomBytes(64 * MiB);
      const file1 = path.join(work, `${kind}-data1`);
      await fs.promises.writeFile(file1, data1);
      await mustRun('nbdcopy', [file1, d.uri('src')]);

      const b1 = await cliJson<Summary>(d, ['backup', 'create', 'src', ...T]);
      assert.equal(b1.stats.blocksRead, 32, 'a full backup reads the 32 blocks holding data');
      assert.equal(b1.stats.blocksStored, 32);
      assert.equal(b1.blocks, 32);
      assert.equal((await view.blockHashes()).size, 32);

      // 4 MiB more, over two blocks of the first 64 MiB.
      const data2 = randomBytes(4 * MiB);
      const file2 = path.join(work, `${kind}-data2`);
      await fs.promises.writeFile(file2, data2);
      await mustRun('qemu-io', ['-f', 'raw', d.uri('src'), '-c', `write -s ${file2} 10M 4M`]);
      const b2 = await cliJson<Summary>(d, ['backup', 'create', 'src', ...T]);
      assert.equal(b2.stats.blocksRead, 2, 'only the two touched blocks are read');
      assert.equal(b2.stats.blocksStored, 2, 'only the two touched blocks are uploaded');
      assert.equal(b2.blocks, 32);
      assert.equal((await view.blockHashes()).size, 34);

      // Each backup restores alone, equal to the snapshot it came from.
      for (const [b, into] of [
        [b1, 'r1'],
        [b2, 'r2'],
      ] as const) {
        await cliJson(d, ['backup', 'restore', b.name, into, ...T]);
        await assertSameBytes(d.uri(`src@${b.snapshot}`), d.uri(into));
      }
      const expected2 = sha256OfImage(256 * MiB, [
        [0, data1],
        [10 * MiB, data2],
      ]);
      assert.equal(await sha256OfExport(d.uri('r2')), expected2);

      // A clone holds the same blocks: its backup uploads none.
      await mustRun(
        process.execPath,
        ['bin/corral.js', 'volume', 'create', 'clone', '--from-snapshot', `src@${b2.snapshot}`],
        {
          env: { ...process.env, CORRAL_API: d.api, CORRAL_TOKEN: d.token },
        },
      );
      const b3 = await cliJson<Summary>(d, ['backup', 'create', 'clone', ...T]);
      assert.equal(b3.stats.blocksRead, 32);
      assert.equal(b3.stats.blocksStored, 0, 'no block is uploaded twice, across volumes');
      assert.equal((await view.blockHashes()).size, 34);

      // Deleting the first backup removes exactly the blocks no other backup lists.
      const listed1 = await view.listedHashes('src', b1.name);
      await cliJson(d, ['backup', 'rm', b1.name, ...T]);
      const kept = new Set([
        ...(await view.listedHashes('src', b2.name)),
        ...(await view.listedHashes('clone', b3.name)),
      ]);
      assert.deepEqual(await view.blockHashes(), kept);
      assert.equal([...listed1].filter((h) => !kept.has(h)).length, 2);
      const left = await cliJson<Summary[]>(d, ['backup', 'ls', ...T]);
      assert.deepEqual(left.map((b) => b.name).sort(), [b2.name, b3.name].sort());

      // Disaster recovery: a daemon that never saw the volume restores from the store alone.
      const fresh = await daemon(['--backup-target', view.target]);
      const seen = await cliJson<Summary[]>(fresh, ['backup', 'ls', 'src']);
      assert.deepEqual(
        seen.map((b) => b.name),
        [b2.name],
      );
      await cliJson(fresh, ['backup', 'restore', b2.url, 'recovered']);
      assert.equal(await sha256OfExport(fresh.uri('recovered')), expected2);
      const byName = await cliJson(fresh, ['backup', 'restore', b3.name, 'recovered-clone']);
      assert.ok(byName);
      assert.equal(await sha256OfExport(fresh.uri('recovered-clone')), expected2);
    });
  }

  it('s3: a large object goes up in parts and comes back whole', async () => {
    Object.assign(process.env, S3_ENV); // the SDK's usual credential variables
    const target = await openTarget(s3.target('multipart'), {
      fileRoots: [],
      s3CredentialChain: false,
    });
    const big = randomBytes(MULTIPART_THRESHOLD + 5 * MiB);
    await target.put('big/object', [big.subarray(0, 1000), big.subarray(1000)]);
    const back = await target.get('big/object');
    assert.ok(back?.equals(big), 'the object reads back byte for byte');
    assert.deepEqual(await target.list('big'), ['big/object']);
    assert.equal(await target.get('big/missing'), undefined);
    await target.delete('big/object');
    assert.equal(await target.exists('big/object'), false);
  });

  it('refuses bad requests with clear errors and loses nothing', async () => {
    const store = path.join(work, 'bad-store');
    const d = await daemon(['--backup-target', `file://${store}`]);
    await d.createVolume('v', '16M');
    await mustRun('qemu-io', ['-f', 'raw', d.uri('v'), '-c', 'write -P 0x5a 0 4M']);
    const b = await cliJson<Summary>(d, ['backup', 'create', 'v']);

    const unknownVolume = await d.cli(['backup', 'create', 'nope']);
    assert.equal(unknownVolume.code, 1);
    assert.match(unknownVolume.stderr, /No volume named nope.*NOT_FOUND/);
    const badTarget = await d.api_<{ error: { code: string; message: string } }>(
      'POST',
      '/v1/backups',
      { volume: 'v', target: 'ftp://host/x' },
    );
    assert.equal(badTarget.status, 400);
    assert.match(badTarget.json.error.message, /file:\/\/\/path or s3:\/\/bucket/);
    const unknownBackup = await d.cli(['backup', 'restore', 'backup-nope', 'x']);
    assert.match(unknownBackup.stderr, /No backup named backup-nope.*NOT_FOUND/);
    const taken = await d.cli(['backup', 'restore', b.name, 'v']);
    assert.match(taken.stderr, /Volume v already exists.*ALREADY_EXISTS/);
    const badBody = await d.api_<{ error: { code: string } }>('POST', '/v1/restores', '{"backup":');
    assert.equal(badBody.status, 400);
    assert.equal((await d.api_('GET', '/v1/operations/op-nope')).status, 404);
    const badUrl = await d.cli(['backup', 'restore', `file://${store}`, 'x']);
    assert.match(badUrl.stderr, /names no backup/);
    const badCron = await d.cli([
      'job',
      'add',
      'v',
      '--cron',
      '* *',
      '--task',
      'backup',
      '--retain',
      '2',
    ]);
    assert.equal(badCron.code, 1);
    assert.match(badCron.stderr, /Invalid cron expression "\* \*".*INVALID_ARGUMENT/);
    const job = await cliJson<{ id: string; nextRunAt: string }>(d, [
      'job',
      'add',
      'v',
      '--cron',
      '30 2 * * *',
      '--task',
      'backup',
      '--retain',
      '7',
    ]);
    assert.match(job.nextRunAt, /T\d\d:30:00.000Z$/);
    const jobs = await d.cli(['job', 'ls']);
    assert.match(jobs.stdout, new RegExp(`${job.id}\\s+v\\s+backup\\s+30 2 \\* \\* \\*\\s+7`));
    await cliJson(d, ['job', 'rm', job.id]);
    assert.deepEqual(await cliJson(d, ['job', 'ls']), []);

    // A corrupted block is caught by its checksum: the restore fails and leaves no volume.
    const blocks = (
      await fs.promises.readdir(path.join(store, 'backupstore', 'blocks'), {
        recursive: true,
      })
    )
      .map(String)
      .filter((f) => f.endsWith('.blk'));
    assert.equal(blocks.length, 1, 'two identical 2 MiB blocks are stored once');
    const blockFile = path.join(store, 'backupstore', 'blocks', blocks[0]!);
    const bytes = await fs.promises.readFile(blockFile);
    bytes[bytes.length - 100] = bytes[bytes.length - 100]! ^ 0xff;
    await fs.promises.writeFile(blockFile, bytes);
    const corrupt = await d.cli(['backup', 'restore', b.name, 'from-corrupt']);
    assert.equal(corrupt.code, 1);
    assert.match(
      corrupt.stderr,
      /Backup block [0-9a-f]{64}: .*(checksum|decompress).*CORRUPT_METADATA/,
    );
    const names = (await cliJson<Array<{ name: string }>>(d, ['volume', 'ls'])).map((v) => v.name);
    assert.deepEqual(names, ['v'], 'a failed restore leaves no half-restored volume');
    // The source volume is untouched.
    await mustRun('qemu-io', ['-f', 'raw', d.uri('v'), '-c', 'read -P 0x5a 0 4M']);
    const events = (
      await run(process.execPath, ['bin/corral.js', 'events', '--json'], {
        env: { ...process.env, CORRAL_API: d.api, CORRAL_TOKEN: d.token },
      })
    ).stdout;
    assert.match(events, /restore-failed/);
  });
});
