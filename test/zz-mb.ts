import { Kv } from '../kv/kv.ts';
import { openSpaces } from '../kv/spaces.ts';
import { LocalReplica } from '../replication/local-replica.ts';
import * as fs from 'node:fs';
fs.rmSync('/tmp/mb', { recursive: true, force: true });
const kv = await Kv.open('/tmp/mb/meta');
const spaces = openSpaces(kv);
const r = await LocalReplica.create({
  spaces,
  root: '/tmp/mb/rep',
  volume: 'x',
  sizeBytes: 1 << 30,
  now: new Date(),
});
const big = Buffer.alloc(1 << 20, 7);
for (let o = 0; o < 1 << 30; o += 1 << 20) await r.write(o, big);
await r.flush();
for (const [bs, qd] of [
  [4096, 32],
  [1 << 20, 8],
] as const) {
  for (const op of ['read', 'write'] as const) {
    let n = 0;
    const until = Date.now() + 2000;
    const data = Buffer.alloc(bs, 3);
    await Promise.all(
      Array.from({ length: qd }, async () => {
        while (Date.now() < until) {
          const off = Math.floor(Math.random() * ((1 << 30) / bs)) * bs;
          if (op === 'read') await r.read(off, bs);
          else await r.write(off, data);
          n++;
        }
      }),
    );
    console.log(bs, op, (n / 2).toFixed(0), 'ops/s', ((n * bs) / 2 / 1e6).toFixed(0), 'MB/s');
  }
}
await r.close();
await kv.close();
