import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, describe, it } from 'node:test';
import { DaemonProcess } from './helpers/daemon.ts';
import { assertSameBytes, fillRandom } from './helpers/export-data.ts';
import { mustRun, waitFor } from './helpers/run.ts';

interface Operation {
  id: string;
  state: string;
  progress: { phase: string; done: number; total: number };
  result?: unknown;
}
interface Summary {
  name: string;
  snapshot: string;
  blocks: number;
  stats: { blocksRead: number; blocksStored: number };
}

async function storeBlocks(store: string): Promise<Set<string>> {
  const dir = path.join(store, 'backupstore', 'blocks');
  const files = (await fs.promises.readdir(dir, { recursive: true }).catch(() => []))
    .map(String)
    .filter((f) => f.endsWith('.blk'));
  return new Set(files.map((f) => path.basename(f, '.blk')));
}

async function listed(store: string, volume: string, backup: string): Promise<Set<string>> {
  const cfg = JSON.parse(
    await fs.promises.readFile(
      path.join(store, 'backupstore', 'volumes', volume, 'backups', `${backup}.cfg`),
      'utf8',
    ),
  ) as { blocks: Array<[number, string]> };
  return new Set(cfg.blocks.map(([, h]) => h));
}

/**
 * SIGKILL in the middle of backup, delete and restore. Every store operation
 * is slowed (the test-only delay filter) so that the kill lands mid-job.
 */
