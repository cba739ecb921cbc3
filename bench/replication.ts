/**
 * 3 replicas against 1, for `npm run bench`: three daemons on this machine
 * (so every write crosses loopback twice and three processes share 2 cores),
 * the same fio jobs on a 1-replica and a 3-replica volume of daemon 1, then
 * the rebuild of a whole replica (MB/s); then the 3-replica volume again in
 * a cluster (etcd), where the engine reaches its own node's replica through
 * the replica connection too.
 */
import { CLUSTER_SECRET, TestCluster } from '../test/helpers/cluster.ts';
import { DaemonProcess } from '../test/helpers/daemon.ts';
import { EtcdProcess } from '../test/helpers/etcd.ts';
import { mustRun, waitFor } from '../test/helpers/run.ts';

export interface BenchJob {
  name: string;
  metric: 'iops' | 'bw';
}

interface Op {
  kind: string;
  state: string;
  startedAt: string;
  endedAt?: string;
  result?: { bytesCopied: number };
}

export async function replicationBench<J extends BenchJob>(
  jobs: J[],
  fio: (uri: string, job: J) => Promise<number>,
  prefill: (uri: string) => Promise<void>,
): Promise<string> {
  const cluster = await TestCluster.start(3, ['--rebuild-delay', '1000']);
  try {
    const d1 = cluster.daemons[0]!;
    for (const [name, n] of [
      ['one', 1],
      ['three', 3],
    ] as const) {
      const r = await d1.api_('POST', '/v1/volumes', { name, size: '1G', replicas: n });
      if (r.status !== 201) throw new Error(`create ${name}: ${JSON.stringify(r.json)}`);
      await prefill(d1.uri(name));
    }
    const measured: Array<{ job: J; one: number; three: number }> = [];
    for (const job of jobs) {
      const one = await fio(d1.uri('one'), job);
      const three = await fio(d1.uri('three'), job);
      measured.push({ job, one, three });
      console.error(`${job.name}: 1 replica ${one.toFixed(0)}, 3 replicas ${three.toFixed(0)}`);
    }
    // A whole replica rebuilt: take one out, the repair loop builds a new one.
    const op = await rebuildOne(d1);
    if (op.state !== 'succeeded') throw new Error(`rebuild ${op.state}`);
    const seconds = (Date.parse(op.endedAt!) - Date.parse(op.startedAt)) / 1000;
    const mb = op.result!.bytesCopied / 1e6;
    const underLoad = await rebuildUnderLoad(d1);
    await cluster.cleanup();
    const inCluster = await clusterRun(jobs, fio, prefill);
    const rows = [
      '| job | 1 replica | 3 replicas | 3 / 1 | 3 replicas, cluster (etcd) | cluster / 3 |',
      '| --- | ---: | ---: | ---: | ---: | ---: |',
    ];
    measured.forEach(({ job, one, three }, i) => {
      const unit = job.metric === 'iops' ? ' IOPS' : ' MB/s';
      const c = inCluster[i]!;
      rows.push(
        `| ${job.name} | ${one.toFixed(0)}${unit} | ${three.toFixed(0)}${unit} | ${(three / one).toFixed(2)} | ${c.toFixed(0)}${unit} | ${(c / three).toFixed(2)} |`,
      );
    });
    rows.push(
      '',
      `Rebuild of a whole replica of the 1 GiB volume (every block written): ${mb.toFixed(0)} MB copied in ${seconds.toFixed(1)} s, ${(mb / seconds).toFixed(0)} MB/s.`,
      '',
      `The same while a client writes 4 KiB at QD1 (fio, 20 s): the client's p50/p99 ${underLoad.during} (steady, no rebuild: ${underLoad.steady}); the rebuild ${underLoad.rate}.`,
    );
    return rows.join('\n');
  } finally {
    await cluster.cleanup();
  }
}

