import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { simulateOwnership } from './sim/ownership-sim.ts';

const one = process.env.CORRAL_SIM_SEED;
const SEEDS = one !== undefined ? [Number(one)] : Array.from({ length: 60 }, (_, i) => i + 1);

describe('seeded simulation: engines moved, taken over, partitioned, the store away', () => {
  it(`never lets two engines write through one replica, never serves older bytes, over ${SEEDS.length} seeds`, async () => {
    const total = { takeovers: 0, moves: 0, fencedWrites: 0, staleAcks: 0, outages: 0 };
    for (const seed of SEEDS) {
      const r = await simulateOwnership(seed);
      for (const k of Object.keys(total) as Array<keyof typeof total>) total[k] += r[k];
    }
    console.log(`ownership simulation: ${JSON.stringify(total)}`);
    // The run must have exercised what it claims to.
    assert.ok(total.takeovers > SEEDS.length, `${total.takeovers} takeovers`);
    assert.ok(total.moves > SEEDS.length, `${total.moves} planned moves`);
    assert.ok(total.fencedWrites > 0, `${total.fencedWrites} writes refused to fenced engines`);
    assert.ok(total.outages > 0, `${total.outages} store outages`);
  });
});
