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
