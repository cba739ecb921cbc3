import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { Kv } from '../kv/kv.ts';
import { openSpaces } from '../kv/spaces.ts';
import { copyAllocated } from '../replication/copy.ts';
import { Engine } from '../replication/engine.ts';
import { LocalReplica } from '../replication/local-replica.ts';

const SIZE = 64 * 4096;
const NOW = new Date('2026-11-25T00:00:00Z');

type Op =
  | { kind: 'write'; offset: number; length: number; byte: number }
  | { kind: 'trim' | 'zero'; offset: number; length: number }
  | { kind: 'snapshot' }
  | { kind: 'delete' | 'revert' | 'clone' | 'readSnapshot'; pick: number }
  | { kind: 'restart' | 'crashAfterFlush' };

const range = fc
  .tuple(fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 1, max: 3 * 4096 }))
  .map(([offset, length]) => ({ offset, length: Math.min(length, SIZE - offset) }));

const op: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc
      .tuple(range, fc.integer({ min: 1, max: 255 }))
      .map(([r, byte]) => ({ kind: 'write' as const, ...r, byte })),
  },
  { weight: 1, arbitrary: range.map((r) => ({ kind: 'trim' as const, ...r })) },
  { weight: 1, arbitrary: range.map((r) => ({ kind: 'zero' as const, ...r })) },
  { weight: 2, arbitrary: fc.constant({ kind: 'snapshot' as const }) },
  { weight: 2, arbitrary: fc.nat().map((pick) => ({ kind: 'delete' as const, pick })) },
  { weight: 1, arbitrary: fc.nat().map((pick) => ({ kind: 'revert' as const, pick })) },
  { weight: 1, arbitrary: fc.nat().map((pick) => ({ kind: 'clone' as const, pick })) },
  { weight: 1, arbitrary: fc.nat().map((pick) => ({ kind: 'readSnapshot' as const, pick })) },
  { weight: 1, arbitrary: fc.constant({ kind: 'restart' as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'crashAfterFlush' as const }) },
);

async function runOps(ops: Op[]): Promise<void> {
  const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-model-'));
  const kv = await Kv.open(path.join(dir, 'meta'));
  const spaces = openSpaces(kv);
  const root = path.join(dir, 'replicas');
  const open: Array<{ close(): Promise<void> }> = [];
  try {
    let replica = await LocalReplica.create({
      spaces,
      root,
      volume: 'v',
      sizeBytes: SIZE,
      now: NOW,
    });
    let engine = new Engine({ volume: 'v', sizeBytes: SIZE, replicas: [replica] });
    open.push(engine);
    let model = Buffer.alloc(SIZE);
    // Snapshots oldest first, as the chain holds them.
    let snapshots: Array<{ name: string; data: Buffer }> = [];
    let counter = 0;
    const pick = (n: number) => snapshots[n % snapshots.length]!;

    for (const [step, o] of ops.entries()) {
      const where = `step ${step} ${JSON.stringify(o)}`;
      switch (o.kind) {
        case 'write':
          await engine.write(o.offset, Buffer.alloc(o.length, o.byte));
          model.fill(o.byte, o.offset, o.offset + o.length);
          break;
        case 'trim':
        case 'zero':
          await (o.kind === 'trim'
            ? engine.trim(o.offset, o.length)
            : engine.zero(o.offset, o.length));
          model.fill(0, o.offset, o.offset + o.length);
          break;
        case 'snapshot': {
          const name = `s${counter++}`;
          await engine.snapshot(name, NOW);
          snapshots.push({ name, data: Buffer.from(model) });
          break;
        }
        case 'delete':
          if (snapshots.length === 0) break;
          await engine.deleteSnapshot(pick(o.pick).name);
          snapshots = snapshots.filter((s) => s !== pick(o.pick));
          break;
        case 'revert': {
          if (snapshots.length === 0) break;
          const target = pick(o.pick);
          await engine.revert(target.name, NOW, { discardNewer: true });
          snapshots = snapshots.slice(0, snapshots.indexOf(target) + 1);
          model = Buffer.from(target.data);
          break;
        }
        case 'readSnapshot': {
          if (snapshots.length === 0) break;
          const s = pick(o.pick);
          const got = Buffer.from(await engine.snapshotDevice(s.name).read(0, SIZE));
          assert.ok(got.equals(s.data), `${where}: snapshot ${s.name} changed`);
          break;
        }
        case 'clone': {
          if (snapshots.length === 0) break;
          const s = pick(o.pick);
          const copy = await LocalReplica.create({
            spaces,
            root,
            volume: `c${step}`,
            sizeBytes: SIZE,
            now: NOW,
          });
          open.push(copy);
          await copyAllocated(engine.snapshotDevice(s.name), copy);
          assert.ok(
            Buffer.from(await copy.read(0, SIZE)).equals(s.data),
            `${where}: clone differs`,
          );
          break;
        }
        case 'restart':
        case 'crashAfterFlush':
          if (o.kind === 'restart') await engine.close();
          else {
            await engine.flush();
            engine.abandon(); // as SIGKILL right after the flush: nothing more reaches the disk
          }
          replica = await LocalReplica.open({ spaces, root, id: replica.id });
          engine = new Engine({ volume: 'v', sizeBytes: SIZE, replicas: [replica] });
          open.push(engine);
          assert.deepEqual(
            engine.snapshots().map((s) => s.name),
            snapshots.map((s) => s.name),
            `${where}: chain after reopen`,
          );
          break;
      }
      const got = Buffer.from(await engine.read(0, SIZE));
      assert.ok(got.equals(model), `${where}: volume differs from the model`);
    }
  } finally {
    for (const o of open) await o.close().catch(() => undefined);
    await kv.close();
    await fs.promises.rm(dir, { recursive: true, force: true });
  }
}

