import { createRequire } from 'node:module';

/**
 * One of the small N-API addons in `native/` (built by node-gyp at setup,
 * `scripts/build-native.sh`), or undefined when it is not built or this
 * runtime cannot load it (Deno): every caller has a slower way without it.
 */
export function loadNative<T>(name: string): T | undefined {
  if (process.env.CORRAL_NATIVE === 'off') return undefined;
  // Deno loads N-API addons, but `xts` takes OpenSSL from the Node binary it runs in: under
  // Deno the symbols would be missing at the first call, not at load. None is used there.
  if ('Deno' in globalThis) return undefined;
  const require = createRequire(import.meta.url);
  // From the sources (replication/) and from the build (dist/replication/).
  for (const candidate of [
    `../native/build/Release/${name}.node`,
    `../../native/build/Release/${name}.node`,
  ]) {
    try {
      return require(candidate) as T;
    } catch {
      // not there: the next place, or none
    }
  }
  return undefined;
}
