import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { isCorralError } from '../common/errors.ts';
import { filter } from '../replication/block-device.ts';
import { copyLayers } from '../replication/rebuild.ts';
import type { Replica } from '../replication/replica.ts';
import { simClock } from './sim/sim-world.ts';
import {
  closeReplicaEnv,
  newReplica,
  overStream,
  replicaEnv,
  type ReplicaEnv,
} from './helpers/replica-env.ts';

const MiB = 1024 * 1024;
const SIZE = 96 * MiB;

/** A source holding data in a few places under snapshot s1, and a target with s1 too. */
async function pair(env: ReplicaEnv) {
  const source = await newReplica(env, SIZE);
  const target = await newReplica(env, SIZE);
  env.open.push(source, target);
  const writes: Array<[number, Buffer]> = [
    [0, randomBytes(4096)],
    [3 * MiB + 8192, randomBytes(MiB)],
    [70 * MiB, randomBytes(5 * MiB)],
  ];
  for (const [offset, data] of writes) await source.write(offset, data);
  await source.zero(40 * MiB, 64 * 1024);
  const at = new Date();
  await source.snapshot('s1', at);
  await target.snapshot('s1', at);
  return { source, target, writes };
}

async function sameLayer(a: Replica, b: Replica): Promise<void> {
  for (let offset = 0; offset < SIZE; offset += 8 * MiB) {
    const x = await a.readLayerChunk('s1', offset, 8 * MiB);
    const y = await b.readLayerChunk('s1', offset, 8 * MiB);
    assert.deepEqual(Buffer.from(y.states), Buffer.from(x.states), `states at ${offset}`);
    assert.ok(Buffer.from(y.data).equals(Buffer.from(x.data)), `data at ${offset}`);
  }
}

describe('a rebuild copies snapshot layers and checks what it copied', () => {
  let env: ReplicaEnv;
  before(async () => {
    env = await replicaEnv();
  });
  after(async () => {
    await closeReplicaEnv(env);
  });

  it('into a replica that holds nothing: only what the source holds travels, over a replica stream', async () => {
    const { source, target, writes } = await pair(env);
    const remote = await overStream(env, target);
    const p = await copyLayers(source, remote, SIZE, { clock: simClock });
    const held = writes.reduce((n, [, d]) => n + d.length, 0);
    assert.equal(p.bytesCopied, held);
    await sameLayer(source, target);
  });

  it('between two replicas over streams, whole and then only a stale block (payloads sent in parts)', async () => {
    const { source, target, writes } = await pair(env);
    const [from, to] = [await overStream(env, source), await overStream(env, target)];
    const p = await copyLayers(from, to, SIZE, { clock: simClock });
    assert.equal(
      p.bytesCopied,
      writes.reduce((n, [, d]) => n + d.length, 0),
    );
    await sameLayer(source, target);
    await target.writeLayerChunk('s1', 3 * MiB + 8192, Uint8Array.of(1), randomBytes(4096));
    const again = await copyLayers(from, to, SIZE, { clock: simClock });
    assert.equal(again.bytesCopied, 4096, 'the stale block alone, selected by a mask');
    await sameLayer(source, target);
  });

  it('into a replica holding stale data: only differing blocks travel', async () => {
    const { source, target } = await pair(env);
    await copyLayers(source, target, SIZE, { clock: simClock });
    // The target's copy of one block goes stale (as if it missed a write before the snapshot).
    const stale = randomBytes(4096);
    await target.writeLayerChunk('s1', 70 * MiB, Uint8Array.of(1), stale);
    const p = await copyLayers(source, target, SIZE, { clock: simClock });
    assert.equal(p.bytesCopied, 4096);
    await sameLayer(source, target);
  });

  it('yields to clients: paces itself while requests arrive, runs flat out while none do', async () => {
    const run = async (clientsWrite: boolean) => {
      const { source, target } = await pair(env);
      let now = 0;
      const slept: number[] = [];
      let requests = 0;
      await copyLayers(source, target, SIZE, {
        clock: {
          ...simClock,
          // Every look at the clock is 20 ms later: the client sampling sees time pass.
          elapsedMs: () => (now += 20),
          // A pause lets I/O completions in (a timer would), without taking the time.
          sleep: (ms) => {
            slept.push(ms);
            return new Promise((resolve) => setImmediate(resolve));
          },
        },
        clientRequests: () => (clientsWrite ? ++requests : requests),
      });
      await sameLayer(source, target);
      return slept;
    };
    assert.equal((await run(false)).length, 0, 'an idle volume: no pauses');
    const paused = await run(true);
    assert.ok(paused.length > 0, 'a busy volume: the copy paused');
  });

  it('from two sources at once; what the other source gives wrong, or cannot give, comes from the first', async () => {
    const { source, target, writes } = await pair(env);
    const twin = await newReplica(env, SIZE);
    env.open.push(twin);
    await twin.snapshot('s1', new Date(source.snapshots()[0]!.createdAt));
    await copyLayers(source, twin, SIZE, { clock: simClock });
    const reads = new Map<string, number>();
    const counted = (r: Replica, tag: string, change?: (data: Uint8Array) => Uint8Array) =>
      filter<Replica>(r, {
        readLayerChunk: async (name, offset, length, mask, into) => {
          reads.set(tag, (reads.get(tag) ?? 0) + 1);
          const chunk = await r.readLayerChunk(name, offset, length, mask, into);
          return change ? { states: chunk.states, data: change(chunk.data) } : chunk;
        },
      });
    const p = await copyLayers(counted(source, 'first'), target, SIZE, {
      clock: simClock,
      alsoFrom: [counted(twin, 'other')],
    });
    assert.equal(
      p.bytesCopied,
      writes.reduce((n, [, d]) => n + d.length, 0),
    );
    assert.ok(
      (reads.get('first') ?? 0) > 0 && (reads.get('other') ?? 0) > 0,
      JSON.stringify([...reads]),
    );
    await sameLayer(source, target);

    for (const other of [
      // A bad disk: one byte of every chunk flipped.
      counted(twin, 'flips', (data) => {
        const copy = Buffer.from(data);
        if (copy.length > 0) copy[0]! ^= 1;
        return copy;
      }),
      // Its node died.
      filter<Replica>(twin, {
        readLayerChunk: () => Promise.reject(new Error('connection closed')),
      }),
    ]) {
      const fresh = await newReplica(env, SIZE);
      env.open.push(fresh);
      await fresh.snapshot('s1', new Date(source.snapshots()[0]!.createdAt));
      await copyLayers(source, fresh, SIZE, { clock: simClock, alsoFrom: [other] });
      await sameLayer(source, fresh);
    }
    assert.ok((reads.get('flips') ?? 0) > 0);
  });

  it('fails, naming the place, when the target does not end up holding what was sent', async () => {
    const { source, target } = await pair(env);
    // A target that flips a byte of every chunk it is given (a bug or a bad disk on its side).
    const flaky = filter<Replica>(target, {
      writeLayerChunk: (name, offset, states, data, mask) => {
        const copy = Buffer.from(data);
        if (copy.length > 0) copy[copy.length - 1]! ^= 1;
        return target.writeLayerChunk(name, offset, states, copy, mask);
      },
    });
    await assert.rejects(
      copyLayers(source, flaky, SIZE, { clock: simClock }),
      (e) =>
        isCorralError(e, 'IO_ERROR') && /layer s1 at \d+ differs from the source/.test(e.message),
    );
  });
});
