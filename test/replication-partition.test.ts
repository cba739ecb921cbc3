import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { RemoteReplica } from '../replication/remote-replica.ts';
import { CLUSTER_SECRET, TestCluster } from './helpers/cluster.ts';
import type { DaemonProcess } from './helpers/daemon.ts';
import { mustRun, run, waitFor } from './helpers/run.ts';

interface ReplicaRow {
  id: string;
  location: string;
  mode: string;
}

async function replicas(d: DaemonProcess, volume: string): Promise<ReplicaRow[]> {
  return (await d.api_<{ replicas: ReplicaRow[] }>('GET', `/v1/volumes/${volume}/replicas`)).json
    .replicas;
}

/**
 * A network partition on loopback: iptables drops every packet to one
 * daemon's API port, so the engine's stream to that replica stalls (no
 * reset, no error: only the timeout can tell).
 */
describe('a replica host cut off by a partition', () => {
  const rules: string[][] = [];
  let cluster: TestCluster | undefined;
  after(async () => {
    for (const r of rules) await run('iptables', ['-D', ...r]);
    await cluster?.cleanup();
  });

  it('is set to ERR without an I/O error, rebuilt when it returns, and refuses a stale engine', async () => {
    cluster = await TestCluster.start(3, ['--replica-timeout', '1500', '--rebuild-delay', '500']);
    const c = cluster;
    const d1 = c.daemons[0]!;
    assert.equal(
      (await d1.cli(['volume', 'create', 'part', '--size', '128M', '--replicas', '3'])).code,
      0,
    );
    const cutOff = (await replicas(d1, 'part')).find((r) => r.location === c.urls[2])!;
    const port = new URL(c.urls[2]!).port;
    const job = run(
      'fio',
      [
        '--name=part',
        '--ioengine=nbd',
        `--uri=${d1.uri('part')}`,
        '--rw=randwrite',
        '--bs=4k',
        '--iodepth=16',
        '--size=64m',
        '--verify=crc32c',
        '--verify_fatal=1',
      ],
      { timeoutMs: 300_000 },
    );
    await waitFor('writes under way', async () =>
      (
        await d1.api_<{ replicas: Array<{ revision: string }> }>('GET', '/v1/volumes/part')
      ).json.replicas.every((r) => BigInt(r.revision) > 1000n)
        ? true
        : undefined,
    );
    const rule = ['INPUT', '-p', 'tcp', '--dport', port, '-j', 'DROP'];
    await mustRun('iptables', ['-I', ...rule]);
    rules.push(rule);
    const fio = await job;
    assert.equal(fio.code, 0, fio.stdout + fio.stderr);
    assert.match(fio.stdout, /err= 0/);
    const during = await replicas(d1, 'part');
    assert.equal(during.find((r) => r.id === cutOff.id)?.mode, 'ERR');
    assert.equal(during.filter((r) => r.mode === 'RW').length, 2);

    // The partition heals: the same replica is rebuilt and the three agree.
    await mustRun('iptables', ['-D', ...rule]);
    rules.pop();
    await waitFor(
      'the cut-off replica to be rebuilt',
      async () => {
        const r = await replicas(d1, 'part');
        return r.length === 3 && r.every((x) => x.mode === 'RW') ? r : undefined;
      },
      60_000,
    );
    assert.ok((await replicas(d1, 'part')).some((r) => r.id === cutOff.id));
    const v = await d1.cli(['volume', 'verify', 'part', '--json']);
    assert.equal(v.code, 0, v.stderr);
    assert.deepEqual((JSON.parse(v.stdout) as { differences: unknown[] }).differences, []);

    // A new engine (the host restarted) has a newer epoch; the old engine's streams are refused.
    await d1.kill();
    const again = await c.restart(0);
    await waitFor('the volume attached again', async () => {
      const r = await replicas(again, 'part');
      return r.length === 3 && r.every((x) => x.mode === 'RW') ? true : undefined;
    });
    const other = (await replicas(again, 'part')).find((r) => r.location === c.urls[1])!;
    const stale = await RemoteReplica.connect({
      url: c.urls[1]!,
      id: other.id,
      secret: CLUSTER_SECRET,
      epoch: 1,
      timeoutMs: 3000,
    });
    assert.match(stale.failure ?? '', /newer engine \(epoch 2\).*epoch 1 is stale/);
    await assert.rejects(stale.write(0, Buffer.alloc(4096, 7)), /stale|newer engine/);
    await mustRun('qemu-io', ['-f', 'raw', again.uri('part'), '-c', 'read -P 7 0 4k']).then(
      () => assert.fail('the stale engine must not have written'),
      () => undefined,
    );
  });
});
