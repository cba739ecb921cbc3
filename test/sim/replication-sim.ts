/**
 * A seeded simulation of one engine and three replicas in one process
 * (docs/CONTRIBUTING.md, after TigerBeetle's VOPR): a random workload of writes, trims,
 * flushes and reads against a model, while faults hit the replicas — error
 * replies, timeouts (late failures: other requests go on meanwhile), replies
 * lost after the replica applied the request (the hard case for revision
 * counters), dropped connections, crashes that lose what was not flushed, and
 * crashes of the engine's host. Checks that a read always sees
 * the last acknowledged write while a healthy replica remains, that a flushed
 * write survives any crash, and that replicas converge after rebuilds.
 * Every failure names its seed: CORRAL_SIM_SEED=N replays it.
 */
import { CorralError } from '../../common/errors.ts';
import type { Kv } from '../../kv/kv.ts';
import type { Spaces } from '../../kv/spaces.ts';
import { Engine } from '../../replication/engine.ts';
import { LocalReplica } from '../../replication/local-replica.ts';
import type { Replica } from '../../replication/replica.ts';
import { simClock, simWorld } from './sim-world.ts';

const BLOCK = 4096;
const BLOCKS = 256;
const SIZE = BLOCKS * BLOCK;
const REPLICAS = 3;

type Fault = 'error' | 'timeout' | 'lost-reply' | 'drop' | 'crash';

/** Faults allowed in the current step, shared by all links: never more than the spare replicas. */
const budget = { faults: 0 };

/** A replica as the engine sees it across a network: it can fail, time out or vanish. */
class Link {
  dead = false;
  faultRate = 0;
  onFault: (fault: Fault, link: Link) => void = () => undefined;
  readonly proxy: Replica;

  constructor(
    readonly inner: LocalReplica,
    readonly slot: number,
    readonly random: () => number,
  ) {
    // The proxy's handler needs this link, not the handler object.
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const self = this;
    this.proxy = new Proxy(inner, {
      get(target, prop, receiver) {
        const value = Reflect.get(target, prop, receiver) as unknown;
        if (prop === 'abandon') return () => (self.dead = true);
        if (prop === 'close') return () => Promise.resolve();
        if (typeof value !== 'function') return value;
        const fn = value as (...a: unknown[]) => unknown;
        if (prop === 'revision' || prop === 'snapshots') return fn.bind(target);
        return async (...args: unknown[]) => {
          if (self.dead) throw new CorralError('IO_ERROR', `link ${self.slot} is down`);
          const fault = self.#maybeFault();
          if (fault === 'lost-reply') {
            // Done on the replica, but the engine never hears so.
            await fn.apply(target, args);
            throw new CorralError('IO_ERROR', `link ${self.slot}: reply lost`);
          }
          if (fault === 'timeout')
            // Late, not at once: the requests behind it go on for a few turns first.
            for (let turns = 1 + Math.floor(self.random() * 4); turns > 0; turns--)
              await new Promise<void>((resolve) => setImmediate(resolve));
          if (fault) throw new CorralError('IO_ERROR', `link ${self.slot}: injected ${fault}`);
          return await fn.apply(target, args);
        };
      },
    });
  }

  #maybeFault(): Fault | undefined {
    if (this.faultRate === 0 || budget.faults === 0 || this.random() >= this.faultRate)
      return undefined;
    budget.faults--;
    const kinds: Fault[] = ['error', 'timeout', 'lost-reply', 'drop', 'crash'];
    const fault = kinds[Math.floor(this.random() * kinds.length)]!;
    this.onFault(fault, this);
    return fault;
  }
}

interface World {
  dir: string;
  kv: Kv;
  spaces: Spaces;
  root: string;
  ids: string[];
}

export interface SimResult {
  steps: number;
  faults: number;
  rebuilds: number;
  engineCrashes: number;
}

