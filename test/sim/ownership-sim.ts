/**
 * A seeded simulation of engine ownership (docs/ARCHITECTURE.md, "Engine
 * ownership and fencing"): real engines over three real replicas, the
 * replicas behind epoch gates as a node's hosted replicas are, the volume
 * record in a store that can be unavailable and changes by compare-and-swap.
 * Engines move (a planned move: the old one stops), are taken over while
 * the old one lives on (it is partitioned from the store, from replicas, or
 * from both), and the store goes away and comes back, while clients write
 * through whichever engine they still reach.
 *
 * Checked at every step: a replica never acknowledges an operation of an
 * older epoch after one of a newer epoch (no two engines ever get writes
 * acknowledged by the same replica in overlapping periods); a read through
 * the volume's engine returns the last acknowledged write of every block,
 * whichever engine acknowledged it, or fails — never older bytes. At the
 * end, healed, the owner rebuilds every replica and all agree.
 * CORRAL_SIM_SEED=N replays one seed.
 */
import { CorralError } from '../../common/errors.ts';
import { Engine } from '../../replication/engine.ts';
import { LocalReplica } from '../../replication/local-replica.ts';
import type { Replica } from '../../replication/replica.ts';
import { simClock, simWorld } from './sim-world.ts';

const BLOCK = 4096;
const BLOCKS = 64;
const SIZE = BLOCKS * BLOCK;
const REPLICAS = 3;

/** The volume record as etcd keeps it. */
interface Store {
  available: boolean;
  owner: number;
  epoch: number;
  failed: Set<string>;
}

/** A replica as its node serves it: one engine stream at a time, the newest epoch wins. */
class Gate {
  /** The epoch of the stream being served. */
  epoch = 0;
  /** Epochs of the operations acknowledged, in order. */
  readonly acked: number[] = [];

  constructor(readonly inner: LocalReplica) {}
}

/** One engine (on some node) and what it can reach. */
interface Sim {
  id: number;
  epoch: number;
  engine: Engine;
  /** Replica slots this engine cannot reach (partition). */
  cut: Set<number>;
  /** The store is out of this engine's reach. */
  storeCut: boolean;
  stopped: boolean;
}

export interface OwnershipResult {
  takeovers: number;
  moves: number;
  fencedWrites: number;
  staleAcks: number;
  outages: number;
}

