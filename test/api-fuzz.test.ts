import assert from 'node:assert/strict';
import { it, describe } from 'node:test';
import fc from 'fast-check';
import { DaemonProcess } from './helpers/daemon.ts';
import { verifyingFio } from './helpers/fio.ts';

/** Requests per run; CORRAL_FUZZ_REQUESTS for longer local runs. */
const REQUESTS = Number(process.env.CORRAL_FUZZ_REQUESTS ?? 3000);

/** Every route of the API, `:p` standing for a path parameter the fuzzer fills. */
const ROUTES: Array<[string, string]> = [
  ['GET', '/v1/volumes'],
  ['POST', '/v1/volumes'],
  ['GET', '/v1/volumes/:p'],
  ['DELETE', '/v1/volumes/:p'],
  ['GET', '/v1/volumes/:p/stats'],
  ['POST', '/v1/volumes/:p/attach'],
  ['POST', '/v1/volumes/:p/detach'],
  ['GET', '/v1/volumes/:p/snapshots'],
  ['POST', '/v1/volumes/:p/snapshots'],
  ['DELETE', '/v1/volumes/:p/snapshots/:p'],
  ['POST', '/v1/volumes/:p/snapshots/:p/revert'],
  ['GET', '/v1/volumes/:p/replicas'],
  ['DELETE', '/v1/volumes/:p/replicas/:p'],
  ['POST', '/v1/volumes/:p/verify'],
  ['POST', '/v1/volumes/:p/scrub'],
  ['GET', '/v1/node'],
  ['GET', '/v1/nodes'],
  ['POST', '/v1/nodes/:p/cordon'],
  ['POST', '/v1/nodes/:p/uncordon'],
  ['POST', '/v1/nodes/:p/drain'],
  ['GET', '/v1/operations'],
  ['GET', '/v1/operations/:p'],
  ['GET', '/v1/backups'],
  ['POST', '/v1/backups'],
  ['POST', '/v1/backups/gc'],
  ['GET', '/v1/backups/:p'],
  ['DELETE', '/v1/backups/:p'],
  ['POST', '/v1/restores'],
  ['GET', '/v1/jobs'],
  ['POST', '/v1/jobs'],
  ['DELETE', '/v1/jobs/:p'],
  ['GET', '/v1/events'],
  ['GET', '/v1/tokens'],
  ['POST', '/v1/tokens'],
  ['DELETE', '/v1/tokens/:p'],
  ['POST', '/v1/replicas'],
  ['DELETE', '/v1/replicas/:p'],
  ['POST', '/v1/peer/volumes/:p/release'],
  ['GET', '/metrics'],
  ['PATCH', '/v1/volumes/:p'],
];

/** Names a user should never send: traversal, NULs, huge, unicode, look-alikes of real ones. */
const hostile = fc
  .oneof(
    fc.constantFrom(
      '..',
      '../../etc/passwd',
      '%00',
      '\u0000',
      'a'.repeat(5000),
      '<script>alert(1)</script>',
      'x@y@z',
      'vol@',
      '@snap',
      ' ',
      'CON',
      'a/b',
      '%2e%2e',
      'host-admin',
      '-1',
      '1e309',
      'file:///etc',
      's3://b/p?endpoint=http://169.254.169.254',
    ),
    fc.string({ maxLength: 80 }),
    fc.string({ unit: 'grapheme', maxLength: 40 }),
  )
  // The volume fio is verifying, and the token the fuzzer calls with, are left alone.
  .filter((n) => n !== 'steady' && n !== 'host-admin');

const value = fc.oneof(
  hostile,
  fc.constantFrom(
    1e309,
    -1,
    0,
    2 ** 53,
    2 ** 64,
    -0,
    1.5,
    '10G',
    '999999999999P',
    '-5M',
    '1M',
    'nbd',
    'fuse',
    'auto',
    'admin',
    'snapshot',
    'backup',
    '* * * * *',
    true,
    null,
  ),
  fc.jsonValue({ maxDepth: 2 }),
);