export async function simulate(seed: number, steps = 300): Promise<SimResult> {
  const sim = await simWorld(seed, 'sim');
  const { random, int, fail, dir, kv, spaces } = sim;
  const world: World = { dir, kv, spaces, root: sim.root, ids: [] };
  const stats: SimResult = { steps, faults: 0, rebuilds: 0, engineCrashes: 0 };
  // The model: the last acknowledged content of each block; what the last flush made durable;
  // and what was acknowledged since (any of it may or may not survive an engine crash).
  let acked: Array<number> = new Array<number>(BLOCKS).fill(0);
  let durable: Array<number> = [...acked];
  let since: Array<Set<number>> = Array.from({ length: BLOCKS }, () => new Set<number>());
  const content = (value: number) => Buffer.alloc(BLOCK, value);
  try {
    const now = new Date('2026-11-25T00:00:00Z');
    for (let i = 0; i < REPLICAS; i++) {
      const r = await LocalReplica.create({
        spaces,
        root: world.root,
        volume: 'sim',
        sizeBytes: SIZE,
        now,
      });
      world.ids.push(r.id);
      await r.close();
    }
    let links: Link[] = [];
    let engine!: Engine;
    const crashLink = (link: Link) => {
      // The replica's host dies: what it did not flush is gone from its metadata.
      link.dead = true;
      link.inner.abandon();
    };
    const onFault = (fault: Fault, link: Link) => {
      stats.faults++;
      if (fault === 'drop') link.dead = true;
      if (fault === 'crash') crashLink(link);
    };
    const openLink = async (slot: number): Promise<Link> => {
      const inner = await LocalReplica.open({ spaces, root: world.root, id: world.ids[slot]! });
      const link = new Link(inner, slot, random);
      link.onFault = onFault;
      return link;
    };
    // What the volume record keeps across engine crashes: the replicas set to ERR.
    const failedIds = new Set<string>();
    const markFailed = (id: string, failed: boolean) => {
      if (failed) failedIds.add(id);
      else failedIds.delete(id);
      return Promise.resolve();
    };
    const startEngine = async () => {
      links = [];
      for (let i = 0; i < REPLICAS; i++) links.push(await openLink(i));
      engine = new Engine({
        volume: 'sim',
        sizeBytes: SIZE,
        replicas: links.map((l) => l.proxy),
        suspect: new Set(links.filter((l) => failedIds.has(l.proxy.id)).map((l) => l.proxy)),
        markFailed,
      });
      for (const m of engine.replicaModes()) if (m.mode === 'ERR') await markFailed(m.id, true);
    };
    await startEngine();
    const healthy = () => engine.replicaModes().filter((m) => m.mode === 'RW').length;
    /** Faults only while two replicas are healthy: the promise holds while one remains. */
    const arm = () => {
      const rate = healthy() >= 2 ? 0.02 : 0;
      budget.faults = healthy() - 1;
      for (const l of links) l.faultRate = rate;
    };
    const checkRead = async (block: number, count: number) => {
      const data = await engine.read(block * BLOCK, count * BLOCK);
      for (let b = 0; b < count; b++) {
        const got = data[b * BLOCK]!;
        const want = acked[block + b]!;
        if (got !== want || data[b * BLOCK + BLOCK - 1] !== want)
          fail(`block ${block + b} reads ${got}, the last acknowledged write was ${want}`);
      }
    };

    for (let step = 1; step <= steps; step++) {
      arm();
      const roll = random();
      const block = int(BLOCKS);
      const count = Math.min(1 + int(8), BLOCKS - block);
      try {
        if (roll < 0.45) {
          const value = 1 + int(250);
          await engine.write(
            block * BLOCK,
            Buffer.concat(Array.from({ length: count }, () => content(value))),
          );
          for (let b = block; b < block + count; b++) {
            acked[b] = value;
            since[b]!.add(value);
          }
        } else if (roll < 0.5) {
          await engine.trim(block * BLOCK, count * BLOCK);
          for (let b = block; b < block + count; b++) {
            acked[b] = 0;
            since[b]!.add(0);
          }
        } else if (roll < 0.6) {
          await engine.flush();
          durable = [...acked];
          since = Array.from({ length: BLOCKS }, () => new Set<number>());
        } else if (roll < 0.85) {
          await checkRead(block, count);
        } else if (roll < 0.95) {
          // Rebuild a replica that failed: its host is back (reopened from its disk).
          const modes = engine.replicaModes();
          const bad = modes.findIndex((m) => m.mode === 'ERR');
          if (bad >= 0) {
            const slot = links.findIndex((l) => l.proxy.id === modes[bad]!.id);
            if (slot < 0) fail(`replica ${modes[bad]!.id} in ERR has no link`);
            if (!links[slot]!.dead) crashLink(links[slot]!);
            else links[slot]!.inner.abandon();
            const back = await openLink(slot);
            for (const l of links) l.faultRate = 0;
            await engine.rebuild(back.proxy, {
              clock: simClock,
              now: new Date(now.getTime() + step * 1000),
              snapshotName: `rebuild-${step}`,
              replaces: back.proxy.id,
            });
            links[slot] = back;
            stats.rebuilds++;
          }
        } else {
          // The engine's host crashes: every replica loses what it did not flush.
          stats.engineCrashes++;
          for (const l of links) {
            l.dead = true;
            l.inner.abandon();
          }
          await startEngine();
          if (healthy() === 0) fail('no replica is healthy after an engine restart');
          const data = await engine.read(0, SIZE);
          for (let b = 0; b < BLOCKS; b++) {
            const got = data[b * BLOCK]!;
            if (got !== durable[b] && !since[b]!.has(got))
              fail(
                `after an engine crash block ${b} reads ${got}: flushed ${durable[b]}, acknowledged since ${[...since[b]!].join(',') || 'nothing'}`,
              );
          }
          acked = Array.from({ length: BLOCKS }, (_, b) => data[b * BLOCK]!);
          durable = [...acked];
          since = Array.from({ length: BLOCKS }, () => new Set<number>());
        }
      } catch (err) {
        if (err instanceof Error && err.message.startsWith(`seed=${seed}`)) throw err;
        fail(
          `step ${step}: the client saw an error with ${healthy()} healthy replicas: ${String(err)}`,
        );
      }
    }

    // Converge: rebuild every replica that is not healthy, then all must be equal.
    for (const l of links) l.faultRate = 0;
    for (let slot = 0; slot < REPLICAS; slot++) {
      const mode = engine.replicaModes().find((m) => m.id === links[slot]!.proxy.id)?.mode;
      if (mode === 'RW') continue;
      links[slot]!.inner.abandon();
      const back = await openLink(slot);
      await engine.rebuild(back.proxy, {
        clock: simClock,
        now: new Date(Date.parse('2026-11-26T00:00:00Z') + slot * 1000),
        snapshotName: `converge-${slot}`,
        replaces: back.proxy.id,
      });
      links[slot] = back;
      stats.rebuilds++;
    }
    if (healthy() !== REPLICAS) fail(`${healthy()} of ${REPLICAS} replicas healthy after rebuilds`);
    const differences = await engine.verify();
    if (differences.length > 0)
      fail(`replicas differ after rebuild: ${JSON.stringify(differences)}`);
    await checkRead(0, BLOCKS);
    for (const l of links) l.inner.abandon();
    return stats;
  } finally {
    await sim.dispose();
  }
}
