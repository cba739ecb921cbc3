import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, describe, it } from 'node:test';
import { cliJson, readVolume, startClusterNode } from './helpers/cluster-node.ts';
import type { DaemonProcess } from './helpers/daemon.ts';
import { EtcdProcess } from './helpers/etcd.ts';
import { mustRun, waitFor } from './helpers/run.ts';

interface NodeRow {
  name: string;
  url: string;
  state: string;
  cordoned?: boolean;
  replicas: number;
}
interface VolumeRow {
  node?: string;
  replicas: Array<{ id: string; mode: string; location: string }>;
}

function startNode(etcd: string, i: number, host: string): Promise<DaemonProcess> {
  return startClusterNode({ etcd, name: `n${i + 1}`, host });
}

describe('repair across a cluster', () => {
  const etcds: EtcdProcess[] = [];
  const nodes: DaemonProcess[] = [];
  const files: string[] = [];
  after(async () => {
    for (const d of nodes) await d.cleanup();
    for (const e of etcds) await e.cleanup();
    for (const f of files) await fs.promises.rm(f, { force: true });
  });

  it('keeps cordoned nodes out, rebuilds a dead node’s replica elsewhere, and cleans it up when the node returns', async () => {
    const etcd = await EtcdProcess.start();
    etcds.push(etcd);
    nodes.push(
      ...(await Promise.all([0, 1, 2, 3].map((i) => startNode(etcd.url, i, `127.0.0.${31 + i}`)))),
    );
    const [n1, , n3] = nodes as [DaemonProcess, DaemonProcess, DaemonProcess];
    assert.equal((await n1.cli(['node', 'cordon', 'n4'])).code, 0);
    const listed = await cliJson<NodeRow[]>(n3, ['node', 'ls']);
    assert.equal(listed.find((n) => n.name === 'n4')?.cordoned, true);
    const unknown = await n1.cli(['node', 'cordon', 'n9']);
    assert.notEqual(unknown.code, 0);
    assert.match(unknown.stderr, /No node named n9/);

    const created = await n1.cli(['volume', 'create', 'r', '--size', '32M', '--replicas', '3']);
    assert.equal(created.code, 0, created.stderr);
    const n4Url = listed.find((n) => n.name === 'n4')!.url;
    const before = await cliJson<VolumeRow>(n1, ['volume', 'get', 'r']);
    assert.ok(
      before.replicas.every((r) => r.location !== n4Url),
      'a cordoned node takes no replica',
    );
    // Four replicas cannot be placed with one node of four cordoned.
    const four = await n1.cli(['volume', 'create', 'r4', '--size', '32M', '--replicas', '4']);
    assert.notEqual(four.code, 0);
    assert.match(four.stderr, /n4 is cordoned/);
    assert.equal((await n1.cli(['node', 'uncordon', 'n4'])).code, 0);

    const data = randomBytes(4 << 20);
    const file = path.join(os.tmpdir(), `corral-repair-${process.pid}.bin`);
    files.push(file);
    await fs.promises.writeFile(file, data);
    await mustRun('nbdcopy', [file, n1.uri('r')]);

    // n3 dies and stays away: after twice the rebuild delay its replica is rebuilt on n4.
    await n3.kill();
    const moved = await waitFor(
      'a replica rebuilt on n4',
      async () => {
        const v = await cliJson<VolumeRow>(n1, ['volume', 'get', 'r']);
        const rw = v.replicas.filter((r) => r.mode === 'RW');
        return rw.length === 3 && rw.some((r) => r.location === n4Url) ? v : undefined;
      },
      40_000,
    );
    assert.equal(moved.replicas.length, 3);
    assert.ok(Buffer.compare(await readVolume(n1, 'r', data.length), data) === 0);

    // n3 comes back: the replica it kept for r is no one's now, and goes.
    const back = await n3.restart();
    nodes[2] = back;
    await waitFor(
      'n3 holds no replica',
      async () =>
        (await cliJson<NodeRow[]>(back, ['node', 'ls'])).find(
          (n) => n.name === 'n3' && n.state === 'up' && n.replicas === 0,
        ),
      30_000,
    );

    // n1 is drained (asked on n2): its engine moves to a node holding a replica, its replica is
    // rebuilt on a node without one, and it keeps nothing.
    const n2 = nodes[1]!;
    const drained = await n2.cli(['node', 'drain', 'n1']);
    assert.equal(drained.code, 0, drained.stderr);
    assert.match(drained.stdout, /1 engines and 1 replicas moved/);
    const n1Url = listed.find((n) => n.name === 'n1')!.url;
    const after = await cliJson<VolumeRow>(n2, ['volume', 'get', 'r']);
    assert.equal(after.node, 'n2');
    assert.deepEqual(
      after.replicas.map((r) => r.mode),
      ['RW', 'RW', 'RW'],
    );
    assert.ok(after.replicas.every((r) => r.location !== n1Url));
    assert.ok(Buffer.compare(await readVolume(n2, 'r', data.length), data) === 0);
    const n1Row = (await cliJson<NodeRow[]>(n2, ['node', 'ls'])).find((n) => n.name === 'n1')!;
    assert.equal(n1Row.cordoned, true);

    // A volume served by a node that holds none of its replicas (n1, back in service): when one
    // goes, its successor is placed on the engine's node, opened in place (no stream to itself),
    // and copied from both replicas left, with the data.
    const made = await n2.cli(['volume', 'create', 'own', '--size', '32M', '--replicas', '3']);
    assert.equal(made.code, 0, made.stderr);
    await mustRun('nbdcopy', [file, n2.uri('own')]);
    assert.equal((await n2.cli(['node', 'uncordon', 'n1'])).code, 0);
    const moved2 = await n1.cli(['volume', 'attach', 'own', '--node', 'n1']);
    assert.equal(moved2.code, 0, moved2.stderr);
    const served = await cliJson<VolumeRow>(n1, ['volume', 'get', 'own']);
    assert.ok(
      served.replicas.every((r) => r.location !== 'local'),
      'no replica on the engine node yet',
    );
    const gone = await n1.cli(['replica', 'rm', 'own', served.replicas[0]!.id]);
    assert.equal(gone.code, 0, gone.stderr);
    const rebuilt = await waitFor(
      'a replica rebuilt on the engine node',
      async () => {
        const v = await cliJson<VolumeRow>(n1, ['volume', 'get', 'own']);
        return v.replicas.length === 3 && v.replicas.every((r) => r.mode === 'RW') ? v : undefined;
      },
      30_000,
    );
    assert.ok(
      rebuilt.replicas.some((r) => r.location === 'local'),
      JSON.stringify(rebuilt),
    );
    const ops = await n1.api_<{
      operations: Array<{ kind: string; volume?: string; result?: { sources: number } }>;
    }>('GET', '/v1/operations');
    const op = ops.json.operations.find((o) => o.kind === 'rebuild' && o.volume === 'own');
    assert.equal(op?.result?.sources, 2, JSON.stringify(op));
    assert.ok(Buffer.compare(await readVolume(n1, 'own', data.length), data) === 0);
    const verified = await n1.cli(['volume', 'verify', 'own']);
    assert.equal(verified.code, 0, verified.stdout + verified.stderr);
  });

  it('with three etcd members, loses nothing a user sees when one is killed', async () => {
    const members = await EtcdProcess.startMembers(3);
    etcds.push(...members);
    const urls = members.map((m) => m.url).join(',');
    const pair = await Promise.all([0, 1].map((i) => startNode(urls, i, `127.0.0.${41 + i}`)));
    nodes.push(...pair);
    const [a, b] = pair as [DaemonProcess, DaemonProcess];
    const created = await a.cli(['volume', 'create', 'm', '--size', '16M', '--replicas', '2']);
    assert.equal(created.code, 0, created.stderr);
    // The member every daemon asks first goes.
    await members[0]!.kill();
    const again = await b.cli(['volume', 'create', 'm2', '--size', '16M', '--replicas', '2']);
    assert.equal(again.code, 0, again.stderr);
    const vols = await cliJson<Array<{ name: string }>>(a, ['volume', 'ls']);
    assert.deepEqual(vols.map((v) => v.name).sort(), ['m', 'm2']);
    const nodesUp = await cliJson<NodeRow[]>(b, ['node', 'ls']);
    assert.deepEqual(
      nodesUp.filter((n) => n.name === 'n1' || n.name === 'n2').map((n) => n.state),
      ['up', 'up'],
    );
    // Leases keep being renewed through the other members: nobody goes down.
    await new Promise((r) => setTimeout(r, 3000));
    const later = await cliJson<NodeRow[]>(a, ['node', 'ls']);
    assert.deepEqual(
      later.filter((n) => n.name === 'n1' || n.name === 'n2').map((n) => n.state),
      ['up', 'up'],
    );
    const moved = await b.cli(['volume', 'attach', 'm', '--node', 'n2']);
    assert.equal(moved.code, 0, moved.stderr);
  });
});