describe('backup jobs cut off by SIGKILL', () => {
  const cleanups: Array<() => Promise<void>> = [];
  after(async () => {
    for (const c of cleanups.reverse()) await c();
  });

  async function start(dataDir?: string, store?: string): Promise<DaemonProcess> {
    const d = await DaemonProcess.start({
      ...(dataDir ? { dataDir } : {}),
      args: store ? ['--backup-target', `file://${store}`] : [],
      env: { CORRAL_FAULT_INJECTION: '1', CORRAL_BACKUP_DELAY_MS: '15' },
    });
    cleanups.push(() => d.cleanup());
    return d;
  }

  async function startOp(d: DaemonProcess, method: string, route: string, body?: unknown) {
    const r = await d.api_<{ operation: Operation }>(method, route, body);
    assert.equal(r.status, 202, JSON.stringify(r.json));
    return r.json.operation;
  }

  async function until(d: DaemonProcess, op: Operation, pred: (o: Operation) => boolean) {
    return waitFor(`operation ${op.id}`, async () => {
      const o = (await d.api_<Operation>('GET', `/v1/operations/${op.id}`)).json;
      assert.notEqual(o.state, 'failed', JSON.stringify(o));
      return pred(o) ? o : undefined;
    });
  }

  async function cliJson<T>(d: DaemonProcess, args: string[]): Promise<T> {
    const r = await d.cli([...args, '--json']);
    assert.equal(r.code, 0, `corral ${args.join(' ')}: ${r.stderr}`);
    return JSON.parse(r.stdout) as T;
  }

  it('the store stays readable and the next backup, gc and restore finish the job', async () => {
    const store = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-crash-store-'));
    cleanups.push(() => fs.promises.rm(store, { recursive: true, force: true }));
    let d = await start(undefined, store);
    await d.createVolume('v', '128M');
    // Random data, every 1 MiB different: no block deduplicates.
    await fillRandom(d.uri('v'), '128m');
    const snap = (
      await d.api_<{ name: string }>('POST', '/v1/volumes/v/snapshots', { name: 'first' })
    ).json.name;

    // 1. SIGKILL during a backup.
    const op = await startOp(d, 'POST', '/v1/backups', { volume: 'v', snapshot: snap });
    await until(d, op, (o) => o.progress.done >= 16);
    await d.kill();
    assert.ok((await fs.promises.readdir(path.join(store, 'backupstore', 'locks'))).length > 0);
    const partial = (await storeBlocks(store)).size;
    assert.ok(partial > 0 && partial < 64, `${partial} blocks were stored before the kill`);
    d = await start(d.dataDir, store);
    assert.deepEqual(await cliJson(d, ['backup', 'ls']), [], 'a cut-off backup is not listed');
    const again = await cliJson<Summary>(d, ['backup', 'create', 'v', '--snapshot', snap]);
    assert.equal(again.blocks, 64);
    assert.equal(
      again.stats.blocksStored,
      64 - partial,
      'blocks stored by the killed run are reused',
    );
    const events = await cliJson<Array<{ type: string }>>(d, ['events']);
    assert.ok(
      events.some((e) => e.type === 'backup-lock-stale'),
      'the dead lock was cleared',
    );
    assert.deepEqual(await storeBlocks(store), await listed(store, 'v', again.name));

    // 2. SIGKILL during a delete: overwrite everything, back up, delete the first backup.
    await fillRandom(d.uri('v'), '128m');
    const second = await cliJson<Summary>(d, ['backup', 'create', 'v']);
    assert.equal(second.stats.blocksStored, 64);
    const del = await startOp(d, 'DELETE', `/v1/backups/${again.name}`);
    await until(d, del, (o) => o.progress.phase === 'collect garbage' && o.progress.done >= 8);
    await d.kill();
    d = await start(d.dataDir, store);
    const left = await cliJson<Summary[]>(d, ['backup', 'ls']);
    assert.deepEqual(
      left.map((b) => b.name),
      [second.name],
      'the deleted backup is gone (its config went first)',
    );
    const keep = await listed(store, 'v', second.name);
    const before = await storeBlocks(store);
    for (const h of keep) assert.ok(before.has(h), 'every block of the kept backup is there');
    assert.ok(before.size > keep.size, 'garbage is left by the cut-off delete');
    await cliJson(d, ['backup', 'restore', second.name, 'check']);
    await assertSameBytes(d.uri(`v@${second.snapshot}`), d.uri('check'));
    await cliJson(d, ['backup', 'gc']);
    assert.deepEqual(await storeBlocks(store), keep, 'gc finishes the cut-off delete');

    // 3. SIGKILL during a restore: the half-restored volume is removed at the next start.
    const restore = await startOp(d, 'POST', '/v1/restores', {
      backup: second.name,
      volume: 'half',
    });
    await until(d, restore, (o) => o.progress.done >= 8);
    await d.kill();
    d = await start(d.dataDir, store);
    const volumes = await cliJson<Array<{ name: string }>>(d, ['volume', 'ls']);
    assert.deepEqual(
      volumes.map((v) => v.name),
      ['check', 'v'],
    );
    const after = await cliJson<Array<{ type: string; volume?: string }>>(d, ['events']);
    assert.ok(after.some((e) => e.type === 'restore-abandoned' && e.volume === 'half'));
    await cliJson(d, ['backup', 'restore', second.name, 'half']);
    await assertSameBytes(d.uri(`v@${second.snapshot}`), d.uri('half'));
  });

  it('a delete waits for a running backup, whose snapshot cannot be deleted meanwhile', async () => {
    const store = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-lock-store-'));
    cleanups.push(() => fs.promises.rm(store, { recursive: true, force: true }));
    const d = await start(undefined, store);
    await d.createVolume('w', '128M');
    await mustRun('qemu-io', ['-f', 'raw', d.uri('w'), '-c', 'write -P 0x11 0 2M']);
    const old = await cliJson<Summary>(d, ['backup', 'create', 'w']);
    await fillRandom(d.uri('w'), '128m');
    await d.api_('POST', '/v1/volumes/w/snapshots', { name: 'big' });
    const backup = await startOp(d, 'POST', '/v1/backups', { volume: 'w', snapshot: 'big' });
    await until(d, backup, (o) => o.progress.done >= 2);
    const held = await d.api_<{ error: { code: string; message: string } }>(
      'DELETE',
      '/v1/volumes/w/snapshots/big',
    );
    assert.equal(held.status, 409);
    assert.match(held.json.error.message, /is reading snapshot w@big/);
    const del = await startOp(d, 'DELETE', `/v1/backups/${old.name}`);
    // The delete holds back while the backup runs: its garbage collection could take
    // blocks the backup reuses without writing them.
    let overlapped = 0;
    await waitFor('the backup to end', async () => {
      const delNow = (await d.api_<Operation>('GET', `/v1/operations/${del.id}`)).json;
      const backupNow = (await d.api_<Operation>('GET', `/v1/operations/${backup.id}`)).json;
      if (backupNow.state !== 'running') return backupNow;
      assert.equal(delNow.state, 'running');
      assert.equal(delNow.progress.phase, 'lock', 'the delete waits for the lock');
      overlapped++;
      return undefined;
    });
    assert.ok(overlapped > 0, 'the delete was started while the backup ran');
    await until(d, del, (o) => o.state === 'succeeded');
    const fresh = (backup.id &&
      (await d.api_<Operation>('GET', `/v1/operations/${backup.id}`)).json.result) as Summary;
    assert.deepEqual(await storeBlocks(store), await listed(store, 'w', fresh.name));
    await cliJson(d, ['backup', 'restore', fresh.name, 'w2']);
    await assertSameBytes(d.uri('w@big'), d.uri('w2'));
    assert.equal((await d.api_('DELETE', '/v1/volumes/w/snapshots/big')).status, 204);
  });
});
