/**
 * The readers that choose where a socket's bytes land (common/direct-socket.ts),
 * over real TCP connections: the NBD server's request reader (nbd/byte-queue.ts)
 * and the replica stream's frame reader (replication/wire.ts). Payloads read in
 * place, small reads out of slabs, slab boundaries, pipelining, backpressure, a
 * sender that stops mid-payload, a bad frame. Every message is checked by
 * SHA-256 against what was sent.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import * as net from 'node:net';
import { describe, it } from 'node:test';
import { BufferPool } from '../common/buffer-pool.ts';
import { adoptDirect } from '../common/direct-socket.ts';
import { ByteQueue } from '../nbd/byte-queue.ts';
import {
  DirectFrameReader,
  MAX_FRAME_BYTES,
  Op,
  parseRequest,
  requestHeader,
} from '../replication/wire.ts';

interface Served {
  queue: ByteQueue;
  socket: net.Socket;
  client: net.Socket;
  close: () => Promise<void>;
}

async function serve(highWaterBytes: number): Promise<Served> {
  let accepted!: (s: { queue: ByteQueue; socket: net.Socket }) => void;
  const got = new Promise<{ queue: ByteQueue; socket: net.Socket }>((r) => (accepted = r));
  const server = net.createServer({ pauseOnConnect: true }, (raw) =>
    accepted(ByteQueue.attach(raw, highWaterBytes)),
  );
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as net.AddressInfo;
  const client = net.connect(port, '127.0.0.1');
  client.setNoDelay(true);
  const { queue, socket } = await got;
  return {
    queue,
    socket,
    client,
    close: async () => {
      client.destroy();
      socket.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

function sha(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}

/** A deterministic PRNG, so that a failure can be replayed. */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

/** Sizes around the reader's thresholds (64 KiB in place, 1 MiB slabs) and far from them. */
function messageSizes(count: number, seed: number): number[] {
  const r = rng(seed);
  const special = [1, 28, 4095, 4096, 65535, 65536, 65537, 1048576, 1048576 + 28, 2 * 1048576 + 7];
  return Array.from({ length: count }, () =>
    r() < 0.3 ? special[Math.floor(r() * special.length)]! : Math.floor(r() ** 3 * 3 * 1048576) + 1,
  );
}

/** Sends [u32 length][payload] messages, cut at random points into writes of random sizes. */
async function sendAll(client: net.Socket, messages: Buffer[], seed: number): Promise<void> {
  const r = rng(seed);
  const stream = Buffer.concat(
    messages.flatMap((m) => {
      const h = Buffer.alloc(4);
      h.writeUInt32BE(m.length);
      return [h, m];
    }),
  );
  let at = 0;
  while (at < stream.length) {
    const n = Math.min(stream.length - at, Math.floor(r() ** 2 * 3 * 1048576) + 1);
    if (!client.write(stream.subarray(at, at + n))) {
      await new Promise<void>((resolve) => client.once('drain', resolve));
    }
    at += n;
    if (r() < 0.1) await new Promise<void>((resolve) => setImmediate(resolve));
  }
}

