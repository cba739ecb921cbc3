/**
 * 3 replicas against 1, for `npm run bench`: three daemons on this machine
 * (so every write crosses loopback twice and three processes share 2 cores),
 * the same fio jobs on a 1-replica and a 3-replica volume of daemon 1, then
 * the rebuild of a whole replica (MB/s).
 */
import { TestCluster } from '../test/helpers/cluster.ts';
import { waitFor } from '../test/helpers/run.ts';

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
    const rows = ['| job | 1 replica | 3 replicas | 3 / 1 |', '| --- | ---: | ---: | ---: |'];
    for (const job of jobs) {
      const one = await fio(d1.uri('one'), job);
      const three = await fio(d1.uri('three'), job);
      const unit = job.metric === 'iops' ? ' IOPS' : ' MB/s';
      rows.push(
        `| ${job.name} | ${one.toFixed(0)}${unit} | ${three.toFixed(0)}${unit} | ${(three / one).toFixed(2)} |`,
      );
      console.error(rows.at(-1));
    }
    // A whole replica rebuilt: take one out, the repair loop builds a new one.
    const { replicas } = (
      await d1.api_<{ replicas: Array<{ id: string; location: string }> }>(
        'GET',
        '/v1/volumes/three/replicas',
      )
    ).json;
    const remote = replicas.find((r) => r.location !== 'local')!;
    await d1.api_('DELETE', `/v1/volumes/three/replicas/${remote.id}`);
    const op = await waitFor(
      'the rebuild',
      async () =>
        (await d1.api_<{ operations: Op[] }>('GET', '/v1/operations')).json.operations.find(
          (o) => o.kind === 'rebuild' && o.state !== 'running',
        ),
      600_000,
    );
    if (op.state !== 'succeeded') throw new Error(`rebuild ${op.state}`);
    const seconds = (Date.parse(op.endedAt!) - Date.parse(op.startedAt)) / 1000;
    const mb = op.result!.bytesCopied / 1e6;
    rows.push(
      '',
      `Rebuild of a whole replica of the 1 GiB volume (every block written): ${mb.toFixed(0)} MB copied in ${seconds.toFixed(1)} s, ${(mb / seconds).toFixed(0)} MB/s.`,
    );
    return rows.join('\n');
  } finally {
    await cluster.cleanup();
  }
}
