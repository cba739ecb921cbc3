import assert from 'node:assert/strict';
import * as path from 'node:path';
import { after, describe, it } from 'node:test';
import { Kv } from '../kv/kv.ts';
import { openSpaces } from '../kv/spaces.ts';
import { DaemonProcess } from './helpers/daemon.ts';
import { assertSameBytes } from './helpers/export-data.ts';
import { duBytes, mustRun, run, waitFor } from './helpers/run.ts';

interface Snap {
  name: string;
  parent?: string;
  allocatedBytes: number;
}
interface ApiError {
  error: { code: string; message: string };
}

describe('snapshots with real clients', () => {
  const daemons: DaemonProcess[] = [];
  after(async () => {
    for (const d of daemons) await d.cleanup();
  });

  async function start(args: string[] = []): Promise<DaemonProcess> {
    const d = await DaemonProcess.start({ args });
    daemons.push(d);
    return d;
  }

  it('fio verifies while 50 snapshots are taken and half of them deleted under it', async () => {
    const d = await start();
    await d.createVolume('busy', '128M');
    const job = [
      '--name=snap',
      '--ioengine=nbd',
      `--uri=${d.uri('busy')}`,
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=16',
      '--size=64m',
      '--verify=crc32c',
      '--verify_fatal=1',
      '--verify_state_save=0',
      '--randseed=7',
      '--rate_iops=4000',
    ];
    let fioDone = false;
    const fio = mustRun('fio', job, { timeoutMs: 300_000 }).finally(() => (fioDone = true));
    const names: string[] = [];
    for (let i = 0; i < 50; i++) {
      const r = await d.api_<Snap>('POST', '/v1/volumes/busy/snapshots', { name: `s${i}` });
      assert.equal(r.status, 201, JSON.stringify(r.json));
      names.push(r.json.name);
    }
    for (const name of names.filter((_, i) => i % 2 === 0)) {
      const r = await d.api_('DELETE', `/v1/volumes/busy/snapshots/${name}`);
      assert.equal(r.status, 204);
    }
    assert.equal(fioDone, false, 'every snapshot and delete happened while fio was running');
    await fio; // wrote everything and verified every block, with no I/O error
    const left = (await d.api_<{ snapshots: Snap[] }>('GET', '/v1/volumes/busy/snapshots')).json
      .snapshots;
    assert.deepEqual(
      left.map((s) => s.name),
      names.filter((_, i) => i % 2 === 1),
    );
    // After all deletes: read everything back once more and verify again.
    await mustRun('fio', [...job.filter((a) => !a.startsWith('--rate')), '--verify_only'], {
      timeoutMs: 300_000,
    });
  });

  it('exports a snapshot read-only as VOLUME@SNAPSHOT and clones it', async () => {
    const d = daemons[0]!;
    await d.createVolume('src', '64M');
    await mustRun('qemu-io', ['-f', 'raw', d.uri('src'), '-c', 'write -P 0x31 0 2M']);
    await d.api_('POST', '/v1/volumes/src/snapshots', { name: 'one' });
    await mustRun('qemu-io', ['-f', 'raw', d.uri('src'), '-c', 'write -P 0x32 1M 2M']);
    const { stdout } = await mustRun('nbdinfo', ['--json', d.uri('src@one')]);
    const info = (JSON.parse(stdout) as { exports: Array<Record<string, unknown>> }).exports[0]!;
    assert.equal(info.is_read_only, true);
    await mustRun('qemu-io', [
      '-f',
      'raw',
      '-r',
      d.uri('src@one'),
      '-c',
      'read -P 0x31 0 2M',
      '-c',
      'read -P 0 2M 1M',
    ]);
    const write = await run('qemu-io', ['-f', 'raw', d.uri('src@one'), '-c', 'write -P 1 0 4k']);
    assert.notEqual(write.code, 0, 'a snapshot export refuses writes');
    const map = JSON.parse(
      (await mustRun('nbdinfo', ['--map', '--json', d.uri('src@one')])).stdout,
    ) as Array<{ offset: number; length: number; type: number }>;
    assert.deepEqual(
      map.slice(0, 2).map((e) => [e.offset, e.length, e.type]),
      [
        [0, 2 * 1024 * 1024, 0],
        [2 * 1024 * 1024, 62 * 1024 * 1024, 3],
      ],
    );
    const clone = await d.cli([
      'volume',
      'create',
      'src-copy',
      '--from-snapshot',
      'src@one',
      '--json',
    ]);
    assert.equal(clone.code, 0, clone.stderr);
    await assertSameBytes(d.uri('src-copy'), d.uri('src@one'));
    await mustRun('qemu-io', ['-f', 'raw', d.uri('src-copy'), '-c', 'write -P 0x33 0 4k']);
    await mustRun('qemu-io', ['-f', 'raw', '-r', d.uri('src@one'), '-c', 'read -P 0x31 0 4k']);
  });

  it('reverts online: the next read sees the snapshot, newer snapshots need confirmation', async () => {
    const d = daemons[0]!;
    await d.createVolume('rv', '16M');
    await mustRun('qemu-io', ['-f', 'raw', d.uri('rv'), '-c', 'write -P 0x41 0 1M']);
    await d.cli(['snapshot', 'create', 'rv', 'good']);
    await mustRun('qemu-io', ['-f', 'raw', d.uri('rv'), '-c', 'write -P 0x42 0 1M']);
    await d.cli(['snapshot', 'create', 'rv', 'later']);
    const refused = await d.cli(['snapshot', 'revert', 'rv', 'good']);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /later.*--discard-newer/);
    const ok = await d.cli(['snapshot', 'revert', 'rv', 'good', '--discard-newer']);
    assert.equal(ok.code, 0, ok.stderr);
    await mustRun('qemu-io', ['-f', 'raw', d.uri('rv'), '-c', 'read -P 0x41 0 1M']);
    const ls = JSON.parse((await d.cli(['snapshot', 'ls', 'rv', '--json'])).stdout) as Snap[];
    assert.deepEqual(
      ls.map((s) => s.name),
      ['good'],
    );
  });

  it('refuses bad snapshot requests with clear errors', async () => {
    const d = daemons[0]!;
    const cases: Array<[string, string, unknown, number, string]> = [
      ['POST', '/v1/volumes/rv/snapshots', { name: 'Bad Name' }, 400, 'INVALID_NAME'],
      ['POST', '/v1/volumes/rv/snapshots', { name: 'good' }, 409, 'ALREADY_EXISTS'],
      ['POST', '/v1/volumes/nope/snapshots', {}, 404, 'NOT_FOUND'],
      ['DELETE', '/v1/volumes/rv/snapshots/missing', undefined, 404, 'NOT_FOUND'],
      ['POST', '/v1/volumes/rv/snapshots/missing/revert', {}, 404, 'NOT_FOUND'],
      ['POST', '/v1/volumes', { name: 'c2', fromSnapshot: 'rv@missing' }, 404, 'NOT_FOUND'],
      ['POST', '/v1/volumes', { name: 'c2', fromSnapshot: 'nonsense' }, 400, 'INVALID_ARGUMENT'],
    ];
    for (const [method, route, body, status, code] of cases) {
      const r = await d.api_<ApiError>(method, route, body);
      assert.equal(r.status, status, `${method} ${route}`);
      assert.equal(r.json.error.code, code, `${method} ${route}`);
    }
    const nbd = await run('nbdinfo', [d.uri('rv@missing')]);
    assert.notEqual(nbd.code, 0, 'no export for a missing snapshot');
  });

  it('deleting a snapshot whose blocks were all overwritten gives its space back', async () => {
    const d = daemons[0]!;
    await d.createVolume('space', '128M');
    await mustRun('qemu-io', ['-f', 'raw', d.uri('space'), '-c', 'write -P 0x51 0 64M']);
    await d.api_('POST', '/v1/volumes/space/snapshots', { name: 'old' });
    await mustRun('qemu-io', ['-f', 'raw', d.uri('space'), '-c', 'write -P 0x52 0 64M']);
    const volume = (await d.api_<{ replicas: Array<{ id: string }> }>('GET', '/v1/volumes/space'))
      .json;
    const dir = path.join(d.dataDir, 'replicas', volume.replicas[0]!.id);
    const before = await duBytes(dir);
    assert.equal((await d.api_('DELETE', '/v1/volumes/space/snapshots/old')).status, 204);
    const after = await duBytes(dir);
    assert.ok(before - after >= 64 * 1024 * 1024 - 4096, `freed ${before - after} bytes of 64 MiB`);
    await mustRun('qemu-io', ['-f', 'raw', d.uri('space'), '-c', 'read -P 0x52 0 64M']);
  });

  it('SIGKILL during the delete of a 64 MiB snapshot: restart finishes it, nothing changed', async () => {
    const d = await start(['--merge-rate', '32M']);
    await d.createVolume('crash', '256M');
    // 64 MiB only in the snapshot, 16 MiB overwritten above it, and the head's own data.
    await mustRun('qemu-io', [
      '-f',
      'raw',
      d.uri('crash'),
      '-c',
      'write -P 0x61 0 64M',
      '-c',
      'write -P 0x62 100M 8M',
    ]);
    await d.api_('POST', '/v1/volumes/crash/snapshots', { name: 'base' });
    await mustRun('qemu-io', [
      '-f',
      'raw',
      d.uri('crash'),
      '-c',
      'write -P 0x63 0 16M',
      '-c',
      'write -P 0x64 200M 4M',
    ]);
    await d.api_('POST', '/v1/volumes/crash/snapshots', { name: 'mid' });
    await mustRun('qemu-io', [
      '-f',
      'raw',
      d.uri('crash'),
      '-c',
      'write -P 0x65 8M 1M',
      '-c',
      'flush',
    ]);
    const deleting = d.api_('DELETE', '/v1/volumes/crash/snapshots/base').catch(() => undefined);
    await waitFor('the delete to start', async () => {
      const { json } = await d.api_<{ events: Array<{ type: string }> }>(
        'GET',
        '/v1/events?volume=crash',
      );
      return json.events.some((e) => e.type === 'snapshot-delete-started') ? true : undefined;
    });
    await d.kill();
    await deleting;
    // The dead daemon's metadata says a delete was under way: the kill came mid-merge.
    const kv = await Kv.open(path.join(d.dataDir, 'meta'));
    try {
      const replicas = await openSpaces(kv).replicas.entries();
      assert.ok(
        replicas.some(([, r]) => r.deleting !== undefined),
        'killed in the middle of the merge',
      );
    } finally {
      await kv.close();
    }
    const d2 = await d.restart();
    daemons.push(d2);
    const snaps = (await d2.api_<{ snapshots: Snap[] }>('GET', '/v1/volumes/crash/snapshots')).json
      .snapshots;
    assert.deepEqual(
      snaps.map((s) => s.name),
      ['mid'],
      'the delete completed at restart',
    );
    await mustRun('qemu-io', [
      '-f',
      'raw',
      d2.uri('crash'),
      '-c',
      'read -P 0x63 0 8M',
      '-c',
      'read -P 0x65 8M 1M',
      '-c',
      'read -P 0x63 9M 7M',
      '-c',
      'read -P 0x61 16M 48M',
      '-c',
      'read -P 0x62 100M 8M',
      '-c',
      'read -P 0x64 200M 4M',
      '-c',
      'read -P 0 64M 36M',
    ]);
    await mustRun('qemu-io', [
      '-f',
      'raw',
      '-r',
      d2.uri('crash@mid'),
      '-c',
      'read -P 0x63 0 16M',
      '-c',
      'read -P 0x61 16M 48M',
      '-c',
      'read -P 0x62 100M 8M',
    ]);
  });
});
