import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { TestCa, type CertFiles } from './helpers/certs.ts';
import { DaemonProcess } from './helpers/daemon.ts';
import { EtcdProcess } from './helpers/etcd.ts';
import { freePorts, mustRun, run, waitFor } from './helpers/run.ts';

interface ReplicaRow {
  id: string;
  location: string;
  mode: string;
}

/** A fetch that trusts the test CA and shows `client`'s certificate. */
async function fetchAs(ca: TestCa, client: CertFiles | undefined) {
  const undici = await import('undici');
  const dispatcher = new undici.Agent({
    connect: {
      ca: fs.readFileSync(ca.ca.cert),
      ...(client ? { cert: fs.readFileSync(client.cert), key: fs.readFileSync(client.key) } : {}),
    },
  });
  return (url: string, init: { method: string; headers?: Record<string, string> }) =>
    undici.fetch(url, { ...init, dispatcher });
}

describe('a cluster over TLS: API and replica streams, peers known by certificate', () => {
  let ca: TestCa;
  const daemons: DaemonProcess[] = [];
  const certs: CertFiles[] = [];
  let urls: string[];
  let mallory: CertFiles;

  before(async () => {
    ca = await TestCa.create();
    for (const n of ['n1', 'n2', 'n3'])
      certs.push(await ca.issue(n, n, { ou: 'node', ips: ['127.0.0.1'] }));
    // Signed by the same CA, but a client's certificate, not a node's.
    mallory = await ca.issue('mallory', 'mallory', { ou: 'client' });
    const ports = await freePorts(3);
    urls = ports.map((p) => `https://127.0.0.1:${p}`);
    // No shared cluster secret: each daemon makes its own, so peers know each other only by
    // their certificates.
    for (let i = 0; i < 3; i++)
      daemons.push(
        await DaemonProcess.start({
          caFile: ca.ca.cert,
          args: [
            '--listen',
            `127.0.0.1:${ports[i]}`,
            ...urls.filter((_, j) => j !== i).flatMap((u) => ['--peer', u]),
            '--tls-cert',
            certs[i]!.cert,
            '--tls-key',
            certs[i]!.key,
            '--tls-ca',
            ca.ca.cert,
            '--rebuild-delay',
            '500',
            '--replica-timeout',
            '3000',
          ],
        }),
      );
  });
  after(async () => {
    for (const d of daemons) await d.cleanup();
    await ca?.cleanup();
  });

  it('mirrors writes to replicas over TLS, rebuilds a killed one, and every copy is identical', async () => {
    const [d1] = daemons as [DaemonProcess];
    assert.match(d1.api, /^https:/);
    const created = await d1.cli(['volume', 'create', 'db', '--size', '64M', '--replicas', '3']);
    assert.equal(created.code, 0, created.stderr);
    const rows = (await d1.api_<{ replicas: ReplicaRow[] }>('GET', '/v1/volumes/db/replicas')).json
      .replicas;
    assert.deepEqual(rows.map((r) => r.location).sort(), ['local', urls[1], urls[2]].sort());
    await mustRun('fio', [
      '--name=fill',
      '--ioengine=nbd',
      `--uri=${d1.uri('db')}`,
      '--rw=write',
      '--bs=1M',
      '--iodepth=8',
      '--size=64m',
      '--verify=crc32c',
      '--end_fsync=1',
    ]);
    const verify = async () => {
      const r = await d1.cli(['volume', 'verify', 'db', '--json']);
      assert.equal(r.code, 0, r.stderr);
      return JSON.parse(r.stdout) as { replicas: number; differences: unknown[] };
    };
    const first = await verify();
    assert.equal(first.replicas, 3);
    assert.deepEqual(first.differences, []);

    // A replica host dies; writes go on; it comes back and is rebuilt over TLS.
    await daemons[2]!.kill();
    await mustRun('fio', [
      '--name=away',
      '--ioengine=nbd',
      `--uri=${d1.uri('db')}`,
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=8',
      '--size=64m',
      '--io_size=2m',
      '--randrepeat=0',
      '--end_fsync=1',
    ]);
    daemons[2] = await daemons[2]!.restart();
    await waitFor(
      'three RW replicas again',
      async () => {
        const r = (await d1.api_<{ replicas: ReplicaRow[] }>('GET', '/v1/volumes/db/replicas')).json
          .replicas;
        return r.length === 3 && r.every((x) => x.mode === 'RW') ? r : undefined;
      },
      60_000,
    );
    assert.deepEqual((await verify()).differences, []);
  });

  it('refuses plain HTTP, and a certificate that is not a node’s is no peer', async () => {
    const plain = await fetch(urls[0]!.replace('https:', 'http:') + '/v1/health');
    assert.equal(plain.status, 400);
    assert.match(await plain.text(), /TLS only/);
    const asNode = await fetchAs(ca, certs[1]);
    const asMallory = await fetchAs(ca, mallory);
    const anonymous = await fetchAs(ca, undefined);
    const call = { method: 'DELETE' };
    assert.equal((await asNode(`${urls[0]}/v1/replicas/nope`, call)).status, 404);
    assert.equal((await asMallory(`${urls[0]}/v1/replicas/nope`, call)).status, 401);
    assert.equal((await anonymous(`${urls[0]}/v1/replicas/nope`, call)).status, 401);
    // An admin token is a person's, not a peer's.
    const admin = await anonymous(`${urls[0]}/v1/replicas/nope`, {
      method: 'DELETE',
      headers: { authorization: `Bearer ${daemons[0]!.token}` },
    });
    assert.equal(admin.status, 403);
    // curl over HTTP/2 with the CA: the API as people use it.
    const curl = await run('curl', [
      '-s',
      '--http2',
      '--cacert',
      ca.ca.cert,
      '-H',
      `Authorization: Bearer ${daemons[0]!.token}`,
      '-w',
      '\n%{http_version}',
      `${urls[0]}/v1/volumes`,
    ]);
    assert.equal(curl.code, 0, curl.stderr);
    assert.match(curl.stdout, /"name":"db"/);
    assert.match(curl.stdout, /\n2$/);
  });

  it('keeps its cluster state in an etcd that takes TLS and client certificates only', async () => {
    const server = await ca.issue('etcd', 'etcd', { ips: ['127.0.0.1'] });
    const etcd = await EtcdProcess.start('127.0.0.1', { ...server, ca: ca.ca.cert });
    let d: DaemonProcess | undefined;
    try {
      assert.match(etcd.url, /^https:/);
      // No certificate, no cluster state.
      const bare = await (
        await fetchAs(ca, undefined)
      )(`${etcd.url}/v3/kv/range`, {
        method: 'POST',
      }).then(
        (r) => r.status,
        () => 'refused',
      );
      assert.notEqual(bare, 200);
      d = await DaemonProcess.start({
        caFile: ca.ca.cert,
        args: [
          '--etcd',
          etcd.url,
          '--node-name',
          'n1',
          '--tls-cert',
          certs[0]!.cert,
          '--tls-key',
          certs[0]!.key,
          '--tls-ca',
          ca.ca.cert,
        ],
      });
      const created = await d.cli(['volume', 'create', 'e', '--size', '8M']);
      assert.equal(created.code, 0, created.stderr);
      const ls = await d.cli(['node', 'ls', '--json']);
      assert.equal(ls.code, 0, ls.stderr);
      assert.deepEqual(
        (JSON.parse(ls.stdout) as Array<{ name: string; state: string }>).map(
          (n) => `${n.name}:${n.state}`,
        ),
        ['n1:up'],
      );
    } finally {
      await d?.cleanup();
      await etcd.cleanup();
    }
  });

  it('corral cluster certs makes a CA and node certificates a daemon accepts', async () => {
    const out = path.join(ca.dir, 'lab');
    await daemons[0]!.cli([
      'cluster',
      'certs',
      '--out',
      out,
      '--node',
      'n9=127.0.0.1',
      '--client',
      'c9',
    ]);
    await mustRun('openssl', [
      'verify',
      '-CAfile',
      path.join(out, 'ca.pem'),
      path.join(out, 'n9.pem'),
    ]);
    const subject = await mustRun('openssl', [
      'x509',
      '-in',
      path.join(out, 'n9.pem'),
      '-noout',
      '-subject',
      '-ext',
      'subjectAltName',
    ]);
    assert.match(subject.stdout, /OU = node, CN = n9/);
    assert.match(subject.stdout, /IP Address:127\.0\.0\.1/);
    assert.equal(fs.statSync(path.join(out, 'n9.key')).mode & 0o777, 0o600);
    assert.equal(fs.statSync(path.join(out, 'ca.key')).mode & 0o777, 0o600);
    const d = await DaemonProcess.start({
      caFile: path.join(out, 'ca.pem'),
      args: [
        '--tls-cert',
        path.join(out, 'n9.pem'),
        '--tls-key',
        path.join(out, 'n9.key'),
        '--tls-ca',
        path.join(out, 'ca.pem'),
      ],
    });
    try {
      const ls = await d.cli(['volume', 'ls']);
      assert.equal(ls.code, 0, ls.stderr);
    } finally {
      await d.cleanup();
    }
  });
});
