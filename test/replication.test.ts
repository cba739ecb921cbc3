import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, describe, it } from 'node:test';
import { TestCluster, CLUSTER_SECRET } from './helpers/cluster.ts';
import type { DaemonProcess } from './helpers/daemon.ts';
import { CMD, RawNbd } from './helpers/nbd-client.ts';
import { mustRun, run, waitFor } from './helpers/run.ts';

interface ReplicaRow {
  id: string;
  location: string;
  mode: string;
  revision: string;
}
interface Operation {
  id: string;
  kind: string;
  state: string;
  volume?: string;
  result?: { bytesCopied: number; layers: number; layersSkipped: number };
}
interface Verify {
  replicas: number;
  differences: unknown[];
}

const REBUILD = ['--rebuild-delay', '500', '--replica-timeout', '3000'];

async function replicas(d: DaemonProcess, volume: string): Promise<ReplicaRow[]> {
  return (await d.api_<{ replicas: ReplicaRow[] }>('GET', `/v1/volumes/${volume}/replicas`)).json
    .replicas;
}

async function allRw(d: DaemonProcess, volume: string, count: number): Promise<ReplicaRow[]> {
  return waitFor(
    `${count} RW replicas of ${volume}`,
    async () => {
      const r = await replicas(d, volume);
      return r.length === count && r.every((x) => x.mode === 'RW') ? r : undefined;
    },
    60_000,
  );
}

async function verify(d: DaemonProcess, volume: string): Promise<Verify> {
  const r = await d.cli(['volume', 'verify', volume, '--json']);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as Verify;
}

function fio(uri: string, args: string[]): Promise<{ code: number | null; stdout: string }> {
  return run(
    'fio',
    ['--name=job', '--ioengine=nbd', `--uri=${uri}`, '--output-format=normal', ...args],
    { timeoutMs: 300_000 },
  );
}

