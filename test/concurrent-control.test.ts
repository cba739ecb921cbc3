import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { DaemonProcess } from './helpers/daemon.ts';
import { prng } from './helpers/prng.ts';
import { CMD, RawNbd } from './helpers/nbd-client.ts';

/**
 * Control operations on one volume sent at the same time: each answers
 * success or a clear 404/409, never a 500 or a dropped connection, and the
 * volumes end as if the operations that succeeded had run one after another
 * in some order (a model replays every order). Every round checks that
 * every volume still attaches and reads what that order says.
 */

const PATTERN = 64 * 1024;

/** A volume as the model sees it: content is the byte filling the first 64 KiB. */
interface ModelVolume {
  head: number;
  attached: boolean;
  snaps: Array<{ name: string; content: number }>;
}
type Model = Map<string, ModelVolume>;

type Op =
  | { kind: 'snapshot'; volume: string; name: string }
  | { kind: 'delete'; volume: string; name: string }
  | { kind: 'revert'; volume: string; name: string }
  | { kind: 'clone'; volume: string; name: string; clone: string }
  | { kind: 'rm'; volume: string }
  | { kind: 'detach'; volume: string }
  | { kind: 'attach'; volume: string }
  | { kind: 'write'; volume: string; byte: number };

function cloneModel(m: Model): Model {
  return new Map(
    [...m].map(([k, v]) => [k, { head: v.head, attached: v.attached, snaps: [...v.snaps] }]),
  );
}

/** Applies `op` to the model; returns false (model unchanged) where Corral must refuse it. */
function apply(m: Model, op: Op): boolean {
  const v = m.get(op.volume);
  if (!v) return false;
  const snap = 'name' in op ? v.snaps.findIndex((s) => s.name === op.name) : -1;
  switch (op.kind) {
    case 'snapshot':
      if (!v.attached || snap >= 0) return false;
      v.snaps.push({ name: op.name, content: v.head });
      return true;
    case 'delete':
      if (!v.attached || snap < 0) return false;
      v.snaps.splice(snap, 1);
      return true;
    case 'revert':
      if (!v.attached || snap < 0) return false;
      v.head = v.snaps[snap]!.content;
      v.snaps.splice(snap + 1);
      return true;
    case 'clone':
      if (!v.attached || snap < 0 || m.has(op.clone)) return false;
      m.set(op.clone, { head: v.snaps[snap]!.content, attached: true, snaps: [] });
      return true;
    case 'rm':
      m.delete(op.volume);
      return true;
    case 'detach':
      v.attached = false;
      return true;
    case 'attach':
      v.attached = true;
      return true;
    case 'write':
      if (!v.attached) return false;
      v.head = op.byte;
      return true;
  }
}

/**
 * Every model reachable by running `ops` in some order, where op i
 * succeeded exactly when `succeeded[i]` says (undefined: either; a write
 * whose connection dropped may or may not have landed).
 */
function outcomes(start: Model, ops: Op[], succeeded: Array<boolean | undefined>): Model[] {
  const out: Model[] = [];
  const walk = (m: Model, left: number[]): void => {
    if (left.length === 0) {
      out.push(m);
      return;
    }
    for (const i of left) {
      const rest = left.filter((j) => j !== i);
      const next = cloneModel(m);
      const ok = apply(next, ops[i]!);
      const want = succeeded[i];
      if (want === undefined || want === ok) walk(ok ? next : cloneModel(m), rest);
      // A write that may have been cut off may also not have landed.
      if (want === undefined && ok) walk(cloneModel(m), rest);
    }
  };
  walk(
    start,
    ops.map((_, i) => i),
  );
  return out;
}

function describeModel(m: Model): string {
  return JSON.stringify(
    [...m]
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([k, v]) => [k, v.head, v.snaps.map((s) => `${s.name}=${s.content}`).join(',')]),
  );
}

async function nbdSession<T>(d: DaemonProcess, name: string, fn: (c: RawNbd) => Promise<T>) {
  const c = await RawNbd.connect({ port: d.nbdPort });
  try {
    await c.greet();
    await c.go(name, { structured: false });
    return await fn(c);
  } finally {
    c.close();
  }
}

async function writePattern(d: DaemonProcess, name: string, byte: number): Promise<void> {
  await nbdSession(d, name, async (c) => {
    c.request(CMD.WRITE, 0, PATTERN, { payload: Buffer.alloc(PATTERN, byte) });
    const w = await c.reply();
    if (w.error !== 0) throw new Error(`write error ${w.error}`);
    c.request(CMD.FLUSH, 0, 0);
    const f = await c.reply();
    if (f.error !== 0) throw new Error(`flush error ${f.error}`);
  });
}