describe('snapshot chain against a plain model', () => {
  it('random sequences of writes, trims, snapshots, deletes, reverts, clones and restarts', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(op, { minLength: 5, maxLength: 60 }), (ops) => runOps(ops)),
      {
        numRuns: Number(process.env.CORRAL_RUNS ?? 40),
        seed: Number(process.env.CORRAL_SEED ?? 20261125),
        verbose: 1,
      },
    );
  });
});

describe('snapshot chain: cases worth naming', () => {
  it('deleting a snapshot that trimmed a block keeps the block zero, also after a restart', async () => {
    const b = 4096;
    await runOps([
      { kind: 'write', offset: 0, length: 4 * b, byte: 7 },
      { kind: 'snapshot' },
      { kind: 'trim', offset: b, length: 2 * b },
      { kind: 'snapshot' },
      { kind: 'delete', pick: 1 },
      { kind: 'restart' },
    ]);
  });

  it('reverting to the oldest snapshot and writing on keeps later reads right', async () => {
    await runOps([
      { kind: 'write', offset: 100, length: 9000, byte: 1 },
      { kind: 'snapshot' },
      { kind: 'write', offset: 0, length: 4096, byte: 2 },
      { kind: 'snapshot' },
      { kind: 'revert', pick: 0 },
      { kind: 'write', offset: 5000, length: 10, byte: 3 },
      { kind: 'crashAfterFlush' },
      { kind: 'readSnapshot', pick: 0 },
    ]);
  });
});

describe('snapshot delete racing client writes', () => {
  it('a write in flight when a delete starts merging into the head is never overwritten by old data', async () => {
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-race-'));
    const kv = await Kv.open(path.join(dir, 'meta'));
    const spaces = openSpaces(kv);
    const size = 128 * 1024 * 1024;
    const replica = await LocalReplica.create({
      spaces,
      root: path.join(dir, 'r'),
      volume: 'v',
      sizeBytes: size,
      now: NOW,
    });
    const engine = new Engine({ volume: 'v', sizeBytes: size, replicas: [replica] });
    try {
      const piece = 32 * 1024 * 1024;
      for (let at = 0; at < size; at += piece) await engine.write(at, Buffer.alloc(piece, 1));
      await engine.snapshot('old', NOW);
      for (let round = 0; round < 4; round++) {
        if (round > 0) await engine.snapshot(`old${round}`, NOW);
        const name = round === 0 ? 'old' : `old${round}`;
        // Large writes go to the thread pool: they are still in flight when the merge begins.
        const writes = [0, 1, 2, 3].map((i) =>
          engine.write(i * piece, Buffer.alloc(piece, 10 + round)),
        );
        const deleting = engine.deleteSnapshot(name);
        await Promise.all([...writes, deleting]);
        for (let at = 0; at < size; at += piece) {
          const data = Buffer.from(await engine.read(at, piece));
          assert.ok(
            data.every((b) => b === 10 + round),
            `round ${round}: a completed write at ${at} was overwritten`,
          );
        }
      }
    } finally {
      await engine.close();
      await kv.close();
      await fs.promises.rm(dir, { recursive: true, force: true });
    }
  });
});
