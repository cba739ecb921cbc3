import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { it } from 'node:test';
import type { BlockOps } from '../../replication/block-device.ts';

/**
 * One suite for every implementation of the block interface (docs/CONTRIBUTING.md,
 * abstract-level): a bare replica, an engine, and whatever comes next.
 * `reopen` simulates a restart after a flush, when the implementation has one.
 */
export interface Subject {
  device: BlockOps;
  sizeBytes: number;
  reopen?: () => Promise<BlockOps>;
  /** Its `close()` (or `stop()`): flush, let go; later operations must reject. */
  close?: () => Promise<void>;
}

/** A tiny PRNG so that failures print a seed that reproduces them. */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 0x100000000;
  };
}

export function blockDeviceConformance(
  name: string,
  make: () => Promise<Subject>,
  cleanup: () => Promise<void>,
): void {
  it(`${name}: unaligned, straddling and sub-block writes read back exactly`, async () => {
    const { device, sizeBytes } = await make();
    try {
      const model = Buffer.alloc(sizeBytes);
      const writes: Array<[number, number]> = [
        [0, 4096],
        [1, 1],
        [4095, 2],
        [512, 512],
        [8000, 20_000],
        [sizeBytes - 1, 1],
        [sizeBytes - 4097, 4097],
      ];
      for (const [offset, length] of writes) {
        const data = randomBytes(length);
        await device.write(offset, data);
        data.copy(model, offset);
      }
      assert.ok(Buffer.from(await device.read(0, sizeBytes)).equals(model));
      assert.ok(Buffer.from(await device.read(4093, 7)).equals(model.subarray(4093, 4100)));
    } finally {
      await cleanup();
    }
  });

  it(`${name}: concurrent sub-block writes into one block all land`, async () => {
    const { device } = await make();
    try {
      const expected = Buffer.alloc(8192);
      const ops: Array<Promise<void>> = [];
      for (let sector = 0; sector < 16; sector++) {
        const data = Buffer.alloc(512, sector + 1);
        data.copy(expected, sector * 512);
        ops.push(device.write(sector * 512, data));
      }
      await Promise.all(ops);
      assert.ok(Buffer.from(await device.read(0, 8192)).equals(expected));
    } finally {
      await cleanup();
    }
  });

  it(`${name}: trim and write-zeroes read as zeros, and extents show holes`, async () => {
    const { device } = await make();
    try {
      await device.write(0, Buffer.alloc(64 * 1024, 0xaa));
      await device.trim(4096, 8192);
      await device.zero(100, 50);
      await device.zero(20_000, 10_000, { noHole: true });
      const data = Buffer.from(await device.read(0, 64 * 1024));
      const expected = Buffer.alloc(64 * 1024, 0xaa);
      expected.fill(0, 4096, 12288);
      expected.fill(0, 100, 150);
      expected.fill(0, 20_000, 30_000);
      assert.ok(data.equals(expected));
      const extents = await device.extents(0, 64 * 1024);
      assert.equal(
        extents.reduce((n, e) => n + e.lengthBytes, 0),
        64 * 1024,
      );
      assert.deepEqual(
        extents.slice(0, 3).map((e) => [e.lengthBytes, e.hole]),
        [
          [4096, false],
          [8192, true],
          [64 * 1024 - 12288, false],
        ],
      );
    } finally {
      await cleanup();
    }
  });

  const seeds = process.env.CORRAL_SEED ? [Number(process.env.CORRAL_SEED)] : [1, 2, 3];
  for (const seed of seeds)
    it(`${name}: a random mix of operations equals a plain model, also after a reopen (seed ${seed})`, async () => {
      const random = rng(seed);
      const subject = await make();
      let device = subject.device;
      const size = subject.sizeBytes;
      const model = Buffer.alloc(size);
      try {
        for (let step = 0; step < 400; step++) {
          const offset = Math.floor(random() * size);
          const length = Math.min(
            size - offset,
            1 + Math.floor(random() * (random() < 0.5 ? 600 : 40_000)),
          );
          const r = random();
          if (r < 0.5) {
            const data = Buffer.alloc(length, Math.floor(random() * 255) + 1);
            await device.write(offset, data);
            data.copy(model, offset);
          } else if (r < 0.6) {
            await device.trim(offset, length);
            model.fill(0, offset, offset + length);
          } else if (r < 0.7) {
            await device.zero(offset, length, { noHole: random() < 0.5 });
            model.fill(0, offset, offset + length);
          } else if (r < 0.95) {
            const got = Buffer.from(await device.read(offset, length));
            assert.ok(
              got.equals(model.subarray(offset, offset + length)),
              `seed ${seed} step ${step}: read ${offset}+${length}`,
            );
          } else if (subject.reopen) {
            await device.flush();
            device = await subject.reopen();
          }
        }
        assert.ok(
          Buffer.from(await device.read(0, size)).equals(model),
          `seed ${seed}: final contents`,
        );
      } finally {
        await cleanup();
      }
    });

  it(`${name}: a write is readable until close, and rejected after it; a second close is harmless`, async () => {
    const subject = await make();
    try {
      if (!subject.close) return;
      const data = randomBytes(5000);
      await subject.device.write(3000, data);
      assert.ok(Buffer.from(await subject.device.read(3000, 5000)).equals(data));
      await subject.close();
      await subject.close();
      await assert.rejects(subject.device.write(0, Buffer.alloc(512, 1)));
      await assert.rejects(subject.device.read(0, 512));
    } finally {
      await cleanup();
    }
  });
}