const body = fc.oneof(
  fc
    .record(
      {
        name: value,
        size: value,
        replicas: value,
        frontend: value,
        fromSnapshot: value,
        failover: value,
        nbdAllow: value,
        volume: value,
        snapshot: value,
        target: value,
        backup: value,
        cron: value,
        task: value,
        retain: value,
        role: value,
        force: value,
        discardNewer: value,
        sizeBytes: value,
        engine: value,
        epoch: value,
        node: value,
      },
      { requiredKeys: [] },
    )
    .map((o) => JSON.stringify(o)),
  fc.jsonValue({ maxDepth: 3 }).map((j) => JSON.stringify(j)),
  fc.string({ maxLength: 200 }),
  fc.constantFrom('{', '[]', 'null', '"x"', '{"size":1e999}', '\u0000', '{"__proto__":{"x":1}}'),
);

const query = fc
  .record(
    { force: value, wait: value, target: value, volume: value, since: value },
    { requiredKeys: [] },
  )
  .map((q) => {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(q))
      params.set(k, typeof v === 'string' ? v : JSON.stringify(v));
    const s = params.toString();
    return s ? `?${s}` : '';
  });

const call = fc.record({
  route: fc.constantFrom(...ROUTES),
  params: fc.array(hostile, { minLength: 2, maxLength: 2 }),
  encode: fc.boolean(),
  body: fc.option(body, { nil: undefined }),
  query,
});

describe('API fuzzing: every route, malformed bodies, huge numbers, hostile names', () => {
  it(`answers each of ${REQUESTS} requests with a client error or a result, never a crash, while fio verifies beside it`, async () => {
    const d = await DaemonProcess.start();
    try {
      await d.createVolume('steady', '64M');
      const fio = verifyingFio(d.uri('steady'), '64m');
      const failures: string[] = [];
      let sent = 0;
      await fc.assert(
        fc.asyncProperty(
          call,
          async ({ route: [method, template], params, encode, body, query }) => {
            let i = 0;
            const path = template.replace(/:p/g, () => {
              const p = params[i++]!;
              return encode ? encodeURIComponent(p) : p.replace(/[?#]/g, '');
            });
            let status: number;
            let text: string;
            try {
              const response = await fetch(d.api + path + query, {
                method,
                headers: {
                  authorization: `Bearer ${d.token}`,
                  ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
                },
                ...(body !== undefined && method !== 'GET' ? { body } : {}),
                signal: AbortSignal.timeout(30_000),
              });
              status = response.status;
              text = await response.text();
            } catch (err) {
              // A URL fetch itself refuses to build is not a request the daemon saw.
              if (
                err instanceof TypeError &&
                !(err.cause instanceof Error && err.cause.message.includes('ECONN'))
              )
                return;
              failures.push(`${method} ${path}: ${String(err)}`);
              return;
            }
            sent++;
            if (status >= 500 && status !== 507)
              failures.push(
                `${method} ${path}${query} ${body ?? ''}: ${status} ${text.slice(0, 300)}`,
              );
            else if (status >= 400 && path !== '/metrics') {
              const parsed = JSON.parse(text) as { error?: { code?: unknown; message?: unknown } };
              if (
                typeof parsed.error?.code !== 'string' ||
                typeof parsed.error.message !== 'string'
              )
                failures.push(
                  `${method} ${path}: ${status} without an error body: ${text.slice(0, 200)}`,
                );
            }
          },
        ),
        {
          numRuns: REQUESTS,
          ...(process.env.CORRAL_SEED ? { seed: Number(process.env.CORRAL_SEED) } : {}),
        },
      );
      assert.deepEqual(failures.slice(0, 10), []);
      assert.ok(sent > REQUESTS * 0.9, `${sent} requests reached the daemon`);
      const verified = await fio;
      assert.equal(verified.code, 0, verified.stdout + verified.stderr);
      assert.equal((await d.api_('GET', '/v1/health')).status, 200);
    } finally {
      await d.cleanup();
    }
  });
});