export async function simulateOwnership(seed: number, steps = 160): Promise<OwnershipResult> {
  const world = await simWorld(seed, 'own');
  const { random, int, fail, spaces, root } = world;
  const result: OwnershipResult = {
    takeovers: 0,
    moves: 0,
    fencedWrites: 0,
    staleAcks: 0,
    outages: 0,
  };
  const gates: Gate[] = [];
  const sims: Sim[] = [];
  try {
    const now = new Date('2026-12-03T00:00:00Z');
    for (let i = 0; i < REPLICAS; i++) {
      const r = await LocalReplica.create({ spaces, root, volume: 'own', sizeBytes: SIZE, now });
      gates.push(new Gate(r));
    }
    const store: Store = { available: true, owner: -1, epoch: 0, failed: new Set() };
    /**
     * What each block may read: the last acknowledged write, whichever engine acknowledged it,
     * and the writes that failed since (they may have reached some replica). A read narrows it.
     */
    const model: Array<Set<number>> = Array.from({ length: BLOCKS }, () => new Set([0]));
    const content = (value: number, count: number) => Buffer.alloc(count * BLOCK, value);

    /** Engine `sim`'s view of replica `slot`: a stream that its node may end or a partition cut. */
    const link = (sim: { epoch: number; cut: Set<number> }, slot: number): Replica => {
      const gate = gates[slot]!;
      return new Proxy(gate.inner, {
        get(target, prop) {
          const value = Reflect.get(target, prop, target) as unknown;
          if (prop === 'close') return () => Promise.resolve();
          if (prop === 'abandon') return () => undefined;
          if (typeof value !== 'function') return value;
          const fn = value as (...a: unknown[]) => unknown;
          if (prop === 'revision' || prop === 'snapshots') return fn.bind(target);
          return async (...args: unknown[]) => {
            if (sim.cut.has(slot)) throw new CorralError('IO_ERROR', `replica ${slot}: no answer`);
            if (gate.epoch !== sim.epoch)
              throw new CorralError('IO_ERROR', `replica ${slot}: stream ended (newer engine)`);
            const out = await fn.apply(target, args);
            if (gate.epoch !== sim.epoch)
              throw new CorralError('IO_ERROR', `replica ${slot}: stream ended (newer engine)`);
            if (['write', 'trim', 'zero', 'flush'].includes(String(prop))) {
              const last = gate.acked[gate.acked.length - 1] ?? 0;
              if (sim.epoch < last)
                fail(`replica ${slot} acknowledged epoch ${sim.epoch} after epoch ${last}`);
              gate.acked.push(sim.epoch);
            }
            return out;
          };
        },
      });
    };

    /** Claims the volume for a new engine and starts it, as `attach` does; undefined if it cannot. */
    const claim = (cut: Set<number>, storeCut: boolean): Sim | undefined => {
      if (!store.available || storeCut) return undefined;
      const sim = { id: sims.length, epoch: store.epoch + 1, cut, storeCut } as Sim;
      store.owner = sim.id;
      store.epoch = sim.epoch;
      const replicas: Replica[] = [];
      const failed = new Map<Replica, string>();
      for (let slot = 0; slot < REPLICAS; slot++) {
        const r = link(sim, slot);
        replicas.push(r);
        // Connecting: refused by a newer stream, else it ends the older one.
        if (cut.has(slot)) failed.set(r, 'unreachable');
        else if (gates[slot]!.epoch > sim.epoch) failed.set(r, 'newer engine');
        else gates[slot]!.epoch = sim.epoch;
        if (store.failed.has(gates[slot]!.inner.id) && !failed.has(r)) failed.set(r, 'recorded');
      }
      if (failed.size === REPLICAS) return undefined;
      // A store write takes a while (other requests run meanwhile), and may be refused.
      const markFailed = async (id: string, isFailed: boolean): Promise<void> => {
        for (let i = int(4); i >= 0; i--) await new Promise((r) => setImmediate(r));
        if (!store.available || sim.storeCut) throw new CorralError('UNAVAILABLE', 'store away');
        if (store.epoch !== sim.epoch || store.owner !== sim.id)
          throw new CorralError('BUSY', 'fenced');
        if (isFailed) store.failed.add(id);
        else store.failed.delete(id);
      };
      sim.engine = new Engine({ volume: 'own', sizeBytes: SIZE, replicas, failed, markFailed });
      sim.stopped = false;
      sims.push(sim);
      return sim;
    };
    const owner = () => sims.find((s) => s.id === store.owner && !s.stopped);
    const recordStartFailures = (sim: Sim) => {
      for (const m of sim.engine.replicaModes()) if (m.mode === 'ERR') store.failed.add(m.id); // recorded at attach, before any I/O
    };
    const first = claim(new Set(), false)!;
    recordStartFailures(first);

    for (let step = 1; step <= steps; step++) {
      const roll = random();
      const live = sims.filter((s) => !s.stopped && !s.engine.fenced);
      const current = owner();
      if (roll < 0.4 && live.length > 0) {
        // A client of some engine writes (mostly the owner's; a stale one's client too).
        // Several writes at once, to disjoint blocks: a failure found by one must hold the others.
        const sim = random() < 0.7 && current ? current : live[int(live.length)]!;
        const k = 1 + int(3);
        const span = Math.floor(BLOCKS / k);
        await Promise.all(
          Array.from({ length: k }, async (_, i) => {
            const block = i * span + int(span - 4);
            const count = 1 + int(4);
            const value = 1 + int(250);
            for (let t = 0; t < 2 * i; t++) await new Promise((r) => setImmediate(r));
            try {
              await sim.engine.write(block * BLOCK, content(value, count));
              for (let b = block; b < block + count; b++) model[b] = new Set([value]);
              if (sim !== current) result.staleAcks++;
            } catch {
              if (sim !== current) result.fencedWrites++;
              for (let b = block; b < block + count; b++) model[b]!.add(value);
            }
          }),
        );
      } else if (roll < 0.55 && current) {
        // A read through the owner: the last acknowledged write, or an error.
        const block = int(BLOCKS);
        const count = Math.min(1 + int(8), BLOCKS - block);
        const data = await current.engine.read(block * BLOCK, count * BLOCK).catch(() => null);
        if (data)
          for (let b = 0; b < count; b++) {
            const may = model[block + b]!;
            const got = data[b * BLOCK]!;
            if (!may.has(got))
              fail(
                `step ${step}: block ${block + b} reads ${got}; it may read ${[...may].join('|')}`,
              );
            model[block + b] = new Set([got]);
          }
      } else if (roll < 0.65 && current) {
        await current.engine.flush().catch(() => undefined);
      } else if (roll < 0.75) {
        // A planned move: the owner stops (drained, flushed), another engine claims.
        if (!current || !store.available || current.storeCut) continue;
        await current.engine.flush().catch(() => undefined);
        current.stopped = true;
        const next = claim(new Set([...current.cut].filter(() => random() < 0.3)), false);
        if (next) {
          recordStartFailures(next);
          result.moves++;
        }
      } else if (roll < 0.85) {
        // The owner's node is lost to the others (its lease ends): a takeover while it lives on,
        // cut from the store, from some replicas, or from both.
        if (!current || !store.available) continue;
        const how = int(3);
        if (how !== 1) current.storeCut = true;
        const cut = new Set<number>();
        if (how !== 0) {
          const slot = int(REPLICAS);
          current.cut.add(slot);
          cut.add(slot);
        }
        const next = claim(new Set([...cut].map((s) => (random() < 0.5 ? s : (s + 1) % 3))), false);
        if (next) {
          recordStartFailures(next);
          result.takeovers++;
        }
      } else if (roll < 0.92) {
        store.available = !store.available;
        if (!store.available) result.outages++;
      } else if (current) {
        // The owner rebuilds a replica it holds in ERR and can reach.
        const modes = current.engine.replicaModes();
        const slot = gates.findIndex(
          (g, i) =>
            !current.cut.has(i) &&
            gates[i]!.epoch <= current.epoch &&
            modes.find((m) => m.id === g.inner.id)?.mode === 'ERR',
        );
        if (slot < 0 || !store.available || current.storeCut) continue;
        gates[slot]!.epoch = current.epoch;
        await current.engine
          .rebuild(link(current, slot), {
            clock: simClock,
            now: new Date(now.getTime() + step * 1000),
            snapshotName: `rebuild-${step}`,
            replaces: gates[slot]!.inner.id,
          })
          .catch(() => undefined);
      }
    }

    // Healed: the store answers, the owner reaches everything; the others have stopped.
    store.available = true;
    for (const s of sims) if (s.id !== store.owner) s.stopped = true;
    let last = owner();
    if (!last || last.engine.fenced || last.engine.replicaModes().every((m) => m.mode !== 'RW')) {
      for (const s of sims) s.stopped = true;
      last = claim(new Set(), false);
      if (last) recordStartFailures(last);
    }
    const fin: Sim = last ?? fail('no engine can serve the volume after healing');
    fin.cut.clear();
    fin.storeCut = false;
    for (let slot = 0; slot < REPLICAS; slot++) {
      const id = gates[slot]!.inner.id;
      if (fin.engine.replicaModes().find((m) => m.id === id)?.mode === 'RW') continue;
      gates[slot]!.epoch = fin.epoch;
      await fin.engine.rebuild(link(fin, slot), {
        clock: simClock,
        now: new Date(Date.parse('2026-12-04T00:00:00Z') + slot * 1000),
        snapshotName: `converge-${slot}`,
        replaces: id,
      });
    }
    const differences = await fin.engine.verify();
    if (differences.length > 0) fail(`replicas differ at the end: ${JSON.stringify(differences)}`);
    const data = await fin.engine.read(0, SIZE);
    for (let b = 0; b < BLOCKS; b++)
      if (!model[b]!.has(data[b * BLOCK]!))
        fail(
          `at the end block ${b} reads ${data[b * BLOCK]}; it may read ${[...model[b]!].join('|')}`,
        );
    return result;
  } finally {
    for (const g of gates) g.inner.abandon();
    await world.dispose();
  }
}
