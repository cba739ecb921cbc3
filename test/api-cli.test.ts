import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as http2 from 'node:http2';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ROUTE_DOCS } from '../daemon/openapi.ts';
import { DaemonProcess } from './helpers/daemon.ts';
import { RawNbd } from './helpers/nbd-client.ts';
import { duBytes, mustRun, waitFor } from './helpers/run.ts';

interface ApiErrorBody {
  error: { code: string; message: string };
}

describe('control API and CLI', () => {
  let daemon: DaemonProcess;
  before(async () => {
    daemon = await DaemonProcess.start();
  });
  after(() => daemon.cleanup());

  it('creates, lists and gets volumes through the CLI, as tables and as JSON', async () => {
    const created = await daemon.cli(['volume', 'create', 'db1', '--size', '10G', '--json']);
    assert.equal(created.code, 0, created.stderr);
    const volume = JSON.parse(created.stdout) as { name: string; sizeBytes: number; state: string };
    assert.equal(volume.name, 'db1');
    assert.equal(volume.sizeBytes, 10 * 1024 ** 3);
    assert.equal(volume.state, 'attached');
    const table = await daemon.cli(['volume', 'ls']);
    assert.match(table.stdout, /^NAME\s+SIZE/m);
    assert.match(table.stdout, /^db1\s+10GiB\s+1\/1\s+nbd\s+attached/m);
    const list = JSON.parse((await daemon.cli(['volume', 'ls', '--json'])).stdout) as Array<{
      name: string;
    }>;
    assert.deepEqual(
      list.map((v) => v.name),
      ['db1'],
    );
    const get = JSON.parse((await daemon.cli(['volume', 'get', 'db1', '--json'])).stdout) as {
      replicas: Array<{ mode: string }>;
    };
    assert.deepEqual(
      get.replicas.map((r) => r.mode),
      ['RW'],
    );
  });

  it('answers bad bodies and names with clear JSON errors', async () => {
    const cases: Array<[unknown, number, string]> = [
      ['{not json', 400, 'INVALID_ARGUMENT'],
      [[1, 2], 400, 'INVALID_ARGUMENT'],
      [{ name: 'ok1' }, 400, 'INVALID_SIZE'],
      [{ name: 'ok1', size: 'lots' }, 400, 'INVALID_SIZE'],
      [{ name: 'ok1', size: '1000' }, 400, 'INVALID_SIZE'], // not a multiple of 4096
      [{ name: 'ok1', size: '-4K' }, 400, 'INVALID_SIZE'],
      [{ name: 'ok1', size: '100T' }, 400, 'INVALID_SIZE'],
      [{ name: 'Bad Name', size: '1G' }, 400, 'INVALID_NAME'],
      [{ name: 'a@b', size: '1G' }, 400, 'INVALID_NAME'],
      [{ name: '../etc', size: '1G' }, 400, 'INVALID_NAME'],
      [{ name: 'ok1', size: '1G', replicas: 0 }, 400, 'INVALID_ARGUMENT'],
      [{ name: 'ok1', size: '1G', frontend: 'iscsi' }, 400, 'INVALID_ARGUMENT'],
      [{ name: 'db1', size: '1G' }, 409, 'ALREADY_EXISTS'],
    ];
    for (const [body, status, code] of cases) {
      const r = await daemon.api_<ApiErrorBody>(
        'POST',
        '/v1/volumes',
        typeof body === 'string' ? body : JSON.stringify(body),
      );
      assert.equal(r.status, status, JSON.stringify(body));
      assert.equal(r.json.error.code, code, JSON.stringify(body));
      assert.ok(r.json.error.message.length > 10, 'a message a person can read');
    }
    const missing = await daemon.api_<ApiErrorBody>('GET', '/v1/volumes/nope');
    assert.equal(missing.status, 404);
    assert.equal(missing.json.error.code, 'NOT_FOUND');
    const route = await daemon.api_<ApiErrorBody>('GET', '/v1/nothing-here');
    assert.equal(route.status, 404);
    const list = await daemon.api_<{ volumes: unknown[] }>('GET', '/v1/volumes');
    assert.equal(list.json.volumes.length, 1, 'no bad request created anything');
  });

  it('refuses large bodies with 413 and echoes no large input back, in bounded memory', async () => {
    const rssBytes = async () => {
      const status = await fs.promises.readFile(`/proc/${daemon.child.pid}/status`, 'utf8');
      return Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1]) * 1024;
    };
    const before = await rssBytes();
    const big = JSON.stringify({ name: 'x'.repeat(64 * 1024 * 1024), size: '1G' });
    for (let i = 0; i < 4; i++) {
      const r = await daemon.api_<ApiErrorBody>('POST', '/v1/volumes', big);
      assert.equal(r.status, 413);
      assert.equal(r.json.error.code, 'TOO_LARGE');
    }
    // Without a Content-Length the limit holds too: the body is cut off as it streams in.
    const chunk = new Uint8Array(1024 * 1024).fill(0x20);
    let sent = 0;
    const streamed = await fetch(`${daemon.api}/v1/volumes`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${daemon.token}` },
      body: new ReadableStream({
        pull(controller) {
          if (sent++ < 64) controller.enqueue(chunk);
          else controller.close();
        },
      }),
      duplex: 'half',
    });
    assert.equal(streamed.status, 413);
    assert.equal(((await streamed.json()) as ApiErrorBody).error.code, 'TOO_LARGE');
    const grown = (await rssBytes()) - before;
    assert.ok(grown < 96 * 1024 * 1024, `RSS grew by ${grown} bytes for refused bodies`);
    // A long name is named in the error, not echoed whole.
    const long = await daemon.api_<ApiErrorBody>('POST', '/v1/volumes', {
      name: 'y'.repeat(500_000),
      size: '1G',
    });
    assert.equal(long.status, 400);
    assert.equal(long.json.error.code, 'INVALID_NAME');
    assert.ok(long.json.error.message.length < 400, long.json.error.message.slice(0, 500));
    assert.match(long.json.error.message, /500002 characters/);
  });

  it('the CLI reports API errors and usage errors with non-zero exits', async () => {
    const r = await daemon.cli(['volume', 'get', 'nope']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /No volume named nope \(NOT_FOUND\)/);
    const usage = await daemon.cli(['volume', 'create', 'x']);
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /--size/);
  });

  it('speaks HTTP/2 cleartext to peers on the same port', async () => {
    const session = http2.connect(daemon.api);
    try {
      const body = await new Promise<string>((resolve, reject) => {
        const req = session.request({ ':path': '/v1/health' });
        let data = '';
        req.on('data', (d: Buffer) => (data += d.toString()));
        req.on('end', () => resolve(data));
        req.on('error', reject);
      });
      assert.equal((JSON.parse(body) as { ok: boolean }).ok, true);
    } finally {
      session.close();
    }
  });

  it('refuses to detach a volume in use, detaches with --force, and reattaches', async () => {
    const client = await RawNbd.connect({ port: daemon.nbdPort });
    await client.greet();
    await client.go('db1');
    const busy = await daemon.cli(['volume', 'detach', 'db1']);
    assert.equal(busy.code, 1);
    assert.match(busy.stderr, /in use by 1 NBD connection/);
    const forced = await daemon.cli(['volume', 'detach', 'db1', '--force', '--json']);
    assert.equal(forced.code, 0, forced.stderr);
    assert.equal((JSON.parse(forced.stdout) as { state: string }).state, 'detached');
    await client.waitClosed();
    const list = await mustRun('nbdinfo', ['--list', '--json', `nbd://${daemon.nbd}`]);
    assert.equal(
      (JSON.parse(list.stdout) as { exports: unknown[] }).exports.length,
      0,
      'a detached volume is not exported',
    );
    assert.equal((await daemon.cli(['volume', 'attach', 'db1'])).code, 0);
    await mustRun('nbdinfo', [daemon.uri('db1')]);
  });

  it('volume rm frees the space', async () => {
    await daemon.createVolume('big', '256M');
    await mustRun('qemu-io', ['-f', 'raw', daemon.uri('big'), '-c', 'write -P 0x11 0 128M']);
    const replicas = path.join(daemon.dataDir, 'replicas');
    const before = await duBytes(replicas);
    assert.ok(before >= 128 * 1024 * 1024, `128 MiB on disk, saw ${before}`);
    const rm = await daemon.cli(['volume', 'rm', 'big']);
    assert.equal(rm.code, 0, rm.stderr);
    const afterRm = await duBytes(replicas);
    assert.ok(before - afterRm >= 128 * 1024 * 1024, `freed ${before - afterRm} bytes`);
    assert.equal((await daemon.api_('GET', '/v1/volumes/big')).status, 404);
    assert.equal(fs.readdirSync(replicas).length, 1, 'only db1 remains');
  });

  it('describes every route it serves in /v1/openapi.json and /docs, with the role each needs', async () => {
    const r = await fetch(`${daemon.api}/v1/openapi.json`); // no token: the description is public
    assert.equal(r.status, 200);
    const doc = (await r.json()) as {
      openapi: string;
      paths: Record<string, Record<string, { summary: string; description: string }>>;
    };
    assert.equal(doc.openapi, '3.1.0');
    const served = Object.entries(doc.paths).flatMap(([p, ms]) =>
      Object.entries(ms).map(([m, op]) => ({ key: `${m.toUpperCase()} ${p}`, op })),
    );
    assert.deepEqual(
      served.filter(({ op }) => op.summary === '').map(({ key }) => key),
      [],
      'a served route without a description in daemon/openapi.ts',
    );
    const documented = Object.keys(ROUTE_DOCS)
      .filter((k) => !k.includes('/debug/'))
      .map((k) => k.replace(/:([a-z]+)/gi, '{$1}'));
    assert.deepEqual(
      documented.filter((k) => !served.some((s) => s.key === k)),
      [],
      'a description of a route that is not served',
    );
    const create = doc.paths['/v1/volumes']!.post!;
    assert.match(create.description, /operator role/);
    assert.match(doc.paths['/v1/volumes/{name}']!.delete!.description, /admin role/);
    // The schemas are the validation: a body they refuse gets the error format, naming why.
    for (const [body, why] of [
      [{ name: 'x', size: '1M', bogus: 1 }, /unknown field "bogus"/],
      [{ name: 5, size: '1M' }, /field name must be string/],
      [{ size: '1M' }, /must have required property 'name'/],
      [{ name: 'x', size: '1M', replicas: 'three' }, /field replicas must be integer/],
    ] as const) {
      const r = await daemon.api_<ApiErrorBody>('POST', '/v1/volumes', body);
      assert.equal(r.status, 400, JSON.stringify(body));
      assert.equal(r.json.error.code, 'INVALID_ARGUMENT');
      assert.match(r.json.error.message, why);
    }
    assert.equal((await daemon.api_('GET', '/v1/volumes/x')).status, 404);
    const page = await fetch(`${daemon.api}/docs`);
    assert.equal(page.status, 200);
    assert.match(await page.text(), /<code>\/v1\/volumes\/\{name\}\/snapshots<\/code>/);
  });

  it('events --follow prints events as they happen (server-sent events)', async () => {
    const cli = path.join(
      path.dirname(new URL(import.meta.url).pathname),
      '..',
      'bin',
      'corral.js',
    );
    const follower = spawn(process.execPath, [cli, 'events', '--follow', '--json'], {
      env: { ...process.env, CORRAL_API: daemon.api, CORRAL_TOKEN: daemon.token },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    follower.stdout.on('data', (d: Buffer) => (out += d.toString()));
    try {
      // Events are created until the follower shows one: it connects at its own pace.
      const seen = await waitFor('a followed event', async () => {
        await daemon.api_('POST', '/v1/volumes', { name: 'followed', size: '1M' });
        await daemon.api_('DELETE', '/v1/volumes/followed');
        const lines = out.split('\n').filter((l) => l.trim() !== '');
        return lines.length > 0 ? lines.map((l) => JSON.parse(l) as { type: string }) : undefined;
      });
      assert.ok(seen.some((e) => e.type === 'volume-created' || e.type === 'volume-removed'));
    } finally {
      follower.kill('SIGTERM');
    }
  });
});
