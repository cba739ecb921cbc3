import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { freePorts, waitFor } from './run.ts';

/**
 * A real etcd (Debian's `etcd-server`) for one test: a member on loopback
 * with its own data dir — alone, or one of a cluster (`startMembers`) —
 * killed and started again on the same data (an outage), killed for good
 * at cleanup.
 */
export class EtcdProcess {
  readonly name: string;
  readonly host: string;
  readonly clientPort: number;
  readonly peerPort: number;
  readonly dataDir: string;
  /** `name=peer-url,...` of every member. */
  initialCluster = '';
  /** Client connections over TLS, with client certificates required (etcd's own TLS). */
  tls: { cert: string; key: string; ca: string } | undefined;
  #child: ChildProcess | undefined;
  log = '';

  private constructor(
    name: string,
    host: string,
    clientPort: number,
    peerPort: number,
    dataDir: string,
  ) {
    this.name = name;
    this.host = host;
    this.clientPort = clientPort;
    this.peerPort = peerPort;
    this.dataDir = dataDir;
  }

  get peerUrl(): string {
    return `http://${this.host}:${this.peerPort}`;
  }

  get url(): string {
    return `${this.tls ? 'https' : 'http'}://${this.host}:${this.clientPort}`;
  }

  /** One member; with `tls` its clients must show a certificate `tls.ca` signed. */
  static async start(
    host = '127.0.0.1',
    tls?: { cert: string; key: string; ca: string },
  ): Promise<EtcdProcess> {
    return (await EtcdProcess.startMembers(1, host, tls))[0]!;
  }

  /** An etcd cluster of `n` members, started together (they need a quorum to serve). */
  static async startMembers(
    n: number,
    host = '127.0.0.1',
    tls?: { cert: string; key: string; ca: string },
  ): Promise<EtcdProcess[]> {
    const members: EtcdProcess[] = [];
    const ports = await freePorts(2 * n);
    for (let i = 0; i < n; i++) {
      const dataDir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-etcd-'));
      const m = new EtcdProcess(`m${i}`, host, ports[2 * i]!, ports[2 * i + 1]!, dataDir);
      m.tls = tls;
      members.push(m);
    }
    const initial = members.map((m) => `${m.name}=${m.peerUrl}`).join(',');
    for (const m of members) m.initialCluster = initial;
    await Promise.all(members.map((m) => m.resume()));
    return members;
  }

  /** Starts the member (again, on the same data) and waits until it serves. */
  async resume(): Promise<void> {
    const client = this.url;
    const peer = this.peerUrl;
    const child = spawn(
      'etcd',
      [
        '--name',
        this.name,
        '--data-dir',
        this.dataDir,
        '--listen-client-urls',
        client,
        '--advertise-client-urls',
        client,
        '--listen-peer-urls',
        peer,
        '--initial-advertise-peer-urls',
        peer,
        '--initial-cluster',
        this.initialCluster,
        ...(this.tls
          ? [
              '--cert-file',
              this.tls.cert,
              '--key-file',
              this.tls.key,
              '--trusted-ca-file',
              this.tls.ca,
              '--client-cert-auth',
            ]
          : []),
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    child.stderr.on('data', (d: Buffer) => (this.log += d.toString()));
    this.#child = child;
    const health = await this.#fetch();
    await waitFor(
      `etcd on ${client}`,
      async () => {
        if (child.exitCode !== null) throw new Error(`etcd exited: ${this.log.slice(-2000)}`);
        const r = await health(`${client}/health`, { signal: AbortSignal.timeout(1000) });
        const body = (await r.json()) as { health?: string };
        return body.health === 'true' ? true : undefined;
      },
      30_000,
    );
  }

  /** The test's fetch to this member: with TLS, one that shows the member's own certificate. */
  async #fetch(): Promise<(url: string, init: { signal: AbortSignal }) => Promise<Response>> {
    const tls = this.tls;
    if (!tls) return fetch;
    const undici = await import('undici');
    const dispatcher = new undici.Agent({
      connect: {
        ca: fs.readFileSync(tls.ca),
        cert: fs.readFileSync(tls.cert),
        key: fs.readFileSync(tls.key),
      },
    });
    return (url, init) =>
      undici.fetch(url, { ...init, dispatcher }) as unknown as Promise<Response>;
  }

  /** Kills the member (an outage); `resume` brings it back with its data. */
  async kill(): Promise<void> {
    const child = this.#child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await exited;
  }

  async cleanup(): Promise<void> {
    await this.kill();
    await fs.promises.rm(this.dataDir, { recursive: true, force: true });
  }
}
