import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, describe, it } from 'node:test';
import { DaemonProcess } from './helpers/daemon.ts';
import { mustRun, run } from './helpers/run.ts';

const MiB = 1024 * 1024;
const MARKER = 'corral-plaintext-marker-0123456789\n';

/** How many times the marker occurs in the files under `dir` (as bytes). */
async function markerCount(dir: string): Promise<number> {
  const r = await run('grep', ['-r', '-a', '-o', '-F', MARKER.trim(), dir]);
  return r.stdout.split('\n').filter((l) => l.length > 0).length;
}

function sha(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

/** fio's crc32c-verifying random writes over 16 MiB at `offset`, or (`verifyOnly`) their check. */
function cryptFio(uri: string, bs: string, offset: string, verifyOnly: boolean) {
  return run(
    'fio',
    [
      '--name=crypt',
      '--ioengine=nbd',
      `--uri=${uri}`,
      '--rw=randwrite',
      `--bs=${bs}`,
      `--offset=${offset}`,
      '--size=16m',
      '--iodepth=8',
      '--verify=crc32c',
      '--verify_fatal=1',
      verifyOnly ? '--verify_only=1' : '--end_fsync=1',
    ],
    { timeoutMs: 300_000 },
  );
}

/** 512-byte writes, and 6 KiB ones that straddle sectors: each with its own 16 MiB. */
const FIO_JOBS: Array<[string, string]> = [
  ['512', '16m'],
  ['6k', '32m'],
];

describe('encryption at rest', () => {
  const cleanups: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanups.reverse()) await c().catch(() => undefined);
  });

  it('replicas, snapshots and clones hold ciphertext; the right key reads the data, a wrong one is refused', async () => {
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-crypt-'));
    cleanups.push(() => fs.promises.rm(dir, { recursive: true, force: true }));
    const key = path.join(dir, 'vault.key');
    fs.writeFileSync(key, randomBytes(64), { mode: 0o600 });
    const wrong = path.join(dir, 'wrong.key');
    fs.writeFileSync(wrong, randomBytes(64), { mode: 0o600 });
    const loose = path.join(dir, 'loose.key');
    fs.writeFileSync(loose, randomBytes(64), { mode: 0o644 });
    const plain = path.join(dir, 'plain.img');
    fs.writeFileSync(plain, MARKER.repeat(Math.ceil((8 * MiB) / MARKER.length)).slice(0, 8 * MiB));

    let d = await DaemonProcess.start();
    cleanups.push(() => d.cleanup());
    const refused = await d.cli([
      'volume',
      'create',
      'x',
      '--size',
      '16M',
      '--encrypt',
      '--key-file',
      loose,
    ]);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /loose\.key/);
    const created = await d.cli([
      'volume',
      'create',
      'vault',
      '--size',
      '64M',
      '--replicas',
      '2',
      '--allow-same-host',
      '--encrypt',
      '--key-file',
      key,
      '--json',
    ]);
    assert.equal(created.code, 0, created.stderr);
    assert.match(
      (JSON.parse(created.stdout) as { encrypted: { keyId: string } }).encrypted.keyId,
      /^[0-9a-f]{16}$/,
    );
    await mustRun('nbdcopy', [plain, d.uri('vault')]);
    await mustRun('qemu-io', ['-f', 'raw', d.uri('vault'), '-c', 'flush']);
    const back = path.join(dir, 'back.img');
    await mustRun('nbdcopy', [d.uri('vault'), back]);
    assert.ok(
      fs
        .readFileSync(back)
        .subarray(0, 8 * MiB)
        .equals(fs.readFileSync(plain)),
    );
    const replicas = path.join(d.dataDir, 'replicas');
    assert.equal(await markerCount(replicas), 0, 'the marker in a layer file');
    assert.ok((await markerCount(dir)) > 0, 'the grep itself finds the marker where it is');

    // Snapshots and a clone: ciphertext too, and the clone reads what the snapshot holds.
    assert.equal((await d.cli(['snapshot', 'create', 'vault', 's1'])).code, 0);
    const clone = await d.cli([
      'volume',
      'create',
      'copy',
      '--from-snapshot',
      'vault@s1',
      '--json',
    ]);
    assert.equal(clone.code, 0, clone.stderr);
    assert.ok(
      (JSON.parse(clone.stdout) as { encrypted?: object }).encrypted,
      'a clone keeps the key',
    );
    const fromSnap = path.join(dir, 'snap.img');
    const fromClone = path.join(dir, 'clone.img');
    await mustRun('nbdcopy', [d.uri('vault@s1'), fromSnap]);
    await mustRun('nbdcopy', [d.uri('copy'), fromClone]);
    assert.equal(sha(fromClone), sha(fromSnap));
    assert.equal(sha(fromSnap), sha(back));
    assert.equal(await markerCount(replicas), 0);

    // 512-byte and sector-straddling writes, verified.
    for (const [bs, offset] of FIO_JOBS) {
      const fio = await cryptFio(d.uri('vault'), bs, offset, false);
      assert.equal(fio.code, 0, fio.stdout + fio.stderr);
    }

    // Backups: an encrypted volume's only under a backup key, and then no block holds plaintext.
    const plainBackup = await d.cli(['backup', 'create', 'vault', '--snapshot', 's1']);
    assert.equal(plainBackup.code, 1);
    assert.match(plainBackup.stderr, /encrypted: its backups must be too/);
    const backupKey = path.join(dir, 'backup.key');
    fs.writeFileSync(backupKey, randomBytes(64), { mode: 0o600 });
    const made = await d.cli([
      'backup',
      'create',
      'vault',
      '--snapshot',
      's1',
      '--encrypt-key-file',
      backupKey,
      '--json',
    ]);
    assert.equal(made.code, 0, made.stderr);
    const backupName = (JSON.parse(made.stdout) as { name: string }).name;
    const store = path.join(d.dataDir, 'backups');
    assert.equal(await markerCount(store), 0, 'the marker in the backup store');
    const noKey = await d.cli(['backup', 'restore', backupName, 'r0']);
    assert.equal(noKey.code, 1);
    assert.match(noKey.stderr, /is encrypted: give its key/);
    const badKey = await d.cli(['backup', 'restore', backupName, 'r0', '--key-file', wrong]);
    assert.equal(badKey.code, 1);
    assert.match(badKey.stderr, /Wrong key for backup .*: it needs key [0-9a-f]{16}, this one is/);
    assert.equal((await d.cli(['volume', 'ls', '--json'])).stdout.includes('"r0"'), false);
    const restored = await d.cli(['backup', 'restore', backupName, 'r1', '--key-file', backupKey]);
    assert.equal(restored.code, 0, restored.stderr);
    const fromBackup = path.join(dir, 'restored.img');
    await mustRun('nbdcopy', [d.uri('r1'), fromBackup]);
    assert.equal(sha(fromBackup), sha(fromSnap));
    // One byte flipped in a stored block: the restore fails naming the block.
    const blocks = (
      await run('find', [path.join(store, 'backupstore', 'blocks'), '-name', '*.blk'])
    ).stdout
      .split('\n')
      .filter((l) => l.length > 0);
    assert.ok(blocks.length > 0);
    const victim = blocks[0]!;
    const bytes = fs.readFileSync(victim);
    bytes[bytes.length - 100]! ^= 0x01;
    fs.writeFileSync(victim, bytes);
    const flipped = await d.cli(['backup', 'restore', backupName, 'r2', '--key-file', backupKey]);
    assert.equal(flipped.code, 1);
    assert.match(
      flipped.stderr,
      new RegExp(`Backup block ${path.basename(victim, '.blk')} fails its authentication`),
    );

    // A restart forgets the key: the volume waits for it. A wrong key is refused, naming both.
    await d.kill();
    d = await d.restart();
    assert.notEqual((await run('nbdinfo', [d.uri('vault')])).code, 0, 'served without its key');
    const none = await d.cli(['volume', 'attach', 'vault']);
    assert.equal(none.code, 1);
    assert.match(none.stderr, /encrypted: attach it with its key/);
    const bad = await d.cli(['volume', 'attach', 'vault', '--key-file', wrong]);
    assert.equal(bad.code, 1);
    assert.match(
      bad.stderr,
      /Wrong key for encrypted volume vault: it needs key [0-9a-f]{16}, this one is [0-9a-f]{16}/,
    );
    const good = await d.cli(['volume', 'attach', 'vault', '--key-env', 'VAULT_KEY'], {
      VAULT_KEY: '',
    });
    assert.equal(good.code, 2, 'an empty variable is refused');
    assert.match(good.stderr, /VAULT_KEY is not set/);
    const ok = await d.cli(['volume', 'attach', 'vault', '--key-file', key]);
    assert.equal(ok.code, 0, ok.stderr);
    const again = path.join(dir, 'again.img');
    await mustRun('nbdcopy', [d.uri('vault@s1'), again]);
    assert.equal(sha(again), sha(fromSnap));
    // What fio wrote before the kill (flushed at its end) verifies after it.
    for (const [bs, offset] of FIO_JOBS) {
      const check = await cryptFio(d.uri('vault'), bs, offset, true);
      assert.equal(check.code, 0, `${bs}: ${check.stdout}${check.stderr}`);
    }

    // A new key: the master key is re-wrapped, no data rewritten; the old key opens nothing.
    const newKey = path.join(dir, 'new.key');
    fs.writeFileSync(newKey, randomBytes(48), { mode: 0o600 });
    const rekeyed = await d.cli([
      'volume',
      'rekey',
      'vault',
      '--key-file',
      key,
      '--new-key-file',
      newKey,
    ]);
    assert.equal(rekeyed.code, 0, rekeyed.stderr);
    const wrongOld = await d.cli([
      'volume',
      'rekey',
      'vault',
      '--key-file',
      wrong,
      '--new-key-file',
      key,
    ]);
    assert.equal(wrongOld.code, 1);
    assert.match(wrongOld.stderr, /Wrong key/);
    assert.equal((await d.cli(['volume', 'detach', 'vault'])).code, 0);
    const old = await d.cli(['volume', 'attach', 'vault', '--key-file', key]);
    assert.equal(old.code, 1);
    assert.match(old.stderr, /Wrong key/);
    assert.equal((await d.cli(['volume', 'attach', 'vault', '--key-file', newKey])).code, 0);
    const rekeyedRead = path.join(dir, 'rekeyed.img');
    await mustRun('nbdcopy', [d.uri('vault@s1'), rekeyedRead]);
    assert.equal(sha(rekeyedRead), sha(fromSnap));
  });
});
