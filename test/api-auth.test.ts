import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { DaemonProcess } from './helpers/daemon.ts';
import { mustRun, run } from './helpers/run.ts';
import { UPGRADE_PROTOCOL, upgradeRequest } from '../replication/wire.ts';

interface ApiErrorBody {
  error: { code: string; message: string };
}

type Role = 'none' | 'read-only' | 'operator' | 'admin';
const ORDER: Role[] = ['none', 'read-only', 'operator', 'admin'];

/**
 * One call of each class of route and the least role it takes ('peer': no
 * token at all, only another daemon). The names are of things that do not
 * exist, so a call let through answers 404/400 and changes nothing.
 */
const ROUTES: Array<[method: string, route: string, body: unknown, least: Role | 'peer']> = [
  ['GET', '/v1/health', undefined, 'none'],
  ['GET', '/v1/volumes', undefined, 'read-only'],
  ['GET', '/v1/volumes/nope', undefined, 'read-only'],
  ['GET', '/v1/volumes/nope/stats', undefined, 'read-only'],
  ['GET', '/v1/events', undefined, 'read-only'],
  ['GET', '/v1/operations', undefined, 'read-only'],
  ['GET', '/v1/nodes', undefined, 'read-only'],
  ['GET', '/v1/backups', undefined, 'read-only'],
  ['GET', '/v1/jobs', undefined, 'read-only'],
  ['GET', '/metrics', undefined, 'read-only'],
  ['POST', '/v1/volumes', { name: 'Bad Name', size: '1M' }, 'operator'],
  ['POST', '/v1/volumes/nope/attach', {}, 'operator'],
  ['POST', '/v1/volumes/nope/detach', {}, 'operator'],
  ['POST', '/v1/volumes/nope/snapshots', {}, 'operator'],
  ['POST', '/v1/volumes/nope/verify', {}, 'operator'],
  ['POST', '/v1/volumes/nope/scrub', {}, 'operator'],
  ['POST', '/v1/backups', { volume: 'nope' }, 'operator'],
  ['POST', '/v1/restores', { backup: 'nope', volume: 'nope2' }, 'operator'],
  ['POST', '/v1/jobs', { volume: 'nope', cron: 'bad', task: 'snapshot', retain: 1 }, 'operator'],
  ['POST', '/v1/volumes/nope/snapshots/s1/revert', {}, 'admin'],
  ['DELETE', '/v1/volumes/nope', undefined, 'admin'],
  ['DELETE', '/v1/volumes/nope/snapshots/s1', undefined, 'admin'],
  ['DELETE', '/v1/volumes/nope/replicas/r1', undefined, 'admin'],
  ['DELETE', '/v1/backups/nope', undefined, 'admin'],
  ['DELETE', '/v1/jobs/nope', undefined, 'admin'],
  ['POST', '/v1/backups/gc', { target: 'file:///nowhere' }, 'admin'],
  ['POST', '/v1/backups', { volume: 'nope', target: 'file:///elsewhere' }, 'admin'],
  ['GET', '/v1/backups?target=file%3A%2F%2F%2Felsewhere', undefined, 'admin'],
  ['POST', '/v1/restores', { backup: 'file:///x?backup=b&volume=v', volume: 'n' }, 'admin'],
  ['POST', '/v1/nodes/n1/cordon', {}, 'admin'],
  ['POST', '/v1/nodes/n1/drain', {}, 'admin'],
  ['GET', '/v1/tokens', undefined, 'admin'],
  ['POST', '/v1/tokens', { name: 'Bad Name', role: 'admin' }, 'admin'],
  ['DELETE', '/v1/tokens/nope', undefined, 'admin'],
  ['POST', '/v1/replicas', {}, 'peer'],
  ['DELETE', '/v1/replicas/nope', undefined, 'peer'],
  ['POST', '/v1/peer/volumes/nope/release', {}, 'peer'],
  ['PUT', '/v1/volumes/nope', {}, 'admin'],
];

