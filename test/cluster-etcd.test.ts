import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, describe, it } from 'node:test';
import { cliJson, readVolume, startClusterNode } from './helpers/cluster-node.ts';
import type { DaemonProcess } from './helpers/daemon.ts';
import { EtcdProcess } from './helpers/etcd.ts';
import { CMD, RawNbd } from './helpers/nbd-client.ts';
import { mustRun, run, waitFor } from './helpers/run.ts';

interface NodeRow {
  name: string;
  state: string;
  url: string;
  cordoned?: boolean;
}
interface VolumeRow {
  name: string;
  node?: string;
  state: string;
  replicas: Array<{ id: string; mode: string; location: string }>;
}

/** Node i of a test cluster: n1 at 127.0.0.11, n2 at .12... */
function startNode(etcd: EtcdProcess, i: number): Promise<DaemonProcess> {
  return startClusterNode({ etcd: etcd.url, name: `n${i + 1}`, host: `127.0.0.${11 + i}` });
}

async function nodeStates(d: DaemonProcess): Promise<string[]> {
  return (await cliJson<NodeRow[]>(d, ['node', 'ls'])).map((n) => `${n.name}:${n.state}`).sort();
}

describe('a cluster with its state in etcd', () => {
  let etcd: EtcdProcess | undefined;
  const daemons: DaemonProcess[] = [];
  const files: string[] = [];
  after(async () => {
    for (const d of daemons) await d.cleanup();
    await etcd?.cleanup();
    for (const f of files) await fs.promises.rm(f, { recursive: true, force: true });
  });

  it('shows every node and volume from any node, moves an engine, and takes over from a killed node', async () => {
    etcd = await EtcdProcess.start();
    const e = etcd;
    daemons.push(...(await Promise.all([0, 1, 2].map((i) => startNode(e, i)))));
    const [d1, d2, d3] = daemons as [DaemonProcess, DaemonProcess, DaemonProcess];
    assert.deepEqual(await nodeStates(d3), ['n1:up', 'n2:up', 'n3:up']);

    const created = await d1.cli(['volume', 'create', 'pg', '--size', '64M', '--replicas', '3']);
    assert.equal(created.code, 0, created.stderr);
    const seen = await cliJson<VolumeRow[]>(d3, ['volume', 'ls']);
    assert.deepEqual(
      seen.map((v) => [v.name, v.node, v.state]),
      [['pg', 'n1', 'attached']],
    );
    assert.equal(new Set(seen[0]!.replicas.map((r) => r.location)).size, 3, 'one replica per node');
    // The name is the cluster's: another node cannot make a second pg.
    const twice = await d2.cli(['volume', 'create', 'pg', '--size', '64M']);
    assert.notEqual(twice.code, 0);
    assert.match(twice.stderr, /already exists/);

    const data = randomBytes(8 << 20);
    const file = path.join(os.tmpdir(), `corral-cluster-${process.pid}.bin`);
    files.push(file);
    await fs.promises.writeFile(file, data);
    await mustRun('nbdcopy', [file, d1.uri('pg')]);

    const unknown = await d3.cli(['volume', 'attach', 'pg', '--node', 'n9']);
    assert.notEqual(unknown.code, 0);
    assert.match(unknown.stderr, /No node named n9/);

    // fio writes 32 MiB with checksums through n1; after the move a verify-only pass of the same
    // job (the same seed makes the same blocks) reads all of it back through n2.
    const fioJob = (uri: string) => [
      '--name=move',
      '--ioengine=nbd',
      `--uri=${uri}`,
      '--rw=randwrite',
      '--bs=64k',
      '--iodepth=8',
      '--offset=16m',
      '--size=32m',
      '--verify=crc32c',
      '--verify_fatal=1',
      '--randrepeat=1',
    ];
    await mustRun('fio', [...fioJob(d1.uri('pg')), '--do_verify=0', '--end_fsync=1'], {
      timeoutMs: 120_000,
    });

    // A planned move, asked on a third node: n1's engine drains, n2's starts.
    const moveStart = Date.now();
    const moved = await d3.cli(['volume', 'attach', 'pg', '--node', 'n2']);
    assert.equal(moved.code, 0, moved.stderr);
    assert.ok(Buffer.compare(await readVolume(d2, 'pg', data.length), data) === 0);
    const moveMs = Date.now() - moveStart;
    await mustRun('fio', [...fioJob(d2.uri('pg')), '--verify_only'], { timeoutMs: 120_000 });
    // Calls made on a node that does not serve the volume go to the one that does: a verify
    // (its operation followed there), a snapshot, and a clone of it, made where the snapshot is.
    const verify = await d3.cli(['volume', 'verify', 'pg']);
    assert.equal(verify.code, 0, verify.stderr);
    assert.match(verify.stdout, /3 replicas of pg are identical/);
    assert.equal((await d3.cli(['snapshot', 'create', 'pg', 's1'])).code, 0);
    const clone = await d1.cli(['volume', 'create', 'pgc', '--from-snapshot', 'pg@s1']);
    assert.equal(clone.code, 0, clone.stderr);
    assert.equal((await cliJson<VolumeRow>(d1, ['volume', 'get', 'pgc'])).node, 'n2');
    assert.ok(Buffer.compare(await readVolume(d2, 'pgc', data.length), data) === 0);
    const target = `file://${path.join(os.tmpdir(), `corral-cluster-backups-${process.pid}`)}`;
    files.push(new URL(target).pathname);
    const backup = await d1.cli(['backup', 'create', 'pg', '--snapshot', 's1', '--target', target]);
    assert.equal(backup.code, 0, backup.stderr);
    const listedBackups = await cliJson<unknown[]>(d3, ['backup', 'ls', 'pg', '--target', target]);
    assert.equal(listedBackups.length, 1);
    assert.notEqual((await run('nbdinfo', [d1.uri('pg')])).code, 0, 'n1 serves pg no more');
    assert.equal((await cliJson<VolumeRow>(d1, ['volume', 'get', 'pg'])).node, 'n2');

    // The engine's node dies: once its lease expires, another node takes the volume over.
    const killedAt = Date.now();
    await d2.kill();
    await waitFor('n2 down', async () =>
      (await nodeStates(d3)).includes('n2:down') ? true : undefined,
    );
    const downMs = Date.now() - killedAt;
    assert.equal((await cliJson<VolumeRow>(d3, ['volume', 'get', 'pg'])).state, 'failed');
    const took = await d3.cli(['volume', 'attach', 'pg']);
    assert.equal(took.code, 0, took.stderr);
    assert.ok(Buffer.compare(await readVolume(d3, 'pg', data.length), data) === 0);
    const takeoverMs = Date.now() - killedAt;
    // The volume's history is the cluster's: the takeover recorded on n3 shows on n1 too.
    const history = await cliJson<Array<{ type: string; node?: string }>>(d1, [
      'events',
      '--volume',
      'pg',
    ]);
    assert.ok(history.some((e) => e.type === 'volume-takeover' && e.node === 'n3'));
    assert.ok(history.some((e) => e.type === 'volume-released' && e.node === 'n1'));

    // The dead node comes back: it serves nothing (its epoch is old) and its replica is
    // brought up to date by the new engine.
    const back = await d2.restart();
    daemons[1] = back;
    await waitFor(
      'pg at 3 healthy replicas again',
      async () => {
        const v = await cliJson<VolumeRow>(d1, ['volume', 'get', 'pg']);
        return v.node === 'n3' && v.replicas.filter((r) => r.mode === 'RW').length === 3
          ? true
          : undefined;
      },
      30_000,
    );
    assert.notEqual((await run('nbdinfo', [back.uri('pg')])).code, 0, 'the old engine stays off');
    console.log(
      `cluster figures: planned move ${moveMs} ms (CLI to first read on the new node); ` +
        `takeover ${takeoverMs} ms from SIGKILL (node down after ${downMs} ms, TTL 2000 ms)`,
    );
  });

  it('keeps serving I/O through 30 s without etcd, answers control calls UNAVAILABLE, and converges after', async () => {
    const e = etcd!;
    const d3 = daemons[2]!;
    const fio = run(
      'fio',
      [
        '--name=outage',
        '--ioengine=nbd',
        `--uri=${d3.uri('pg')}`,
        '--rw=randwrite',
        '--bs=64k',
        '--iodepth=8',
        '--size=48m',
        // 48 MiB at 1.6 MB/s: fio runs ~30 s, all of it with etcd down (15× the node TTL).
        '--rate=1600k',
        '--verify=crc32c',
        '--verify_fatal=1',
      ],
      { timeoutMs: 120_000 },
    );
    await e.kill();
    const downAt = Date.now();
    const created = await d3.api_<{ error: { code: string; message: string } }>(
      'POST',
      '/v1/volumes',
      { name: 'web', size: '16M' },
    );
    assert.equal(created.status, 503);
    assert.equal(created.json.error.code, 'UNAVAILABLE');
    assert.match(created.json.error.message, /cluster store \(etcd\) does not answer/);
    const listed = await d3.cli(['volume', 'ls']);
    assert.notEqual(listed.code, 0);
    assert.match(listed.stderr, /etcd/);
    const done = await fio;
    assert.equal(done.code, 0, `fio failed while etcd was down: ${done.stdout}${done.stderr}`);
    assert.ok(Date.now() - downAt >= 25_000, 'the outage lasted the length of the fio run');
    await e.resume();
    await waitFor('every node up again', async () =>
      (await nodeStates(d3)).join() === 'n1:up,n2:up,n3:up' ? true : undefined,
    );
    const web = await daemons[0]!.cli([
      'volume',
      'create',
      'web',
      '--size',
      '16M',
      '--replicas',
      '2',
    ]);
    assert.equal(web.code, 0, web.stderr);
    const v = await cliJson<VolumeRow>(d3, ['volume', 'get', 'pg']);
    assert.equal(v.node, 'n3');
    assert.equal(v.replicas.filter((r) => r.mode === 'RW').length, 3);
  });

  it('fails a --failover auto volume over by itself when its engine node dies', async () => {
    const [d1, , d3] = daemons as [DaemonProcess, DaemonProcess, DaemonProcess];
    const created = await d1.cli([
      'volume',
      'create',
      'auto',
      '--size',
      '32M',
      '--replicas',
      '2',
      '--failover',
      'auto',
    ]);
    assert.equal(created.code, 0, created.stderr);
    const data = randomBytes(4 << 20);
    const file = path.join(os.tmpdir(), `corral-auto-${process.pid}.bin`);
    files.push(file);
    await fs.promises.writeFile(file, data);
    await mustRun('nbdcopy', [file, d1.uri('auto')]);
    const killedAt = Date.now();
    await d1.kill();
    const heir = await waitFor(
      'auto attached on another node',
      async () => {
        const v = await cliJson<VolumeRow>(d3, ['volume', 'get', 'auto']);
        return v.node !== 'n1' && v.state === 'attached' ? v.node : undefined;
      },
      30_000,
    );
    const serving = daemons.find((_, i) => `n${i + 1}` === heir)!;
    assert.ok(Buffer.compare(await readVolume(serving, 'auto', data.length), data) === 0);
    console.log(
      `cluster figures: automatic failover ${Date.now() - killedAt} ms from SIGKILL to the data read on ${heir}`,
    );
  });

  it('runs a volume’s recurring jobs on the node that serves it, wherever the job was added', async () => {
    const n2 = daemons[1]!;
    const n3 = daemons[2]!;
    const created = await n3.cli(['volume', 'create', 'jv', '--size', '16M', '--replicas', '2']);
    assert.equal(created.code, 0, created.stderr);
    const added = await n2.cli([
      'job',
      'add',
      'jv',
      '--cron',
      '* * * * * *',
      '--task',
      'snapshot',
      '--retain',
      '2',
    ]);
    assert.equal(added.code, 0, added.stderr);
    assert.equal((await cliJson<unknown[]>(n3, ['job', 'ls'])).length, 1, 'jobs are the cluster’s');
    const ranOn = async (node: string) =>
      (
        await cliJson<Array<{ type: string; node?: string }>>(n2, ['events', '--volume', 'jv'])
      ).some((e) => e.type === 'snapshot-created' && e.node === node);
    await waitFor('a job snapshot taken on n3', async () =>
      (await ranOn('n3')) ? true : undefined,
    );
    assert.equal((await n3.cli(['volume', 'attach', 'jv', '--node', 'n2'])).code, 0);
    await waitFor('a job snapshot taken on n2', async () =>
      (await ranOn('n2')) ? true : undefined,
    );
  });

  it('keeps a standby following its source’s backups on the node that serves it, after it moves too', async () => {
    const n2 = daemons[1]!;
    const n3 = daemons[2]!;
    const store = path.join(os.tmpdir(), `corral-cluster-standby-${process.pid}`);
    files.push(store);
    const target = `file://${store}`;
    const made = await n2.cli(['volume', 'create', 'sv', '--size', '16M', '--replicas', '2']);
    assert.equal(made.code, 0, made.stderr);
    const write = async (data: Buffer) => {
      const file = path.join(os.tmpdir(), `corral-standby-src-${process.pid}`);
      files.push(file);
      await fs.promises.writeFile(file, data);
      await mustRun('nbdcopy', [file, n2.uri('sv')]);
      const b = await n2.cli(['backup', 'create', 'sv', '--target', target]);
      assert.equal(b.code, 0, b.stderr);
    };
    const first = randomBytes(4 << 20);
    await write(first);
    const standby = await n3.cli([
      'volume',
      'create',
      'dr',
      '--standby-from',
      `${target}?volume=sv`,
      '--poll',
      '1s',
    ]);
    assert.equal(standby.code, 0, standby.stderr);
    assert.equal((await cliJson<VolumeRow>(n2, ['volume', 'get', 'dr'])).node, 'n3');
    assert.ok((await readVolume(n3, 'dr', first.length)).equals(first));

    // Served from n2 now: the next backup is applied there.
    const moved = await n3.cli(['volume', 'attach', 'dr', '--node', 'n2']);
    assert.equal(moved.code, 0, moved.stderr);
    const second = randomBytes(4 << 20);
    await write(second);
    await waitFor(
      'the standby on n2 to hold the second backup',
      async () => {
        // Reads are refused while a backup is applied: try again.
        const held = await readVolume(n2, 'dr', second.length).catch(() => undefined);
        return held?.equals(second) ? true : undefined;
      },
      30_000,
    );
    const events = await cliJson<Array<{ type: string; node?: string }>>(n3, [
      'events',
      '--volume',
      'dr',
    ]);
    assert.ok(
      events.some((e) => e.type === 'standby-apply-succeeded' && e.node === 'n2'),
      JSON.stringify(events.map((e) => [e.type, e.node])),
    );
    const active = await n3.cli(['volume', 'activate', 'dr']);
    assert.equal(active.code, 0, active.stderr);
    const row = await cliJson<VolumeRow & { standby?: unknown }>(n3, ['volume', 'get', 'dr']);
    assert.equal(row.standby, undefined);
    assert.ok((await readVolume(n2, 'dr', second.length)).equals(second));
  });
});

