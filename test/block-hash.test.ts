import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, it } from 'node:test';
import * as fs from 'node:fs';
import { HASH_IMPLEMENTATION, hashBlocks, hashBlocksWasm } from '../replication/block-hash.ts';

/** XXH32 with seed 0, the reference algorithm written plainly, for 4 KiB inputs. */
function xxh32(data: Uint8Array): number {
  const P1 = 0x9e3779b1;
  const P2 = 0x85ebca77;
  const P3 = 0xc2b2ae3d;
  const rotl = (x: number, r: number) => ((x << r) | (x >>> (32 - r))) >>> 0;
  const round = (acc: number, lane: number) =>
    Math.imul(rotl((acc + Math.imul(lane, P2)) >>> 0, 13), P1) >>> 0;
  const view = new DataView(data.buffer, data.byteOffset, data.length);
  const v = [(P1 + P2) >>> 0, P2, 0, (0 - P1) >>> 0];
  for (let i = 0; i < data.length; i += 16)
    for (let k = 0; k < 4; k++) v[k] = round(v[k]!, view.getUint32(i + 4 * k, true));
  let h = (rotl(v[0]!, 1) + rotl(v[1]!, 7) + rotl(v[2]!, 12) + rotl(v[3]!, 18) + data.length) >>> 0;
  h = Math.imul(h ^ (h >>> 15), P2) >>> 0;
  h = Math.imul(h ^ (h >>> 13), P3) >>> 0;
  return (h ^ (h >>> 16)) >>> 0;
}

describe('block hash (XXH32: native AVX2, else WebAssembly)', () => {
  it('matches the reference XXH32 for every block, in batches of any length, both ways', () => {
    for (const blocks of [1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 255, 256, 257, 600]) {
      // At an odd offset into a larger buffer: neither way may assume alignment.
      const data = randomBytes(blocks * 4096 + 13).subarray(13);
      for (const [name, hash] of [
        ['hashBlocks', hashBlocks],
        ['wasm', hashBlocksWasm],
      ] as const) {
        const out = new Uint32Array(blocks + 2).fill(0xdeadbeef);
        hash(data, out, 1);
        assert.equal(out[0], 0xdeadbeef, `${name}: nothing written before outAt`);
        assert.equal(out[blocks + 1], 0xdeadbeef, `${name}: nothing written past the blocks`);
        for (let i = 0; i < blocks; i++)
          assert.equal(
            out[i + 1],
            xxh32(data.subarray(i * 4096, (i + 1) * 4096)),
            `${name}: block ${i} of ${blocks}`,
          );
      }
    }
  });

  it('uses the native addon where the CPU has AVX2, and refuses what is not whole blocks', () => {
    const avx2 = /\bavx2\b/.test(fs.readFileSync('/proc/cpuinfo', 'utf8'));
    const expected = avx2 && process.env.CORRAL_NATIVE !== 'off' ? 'native' : 'wasm';
    assert.equal(HASH_IMPLEMENTATION, expected, 'setup built native/xxh32');
    assert.throws(() => hashBlocks(new Uint8Array(4095), new Uint32Array(1)));
    assert.throws(() => hashBlocks(new Uint8Array(8192), new Uint32Array(1)), RangeError);
  });

  it('sees a single flipped bit, and a view into a larger buffer hashes its own bytes', () => {
    const big = randomBytes(16 * 4096);
    const a = new Uint32Array(4);
    hashBlocks(big.subarray(4096, 5 * 4096), a);
    big[2 * 4096 + 777]! ^= 0x10;
    const b = new Uint32Array(4);
    hashBlocks(big.subarray(4096, 5 * 4096), b);
    assert.equal(a[0], b[0]);
    assert.notEqual(a[1], b[1]);
    assert.equal(a[2], b[2]);
    assert.equal(a[3], b[3]);
  });
});