describe('replication across three daemons', () => {
  const clusters: TestCluster[] = [];
  after(async () => {
    for (const c of clusters) await c.cleanup();
  });

  async function cluster(): Promise<TestCluster> {
    const c = await TestCluster.start(3, REBUILD);
    clusters.push(c);
    return c;
  }

  it('fio verifies through a replica daemon SIGKILLed mid-write; the rebuilt replica serves alone', async () => {
    const c = await cluster();
    const [d1, , d3] = c.daemons as [DaemonProcess, DaemonProcess, DaemonProcess];
    const nodes = await d1.cli(['node', 'ls', '--json']);
    assert.equal((JSON.parse(nodes.stdout) as Array<{ state: string }>).length, 3);
    const created = await d1.cli(['volume', 'create', 'pg', '--size', '256M', '--replicas', '3']);
    assert.equal(created.code, 0, created.stderr);
    const placed = await replicas(d1, 'pg');
    assert.deepEqual(placed.map((r) => r.location).sort(), ['local', c.urls[1], c.urls[2]].sort());

    // fio writes and verifies crc32c while the third daemon dies under it.
    const job = fio(d1.uri('pg'), [
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=16',
      '--size=128m',
      '--verify=crc32c',
      '--verify_fatal=1',
      '--do_verify=1',
    ]);
    await waitFor('writes to reach the third replica', async () => {
      const r = await replicas(d1, 'pg');
      return BigInt(r.find((x) => x.location === c.urls[2])!.revision) > 2000n ? true : undefined;
    });
    await d3.kill();
    const result = await job;
    assert.equal(result.code, 0, result.stdout);
    assert.match(result.stdout, /err= 0/);
    const degraded = await replicas(d1, 'pg');
    assert.equal(degraded.find((r) => r.location === c.urls[2])?.mode, 'ERR');
    const events = await d1.cli(['events', '--json']);
    assert.match(events.stdout, /replica-error/);

    // Back: the replica is rebuilt in place, and every replica holds the same bytes.
    await c.restart(2);
    await allRw(d1, 'pg', 3);
    const ops = (await d1.api_<{ operations: Operation[] }>('GET', '/v1/operations')).json
      .operations;
    assert.ok(ops.some((o) => o.kind === 'rebuild' && o.state === 'succeeded'));
    const v = await verify(d1, 'pg');
    assert.equal(v.replicas, 3);
    assert.deepEqual(v.differences, []);

    // Reads now from the rebuilt replica alone: the local one is taken out, the second host dies.
    const local = (await replicas(d1, 'pg')).find((r) => r.location === 'local')!;
    const rm = await d1.cli(['replica', 'rm', 'pg', local.id]);
    assert.equal(rm.code, 0, rm.stderr);
    await c.daemons[1]!.kill();
    const read = await fio(d1.uri('pg'), [
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=16',
      '--size=128m',
      '--verify=crc32c',
      '--verify_only',
      '--verify_fatal=1',
    ]);
    assert.equal(read.code, 0, read.stdout);
    assert.match(read.stdout, /err= 0/);
    const left = await replicas(d1, 'pg');
    const serving = left.filter((r) => r.mode === 'RW');
    assert.deepEqual(
      serving.map((r) => r.location),
      [c.urls[2]],
      'only the rebuilt replica serves',
    );
  });

  it('a local replica that fails (its disk full) is replaced on the free host while fio runs, and its files go', async () => {
    // Daemon 1's replicas live on a 48 MiB tmpfs; its LevelDB stays on the real disk.
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-localfail-'));
    const replicaDir = path.join(dir, 'replicas');
    await fs.promises.mkdir(replicaDir);
    await mustRun('mount', ['-t', 'tmpfs', '-o', 'size=48m', 'tmpfs', replicaDir]);
    const c = await TestCluster.start(3, REBUILD, [dir]).catch(async (err: unknown) => {
      await run('umount', [replicaDir]);
      throw err;
    });
    clusters.push({
      cleanup: async () => {
        await c.daemons[0]!.stop('SIGKILL');
        await run('umount', [replicaDir]);
        await c.cleanup();
      },
    } as TestCluster);
    const d1 = c.daemons[0]!;
    const created = await d1.cli(['volume', 'create', 'full', '--size', '256M', '--replicas', '2']);
    assert.equal(created.code, 0, created.stderr);
    const placed = await replicas(d1, 'full');
    const remote = placed.find((r) => r.location !== 'local')!;
    const free = c.urls.slice(1).find((u) => u !== remote.location)!;

    // 128 MiB of writes: the local replica runs out of space a third of the way in.
    const job = [
      '--rw=randwrite',
      '--bs=64k',
      '--iodepth=16',
      '--size=128m',
      '--verify=crc32c',
      '--verify_fatal=1',
    ];
    const written = await fio(d1.uri('full'), [...job, '--do_verify=1']);
    assert.equal(written.code, 0, written.stdout);
    assert.match(written.stdout, /err= 0/);
    assert.match((await d1.cli(['events', '--json'])).stdout, /replica-error/);

    const healed = await allRw(d1, 'full', 2);
    assert.deepEqual(
      healed.map((r) => r.location).sort(),
      [remote.location, free].sort(),
      'the failed local replica is replaced on the host that had none',
    );
    await waitFor('the failed local replica files to be removed', async () =>
      (await fs.promises.readdir(replicaDir)).length === 0 ? true : undefined,
    );
    const v = await verify(d1, 'full');
    assert.equal(v.replicas, 2);
    assert.deepEqual(v.differences, []);
    const read = await fio(d1.uri('full'), [...job, '--verify_only']);
    assert.equal(read.code, 0, read.stdout);
    assert.match(read.stdout, /err= 0/);
  });

  it('a short absence copies only what changed; the engine host restarts with the freshest replicas', async () => {
    const c = await cluster();
    const [d1] = c.daemons as [DaemonProcess];
    assert.equal(
      (await d1.cli(['volume', 'create', 'db', '--size', '256M', '--replicas', '3'])).code,
      0,
    );
    await mustRun('fio', [
      '--name=fill',
      '--ioengine=nbd',
      `--uri=${d1.uri('db')}`,
      '--rw=write',
      '--bs=1M',
      '--iodepth=8',
      '--size=256m',
      '--end_fsync=1',
    ]);
    await c.daemons[2]!.kill();
    // 1% of the volume, scattered 4 KiB writes, while the third replica is away.
    const written = 256 * 1024 * 1024 * 0.01;
    await mustRun('fio', [
      '--name=away',
      '--ioengine=nbd',
      `--uri=${d1.uri('db')}`,
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=8',
      '--size=256m',
      `--io_size=${written}`,
      '--randrepeat=0',
      '--end_fsync=1',
    ]);
    await c.restart(2);
    await allRw(d1, 'db', 3);
    const rebuild = (
      await d1.api_<{ operations: Operation[] }>('GET', '/v1/operations')
    ).json.operations.find((o) => o.kind === 'rebuild' && o.volume === 'db');
    assert.equal(rebuild?.state, 'succeeded');
    const copied = rebuild.result!.bytesCopied;
    assert.ok(copied > 0, 'the changed blocks were copied');
    assert.ok(
      copied <= 3 * written,
      `copied ${copied} bytes for ${written} written while away (at most 3x)`,
    );
    assert.deepEqual((await verify(d1, 'db')).differences, []);

    // The engine's host dies; what was flushed is there when it comes back.
    await mustRun('qemu-io', [
      '-f',
      'raw',
      d1.uri('db'),
      '-c',
      'write -P 0x5c 100M 1M',
      '-c',
      'flush',
    ]);
    await d1.kill();
    const again = await c.restart(0);
    const back = await allRw(again, 'db', 3);
    assert.equal(new Set(back.map((r) => r.revision)).size, 1, 'replicas agree on the revision');
    await mustRun('qemu-io', ['-f', 'raw', again.uri('db'), '-c', 'read -P 0x5c 100M 1M']);
    assert.deepEqual((await verify(again, 'db')).differences, []);
  });

  it('the engine host SIGKILLed with writes unflushed: its local replica, behind, is rebuilt in place', async () => {
    const c = await cluster();
    const d1 = c.daemons[0]!;
    assert.equal(
      (await d1.cli(['volume', 'create', 'pg', '--size', '64M', '--replicas', '3'])).code,
      0,
    );
    await mustRun('qemu-io', ['-f', 'raw', d1.uri('pg'), '-c', 'write -P 0x3a 0 4M']);
    // Written but not flushed here when the host dies: the peers have them, this host's
    // replica persisted an older revision, so it starts behind (ERR) and no other host is free.
    const nbd = await RawNbd.connect({ port: d1.nbdPort });
    await nbd.greet();
    await nbd.go('pg');
    for (let i = 0; i < 8; i++) {
      nbd.request(CMD.WRITE, 8 * 1024 * 1024 + i * 65536, 65536, {
        payload: Buffer.alloc(65536, 0x70 + i),
      });
      assert.equal((await nbd.reply()).error, 0);
    }
    await d1.kill();
    nbd.close();
    const again = await c.restart(0);
    const healed = await allRw(again, 'pg', 3);
    assert.equal(healed.filter((r) => r.location === 'local').length, 1, 'still one replica here');
    assert.deepEqual((await verify(again, 'pg')).differences, []);
    await mustRun('qemu-io', ['-f', 'raw', again.uri('pg'), '-c', 'read -P 0x3a 0 4M']);
  });

  it('refuses what cannot be placed or authenticated, with clear errors', async () => {
    const c = await cluster();
    const [d1] = c.daemons as [DaemonProcess];
    const four = await d1.cli(['volume', 'create', 'x', '--size', '64M', '--replicas', '4']);
    assert.equal(four.code, 1);
    assert.match(
      four.stderr,
      /Cannot place 4 replicas of volume x .* on distinct hosts: 3 of 3 can take one/,
    );
    assert.equal((await d1.cli(['volume', 'ls', '--json'])).stdout.trim(), '[]');
    // Asked for: the replica the hosts cannot take stays on the engine's host.
    const crowded = await d1.cli([
      'volume',
      'create',
      'x',
      '--size',
      '64M',
      '--replicas',
      '4',
      '--allow-same-host',
    ]);
    assert.equal(crowded.code, 0, crowded.stderr);
    const four4 = await replicas(d1, 'x');
    assert.equal(four4.length, 4);
    assert.equal(four4.filter((r) => r.location === 'local').length, 2);
    assert.ok(four4.every((r) => r.mode === 'RW'));
    await mustRun('qemu-io', [
      '-f',
      'raw',
      d1.uri('x'),
      '-c',
      'write -P 0x21 0 1M',
      '-c',
      'read -P 0x21 0 1M',
    ]);
    assert.equal((await d1.cli(['volume', 'rm', 'x'])).code, 0);

    const peer = c.urls[1]!;
    const anonymous = await fetch(`${peer}/v1/replicas`, {
      method: 'POST',
      body: '{}',
      headers: { 'content-type': 'application/json' },
    });
    assert.equal(anonymous.status, 401);
    const wrong = await fetch(`${peer}/v1/replicas`, {
      method: 'POST',
      body: JSON.stringify({ volume: 'v', sizeBytes: 4096, engine: 'x', epoch: 1 }),
      headers: { 'content-type': 'application/json', authorization: 'Bearer nope' },
    });
    assert.equal(wrong.status, 401);
    const bad = await fetch(`${peer}/v1/replicas`, {
      method: 'POST',
      body: JSON.stringify({ volume: 'v' }),
      headers: { 'content-type': 'application/json', authorization: `Bearer ${CLUSTER_SECRET}` },
    });
    assert.equal(bad.status, 400);
    const missing = await fetch(`${peer}/v1/replicas/nope`, {
      method: 'DELETE',
      headers: { authorization: `Bearer ${CLUSTER_SECRET}` },
    });
    assert.equal(missing.status, 404);

    // Snapshots go to every replica; the last healthy replica cannot be removed.
    assert.equal(
      (await d1.cli(['volume', 'create', 'y', '--size', '64M', '--replicas', '2'])).code,
      0,
    );
    assert.equal((await d1.cli(['snapshot', 'create', 'y', 's1'])).code, 0);
    await c.daemons[1]!.kill();
    await c.daemons[2]!.kill();
    await mustRun('qemu-io', ['-f', 'raw', d1.uri('y'), '-c', 'write -P 0x33 0 64k']);
    const rows = await replicas(d1, 'y');
    const local = rows.find((r) => r.location === 'local')!;
    assert.equal(rows.find((r) => r.location !== 'local')?.mode, 'ERR');
    const last = await d1.cli(['replica', 'rm', 'y', local.id]);
    assert.equal(last.code, 1);
    assert.match(last.stderr, /last healthy replica/);
  });

  it('a volume removed while a replica host is away frees that replica when the host returns', async () => {
    const c = await cluster();
    const [d1] = c.daemons as [DaemonProcess];
    assert.equal(
      (await d1.cli(['volume', 'create', 'gone', '--size', '64M', '--replicas', '2'])).code,
      0,
    );
    const remote = (await replicas(d1, 'gone')).find((r) => r.location !== 'local')!;
    const host = c.daemons.findIndex((_, i) => c.urls[i] === remote.location);
    const count = async (d: DaemonProcess) =>
      (await d.api_<{ replicas: number }>('GET', '/v1/node')).json.replicas;
    assert.equal(await count(c.daemons[host]!), 1);
    await c.daemons[host]!.kill();
    const rm = await d1.cli(['volume', 'rm', 'gone']);
    assert.equal(rm.code, 0, rm.stderr);
    assert.match((await d1.cli(['events'])).stdout, /replica-left-behind/);
    const back = await c.restart(host);
    await waitFor('the left-behind replica to be deleted', async () =>
      (await count(back)) === 0 ? true : undefined,
    );
    assert.match((await d1.cli(['events'])).stdout, /left behind since/);
  });
});