/**
 * A real partition: node n1 runs in its own network namespace, joined to
 * the host by a veth pair; iptables inside the namespace then drops
 * everything between n1 and the rest of the cluster (etcd, the other
 * nodes) while its NBD clients still reach it.
 */
describe('an engine cut off from the cluster', () => {
  const ns = `corral-fence-${process.pid}`;
  const vethHost = `cfh${process.pid % 100000}`;
  const vethNs = `cfn${process.pid % 100000}`;
  const hostIp = '10.78.0.1';
  const nsIp = '10.78.0.2';
  let etcd: EtcdProcess | undefined;
  const daemons: DaemonProcess[] = [];
  let client: RawNbd | undefined;
  after(async () => {
    client?.close();
    for (const d of daemons) await d.cleanup();
    await etcd?.cleanup();
    await run('ip', ['link', 'del', vethHost]);
    await run('ip', ['netns', 'del', ns]);
  });

  it('is fenced after a takeover: its client gets errors and none of its writes is served', async () => {
    const ip = (...args: string[]) => mustRun('ip', args);
    await ip('netns', 'add', ns);
    await ip('link', 'add', vethHost, 'type', 'veth', 'peer', 'name', vethNs);
    await ip('link', 'set', vethNs, 'netns', ns);
    await ip('addr', 'add', `${hostIp}/24`, 'dev', vethHost);
    await ip('link', 'set', vethHost, 'up');
    await ip('netns', 'exec', ns, 'ip', 'addr', 'add', `${nsIp}/24`, 'dev', vethNs);
    await ip('netns', 'exec', ns, 'ip', 'link', 'set', vethNs, 'up');
    await ip('netns', 'exec', ns, 'ip', 'link', 'set', 'lo', 'up');

    etcd = await EtcdProcess.start(hostIp);
    const node = (i: number, host: string, netns?: string) =>
      startClusterNode({
        etcd: etcd!.url,
        name: `n${i}`,
        host,
        ...(netns !== undefined ? { netns } : {}),
      });
    const d1 = await node(1, nsIp, ns);
    daemons.push(d1);
    const [d2, d3] = await Promise.all([node(2, hostIp), node(3, hostIp)]);
    daemons.push(d2, d3);
    const created = await d1.cli(['volume', 'create', 'fence', '--size', '16M', '--replicas', '3']);
    assert.equal(created.code, 0, created.stderr);

    // A client of n1 writes A and flushes: acknowledged, so it must survive everything below.
    const [host, port] = d1.nbd.split(':') as [string, string];
    client = await RawNbd.connect({ host, port: Number(port) });
    await client.greet();
    await client.go('fence');
    const a = Buffer.alloc(1 << 20, 0xaa);
    client.request(CMD.WRITE, 0, a.length, { payload: a });
    assert.equal((await client.reply()).error, 0);
    client.request(CMD.FLUSH, 0, 0);
    assert.equal((await client.reply()).error, 0);

    // The partition: n1 keeps its NBD clients and nothing else.
    const inNs = (...args: string[]) => mustRun('ip', ['netns', 'exec', ns, 'iptables', ...args]);
    await inNs('-A', 'OUTPUT', '-p', 'tcp', '--sport', port, '-j', 'ACCEPT');
    await inNs('-A', 'OUTPUT', '-d', hostIp, '-j', 'DROP');
    await inNs('-A', 'INPUT', '-s', hostIp, '-p', 'tcp', '!', '--dport', port, '-j', 'DROP');
    await waitFor('n1 down', async () =>
      (await nodeStates(d2)).includes('n1:down') ? true : undefined,
    );
    const took = await d2.cli(['volume', 'attach', 'fence']);
    assert.equal(took.code, 0, took.stderr);

    // n1's client writes B after the takeover: every request fails, none is acknowledged.
    const b = Buffer.alloc(1 << 20, 0xbb);
    client.request(CMD.WRITE, 0, b.length, { payload: b });
    client.request(CMD.WRITE, 1 << 20, b.length, { payload: b });
    client.request(CMD.FLUSH, 0, 0);
    for (let i = 0; i < 3; i++) {
      const r = await client.reply(0, 60_000).catch(() => ({ error: -1 }));
      assert.notEqual(r.error, 0, `request ${i} of the fenced engine was acknowledged`);
    }

    // The new engine serves A, never B; after the partition heals n1's replica is rebuilt
    // and every replica agrees.
    const expected = Buffer.concat([a, Buffer.alloc(1 << 20)]);
    assert.ok(Buffer.compare(await readVolume(d2, 'fence', 2 << 20), expected) === 0);
    await mustRun('ip', ['netns', 'exec', ns, 'iptables', '-F']);
    await waitFor(
      'three healthy replicas',
      async () => {
        const v = await cliJson<VolumeRow>(d2, ['volume', 'get', 'fence']);
        return v.replicas.filter((r) => r.mode === 'RW').length === 3 ? v : undefined;
      },
      30_000,
    );
    const verify = await d2.cli(['volume', 'verify', 'fence']);
    assert.equal(verify.code, 0, verify.stdout + verify.stderr);
    assert.ok(Buffer.compare(await readVolume(d2, 'fence', 2 << 20), expected) === 0);
    const events = await d1.cli(['events', '--volume', 'fence']);
    assert.match(events.stdout, /engine-fenced/);
  });
});
