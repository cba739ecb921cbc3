import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { TestCa, type CertFiles } from './helpers/certs.ts';
import { DaemonProcess } from './helpers/daemon.ts';
import { RawNbd } from './helpers/nbd-client.ts';
import { mustRun, run } from './helpers/run.ts';

const OPT_STARTTLS = 5;
const OPT_GO = 7;
const REP_ACK = 1;
const REP_ERR_INVALID = 0x80000003;
const REP_ERR_TLS_REQD = 0x80000005;
const REP_ERR_POLICY = 0x80000002;
const MiB = 1024 * 1024;

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/** qemu's view of a TLS export: `--object tls-creds-x509` and the nbd driver's options. */
function qemuTls(d: DaemonProcess, volume: string, dir: string): string[] {
  return [
    '--object',
    `tls-creds-x509,id=tls0,endpoint=client,dir=${dir}`,
    '--image-opts',
    `driver=nbd,host=127.0.0.1,port=${d.nbdPort},export=${volume},tls-creds=tls0`,
  ];
}

describe('NBD over TLS (X.509): real clients, refusals, allow lists', () => {
  let ca: TestCa;
  let other: TestCa;
  let d: DaemonProcess;
  let client1: string;
  let client2: string;
  let anonymous: string;
  let strangerDir: string;
  let expiredDir: string;
  let work: string;
  before(async () => {
    ca = await TestCa.create();
    other = await TestCa.create('another-ca');
    const node = await ca.issue('n1', 'n1', { ou: 'node', ips: ['127.0.0.1'] });
    client1 = await ca.clientDir('c1', await ca.issue('client1', 'client1', { ou: 'client' }));
    client2 = await ca.clientDir('c2', await ca.issue('client2', 'client2', { ou: 'client' }));
    anonymous = await ca.clientDir('anon');
    // A client that trusts our CA but shows a certificate another CA signed (TLS clients do
    // not offer a certificate the server's CA list does not name: it comes in anonymous),
    // and one whose certificate, ours, has expired.
    const stranger: CertFiles = await other.issue('client1', 'client1');
    strangerDir = await ca.clientDir('stranger', stranger);
    expiredDir = await ca.clientDir('expired', await ca.issue('old', 'client1', { days: -1 }));
    work = path.join(ca.dir, 'work');
    fs.mkdirSync(work);
    d = await DaemonProcess.start({
      caFile: ca.ca.cert, // the API is https too
      args: [
        '--tls-cert',
        node.cert,
        '--tls-key',
        node.key,
        '--tls-ca',
        ca.ca.cert,
        '--nbd-tls',
        'require',
        '--nbd-handshake-timeout',
        '1500',
      ],
    });
    await d.createVolume('v', '32M');
    const locked = await d.cli([
      'volume',
      'create',
      'locked',
      '--size',
      '8M',
      '--nbd-allow',
      'client1',
    ]);
    assert.equal(locked.code, 0, locked.stderr);
  });
  after(async () => {
    await d?.cleanup();
    await ca?.cleanup();
    await other?.cleanup();
  });

  it('nbdcopy, nbdinfo, qemu-io and qemu-img read and write over TLS, byte for byte', async () => {
    const uri = (dir: string, v = 'v') =>
      `nbds://127.0.0.1:${d.nbdPort}/${v}?tls-certificates=${dir}`;
    const info = await mustRun('nbdinfo', [uri(anonymous)]);
    assert.match(info.stdout, /with TLS/);
    const data = randomBytes(24 * MiB);
    const src = path.join(work, 'src');
    const back = path.join(work, 'back');
    fs.writeFileSync(src, data);
    await mustRun('nbdcopy', [src, uri(client1)]);
    await mustRun('nbdcopy', [uri(client2), back]);
    assert.equal(sha(fs.readFileSync(back).subarray(0, data.length)), sha(data));
    await mustRun('qemu-io', [
      ...qemuTls(d, 'v', client1),
      '-c',
      'write -P 0x5c 30M 1M',
      '-c',
      'read -P 0x5c 30M 1M',
    ]);
    const img = await mustRun('qemu-img', ['info', ...qemuTls(d, 'v', anonymous)]);
    assert.match(img.stdout, /virtual size: 32 MiB/);
    // What qemu wrote is what a libnbd client reads.
    await mustRun('nbdcopy', [uri(anonymous), back]);
    const all = fs.readFileSync(back);
    assert.ok(all.subarray(30 * MiB, 31 * MiB).every((b) => b === 0x5c));
    assert.equal(sha(all.subarray(0, data.length)), sha(data));
  });

  it('refuses a plain client, a client that does not trust the server, and a client whose certificate it does not trust', async () => {
    const plain = await run('nbdinfo', [`nbd://127.0.0.1:${d.nbdPort}/v`]);
    assert.notEqual(plain.code, 0);
    // What a plain client hears, exactly: NBD_REP_ERR_TLS_REQD to every option but STARTTLS.
    const raw = await RawNbd.connect({ port: d.nbdPort });
    await raw.greet();
    raw.sendOption(OPT_GO, Buffer.from([0, 0, 0, 1, 0x76, 0, 0]));
    assert.equal((await raw.readOptionReply()).type, REP_ERR_TLS_REQD);
    raw.close();

    const untrusting = await other.clientDir('trusts-another');
    const wrongCa = await run('nbdinfo', [
      `nbds://127.0.0.1:${d.nbdPort}/v?tls-certificates=${untrusting}`,
    ]);
    assert.notEqual(wrongCa.code, 0);
    assert.match(wrongCa.stderr, /certificate|verif/i);
    const expired = await run('nbdinfo', [
      `nbds://127.0.0.1:${d.nbdPort}/v?tls-certificates=${expiredDir}`,
    ]);
    assert.notEqual(expired.code, 0, 'an expired client certificate is refused');
    assert.match(d.stderr, /client certificate refused: CERT_HAS_EXPIRED/);
    const stranger = await run('nbdinfo', [
      `nbds://127.0.0.1:${d.nbdPort}/locked?tls-certificates=${strangerDir}`,
    ]);
    assert.notEqual(stranger.code, 0, 'a certificate from another CA proves no identity');
  });

  it('a client refuses a server whose certificate has expired', async () => {
    const old = await ca.issue('n1-old', 'n1', { ou: 'node', ips: ['127.0.0.1'], days: -1 });
    // Its API serves the expired certificate too: the volume comes from the command line.
    const stale = await DaemonProcess.start({
      args: [
        '--tls-cert',
        old.cert,
        '--tls-key',
        old.key,
        '--nbd-tls',
        'require',
        '--ensure-volume',
        'v=1M',
      ],
    });
    try {
      const r = await run('nbdinfo', [
        `nbds://127.0.0.1:${stale.nbdPort}/v?tls-certificates=${anonymous}`,
      ]);
      assert.notEqual(r.code, 0);
      // GnuTLS's word for it; the same certificate unexpired is served above.
      assert.match(r.stderr, /certificate verification|expired/i);
    } finally {
      await stale.cleanup();
    }
  });

  it('opens an allow-listed volume to the identities on its list only', async () => {
    const uri = (dir: string) => `nbds://127.0.0.1:${d.nbdPort}/locked?tls-certificates=${dir}`;
    await mustRun('qemu-io', [...qemuTls(d, 'locked', client1), '-c', 'write -P 0x11 0 64k']);
    const ok = await mustRun('nbdinfo', [uri(client1)]);
    assert.match(ok.stdout, /export-size: 8388608/);
    for (const dir of [client2, anonymous]) {
      const no = await run('nbdinfo', [uri(dir)]);
      assert.notEqual(no.code, 0);
      // libnbd words NBD_REP_ERR_POLICY as it words every refused GO.
      assert.match(no.stderr, /opt_go.*locked/, no.stderr);
    }
    // Not listed to those who may not open it either.
    const listed = await mustRun('nbdinfo', [
      '--list',
      `nbds://127.0.0.1:${d.nbdPort}/?tls-certificates=${client2}`,
    ]);
    assert.ok(!listed.stdout.includes('locked') && listed.stdout.includes('"v"'));
    const get = await d.api_<{ nbdAllow: string[] }>('GET', '/v1/volumes/locked');
    assert.deepEqual(get.json.nbdAllow, ['client1']);
  });

  it('after STARTTLS nothing sent in the clear counts, and the handshake timeout still holds', async () => {
    // Plaintext queued right behind STARTTLS (an injection attempt) ends the connection.
    const inject = await RawNbd.connect({ port: d.nbdPort });
    await inject.greet();
    const header = (option: number, length: number): Buffer => {
      const b = Buffer.alloc(16);
      b.writeBigUInt64BE(0x49484156454f5054n, 0);
      b.writeUInt32BE(option, 8);
      b.writeUInt32BE(length, 12);
      return b;
    };
    inject.write(Buffer.concat([header(OPT_STARTTLS, 0), header(OPT_GO, 7), Buffer.alloc(7)]));
    await inject.waitClosed();
    // STARTTLS with data is invalid; then a bare STARTTLS is acknowledged.
    const slow = await RawNbd.connect({ port: d.nbdPort });
    await slow.greet();
    slow.sendOption(OPT_STARTTLS, Buffer.from('x'));
    assert.equal((await slow.readOptionReply()).type, REP_ERR_INVALID);
    slow.sendOption(OPT_STARTTLS);
    assert.equal((await slow.readOptionReply()).type, REP_ACK);
    // ... and a client that then never starts TLS is dropped by the handshake timeout.
    const t0 = Date.now();
    await slow.waitClosed(10_000);
    assert.ok(Date.now() - t0 < 5000, 'closed by the 1.5 s handshake timeout');
  });
});

