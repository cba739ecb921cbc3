import * as path from 'node:path';
import { Kv } from '../kv/kv.ts';
import { openSpaces } from '../kv/spaces.ts';
import { LocalReplica } from '../replication/local-replica.ts';

const COMMITS = 3000;

/**
 * What a database's commit costs a replica by itself (in this process, no
 * network, no NBD): a 4 KiB write into an allocated block, then a flush —
 * on a small volume, and on a large one with many snapshots, whose flush
 * must not grow with the volume's regions times its layers.
 */
export async function commitBench(dir: string): Promise<string> {
  const rows = [
    '| replica | per commit (write + flush), wall | CPU of this process per commit |',
    '| --- | ---: | ---: |',
  ];
  for (const [label, sizeBytes, snapshots] of [
    ['1 GiB, no snapshot', 2 ** 30, 0],
    ['1 TiB, 100 snapshots', 2 ** 40, 100],
  ] as const) {
    const at = path.join(dir, `commit-${snapshots}`);
    const kv = await Kv.open(path.join(at, 'meta'));
    const where = { spaces: openSpaces(kv), root: path.join(at, 'replicas') };
    const made = await LocalReplica.create({ ...where, volume: 'v', sizeBytes, now: new Date() });
    const block = Buffer.alloc(4096, 7);
    for (let i = 0; i < snapshots; i++) {
      await made.write(i * 4 * 2 ** 20, block);
      await made.snapshot(`s${i}`, new Date());
    }
    // Closed and opened again: the setup's write-intent marks are gone, as they would be
    // 5 s after its last write.
    await made.close();
    const replica = await LocalReplica.open({ ...where, id: made.id });
    try {
      await replica.write(8192, block);
      await replica.flush();
      const cpu = process.cpuUsage();
      const started = performance.now();
      for (let i = 0; i < COMMITS; i++) {
        await replica.write(8192, block);
        await replica.flush();
      }
      const wallMs = (performance.now() - started) / COMMITS;
      const used = process.cpuUsage(cpu);
      rows.push(
        `| ${label} | ${wallMs.toFixed(2)} ms | ${((used.user + used.system) / COMMITS).toFixed(0)} µs |`,
      );
    } finally {
      await replica.close();
      await kv.close();
    }
  }
  return rows.join('\n');
}
