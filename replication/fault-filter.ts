import { filter } from './block-device.ts';
import type { SupervisedEngine } from './supervisor.ts';

export type FaultMode = 'none' | 'throw' | 'hang';

/** An engine whose block operations can be made to fail, switched live. */
export interface FaultFilter extends SupervisedEngine {
  setMode(mode: FaultMode): void;
}

/**
 * A filter for tests of engine isolation: 'throw' makes the next block
 * operations fail like a bug would (a plain Error), 'hang' makes them never
 * complete; control operations fall through untouched. Enabled only with
 * CORRAL_FAULT_INJECTION=1.
 */
export function faultFilter(next: SupervisedEngine): FaultFilter {
  const state = { mode: 'none' as FaultMode };
  const gate = (): Promise<void> => {
    if (state.mode === 'throw') return Promise.reject(new Error('injected engine fault'));
    if (state.mode === 'hang') return new Promise<void>(() => undefined);
    return Promise.resolve();
  };
  return filter(next, {
    setMode: (mode: FaultMode) => {
      state.mode = mode;
    },
    read: (offset, length, into) => gate().then(() => next.read(offset, length, into)),
    write: (offset, data, options) => gate().then(() => next.write(offset, data, options)),
    flush: () => gate().then(() => next.flush()),
    trim: (offset, length, options) => gate().then(() => next.trim(offset, length, options)),
    zero: (offset, length, options) => gate().then(() => next.zero(offset, length, options)),
    extents: (offset, length) => gate().then(() => next.extents(offset, length)),
  });
}