describe('NBD over TLS with pre-shared keys', () => {
  let d: DaemonProcess;
  let dir: string;
  let pskFile: string;
  let wrongFile: string;
  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'corral-psk-'));
    pskFile = path.join(dir, 'keys.psk');
    wrongFile = path.join(dir, 'wrong.psk');
    fs.writeFileSync(
      pskFile,
      `alice:${randomBytes(32).toString('hex')}\nbob:${randomBytes(32).toString('hex')}\n`,
      { mode: 0o600 },
    );
    fs.writeFileSync(wrongFile, `alice:${randomBytes(32).toString('hex')}\n`, { mode: 0o600 });
    // `on`: TLS is offered, plain clients are still served.
    d = await DaemonProcess.start({ args: ['--nbd-tls', 'on', '--nbd-tls-psk', pskFile] });
    await d.createVolume('v', '8M');
    const only = await d.cli(['volume', 'create', 'bobs', '--size', '4M', '--nbd-allow', 'bob']);
    assert.equal(only.code, 0, only.stderr);
  });
  after(async () => {
    await d?.cleanup();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('serves a client with the right key, refuses a wrong key, and allow-lists by PSK user', async () => {
    const uri = (user: string, file: string, v = 'v') =>
      `nbds://${user}@127.0.0.1:${d.nbdPort}/${v}?tls-psk-file=${file}`;
    const data = randomBytes(8 * MiB);
    const src = path.join(dir, 'src');
    const back = path.join(dir, 'back');
    fs.writeFileSync(src, data);
    await mustRun('nbdcopy', [src, uri('alice', pskFile)]);
    await mustRun('nbdcopy', [uri('bob', pskFile), back]);
    assert.equal(sha(fs.readFileSync(back)), sha(data));
    const wrong = await run('nbdinfo', [uri('alice', wrongFile)]);
    assert.notEqual(wrong.code, 0);
    const plain = await mustRun('nbdinfo', [`nbd://127.0.0.1:${d.nbdPort}/v`]);
    assert.match(plain.stdout, /without TLS/);
    await mustRun('nbdinfo', [uri('bob', pskFile, 'bobs')]);
    const notBob = await run('nbdinfo', [uri('alice', pskFile, 'bobs')]);
    assert.notEqual(notBob.code, 0);
    const plainBobs = await run('nbdinfo', [`nbd://127.0.0.1:${d.nbdPort}/bobs`]);
    assert.notEqual(plainBobs.code, 0, 'no identity, no access');
    // What such a client hears, exactly: NBD_REP_ERR_POLICY.
    const raw = await RawNbd.connect({ port: d.nbdPort });
    await raw.greet();
    raw.sendOption(OPT_GO, Buffer.from([0, 0, 0, 4, ...Buffer.from('bobs'), 0, 0]));
    assert.equal((await raw.readOptionReply()).type, REP_ERR_POLICY);
    raw.close();
  });

  it('refuses a key file that others can read', async () => {
    const loose = path.join(dir, 'loose.psk');
    fs.writeFileSync(loose, `alice:${randomBytes(16).toString('hex')}\n`);
    fs.chmodSync(loose, 0o644);
    const r = await run(process.execPath, [
      'bin/corral.js',
      'daemon',
      '--data-dir',
      path.join(dir, 'data'),
      '--nbd-tls',
      'require',
      '--nbd-tls-psk',
      loose,
    ]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /can be read by others/);
  });
});
