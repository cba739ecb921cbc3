import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, describe, it } from 'node:test';
import { CLUSTER_SECRET } from './helpers/cluster.ts';
import { DaemonProcess } from './helpers/daemon.ts';
import { EtcdProcess } from './helpers/etcd.ts';
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

/** Node i of a test cluster: its own loopback address, so that a partition can cut it off. */
function startNode(etcd: EtcdProcess, i: number, extra: string[] = []): Promise<DaemonProcess> {
  const host = `127.0.0.${11 + i}`;
  return DaemonProcess.start({
    args: [
      '--listen',
      `${host}:0`,
      '--nbd',
      `${host}:0`,
      '--etcd',
      etcd.url,
      '--node-name',
      `n${i + 1}`,
      '--node-ttl',
      '2000',
      '--rebuild-delay',
      '1000',
      '--replica-timeout',
      '1500',
      ...extra,
    ],
    env: { CORRAL_CLUSTER_SECRET: CLUSTER_SECRET },
  });
}

async function json<T>(d: DaemonProcess, args: string[]): Promise<T> {
  const r = await d.cli([...args, '--json']);
  assert.equal(r.code, 0, `corral ${args.join(' ')}: ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

async function nodeStates(d: DaemonProcess): Promise<string[]> {
  return (await json<NodeRow[]>(d, ['node', 'ls'])).map((n) => `${n.name}:${n.state}`).sort();
}

/** Reads `length` bytes of a volume through a node's NBD export. */
async function readVolume(d: DaemonProcess, volume: string, length: number): Promise<Buffer> {
  const out = path.join(os.tmpdir(), `corral-read-${process.pid}-${Date.now()}`);
  try {
    await mustRun('nbdcopy', [d.uri(volume), out]);
    return (await fs.promises.readFile(out)).subarray(0, length);
  } finally {
    await fs.promises.rm(out, { force: true });
  }
}

describe('a cluster with its state in etcd', () => {
  let etcd: EtcdProcess | undefined;
  const daemons: DaemonProcess[] = [];
  const files: string[] = [];
  after(async () => {
    for (const d of daemons) await d.cleanup();
    await etcd?.cleanup();
    for (const f of files) await fs.promises.rm(f, { force: true });
  });

  it('shows every node and volume from any node, moves an engine, and takes over from a killed node', async () => {
    etcd = await EtcdProcess.start();
    const e = etcd;
    daemons.push(...(await Promise.all([0, 1, 2].map((i) => startNode(e, i)))));
    const [d1, d2, d3] = daemons as [DaemonProcess, DaemonProcess, DaemonProcess];
    assert.deepEqual(await nodeStates(d3), ['n1:up', 'n2:up', 'n3:up']);

    const created = await d1.cli(['volume', 'create', 'pg', '--size', '64M', '--replicas', '3']);
    assert.equal(created.code, 0, created.stderr);
    const seen = await json<VolumeRow[]>(d3, ['volume', 'ls']);
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

    // A planned move, asked on a third node: n1's engine drains, n2's starts.
    const moveStart = Date.now();
    const moved = await d3.cli(['volume', 'attach', 'pg', '--node', 'n2']);
    assert.equal(moved.code, 0, moved.stderr);
    assert.ok(Buffer.compare(await readVolume(d2, 'pg', data.length), data) === 0);
    const moveMs = Date.now() - moveStart;
    assert.notEqual((await run('nbdinfo', [d1.uri('pg')])).code, 0, 'n1 serves pg no more');
    assert.equal((await json<VolumeRow>(d1, ['volume', 'get', 'pg'])).node, 'n2');

    // The engine's node dies: once its lease expires, another node takes the volume over.
    const killedAt = Date.now();
    await d2.kill();
    await waitFor('n2 down', async () =>
      (await nodeStates(d3)).includes('n2:down') ? true : undefined,
    );
    const downMs = Date.now() - killedAt;
    assert.equal((await json<VolumeRow>(d3, ['volume', 'get', 'pg'])).state, 'failed');
    const took = await d3.cli(['volume', 'attach', 'pg']);
    assert.equal(took.code, 0, took.stderr);
    assert.ok(Buffer.compare(await readVolume(d3, 'pg', data.length), data) === 0);
    const takeoverMs = Date.now() - killedAt;

    // The dead node comes back: it serves nothing (its epoch is old) and its replica is
    // brought up to date by the new engine.
    const back = await d2.restart();
    daemons[1] = back;
    await waitFor(
      'pg at 3 healthy replicas again',
      async () => {
        const v = await json<VolumeRow>(d1, ['volume', 'get', 'pg']);
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
});