/** The 3-replica jobs again on three daemons that keep their state in etcd. */
async function clusterRun<J extends BenchJob>(
  jobs: J[],
  fio: (uri: string, job: J) => Promise<number>,
  prefill: (uri: string) => Promise<void>,
): Promise<number[]> {
  const etcd = await EtcdProcess.start();
  const daemons: DaemonProcess[] = [];
  try {
    for (let i = 0; i < 3; i++)
      daemons.push(
        await DaemonProcess.start({
          args: ['--etcd', etcd.url, '--node-name', `b${i + 1}`],
          env: { CORRAL_CLUSTER_SECRET: CLUSTER_SECRET },
        }),
      );
    const d1 = daemons[0]!;
    const r = await d1.api_('POST', '/v1/volumes', { name: 'three', size: '1G', replicas: 3 });
    if (r.status !== 201) throw new Error(`create three: ${JSON.stringify(r.json)}`);
    await prefill(d1.uri('three'));
    const out: number[] = [];
    for (const job of jobs) out.push(await fio(d1.uri('three'), job));
    return out;
  } finally {
    for (const d of daemons) await d.cleanup();
    await etcd.cleanup();
  }
}

/** fio 4k randwrite QD1 for `seconds`: completion latency p50/p99 in µs. */
async function qd1(uri: string, seconds: number): Promise<string> {
  const { stdout } = await mustRun('fio', [
    '--name=lat',
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--rw=randwrite',
    '--bs=4k',
    '--iodepth=1',
    '--size=1G',
    '--time_based',
    `--runtime=${seconds}`,
    '--output-format=json',
  ]);
  const p = (
    JSON.parse(stdout.slice(stdout.indexOf('{'))) as {
      jobs: Array<{ write: { clat_ns: { percentile: Record<string, number> } } }>;
    }
  ).jobs[0]!.write.clat_ns.percentile;
  return `${((p['50.000000'] ?? 0) / 1000).toFixed(0)}/${((p['99.000000'] ?? 0) / 1000).toFixed(0)} µs`;
}

/**
 * Client latency while a whole replica is rebuilt (the rebuild yields to clients): QD1 writes
 * alone, then again while a replica is taken out and rebuilt.
 */
async function rebuildUnderLoad(
  d1: DaemonProcess,
): Promise<{ steady: string; during: string; rate: string }> {
  // Both from the same page-cache state: the first rebuild's writes drained.
  await mustRun('sync', []);
  const steady = await qd1(d1.uri('three'), 5);
  await mustRun('sync', []);
  const during = qd1(d1.uri('three'), 20);
  const op = await rebuildOne(d1);
  const latency = await during;
  const seconds = (Date.parse(op.endedAt!) - Date.parse(op.startedAt)) / 1000;
  return {
    steady,
    during: latency,
    rate: `${op.state}: ${((op.result?.bytesCopied ?? 0) / 1e6).toFixed(0)} MB in ${seconds.toFixed(1)} s, ${((op.result?.bytesCopied ?? 0) / 1e6 / seconds).toFixed(0)} MB/s`,
  };
}

/** Takes a remote replica of a volume out and waits for the rebuild of its successor. */
export async function rebuildOne(d1: DaemonProcess, volume = 'three'): Promise<Op> {
  const { replicas } = (
    await d1.api_<{ replicas: Array<{ id: string; location: string }> }>(
      'GET',
      `/v1/volumes/${volume}/replicas`,
    )
  ).json;
  const ops = async () =>
    (await d1.api_<{ operations: Array<Op & { id: string }> }>('GET', '/v1/operations')).json
      .operations;
  const before = new Set((await ops()).map((o) => o.id));
  const remote = replicas.find((r) => r.location !== 'local')!;
  await d1.api_('DELETE', `/v1/volumes/${volume}/replicas/${remote.id}`);
  return waitFor(
    'the rebuild',
    async () =>
      (await ops()).find((o) => o.kind === 'rebuild' && o.state !== 'running' && !before.has(o.id)),
    600_000,
  );
}