describe('NBD request reader', () => {
  it('delivers every byte of pipelined messages of every size, in place or from slabs', async () => {
    for (const seed of [1, 2, 3]) {
      const s = await serve(8 * 1048576);
      try {
        const messages = messageSizes(120, seed).map((n) => randomBytes(n));
        const pool = new BufferPool(64 * 1048576);
        const sending = sendAll(s.client, messages, seed);
        for (const [i, m] of messages.entries()) {
          const header = await s.queue.read(4);
          assert.equal(header.readUInt32BE(0), m.length, `seed ${seed} message ${i} header`);
          const payload = await s.queue.read(m.length, (n) => pool.acquire(n));
          assert.equal(sha(payload), sha(m), `seed ${seed} message ${i} (${m.length} bytes)`);
          // Reused buffers must not disturb payloads handed out earlier or later.
          pool.release(payload);
        }
        await sending;
      } finally {
        await s.close();
      }
    }
  });

  it('reads a stream of 1 MiB payloads in place, a few KiB of each through a slab', async () => {
    const s = await serve(8 * 1048576);
    try {
      const messages = Array.from({ length: 64 }, () => randomBytes(1048576));
      const pool = new BufferPool(64 * 1048576);
      const sending = sendAll(s.client, messages, 5);
      for (const m of messages) {
        await s.queue.read(4);
        const payload = await s.queue.read(m.length, (n) => pool.acquire(n));
        assert.equal(sha(payload), sha(m));
        pool.release(payload);
      }
      await sending;
      // Where the read after a payload lands is fixed before the next header is parsed: at
      // 64 KiB per read, 128 KiB of each MiB went through a slab and was copied over.
      const perMessage = s.queue.slabBytes / messages.length;
      assert.ok(perMessage <= 16 * 1024, `${perMessage} bytes of each payload through a slab`);
    } finally {
      await s.close();
    }
  });

  it('keeps unread bytes intact while payloads go back to the pool and are reused', async () => {
    const s = await serve(64 * 1048576);
    try {
      const messages = messageSizes(40, 9).map((n) => randomBytes(n));
      const total = messages.reduce((a, m) => a + m.length + 4, 0);
      assert.ok(total < 64 * 1048576, 'everything fits under the high-water mark');
      // All of it waits in slabs before the first read: payloads come out as views of them.
      await sendAll(s.client, messages, 9);
      const deadline = Date.now() + 10_000;
      while (s.queue.buffered < total && Date.now() < deadline) {
        await new Promise<void>((r) => setTimeout(r, 10));
      }
      assert.equal(s.queue.buffered, total);
      const pool = new BufferPool(64 * 1048576);
      for (const [i, m] of messages.entries()) {
        await s.queue.read(4);
        const payload = await s.queue.read(m.length, (n) => pool.acquire(n));
        assert.equal(sha(payload), sha(m), `message ${i}`);
        // The next request reuses what went back. Had a view into a slab gone back, this
        // would overwrite messages still waiting unread in that slab.
        pool.release(payload);
        pool.acquire(m.length).fill(0xee);
      }
    } finally {
      await s.close();
    }
  });

  it('stops reading the socket past the high-water mark and resumes when drained', async () => {
    const highWater = 256 * 1024;
    const s = await serve(highWater);
    try {
      const data = randomBytes(8 * 1048576);
      const sending = new Promise<void>((resolve) => s.client.write(data, () => resolve()));
      // Nobody reads: the queue must stop near the mark instead of taking all 8 MiB.
      const deadline = Date.now() + 10_000;
      let last = -1;
      for (;;) {
        await new Promise<void>((r) => setTimeout(r, 50)); // lets the kernel fill both buffers
        if (s.queue.buffered === last || Date.now() > deadline) break;
        last = s.queue.buffered;
      }
      assert.ok(s.queue.buffered > 0, 'something arrived');
      assert.ok(
        s.queue.buffered <= highWater + 1048576,
        `held ${s.queue.buffered} bytes against a mark of ${highWater}`,
      );
      const back = await s.queue.read(data.length);
      assert.equal(sha(back), sha(data));
      await sending;
    } finally {
      await s.close();
    }
  });

  it('fails a read whose payload the sender never finishes, and then every later read', async () => {
    const s = await serve(8 * 1048576);
    try {
      const reading = s.queue.read(1048576);
      s.client.end(randomBytes(300 * 1024));
      await assert.rejects(reading, /connection closed/);
      await assert.rejects(s.queue.read(4), /connection closed/);
    } finally {
      await s.close();
    }
  });
});

