import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { randomBytes } from 'node:crypto';
import { systemClock } from '../common/clock.ts';
import { encryptedDevice, SectorCipher } from '../replication/crypt.ts';
import { Engine } from '../replication/engine.ts';
import { faultFilter } from '../replication/fault-filter.ts';
import { LocalReplica } from '../replication/local-replica.ts';
import type { Replica } from '../replication/replica.ts';
import { Supervisor } from '../replication/supervisor.ts';
import { blockDeviceConformance, type Subject } from './conformance/block-device.ts';
import {
  closeReplicaEnv,
  newReplica,
  overStream,
  replicaEnv,
  type ReplicaEnv,
} from './helpers/replica-env.ts';

/**
 * The one block-device suite (test/conformance/block-device.ts) against
 * every implementation of the interface the frontends and the engine use.
 */
const SIZE = 256 * 1024;

let env: ReplicaEnv | undefined;

async function fresh(): Promise<ReplicaEnv> {
  env = await replicaEnv();
  return env;
}

async function cleanup(): Promise<void> {
  if (env) await closeReplicaEnv(env);
  env = undefined;
}

async function replicas(e: ReplicaEnv, count: number): Promise<LocalReplica[]> {
  const made: LocalReplica[] = [];
  for (let i = 0; i < count; i++) made.push(await newReplica(e, SIZE));
  return made;
}

function engineOf(e: ReplicaEnv, members: Replica[]): Engine {
  const engine = new Engine({ volume: 'v', sizeBytes: SIZE, replicas: members });
  e.open.push(engine);
  return engine;
}

const subjects: Record<string, () => Promise<Subject>> = {
  'bare replica': async () => {
    const e = await fresh();
    const [replica] = await replicas(e, 1);
    e.open.push(replica!);
    return {
      device: replica!,
      sizeBytes: SIZE,
      close: () => replica!.close(),
      reopen: async () => {
        replica!.abandon(); // like a crash right after the flush: nothing more is persisted
        const again = await LocalReplica.open({ spaces: e.spaces, root: e.root, id: replica!.id });
        e.open.push(again);
        return again;
      },
    };
  },
  'one-replica engine': async () => {
    const e = await fresh();
    const engine = engineOf(e, await replicas(e, 1));
    return { device: engine, sizeBytes: SIZE, close: () => engine.close() };
  },
  'three-replica engine': async () => {
    const e = await fresh();
    const engine = engineOf(e, await replicas(e, 3));
    return { device: engine, sizeBytes: SIZE, close: () => engine.close() };
  },
  'supervisor over a three-replica engine': async () => {
    const e = await fresh();
    const made = await replicas(e, 3);
    for (const r of made) await r.close();
    // What a restart does too: open the replicas and build an engine over them.
    const start = async () =>
      engineOf(
        e,
        await Promise.all(
          made.map(({ id }) => LocalReplica.open({ spaces: e.spaces, root: e.root, id })),
        ),
      );
    const supervisor = await Supervisor.start({
      volume: 'v',
      sizeBytes: SIZE,
      start,
      clock: systemClock,
      hangTimeoutMs: 60_000,
    });
    e.open.push({ close: () => supervisor.stop() });
    return { device: supervisor, sizeBytes: SIZE, close: () => supervisor.stop() };
  },
  'replica over a replica stream': async () => {
    const e = await fresh();
    const [replica] = await replicas(e, 1);
    const remote = await overStream(e, replica!);
    e.open.push(remote, replica!);
    return { device: remote, sizeBytes: SIZE, close: () => remote.close() };
  },
  'engine over one local and two streamed replicas': async () => {
    const e = await fresh();
    const [local, a, b] = await replicas(e, 3);
    e.open.push(a!, b!);
    const engine = engineOf(e, [local!, await overStream(e, a!), await overStream(e, b!)]);
    return { device: engine, sizeBytes: SIZE, close: () => engine.close() };
  },
  'an encrypted view of a two-replica engine': async () => {
    const e = await fresh();
    const engine = engineOf(e, await replicas(e, 2));
    const device = encryptedDevice(engine, new SectorCipher(randomBytes(64)));
    return { device, sizeBytes: SIZE, close: () => engine.close() };
  },
  'an encrypted view with the portable cipher (no addon)': async () => {
    const e = await fresh();
    const engine = engineOf(e, await replicas(e, 1));
    const device = encryptedDevice(engine, new SectorCipher(randomBytes(64), { portable: true }));
    return { device, sizeBytes: SIZE, close: () => engine.close() };
  },
  'fault filter, switched off, over an engine': async () => {
    const e = await fresh();
    const engine = engineOf(e, await replicas(e, 1));
    const filtered = faultFilter(engine);
    return { device: filtered, sizeBytes: SIZE, close: () => filtered.close() };
  },
};

