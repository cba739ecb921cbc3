import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, describe, it } from 'node:test';
import { startClusterNode } from './helpers/cluster-node.ts';
import type { DaemonProcess } from './helpers/daemon.ts';
import { EtcdProcess } from './helpers/etcd.ts';
import { CMD, RawNbd } from './helpers/nbd-client.ts';
import { mustRun, waitFor } from './helpers/run.ts';
import { prng } from './helpers/prng.ts';

const CYCLES = Number(process.env.CORRAL_CYCLES ?? 20);
const SEED = Number(process.env.CORRAL_SEED ?? 7);
const PIECE = 4096;
const WRITE = 64 * 1024;
const SIZE = 8 << 20;
const PIECES = SIZE / PIECE;

interface VolumeRow {
  node?: string;
  replicas: Array<{ mode: string }>;
}

function startNode(etcd: EtcdProcess, i: number): Promise<DaemonProcess> {
  return startClusterNode({
    etcd: etcd.url,
    name: `n${i + 1}`,
    host: `127.0.0.${21 + i}`,
    rebuildDelayMs: 500,
  });
}

/**
 * What each 4 KiB piece of the volume may hold: what the last completed
 * flush covered, and every value written to it since (acknowledged or not,
 * an unflushed write may or may not survive a crash).
 */
class Model {
  readonly durable = new Uint8Array(PIECES);
  readonly since: Array<Set<number>> = Array.from({ length: PIECES }, () => new Set());

  allowed(piece: number): number[] {
    return [this.durable[piece]!, ...this.since[piece]!];
  }

  /** After a crash and a read: what the volume holds now is what a flush covers. */
  settle(read: Buffer): void {
    for (let p = 0; p < PIECES; p++) {
      this.durable[p] = read[p * PIECE]!;
      this.since[p]!.clear();
    }
  }
}

/**
 * A client that writes 64 KiB blocks in batches of eight distinct blocks,
 * waits for the replies, then flushes; a completed flush makes the batch
 * durable in the model. It stops at the first error (its server was killed).
 */
async function writeUntilCut(
  d: DaemonProcess,
  model: Model,
  random: () => number,
  progress: { batches: number },
): Promise<void> {
  const [host, port] = d.nbd.split(':') as [string, string];
  const c = await RawNbd.connect({ host, port: Number(port) });
  try {
    await c.greet();
    await c.go('cycles', { structured: false });
    for (;;) {
      const blocks = new Set<number>();
      while (blocks.size < 8) blocks.add(Math.floor(random() * (SIZE / WRITE)));
      const batch = [...blocks].map((block) => ({ block, value: 1 + Math.floor(random() * 250) }));
      for (const { block, value } of batch) {
        for (let p = 0; p < WRITE / PIECE; p++)
          model.since[(block * WRITE) / PIECE + p]!.add(value);
        c.request(CMD.WRITE, block * WRITE, WRITE, { payload: Buffer.alloc(WRITE, value) });
      }
      for (let i = 0; i < batch.length; i++) if ((await c.reply(0, 5000)).error !== 0) return;
      c.request(CMD.FLUSH, 0, 0);
      if ((await c.reply(0, 5000)).error !== 0) return;
      for (const { block, value } of batch)
        for (let p = 0; p < WRITE / PIECE; p++) {
          const piece = (block * WRITE) / PIECE + p;
          model.durable[piece] = value;
          model.since[piece]!.clear();
        }
      progress.batches++;
    }
  } catch {
    return; // the connection went with its server
  } finally {
    c.close();
  }
}

describe('kill and takeover cycles', () => {
  let etcd: EtcdProcess | undefined;
  const nodes: DaemonProcess[] = [];
  after(async () => {
    for (const d of nodes) await d.cleanup();
    await etcd?.cleanup();
  });

  it(`lose no flushed write over ${CYCLES} SIGKILLs of the engine's node under writes (seed ${SEED})`, async () => {
    const random = prng(SEED);
    etcd = await EtcdProcess.start();
    const e = etcd;
    nodes.push(...(await Promise.all([0, 1, 2].map((i) => startNode(e, i)))));
    const created = await nodes[0]!.cli([
      'volume',
      'create',
      'cycles',
      '--size',
      String(SIZE),
      '--replicas',
      '3',
    ]);
    assert.equal(created.code, 0, created.stderr);
    const model = new Model();
    const out = path.join(os.tmpdir(), `corral-cycles-${process.pid}`);
    let owner = 0;
    const takeovers: number[] = [];
    try {
      for (let cycle = 1; cycle <= CYCLES; cycle++) {
        const progress = { batches: 0 };
        const writing = writeUntilCut(nodes[owner]!, model, random, progress);
        const batches = 1 + Math.floor(random() * 4);
        await waitFor(`${batches} flushed batches`, () =>
          progress.batches >= batches ? true : undefined,
        );
        const killedAt = Date.now();
        await nodes[owner]!.kill();
        await writing;
        const next = (owner + 1) % 3;
        const heir = nodes[next]!;
        await waitFor(
          `the takeover of cycle ${cycle}`,
          async () => {
            const r = await heir.api_<{ error?: { code: string } }>(
              'POST',
              '/v1/volumes/cycles/attach',
              {},
            );
            return r.status === 200 ? true : undefined;
          },
          20_000,
        );
        await mustRun('nbdcopy', [heir.uri('cycles'), out]);
        takeovers.push(Date.now() - killedAt);
        const read = await fs.promises.readFile(out);
        for (let p = 0; p < PIECES; p++) {
          const got = read[p * PIECE]!;
          const uniform = read.subarray(p * PIECE, (p + 1) * PIECE).every((b) => b === got);
          assert.ok(uniform, `cycle ${cycle}: piece ${p} is torn inside 4 KiB`);
          assert.ok(
            model.allowed(p).includes(got),
            `cycle ${cycle}: piece ${p} reads ${got}; flushed ${model.durable[p]}, written since ${[...model.since[p]!].join(',') || 'nothing'} (seed ${SEED})`,
          );
        }
        model.settle(read);
        // The dead node comes back; its replica is rebuilt before the next kill (a volume
        // cannot outlive the loss of its last healthy replica).
        nodes[owner] = await nodes[owner]!.restart();
        await waitFor(
          `three healthy replicas after cycle ${cycle}`,
          async () => {
            const v = (await heir.api_<VolumeRow>('GET', '/v1/volumes/cycles')).json;
            return v.node === `n${next + 1}` &&
              v.replicas.filter((r) => r.mode === 'RW').length === 3
              ? true
              : undefined;
          },
          30_000,
        );
        owner = next;
      }
    } finally {
      await fs.promises.rm(out, { force: true });
    }
    takeovers.sort((a, b) => a - b);
    console.log(
      `takeover cycles: ${CYCLES}, SIGKILL to the volume read on the new node: median ${takeovers[Math.floor(takeovers.length / 2)]} ms, max ${takeovers[takeovers.length - 1]} ms (node TTL 2000 ms)`,
    );
  });
});