describe('API tokens and roles', () => {
  let d: DaemonProcess;
  const tokens: Partial<Record<Role, string>> = {};
  before(async () => {
    d = await DaemonProcess.start();
    for (const role of ['read-only', 'operator', 'admin'] as const) {
      const made = await d.cli(['token', 'create', '--name', `t-${role}`, '--role', role]);
      assert.equal(made.code, 0, made.stderr);
      tokens[role] = made.stdout.trim();
      assert.match(tokens[role], /^corral_t-[a-z-]+_[0-9a-f]{64}$/);
    }
  });
  after(() => d.cleanup());

  it('every route refuses a caller without the role it needs, and lets the others through', async () => {
    const wrong: string[] = [];
    for (const [method, route, body, least] of ROUTES) {
      for (const role of ORDER) {
        const token = role === 'none' ? null : tokens[role]!;
        const r = await d.api_<ApiErrorBody>(method, route, body, token);
        const allowed = least !== 'peer' && ORDER.indexOf(role) >= ORDER.indexOf(least);
        const refused = r.status === 401 || r.status === 403;
        const expectCode = role === 'none' ? 'UNAUTHENTICATED' : 'FORBIDDEN';
        if (allowed === refused || (refused && r.json.error.code !== expectCode))
          wrong.push(`${method} ${route} as ${role}: ${r.status} ${JSON.stringify(r.json)}`);
      }
    }
    assert.deepEqual(wrong, []);
    // A token that is not one of ours, or is malformed, is refused as no token is.
    for (const bad of ['corral_t-admin_' + '0'.repeat(64), 'nonsense', tokens.admin + 'x']) {
      const r = await d.api_<ApiErrorBody>('GET', '/v1/volumes', undefined, bad);
      assert.equal(r.status, 401, bad);
      assert.equal(r.json.error.code, 'UNAUTHENTICATED');
    }
  });

  it('records refused calls as events, naming who and from where but never the token', async () => {
    await d.api_('DELETE', '/v1/volumes/nope', undefined, tokens['read-only']);
    const events = (
      await d.api_<{ events: Array<{ type: string; message: string }> }>('GET', '/v1/events')
    ).json.events.filter((e) => e.type === 'access-denied');
    assert.ok(
      events.some(
        (e) =>
          e.message.includes('read-only token "t-read-only" from 127.0.0.1') &&
          e.message.includes('DELETE /v1/volumes/nope'),
      ),
      JSON.stringify(events),
    );
    const all = JSON.stringify(events) + d.stderr;
    for (const t of Object.values(tokens)) assert.ok(!all.includes(t), 'a token was written out');
    assert.ok(!all.includes(d.token));
  });

  it('lists tokens without their secrets; a removed token stops working at once', async () => {
    const ls = await d.cli(['token', 'ls', '--json']);
    assert.equal(ls.code, 0, ls.stderr);
    const listed = JSON.parse(ls.stdout) as Array<Record<string, string>>;
    assert.deepEqual(
      listed.map((t) => `${t.name}:${t.role}`),
      ['host-admin:admin', 't-admin:admin', 't-operator:operator', 't-read-only:read-only'],
    );
    assert.ok(!ls.stdout.includes(tokens.admin!) && !/hash/.test(ls.stdout));
    const dup = await d.cli(['token', 'create', '--name', 't-admin', '--role', 'admin']);
    assert.notEqual(dup.code, 0);
    assert.match(dup.stderr, /exists/);
    // An operator cannot mint itself an admin token.
    const escalate = await d.cli(['token', 'create', '--name', 'x', '--role', 'admin'], {
      CORRAL_TOKEN: tokens.operator!,
    });
    assert.notEqual(escalate.code, 0);
    assert.match(escalate.stderr, /needs the admin role/);
    assert.equal((await d.cli(['token', 'rm', 't-operator'])).code, 0);
    const after = await d.api_('GET', '/v1/volumes', undefined, tokens.operator);
    assert.equal(after.status, 401);
  });

  it('the CLI on the daemon host finds the admin token; the files holding secrets are the owner’s alone', async () => {
    // No CORRAL_TOKEN: the CLI reads DATA_DIR/admin.token.
    const ls = await d.cli(['volume', 'ls'], { CORRAL_TOKEN: '', CORRAL_DATA_DIR: d.dataDir });
    assert.equal(ls.code, 0, ls.stderr);
    const none = await d.cli(['volume', 'ls'], {
      CORRAL_TOKEN: '',
      CORRAL_DATA_DIR: path.join(d.dataDir, 'nowhere'),
    });
    assert.notEqual(none.code, 0);
    assert.match(none.stderr, /needs a token/);
    assert.equal(fs.statSync(d.dataDir).mode & 0o777, 0o700);
    assert.equal(fs.statSync(path.join(d.dataDir, 'admin.token')).mode & 0o777, 0o600);
    await d.createVolume('v', '8M');
    // Nothing under the data dir (metadata, layer files) is open to group or others.
    const open = (await fs.promises.readdir(d.dataDir, { recursive: true }))
      .map((f) => path.join(d.dataDir, String(f)))
      .filter((f) => !f.startsWith(path.join(d.dataDir, 'images')))
      .filter((f) => (fs.lstatSync(f).mode & 0o077) !== 0);
    assert.deepEqual(open, []);
    // A token file others can read is refused by the CLI, as ssh refuses such keys.
    const loose = path.join(d.dataDir, 'loose.token');
    fs.writeFileSync(loose, d.token, { mode: 0o644 });
    fs.chmodSync(loose, 0o644);
    const refused = await d.cli(['volume', 'ls'], { CORRAL_TOKEN: '', CORRAL_TOKEN_FILE: loose });
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, /can be read by others/);
  });

  it('takes the cluster secret from a file or the environment, never from argv', async () => {
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-secret-'));
    try {
      const argv = await run(process.execPath, [
        'bin/corral.js',
        'daemon',
        '--data-dir',
        dir,
        '--cluster-secret',
        's3cr3t',
      ]);
      assert.equal(argv.code, 2);
      assert.match(argv.stderr, /--cluster-secret-file/);
      const file = path.join(dir, 'secret');
      fs.writeFileSync(file, 'a-secret-of-ours\n', { mode: 0o640 });
      fs.chmodSync(file, 0o640);
      const loose = await run(process.execPath, [
        'bin/corral.js',
        'daemon',
        '--data-dir',
        dir,
        '--cluster-secret-file',
        file,
      ]);
      assert.notEqual(loose.code, 0);
      assert.match(loose.stderr, /can be read by others/);
      fs.chmodSync(file, 0o600);
      const peer = await DaemonProcess.start({ args: ['--cluster-secret-file', file] });
      try {
        // The secret is the peer credential: a call with it is a peer's.
        const r = await fetch(`${peer.api}/v1/replicas/nope`, {
          method: 'DELETE',
          headers: { authorization: 'Bearer a-secret-of-ours' },
        });
        assert.equal(r.status, 404);
        // A replica stream asked for by another version of the daemon: refused, naming both.
        const answer = await rawUpgrade(
          peer.api,
          upgradeRequest(new URL(peer.api).host, 'nope', 'a-secret-of-ours', 1).replace(
            UPGRADE_PROTOCOL,
            'corral-replica/2',
          ),
        );
        assert.match(answer, /^HTTP\/1\.1 426 /);
        assert.ok(
          answer.includes(`speaks ${UPGRADE_PROTOCOL}, the engine asked for corral-replica/2`),
          answer,
        );
        const ps = await mustRun('ps', ['-eo', 'args']);
        assert.ok(!ps.stdout.includes('a-secret-of-ours'), 'the secret shows in ps');
      } finally {
        await peer.cleanup();
      }
    } finally {
      await fs.promises.rm(dir, { recursive: true, force: true });
    }
  });
});

