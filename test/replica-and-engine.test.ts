import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { describe, it } from 'node:test';
import { Kv } from '../kv/kv.ts';
import { openSpaces, type Spaces } from '../kv/spaces.ts';
import { Engine } from '../replication/engine.ts';
import { LocalReplica } from '../replication/local-replica.ts';
import type { Replica } from '../replication/replica.ts';
import type { Subject } from './conformance/block-device.ts';

const SIZE = 256 * 1024;

interface Env {
  dir: string;
  kv: Kv;
  spaces: Spaces;
  open: Array<{ close(): Promise<void> }>;
}

let env: Env | undefined;

async function setup(): Promise<Env> {
  const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-unit-'));
  const kv = await Kv.open(path.join(dir, 'meta'));
  env = { dir, kv, spaces: openSpaces(kv), open: [] };
  return env;
}

async function teardown(): Promise<void> {
  if (!env) return;
  for (const o of env.open) await o.close().catch(() => undefined);
  await env.kv.close();
  await fs.promises.rm(env.dir, { recursive: true, force: true });
  env = undefined;
}

/** A fresh environment with one empty replica in it. */
async function freshReplica(): Promise<{ e: Env; root: string; replica: LocalReplica }> {
  const e = await setup();
  const root = path.join(e.dir, 'replicas');
  const replica = await LocalReplica.create({
    spaces: e.spaces,
    root,
    volume: 'v',
    sizeBytes: SIZE,
    now: new Date(),
  });
  return { e, root, replica };
}

/** A fresh environment with two empty replicas of one volume. */
async function twoReplicas(): Promise<{ e: Env; replica: LocalReplica; b: LocalReplica }> {
  const { e, root, replica } = await freshReplica();
  const b = await LocalReplica.create({
    spaces: e.spaces,
    root,
    volume: 'v',
    sizeBytes: SIZE,
    now: new Date(),
  });
  return { e, replica, b };
}

async function replicaSubject(): Promise<Subject> {
  const { e, root, replica } = await freshReplica();
  e.open.push(replica);
  return {
    device: replica,
    sizeBytes: SIZE,
    reopen: async () => {
      replica.abandon(); // like a crash right after the flush: nothing more is persisted
      const again = await LocalReplica.open({ spaces: e.spaces, root, id: replica.id });
      e.open.push(again);
      return again;
    },
  };
}

async function engineSubject(): Promise<Subject> {
  const { e, replica } = await freshReplica();
  const engine = new Engine({ volume: 'v', sizeBytes: SIZE, replicas: [replica] });
  e.open.push(engine);
  return { device: engine, sizeBytes: SIZE };
}

