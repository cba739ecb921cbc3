import { fail } from '../common/assert.ts';
import { BLOCK_SIZE } from './block-device.ts';
import { loadNative } from './native.ts';

/**
 * XXH32 (seed 0) of 4 KiB blocks, in WebAssembly SIMD: one block's four
 * lanes are one v128, and four blocks go through the loop together so their
 * multiply chains overlap (`block-hash.wat`, the source of the bytes below;
 * `npm run build:wasm` makes them again). Measured here: ~77 µs per MiB with
 * the copy into the module's memory, against ~300 µs for zlib's CRC-32 in
 * 4 KiB pieces (Node's zlib has no carry-less-multiply path), so checking
 * every block of a 1 MiB read or write stops costing a quarter of the
 * event loop (docs/PERFORMANCE.md, "Checksums").
 */
const WASM_BASE64 =
  'AGFzbQEAAAABFgRgAXsBf2ABfwF/YAJ/fwBgA39/fwADBQQAAQIDBQMBAAEHEQIGbWVtb3J5AgAEc3VtcwADCsoEBFsBAX8gAP0bAEEBdyAA/RsBQQd3aiAA/RsCQQx3IAD9GwNBEndqaiEBIAFBgCBqIQEgASABQQ92c0H3lK+veGwhASABIAFBDXZzQb3cypV8bCEBIAEgAUEQdnMLbgIEewF/QbHz3fF5/REhA0H3lK+veP0RIQT9DChEIyR3yuuFAAAAAE+GyGEhAQNAIAEgACAFav0ABAAgBP21Af2uASICQQ39qwEgAkET/a0B/VAgA/21ASEBIAVBEGohBSAFQYAgSQ0ACyABEAALoQICB3sCf0Gx893xef0RIQdB95Svr3j9ESEI/QwoRCMkd8rrhQAAAABPhshhIQIgAiEDIAIhBCACIQUDQCAAIAlqIQogAiAK/QAEACAI/bUB/a4BIgZBDf2rASAGQRP9rQH9UCAH/bUBIQIgAyAKQYAgav0ABAAgCP21Af2uASIGQQ39qwEgBkET/a0B/VAgB/21ASEDIAQgCkGAwABq/QAEACAI/bUB/a4BIgZBDf2rASAGQRP9rQH9UCAH/bUBIQQgBSAKQYDgAGr9AAQAIAj9tQH9rgEiBkEN/asBIAZBE/2tAf1QIAf9tQEhBSAJQRBqIQkgCUGAIEkNAAsgASACEAA2AgAgASADEAA2AgQgASAEEAA2AgggASAFEAA2AgwLWgEBfwJAA0AgA0EEaiABSw0BIAAgA0EMdGogAiADQQJ0ahACIANBBGohAwwACwsCQANAIAMgAU8NASACIANBAnRqIAAgA0EMdGoQATYCACADQQFqIQMMAAsLCw==';

/** Blocks hashed per call: the input area of the module's memory. */
const BATCH_BLOCKS = 256;
const INPUT_BYTES = BATCH_BLOCKS * BLOCK_SIZE;
const PAGE_BYTES = 65536;

// The compiler's libraries here have no WebAssembly types (no DOM lib): the little we use.
declare const WebAssembly: {
  Module: new (bytes: Uint8Array) => object;
  Instance: new (module: object, imports: object) => { exports: unknown };
};

interface Exports {
  memory: { buffer: ArrayBuffer; grow(pages: number): number };
  sums(src: number, count: number, dst: number): void;
}

const exports = new WebAssembly.Instance(
  new WebAssembly.Module(Buffer.from(WASM_BASE64, 'base64')),
  {},
).exports as Exports;
// Grown once, here: growing later would detach the views below.
exports.memory.grow(Math.ceil((INPUT_BYTES + BATCH_BLOCKS * 4) / PAGE_BYTES));
const input = new Uint8Array(exports.memory.buffer, 0, INPUT_BYTES);
const output = new Uint32Array(exports.memory.buffer, INPUT_BYTES, BATCH_BLOCKS);

interface NativeHash {
  sums(data: Uint8Array, out: Uint32Array, outAt: number): void;
}

/**
 * `native/xxh32.c`: the same hashes computed where the bytes lie, eight
 * blocks at a time in AVX2 — no copy into the module's memory, which was a
 * quarter of the cost here (88 µs per MiB with the copy, 24 µs of it the
 * copy). Absent without the addon, under Deno, and on CPUs without AVX2
 * (the addon then exports nothing).
 */
const addon = loadNative<Partial<NativeHash>>('xxh32');
const native: NativeHash | undefined = addon?.sums ? (addon as NativeHash) : undefined;

/** Which implementation `hashBlocks` uses (the tests check it). */
export const HASH_IMPLEMENTATION: 'native' | 'wasm' = native ? 'native' : 'wasm';

/**
 * The XXH32 of each 4 KiB block of `data` (whole blocks), into `out` from
 * `outAt` on.
 */
export function hashBlocks(data: Uint8Array, out: Uint32Array, outAt = 0): void {
  if (native) native.sums(data, out, outAt);
  else hashBlocksWasm(data, out, outAt);
}

/** `hashBlocks` in WebAssembly, always (the fallback, and what tests hold the addon to). */
export function hashBlocksWasm(data: Uint8Array, out: Uint32Array, outAt = 0): void {
  if (data.length % BLOCK_SIZE !== 0) fail(`${data.length} bytes are not whole blocks`);
  const count = data.length / BLOCK_SIZE;
  for (let done = 0; done < count; done += BATCH_BLOCKS) {
    const n = Math.min(BATCH_BLOCKS, count - done);
    input.set(data.subarray(done * BLOCK_SIZE, (done + n) * BLOCK_SIZE));
    exports.sums(0, n, INPUT_BYTES);
    out.set(output.subarray(0, n), outAt + done);
  }
}