describe('backup targets are not a way out of the host', () => {
  let d: DaemonProcess;
  before(async () => {
    d = await DaemonProcess.start();
  });
  after(() => d.cleanup());

  it('file targets stay under the backup roots, and listing one creates nothing', async () => {
    const outside = path.join(os.tmpdir(), `corral-outside-${process.pid}`, 'x', 'y');
    const r = await d.api_<ApiErrorBody>(
      'GET',
      `/v1/backups?target=${encodeURIComponent(`file://${outside}`)}`,
    );
    assert.equal(r.status, 400);
    assert.match(r.json.error.message, /outside the daemon's backup roots/);
    assert.equal(fs.existsSync(path.dirname(path.dirname(outside))), false);
    // `..` and symbolic links do not lead out either.
    const dotdot = `file://${path.join(d.dataDir, 'backups')}/../../../etc`;
    const r2 = await d.api_<ApiErrorBody>(
      'GET',
      `/v1/backups?target=${encodeURIComponent(dotdot)}`,
    );
    assert.equal(r2.status, 400);
    fs.mkdirSync(path.join(d.dataDir, 'backups'), { recursive: true });
    fs.symlinkSync('/etc', path.join(d.dataDir, 'backups', 'link'));
    const r3 = await d.api_<ApiErrorBody>(
      'GET',
      `/v1/backups?target=${encodeURIComponent(`file://${d.dataDir}/backups/link/sub`)}`,
    );
    assert.equal(r3.status, 400);
    // Inside a root: an empty listing, and still no directory made.
    const inside = path.join(d.dataDir, 'backups', 'team', 'a');
    const r4 = await d.api_<{ backups: unknown[] }>(
      'GET',
      `/v1/backups?target=${encodeURIComponent(`file://${inside}`)}`,
    );
    assert.equal(r4.status, 200);
    assert.deepEqual(r4.json.backups, []);
    assert.equal(fs.existsSync(path.join(d.dataDir, 'backups', 'team')), false);
  });

  it('an S3 target with no credentials is refused before any request leaves the host', async () => {
    let connections = 0;
    const listener = net.createServer((s) => {
      connections++;
      s.destroy();
    });
    await new Promise<void>((r) => listener.listen(0, '127.0.0.1', r));
    const port = (listener.address() as net.AddressInfo).port;
    try {
      const target = `s3://bucket/p?endpoint=http://127.0.0.1:${port}`;
      const r = await d.api_<ApiErrorBody>(
        'GET',
        `/v1/backups?target=${encodeURIComponent(target)}`,
      );
      assert.equal(r.status, 400);
      assert.match(r.json.error.message, /no S3 credentials/);
      assert.equal(connections, 0);
    } finally {
      listener.close();
    }
  });
});

/** Sends `request` on a fresh connection to the API and returns all it answers before closing. */
function rawUpgrade(api: string, request: string): Promise<string> {
  const { hostname, port } = new URL(api);
  return new Promise((resolve, reject) => {
    const socket = net.connect(Number(port), hostname, () => socket.write(request));
    let answer = '';
    socket.on('data', (d: Buffer) => (answer += d.toString('latin1')));
    socket.on('error', reject);
    socket.on('close', () => resolve(answer));
    socket.setTimeout(10_000, () => socket.destroy(new Error('no answer to the upgrade')));
  });
}
