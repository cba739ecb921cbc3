import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { freePort, waitFor } from './run.ts';

/**
 * A real etcd (Debian's `etcd-server`) for one test: a single member on
 * loopback with its own data dir, stopped and started again on the same
 * data (an etcd outage), killed for good at cleanup.
 */
export class EtcdProcess {
  readonly host: string;
  readonly clientPort: number;
  readonly peerPort: number;
  readonly dataDir: string;
  #child: ChildProcess | undefined;
  log = '';

  private constructor(host: string, clientPort: number, peerPort: number, dataDir: string) {
    this.host = host;
    this.clientPort = clientPort;
    this.peerPort = peerPort;
    this.dataDir = dataDir;
  }

  get url(): string {
    return `http://${this.host}:${this.clientPort}`;
  }

  static async start(host = '127.0.0.1'): Promise<EtcdProcess> {
    const dataDir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-etcd-'));
    const etcd = new EtcdProcess(host, await freePort(), await freePort(), dataDir);
    await etcd.resume();
    return etcd;
  }

  /** Starts the member (again, on the same data) and waits until it serves. */
  async resume(): Promise<void> {
    const client = this.url;
    const peer = `http://${this.host}:${this.peerPort}`;
    const child = spawn(
      'etcd',
      [
        '--name',
        'test',
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
        `test=${peer}`,
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    child.stderr.on('data', (d: Buffer) => (this.log += d.toString()));
    this.#child = child;
    await waitFor(
      `etcd on ${client}`,
      async () => {
        if (child.exitCode !== null) throw new Error(`etcd exited: ${this.log.slice(-2000)}`);
        const r = await fetch(`${client}/health`, { signal: AbortSignal.timeout(1000) });
        const body = (await r.json()) as { health?: string };
        return body.health === 'true' ? true : undefined;
      },
      30_000,
    );
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