/** The byte filling the first 64 KiB of an export; throws if they are not all the same. */
async function readPattern(d: DaemonProcess, exportName: string): Promise<number> {
  return nbdSession(d, exportName, async (c) => {
    c.request(CMD.READ, 0, PATTERN);
    const r = await c.reply(PATTERN);
    assert.equal(r.error, 0, `read of ${exportName} failed with errno ${r.error}`);
    const byte = r.data[0]!;
    assert.ok(
      r.data.every((b) => b === byte),
      `${exportName}: the first 64 KiB are not one pattern (torn content)`,
    );
    return byte;
  });
}

/** What the daemon holds, attaching every volume on the way (each must attach). */
async function observe(d: DaemonProcess): Promise<Model> {
  const { json } = await d.api_<{ volumes: Array<{ name: string; attached: boolean }> }>(
    'GET',
    '/v1/volumes',
  );
  const m: Model = new Map();
  for (const v of json.volumes) {
    if (!v.attached) {
      const a = await d.api_('POST', `/v1/volumes/${v.name}/attach`, {});
      assert.equal(a.status, 200, `volume ${v.name} attaches: ${JSON.stringify(a.json)}`);
    }
    const s = await d.api_<{ snapshots: Array<{ name: string }> }>(
      'GET',
      `/v1/volumes/${v.name}/snapshots`,
    );
    assert.equal(s.status, 200, `snapshots of ${v.name}: ${JSON.stringify(s.json)}`);
    const snaps: ModelVolume['snaps'] = [];
    for (const snap of s.json.snapshots)
      snaps.push({ name: snap.name, content: await readPattern(d, `${v.name}@${snap.name}`) });
    m.set(v.name, { head: await readPattern(d, v.name), attached: true, snaps });
  }
  return m;
}

/** Sends one operation; true if it was done, false if refused with a clear 404/409. */
async function send(d: DaemonProcess, op: Op): Promise<boolean | undefined> {
  if (op.kind === 'write') {
    try {
      await writePattern(d, op.volume, op.byte);
      return true;
    } catch {
      // Refused at GO (not attached) or cut off by a forced detach: may or may not have landed.
      return undefined;
    }
  }
  const v = encodeURIComponent(op.volume);
  const call = {
    snapshot: () =>
      d.api_('POST', `/v1/volumes/${v}/snapshots`, { name: op.kind === 'snapshot' ? op.name : '' }),
    delete: () => d.api_('DELETE', `/v1/volumes/${v}/snapshots/${'name' in op ? op.name : ''}`),
    revert: () =>
      d.api_('POST', `/v1/volumes/${v}/snapshots/${'name' in op ? op.name : ''}/revert`, {
        discardNewer: true,
      }),
    clone: () =>
      d.api_('POST', '/v1/volumes', {
        name: op.kind === 'clone' ? op.clone : '',
        fromSnapshot: `${op.volume}@${'name' in op ? op.name : ''}`,
      }),
    rm: () => d.api_('DELETE', `/v1/volumes/${v}?force=true`),
    detach: () => d.api_('POST', `/v1/volumes/${v}/detach`, { force: true }),
    attach: () => d.api_('POST', `/v1/volumes/${v}/attach`, {}),
  }[op.kind];
  const r = await call();
  if (r.status >= 200 && r.status < 300) return true;
  const error = (r.json as { error?: { code?: string; message?: string } } | undefined)?.error;
  assert.ok(
    (r.status === 404 || r.status === 409) && typeof error?.message === 'string',
    `${JSON.stringify(op)} answered ${r.status} ${JSON.stringify(r.json)}: refusals are 404/409 with a message`,
  );
  // BUSY is for one thing only: a clone is reading the snapshot (it would lose its source).
  if (error?.code === 'BUSY')
    assert.match(
      error.message ?? '',
      /is reading snapshot/,
      `${JSON.stringify(op)} should wait its turn`,
    );
  return false;
}

