import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { Clock } from '../../common/clock.ts';
import { Kv } from '../../kv/kv.ts';
import { openSpaces, type Spaces } from '../../kv/spaces.ts';
import { prng } from '../helpers/prng.ts';

/** A clock for simulated rebuilds: no timers, no sleeping. */
export const simClock: Clock = {
  nowMs: () => Date.now(),
  elapsedMs: () => performance.now(),
  setInterval: () => ({ cancel: () => undefined }),
  after: () => ({ cancel: () => undefined }),
  sleep: () => Promise.resolve(),
};

/** What every seeded simulation starts from: its random source, a metadata store, a folder. */
export interface SimWorld {
  random: () => number;
  /** A whole number in [0, n). */
  int: (n: number) => number;
  /** Fails the run, naming the seed that replays it. */
  fail: (message: string) => never;
  dir: string;
  kv: Kv;
  spaces: Spaces;
  /** Where the replicas' folders go. */
  root: string;
  dispose(): Promise<void>;
}

export async function simWorld(seed: number, name: string): Promise<SimWorld> {
  const random = prng(seed);
  const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), `corral-${name}-`));
  const kv = await Kv.open(path.join(dir, 'meta'));
  return {
    random,
    int: (n) => Math.floor(random() * n),
    fail: (message) => {
      throw new Error(`seed=${seed}: ${message} (replay: CORRAL_SIM_SEED=${seed})`);
    },
    dir,
    kv,
    spaces: openSpaces(kv),
    root: path.join(dir, 'replicas'),
    dispose: async () => {
      await kv.close();
      await fs.promises.rm(dir, { recursive: true, force: true });
    },
  };
}