/** Polls (with a deadline) until `done`: file descriptors close on libuv's threads. */
async function waitForFds(done: () => Promise<boolean>): Promise<void> {
  const until = Date.now() + 5000;
  while (!(await done())) {
    assert.ok(Date.now() < until, 'the layer files were not closed');
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

describe('replica close', () => {
  it('a close whose flush fails rejects and still closes every file', async () => {
    const fds = async () => (await fs.promises.readdir('/proc/self/fd')).length;
    const { e, replica } = await freshReplica();
    await replica.snapshot('s1', new Date()); // two layers: two open files
    await replica.write(0, Buffer.alloc(4096, 7));
    // The metadata store goes away under it: the flush cannot record the write.
    await e.kv.close();
    const open = await fds();
    await assert.rejects(replica.close(), /closed/i);
    await waitForFds(async () => (await fds()) === open - 2);
    await fs.promises.rm(e.dir, { recursive: true, force: true });
    env = undefined;
  });
});

describe('replica crash semantics', () => {
  it('an unflushed write is gone after a crash; a flushed one stays; the revision counter is persisted', async () => {
    const { device, reopen } = await replicaSubject();
    try {
      const replica = device as LocalReplica;
      await replica.write(0, Buffer.alloc(4096, 1));
      await replica.flush();
      const flushedRevision = replica.revision();
      await replica.write(4096, Buffer.alloc(4096, 2));
      assert.equal(replica.revision(), flushedRevision + 1n);
      const again = (await reopen!()) as LocalReplica; // no flush in between: the second write was never acknowledged durable
      assert.equal(again.revision(), flushedRevision);
      const data = Buffer.from(await again.read(0, 8192));
      assert.ok(data.subarray(0, 4096).every((b) => b === 1));
      assert.ok(
        data.subarray(4096).every((b) => b === 0),
        'unflushed block reads as its old content',
      );
    } finally {
      await teardown();
    }
  });

  it('refuses a record written by a newer format with a clear error', async () => {
    const e = await setup();
    try {
      await e.kv
        .space('vol', { name: 'raw', encode: (v: Uint8Array) => v, decode: (b: Uint8Array) => b })
        .put('future', new TextEncoder().encode('{"v":99,"name":"future"}'));
      await assert.rejects(() => e.spaces.volumes.get('future'), {
        code: 'UNSUPPORTED_FORMAT',
        message: /version 99/,
      });
    } finally {
      await teardown();
    }
  });

  it('the engine rejects out-of-range requests before any replica sees them', async () => {
    const { device } = await engineSubject();
    try {
      await assert.rejects(() => device.read(SIZE - 10, 20), { code: 'OUT_OF_RANGE' });
      await assert.rejects(() => device.write(-1, Buffer.alloc(1)), { code: 'INVALID_ARGUMENT' });
      await assert.rejects(() => device.trim(SIZE, 1), { code: 'OUT_OF_RANGE' });
    } finally {
      await teardown();
    }
  });
});

describe('a replica failure', () => {
  it('holds every write until it is recorded, and fences the engine when it cannot be', async () => {
    const { e, replica: a, b } = await twoReplicas();
    // b's disk fails at the first write.
    const failing = new Proxy(b, {
      get(target, key) {
        if (key === 'write') return () => Promise.reject(new Error('disk gone'));
        const value: unknown = Reflect.get(target, key, target);
        return typeof value === 'function' ? (value as () => unknown).bind(target) : value;
      },
    });
    let refuse!: (err: Error) => void;
    const recorded = new Promise<void>((_, reject) => (refuse = reject));
    try {
      const engine = new Engine({
        volume: 'v',
        sizeBytes: SIZE,
        replicas: [a, failing],
        markFailed: () => recorded,
      });
      const outcome = (p: Promise<void>) =>
        p.then(
          () => 'acknowledged',
          (err: unknown) => (err as { code?: string }).code ?? 'error',
        );
      // The first write finds b broken; the second, right behind it, succeeds on a alone.
      const first = outcome(engine.write(0, Buffer.alloc(4096, 1)));
      await new Promise((r) => setImmediate(r));
      const second = outcome(engine.write(4096, Buffer.alloc(4096, 2)));
      const early = await Promise.race([
        second,
        new Promise((r) => setTimeout(() => r('pending'), 200)),
      ]);
      assert.equal(early, 'pending', 'a write is acknowledged before the failure is recorded');
      refuse(new Error('the store is away'));
      assert.deepEqual([await first, await second], ['IO_ERROR', 'IO_ERROR']);
      await assert.rejects(() => engine.read(0, 4096), /stopped serving/);
      assert.ok(engine.fenced);
    } finally {
      e.open.push(a, b);
      await teardown();
    }
  });
});

describe('a mirrored write', () => {
  it('starts on the replicas across the network before the local one', async () => {
    const { e, replica, b } = await twoReplicas();
    // The local write copies up to 1 MiB on the event loop before it returns: started first,
    // it would hold back the sends that the other hosts are waiting for.
    const started: string[] = [];
    const as = (r: LocalReplica, location: string): Replica =>
      new Proxy(r, {
        get(target, key) {
          if (key === 'location') return location;
          if (key === 'write')
            return (...args: Parameters<Replica['write']>) => {
              started.push(location);
              return target.write(...args);
            };
          const value: unknown = Reflect.get(target, key, target);
          return typeof value === 'function' ? (value as () => unknown).bind(target) : value;
        },
      });
    // The local replica first in the engine's list, as a daemon orders them.
    const engine = new Engine({
      volume: 'v',
      sizeBytes: SIZE,
      replicas: [as(replica, 'local'), as(b, 'http://peer:9500')],
    });
    e.open.push(engine);
    try {
      await engine.write(0, Buffer.alloc(8192, 0x5a));
      assert.deepEqual(started, ['http://peer:9500', 'local']);
      for (const r of [replica, b]) assert.ok((await r.read(0, 8192)).every((x) => x === 0x5a));
    } finally {
      await teardown();
    }
  });
});

describe('engine start', () => {
  it('salvages the freshest replicas when every one had been set to ERR, and only then', async () => {
    const { e, replica: a, b } = await twoReplicas();
    try {
      const engine = new Engine({ volume: 'v', sizeBytes: SIZE, replicas: [a, b] });
      await engine.write(0, Buffer.alloc(4096, 9));
      await engine.flush();
      // b misses the next write (as if it had failed), then both are recorded as failed.
      await a.write(4096, Buffer.alloc(4096, 8));
      await a.flush();
      const events: string[] = [];
      const salvaged = new Engine({
        volume: 'v',
        sizeBytes: SIZE,
        replicas: [a, b],
        suspect: new Set([a, b]),
        onEvent: (ev) => events.push(ev.type),
      });
      assert.deepEqual(
        salvaged.replicaModes().map((m) => m.mode),
        ['RW', 'ERR'],
        'the freshest serves, the one behind does not',
      );
      assert.ok(events.includes('volume-salvaged'));
      assert.equal((await salvaged.read(4096, 4096))[0], 8);
      const strict = new Engine({
        volume: 'v',
        sizeBytes: SIZE,
        replicas: [a, b],
        suspect: new Set([b]),
      });
      assert.deepEqual(
        strict.replicaModes().map((m) => m.mode),
        ['RW', 'ERR'],
        'a suspect replica stays out while another can serve',
      );
    } finally {
      e.open.push(a, b);
      await teardown();
    }
  });
});