describe('concurrent control operations', () => {
  let d: DaemonProcess;

  before(async () => {
    d = await DaemonProcess.start();
  });
  after(async () => {
    await d.cleanup();
  });

  it('a snapshot delete and a revert to it, sent together, leave a volume that serves', async () => {
    for (let i = 0; i < 6; i++) {
      const name = `race${i}`;
      await d.createVolume(name, '16M');
      await writePattern(d, name, 1);
      assert.equal(
        (await d.api_('POST', `/v1/volumes/${name}/snapshots`, { name: 's1' })).status,
        201,
      );
      await writePattern(d, name, 2);
      assert.equal(
        (await d.api_('POST', `/v1/volumes/${name}/snapshots`, { name: 's2' })).status,
        201,
      );
      await writePattern(d, name, 3);
      const start: Model = new Map([
        [
          name,
          {
            head: 3,
            attached: true,
            snaps: [
              { name: 's1', content: 1 },
              { name: 's2', content: 2 },
            ],
          },
        ],
      ]);
      const ops: Op[] = [
        { kind: 'delete', volume: name, name: 's1' },
        { kind: 'revert', volume: name, name: 's1' },
      ];
      const results = await Promise.all(ops.map((op) => send(d, op)));
      const seen = await observe(d);
      const got = describeModel(new Map([[name, seen.get(name)!]]));
      const allowed = outcomes(start, ops, results).map(describeModel);
      assert.ok(
        allowed.includes(got),
        `after ${JSON.stringify(results)}: ${got}, expected one of ${allowed.join(' | ')}`,
      );
    }
  });

  it('random rounds of concurrent operations match a serial order, across a restart', async () => {
    const seed = Number(process.env.CORRAL_SEED ?? 20261203);
    const random = prng(seed);
    const pick = <T>(xs: T[]): T => xs[Math.floor(random() * xs.length)]!;
    let model: Model = await observe(d);
    let clones = 0;
    const rounds = 14;
    for (let round = 0; round < rounds; round++) {
      // Keep two or three volumes with a few snapshots to work on.
      for (const name of ['a', 'b']) {
        if (model.has(name)) continue;
        await d.createVolume(name, '16M');
        await writePattern(d, name, 10 + round);
        model.set(name, { head: 10 + round, attached: true, snaps: [] });
      }
      for (const [name, v] of model) {
        if (!v.attached) {
          assert.equal((await d.api_('POST', `/v1/volumes/${name}/attach`, {})).status, 200);
          v.attached = true;
        }
        if (v.snaps.length < 2) {
          const snap = `r${round}`;
          assert.equal(
            (await d.api_('POST', `/v1/volumes/${name}/snapshots`, { name: snap })).status,
            201,
          );
          v.snaps.push({ name: snap, content: v.head });
        }
      }
      const names = [...model.keys()];
      const snapNames = [
        ...new Set([...model.values()].flatMap((v) => v.snaps.map((s) => s.name))),
      ];
      const ops: Op[] = [];
      const count = 3 + Math.floor(random() * 2);
      while (ops.length < count) {
        const volume = pick(names);
        const kind = pick<Op['kind']>([
          'snapshot',
          'delete',
          'delete',
          'revert',
          'revert',
          'clone',
          'write',
          'write',
          'detach',
          'attach',
          'rm',
        ]);
        const snap = pick(snapNames.length > 0 ? snapNames : ['none']);
        if (kind === 'snapshot') ops.push({ kind, volume, name: `n${round}-${ops.length}` });
        else if (kind === 'delete' || kind === 'revert') ops.push({ kind, volume, name: snap });
        else if (kind === 'clone') ops.push({ kind, volume, name: snap, clone: `c${clones++}` });
        else if (kind === 'write') ops.push({ kind, volume, byte: 100 + round * 8 + ops.length });
        else ops.push({ kind, volume });
      }
      const results = await Promise.all(ops.map((op) => send(d, op)));
      const seen = await observe(d);
      const allowed = outcomes(model, ops, results);
      const got = describeModel(seen);
      assert.ok(
        allowed.some((m) => describeModel(m) === got),
        `seed ${seed} round ${round}: ${JSON.stringify(ops)} → ${JSON.stringify(results)}\n got ${got}\n expected one of ${[...new Set(allowed.map(describeModel))].join('\n  ')}`,
      );
      model = seen;
      // Clones pile up: drop them now and then.
      for (const name of [...model.keys()].filter((n) => n.startsWith('c') && random() < 0.5)) {
        assert.equal((await d.api_('DELETE', `/v1/volumes/${name}?force=true`)).status, 204);
        model.delete(name);
      }
      if (round === Math.floor(rounds / 2)) {
        await d.stop();
        d = await d.restart();
        assert.equal(
          describeModel(await observe(d)),
          describeModel(model),
          'the same after a restart',
        );
      }
    }
  });
});
