/**
 * Our own assertion, on in production (docs/CONTRIBUTING.md, after TigerBeetle): a broken
 * invariant in the data path must stop the engine, not corrupt a block.
 */
export class AssertionError extends Error {
  override name = 'AssertionError';
}

export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new AssertionError(message);
}

/**
 * For checks on the per-request and per-block path: `if (!ok) fail(\`...\`)`
 * builds its message only when it fails, where `assert(ok, \`...\`)` formats
 * the template on every call (number to string, concatenation: the largest
 * JS cost left in a 1 MiB write's block loop).
 */
export function fail(message: string): never {
  throw new AssertionError(message);
}
