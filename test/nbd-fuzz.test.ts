import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import fc from 'fast-check';
import { NbdServer } from '../nbd/server.ts';
import { DaemonProcess } from './helpers/daemon.ts';
import { verifyingFio } from './helpers/fio.ts';
import { MemoryDevice } from './helpers/memory-device.ts';
import { RawNbd } from './helpers/nbd-client.ts';
import { waitFor } from './helpers/run.ts';

/** Inputs per run: ≥ 100k on CI; CORRAL_FUZZ_INPUTS for longer local runs. */
const INPUTS = Number(process.env.CORRAL_FUZZ_INPUTS ?? 100_000);
/** Connections fuzzed at once (one property run sends a batch). */
const BATCH = 64;
const SIZE = 1024 * 1024;

const IHAVEOPT = 0x49484156454f5054n;

function u16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n & 0xffff);
  return b;
}
function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}
function option(code: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(IHAVEOPT, 0);
  h.writeUInt32BE(code >>> 0, 8);
  h.writeUInt32BE(data.length, 12);
  return Buffer.concat([h, data]);
}
function named(name: string, tail: Buffer): Buffer {
  const n = Buffer.from(name);
  return Buffer.concat([u32(n.length), n, tail]);
}
function info(name: string, requests: number[]): Buffer {
  return named(name, Buffer.concat([u16(requests.length), ...requests.map(u16)]));
}
function meta(name: string, queries: string[]): Buffer {
  return named(
    name,
    Buffer.concat([
      u32(queries.length),
      ...queries.map((q) => Buffer.concat([u32(Buffer.byteLength(q)), Buffer.from(q)])),
    ]),
  );
}
function request(
  flags: number,
  type: number,
  offset: bigint,
  length: number,
  payload: Buffer,
): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(0x25609513, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(BigInt(Math.floor(Math.random() * 1e9)), 8);
  h.writeBigUInt64BE(offset, 16);
  h.writeUInt32BE(length >>> 0, 24);
  return Buffer.concat([h, payload]);
}

/**
 * A valid client conversation — greeting flags, options in any order, GO or
 * EXPORT_NAME, then requests of every kind with edge offsets and lengths —
 * which the mutations below then break: flipped bytes, cuts, inserted bytes,
 * 32-bit boundary values written over it.
 */
function conversations(exportName: string, size: number): fc.Arbitrary<Buffer> {
  const name = fc.constantFrom(exportName, `${exportName}@snap`, 'nope', '');
  const opt = fc.oneof(
    fc.constant(option(8)),
    name.map((n) => option(10, meta(n, ['base:allocation']))),
    name.map((n) => option(9, meta(n, []))),
    fc.constant(option(3)),
    name.map((n) => option(6, info(n, [0, 1, 2, 3]))),
    fc.constant(option(5)),
    fc.integer({ min: 0, max: 0xffffffff }).map((o) => option(o)),
  );
  const finish = fc.oneof(
    fc.constant(option(7, info(exportName, []))),
    fc.constant(option(1, Buffer.from(exportName))),
    fc.constant(option(2)),
  );
  const offset = fc.oneof(
    fc.constantFrom(0n, 4096n, BigInt(size - 4096), BigInt(size), 2n ** 63n, 2n ** 64n - 1n),
    fc.bigInt({ min: 0n, max: BigInt(size) }),
    fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
  );
  const length = fc.oneof(
    fc.constantFrom(0, 1, 512, 4096, 65536, 32 * 1024 * 1024, 32 * 1024 * 1024 + 1, 0xffffffff),
    fc.nat({ max: 2 * 65536 }),
  );
  const req = fc
    .record({
      type: fc.oneof(fc.integer({ min: 0, max: 8 }), fc.integer({ min: 0, max: 0xffff })),
      flags: fc.oneof(fc.constantFrom(0, 1, 2, 4, 8, 15), fc.integer({ min: 0, max: 0xffff })),
      offset,
      length,
    })
    .map(({ type, flags, offset, length }) =>
      request(
        flags,
        type,
        offset,
        length,
        type === 1 ? Buffer.alloc(Math.min(length, 65536), 0x5a) : Buffer.alloc(0),
      ),
    );
  const valid = fc
    .tuple(
      fc.constantFrom(3, 1, 2, 0, 0xffffffff),
      fc.array(opt, { maxLength: 6 }),
      finish,
      fc.array(req, { maxLength: 8 }),
    )
    .map(([flags, options, end, requests]) =>
      Buffer.concat([u32(flags), ...options, end, ...requests]),
    );
  const mutation = fc.record({
    kind: fc.integer({ min: 0, max: 3 }),
    at: fc.nat(),
    byte: fc.integer({ min: 0, max: 255 }),
    word: fc.constantFrom(0, 1, 0x7fffffff, 0x80000000, 0xffffffff, size),
  });
  return fc.tuple(valid, fc.array(mutation, { maxLength: 3 })).map(([bytes, mutations]) => {
    let b = Buffer.from(bytes);
    for (const m of mutations) {
      const at = b.length === 0 ? 0 : m.at % b.length;
      if (m.kind === 0 && b.length > 0) b[at] = b[at]! ^ (m.byte || 1);
      else if (m.kind === 1) b = b.subarray(0, at);
      else if (m.kind === 2)
        b = Buffer.concat([b.subarray(0, at), Buffer.from([m.byte]), b.subarray(at)]);
      else if (b.length >= at + 4) b.writeUInt32BE(m.word >>> 0, at);
    }
    return b;
  });
}

