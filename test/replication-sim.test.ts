import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { simulate } from './sim/replication-sim.ts';

const one = process.env.CORRAL_SIM_SEED;
const SEEDS = one !== undefined ? [Number(one)] : Array.from({ length: 40 }, (_, i) => i + 1);

describe('seeded simulation: one engine, three replicas, injected faults', () => {
  it(`keeps every acknowledged write and converges, over ${SEEDS.length} seeds`, async () => {
    let faults = 0;
    let rebuilds = 0;
    let crashes = 0;
    for (const seed of SEEDS) {
      const r = await simulate(seed);
      faults += r.faults;
      rebuilds += r.rebuilds;
      crashes += r.engineCrashes;
    }
    // The run must have exercised what it claims to.
    assert.ok(faults > SEEDS.length, `${faults} faults injected`);
    assert.ok(rebuilds > SEEDS.length, `${rebuilds} rebuilds`);
    assert.ok(crashes > 0, `${crashes} engine crashes`);
  });
});