for (const [name, make] of Object.entries(subjects))
  describe(`block device conformance: ${name}`, () => blockDeviceConformance(name, make, cleanup));

describe('the close contract', () => {
  it('a streamed replica whose flush cannot reach the replica rejects close, and lets go', async () => {
    const e = await fresh();
    try {
      const [replica] = await replicas(e, 1);
      e.open.push(replica!);
      const remote = await overStream(e, replica!);
      await remote.write(0, Buffer.alloc(4096, 9));
      // The replica's host goes away before the write was flushed.
      for (const s of e.sockets) s.destroy();
      const until = Date.now() + 5000;
      while (remote.failure === undefined) {
        assert.ok(Date.now() < until, 'the stream end was not noticed');
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      await assert.rejects(remote.close(), /Replica .* at http/);
      assert.notEqual(remote.failure, undefined);
    } finally {
      await cleanup();
    }
  });
});

describe('a write over a replica stream', () => {
  it('stores the block checksums its stream check computed: the same as a local write’s', async () => {
    const e = await fresh();
    try {
      const [streamed, local] = await replicas(e, 2);
      e.open.push(streamed!, local!);
      const remote = await overStream(e, streamed!);
      const data = randomBytes(128 * 1024); // large enough to carry the stream's block hashes
      await remote.write(64 * 1024, data);
      await remote.flush();
      await local!.write(64 * 1024, data);
      const at = new Date();
      await streamed!.snapshot('s', at);
      await local!.snapshot('s', at);
      const [a, b] = [
        await streamed!.layerSums('s', 0, SIZE),
        await local!.layerSums('s', 0, SIZE),
      ];
      assert.ok(Buffer.from(a).equals(Buffer.from(b)), 'the same states and checksums');
      // A checksum of all zeros would mean "unknown" and check nothing.
      assert.ok(Buffer.from(a.subarray(16 * 5, 17 * 5)).some((x, i) => i > 0 && x !== 0));
      assert.ok(Buffer.from(await remote.readSnapshot('s', 64 * 1024, data.length)).equals(data));
    } finally {
      await cleanup();
    }
  });
});

describe('an engine’s write to several replicas', () => {
  it('hashes its blocks once for all: the stream accepts the payload checksum made from them, and every replica keeps the same block checksums', async () => {
    const e = await fresh();
    try {
      const [local, far] = await replicas(e, 2);
      e.open.push(local!, far!);
      const engine = engineOf(e, [local!, await overStream(e, far!)]);
      const data = randomBytes(128 * 1024);
      await engine.write(64 * 1024, data);
      await engine.flush();
      assert.deepEqual(
        engine.replicaModes().map((m) => m.mode),
        ['RW', 'RW'],
        'no replica refused the write',
      );
      const at = new Date();
      await engine.snapshot('s', at);
      const [a, b] = [await local!.layerSums('s', 0, SIZE), await far!.layerSums('s', 0, SIZE)];
      assert.ok(Buffer.from(a).equals(Buffer.from(b)), 'the same states and checksums');
      assert.ok(Buffer.from(await far!.readSnapshot('s', 64 * 1024, data.length)).equals(data));
      assert.ok(Buffer.from(await local!.readSnapshot('s', 64 * 1024, data.length)).equals(data));
    } finally {
      await cleanup();
    }
  });
});

describe('the two AES-XTS paths', () => {
  it("the addon and Node's crypto write the same ciphertext, and read each other's", async () => {
    const key = randomBytes(64);
    const fast = new SectorCipher(key);
    const portable = new SectorCipher(key, { portable: true });
    for (const length of [4096, 64 * 1024, 1024 * 1024]) {
      const plain = randomBytes(length);
      plain.fill(0, 0, 4096); // a zero sector: zeros in plaintext encrypt like any other
      const a = Buffer.from(plain);
      const b = Buffer.from(plain);
      await fast.encrypt(12 * 4096, a);
      await portable.encrypt(12 * 4096, b);
      assert.ok(a.equals(b), `ciphertext of ${length} bytes`);
      assert.ok(!a.subarray(0, 4096).every((x) => x === 0), 'a zero sector is encrypted');
      await fast.decrypt(12 * 4096, b);
      await portable.decrypt(12 * 4096, a);
      assert.ok(a.equals(plain) && b.equals(plain), `round trip of ${length} bytes`);
      const holes = Buffer.alloc(length);
      await fast.decrypt(0, holes);
      assert.ok(
        holes.every((x) => x === 0),
        'ciphertext of zeros (a hole) reads as zeros',
      );
    }
  });
});