/** Sends one input on a new connection and half-closes; resolves when the server has closed. */
function sendOne(connect: () => net.Socket, input: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = connect();
    const timer = setTimeout(() => {
      socket.destroy();
      reject(
        new Error(
          `the server kept a finished connection open (input ${input.toString('hex').slice(0, 200)})`,
        ),
      );
    }, 10_000);
    socket.on('error', () => undefined); // a reset is an answer too
    socket.on('data', () => undefined);
    socket.once('connect', () => socket.end(input));
    socket.once('close', () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

describe('NBD fuzzing: mutated handshakes and requests', () => {
  let dir: string;
  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'corral-fuzz-'));
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  it(`the server answers or closes for every input (${INPUTS} inputs), and serves a good client after`, async () => {
    const device = new MemoryDevice(SIZE);
    let warnings = 0;
    const server = new NbdServer({
      exports: { names: () => ['v'], lookup: (n) => (n === 'v' ? device : undefined) },
      log: { warn: () => warnings++ },
      handshakeTimeoutMs: 5000,
      maxConnections: 4 * BATCH,
    });
    const socketPath = path.join(dir, 'nbd.sock');
    await server.listenUnix(socketPath);
    let sent = 0;
    try {
      await fc.assert(
        fc.asyncProperty(
          fc.array(conversations('v', SIZE), { minLength: BATCH, maxLength: BATCH }),
          async (batch) => {
            await Promise.all(batch.map((input) => sendOne(() => net.connect(socketPath), input)));
            sent += batch.length;
          },
        ),
        {
          numRuns: Math.ceil(INPUTS / BATCH),
          ...(process.env.CORRAL_SEED ? { seed: Number(process.env.CORRAL_SEED) } : {}),
        },
      );
      assert.ok(sent >= INPUTS, `${sent} inputs`);
      assert.ok(warnings > 0, 'the server noticed the broken inputs');
      await waitFor('every fuzzed connection to be gone', () =>
        server.connectionsTo('v') === 0 ? true : undefined,
      );
      // A well-behaved client after all that: verified writes and reads.
      const good = await RawNbd.connect({ path: socketPath });
      await good.greet();
      assert.equal(await good.go('v'), BigInt(SIZE));
      const data = randomBytes(65536);
      const w = good.request(1, 8192, data.length, { payload: data });
      assert.equal((await good.reply()).cookie, w);
      const r = good.request(0, 8192, data.length);
      const back = await good.reply(data.length);
      assert.equal(back.cookie, r);
      assert.ok(back.data.equals(data));
      good.close();
    } finally {
      await server.close();
    }
  });

  it('a real daemon stays up under fuzzed connections while fio verifies its writes beside them', async () => {
    const d = await DaemonProcess.start({ args: ['--nbd-handshake-timeout', '2000'] });
    try {
      await d.createVolume('steady', '64M');
      await d.createVolume('f', '1M');
      const fio = verifyingFio(d.uri('steady'), '64m');
      let sent = 0;
      await fc.assert(
        fc.asyncProperty(
          fc.array(conversations('f', SIZE), { minLength: 16, maxLength: 16 }),
          async (batch) => {
            await Promise.all(
              batch.map((input) => sendOne(() => net.connect(d.nbdPort, '127.0.0.1'), input)),
            );
            sent += batch.length;
          },
        ),
        { numRuns: 200 },
      );
      const verified = await fio;
      assert.equal(verified.code, 0, verified.stdout + verified.stderr);
      assert.ok(sent >= 3200);
      assert.equal((await d.api_('GET', '/v1/health')).status, 200);
      assert.equal(d.child.exitCode, null, 'the daemon is alive');
    } finally {
      await d.cleanup();
    }
  });
});