describe('replica stream frame reader', () => {
  async function frameServer(): Promise<{
    client: net.Socket;
    frames: Array<{ frame: Buffer; pooled: boolean }>;
    errors: Error[];
    pooledBuffers: WeakSet<object>;
    reader: () => DirectFrameReader;
    arrived: (n: number) => Promise<void>;
    close: () => Promise<void>;
  }> {
    const frames: Array<{ frame: Buffer; pooled: boolean }> = [];
    const errors: Error[] = [];
    const pooledBuffers = new WeakSet<object>();
    let wake = (): void => undefined;
    let socket: net.Socket | undefined;
    let reader: DirectFrameReader | undefined;
    const server = net.createServer({ pauseOnConnect: true }, (raw) => {
      reader = new DirectFrameReader(
        (n) => {
          const b = Buffer.alloc(n);
          pooledBuffers.add(b);
          return b;
        },
        (frame, pooled) => {
          frames.push({ frame, pooled });
          wake();
        },
        (err) => {
          errors.push(err);
          wake();
        },
      );
      socket = adoptDirect(raw, reader);
      assert.ok(socket, 'Node can read this socket in place');
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
    await new Promise<void>((r) => client.once('connect', r));
    return {
      client,
      frames,
      errors,
      pooledBuffers,
      reader: () => reader!,
      arrived: async (n) => {
        const deadline = Date.now() + 20_000;
        while (frames.length < n && errors.length === 0) {
          assert.ok(Date.now() < deadline, `only ${frames.length} of ${n} frames arrived`);
          await new Promise<void>((r) => {
            wake = r;
            setTimeout(r, 100);
          });
        }
      },
      close: async () => {
        client.destroy();
        socket?.destroy();
        await new Promise<void>((r) => server.close(() => r()));
      },
    };
  }

  it('hands out every frame whole, large ones read in place into acquired buffers', async () => {
    const s = await frameServer();
    try {
      const messages = messageSizes(150, 7).map((n) => randomBytes(n));
      await sendAll(s.client, messages, 7);
      await s.arrived(messages.length);
      assert.deepEqual(s.errors, []);
      s.frames.forEach(({ frame, pooled }, i) => {
        assert.equal(sha(frame), sha(messages[i]!), `frame ${i} (${messages[i]!.length} bytes)`);
        assert.equal(pooled, s.pooledBuffers.has(frame), `frame ${i}: pooled flag`);
      });
      assert.ok(
        s.frames.some((f) => f.pooled && f.frame.length >= 1048576),
        'large frames were read into acquired buffers',
      );
    } finally {
      await s.close();
    }
  });

  it('reads a stream of 1 MiB frames in place, a few KiB of each through a slab', async () => {
    const s = await frameServer();
    try {
      const messages = Array.from({ length: 64 }, () => randomBytes(1048576));
      await sendAll(s.client, messages, 11);
      await s.arrived(messages.length);
      s.frames.forEach(({ frame }, i) => assert.equal(sha(frame), sha(messages[i]!)));
      // At 64 KiB per read, the read after each frame took the next one's first 64 KiB.
      const perFrame = s.reader().slabBytes / messages.length;
      assert.ok(perFrame <= 16 * 1024, `${perFrame} bytes of each frame through a slab`);
    } finally {
      await s.close();
    }
  });

  it('refuses a frame longer than the limit instead of waiting for it', async () => {
    const s = await frameServer();
    try {
      const h = Buffer.alloc(4);
      h.writeUInt32BE(MAX_FRAME_BYTES + 1);
      s.client.write(Buffer.concat([h, randomBytes(100_000)]));
      await s.arrived(1);
      assert.equal(s.frames.length, 0);
      assert.match(s.errors[0]?.message ?? '', /too large/);
    } finally {
      await s.close();
    }
  });

  it('checksums a payload once per turn, and anew once its bytes change', async () => {
    const payload = randomBytes(1024 * 1024);
    const frame = (h: Buffer) => Buffer.concat([h, payload]).subarray(4);
    const first = requestHeader(Op.WRITE, 1, 0, 0, payload.length, payload);
    const second = requestHeader(Op.WRITE, 2, 0, 0, payload.length, payload);
    assert.equal(first.readUInt32BE(22), second.readUInt32BE(22));
    parseRequest(frame(second));
    // The next turn: a pooled buffer refilled with other bytes must not reuse the memo.
    await new Promise(setImmediate);
    payload[12345] = (payload[12345] ?? 0) ^ 0xff;
    const third = requestHeader(Op.WRITE, 3, 0, 0, payload.length, payload);
    assert.notEqual(third.readUInt32BE(22), first.readUInt32BE(22));
    assert.equal(parseRequest(frame(third)).payload.length, payload.length);
    // Within a turn, another view of the same memory (a different length) is checksummed itself.
    const half = payload.subarray(0, payload.length / 2);
    const h = requestHeader(Op.WRITE, 4, 0, 0, half.length, half);
    parseRequest(Buffer.concat([h, half]).subarray(4));
  });
});
