import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { run, type RunResult } from './run.ts';

type Fetch = (url: string, init?: RequestInit) => Promise<Response>;

/** The test's fetch: the global one, or one that trusts the daemon's CA. */
async function testFetch(caFile: string | undefined): Promise<Fetch> {
  if (caFile === undefined) return fetch;
  const undici = await import('undici');
  const dispatcher = new undici.Agent({ connect: { ca: fs.readFileSync(caFile) } });
  return (url, init) =>
    undici.fetch(url, {
      ...(init as Parameters<typeof undici.fetch>[1]),
      dispatcher,
    }) as unknown as Promise<Response>;
}

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const CLI = path.join(ROOT, 'bin', 'corral.js');

export interface DaemonOptions {
  dataDir?: string;
  args?: string[];
  env?: Record<string, string>;
  /** Run the TypeScript sources under Deno instead of the built daemon under Node. */
  deno?: boolean;
  /** Run inside this network namespace (`ip netns exec`), for partitions. */
  netns?: string;
  /** The CA that signed the daemon's certificate (`--tls-*`): the test and the CLI trust it. */
  caFile?: string;
}

/** A real `corral daemon` process on loopback, on ports it picked itself. */
export class DaemonProcess {
  readonly dataDir: string;
  readonly api: string;
  readonly nbd: string;
  readonly nbdSocket: string;
  readonly child: ChildProcess;
  /** The daemon's own admin token (its data dir's admin.token). */
  readonly token: string;
  readonly #options: DaemonOptions;
  #fetch: Fetch | undefined;
  #exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr = '';

  private constructor(
    options: DaemonOptions & { dataDir: string },
    child: ChildProcess,
    ready: { api: string; nbd: string; nbdSocket: string },
  ) {
    this.#options = options;
    this.dataDir = options.dataDir;
    this.child = child;
    this.api = ready.api;
    this.nbd = ready.nbd;
    this.nbdSocket = ready.nbdSocket;
    this.token = fs.readFileSync(path.join(options.dataDir, 'admin.token'), 'utf8').trim();
    this.#exit = new Promise((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null)
        resolve({ code: child.exitCode, signal: child.signalCode });
      else child.once('exit', (code, signal) => resolve({ code, signal }));
    });
  }

  static async start(options: DaemonOptions = {}): Promise<DaemonProcess> {
    const dataDir =
      options.dataDir ?? (await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-test-')));
    const daemonArgs = [
      'daemon',
      '--data-dir',
      dataDir,
      '--listen',
      '127.0.0.1:0',
      '--nbd',
      '127.0.0.1:0',
      ...(options.args ?? []),
    ];
    const [command, args] = options.deno
      ? [
          path.join(ROOT, 'node_modules', '.bin', 'deno'),
          ['run', '-A', path.join(ROOT, 'daemon', 'cli.ts'), ...daemonArgs],
        ]
      : options.netns
        ? // `ip netns exec` execs the command: the child's pid is the daemon's.
          ['ip', ['netns', 'exec', options.netns, process.execPath, CLI, ...daemonArgs]]
        : // CORRAL_DAEMON_NODE_ARGS: Node flags for the daemons, e.g. `--cpu-prof --cpu-prof-dir=D`
          // (NODE_OPTIONS refuses --cpu-prof) to profile a bench's daemons.
          [process.execPath, [...nodeArgs(), CLI, ...daemonArgs]];
    const child = spawn(command, args, {
      cwd: ROOT,
      env: { ...process.env, ...options.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
      if (process.env.CORRAL_TEST_VERBOSE) process.stderr.write(d);
    });
    const ready = await new Promise<{ api: string; nbd: string; nbdSocket: string }>(
      (resolve, reject) => {
        let out = '';
        const timer = setTimeout(() => {
          child.kill('SIGKILL');
          reject(new Error(`daemon did not become ready in 60 s\n${stderr}`));
        }, 60_000);
        child.stdout.on('data', (d: Buffer) => {
          out += d.toString();
          const line = out.split('\n').find((l) => l.startsWith('ready '));
          if (line) {
            clearTimeout(timer);
            resolve(JSON.parse(line.slice(6)) as { api: string; nbd: string; nbdSocket: string });
          }
        });
        child.once('exit', (code, signal) => {
          clearTimeout(timer);
          reject(new Error(`daemon exited (${code ?? signal}) before it was ready\n${stderr}`));
        });
      },
    );
    const daemon = new DaemonProcess({ ...options, dataDir }, child, ready);
    child.stderr.on('data', (d: Buffer) => (daemon.stderr += d.toString()));
    daemon.stderr = stderr;
    return daemon;
  }

  uri(volume: string): string {
    return `nbd://${this.nbd}/${volume}`;
  }

  unixUri(volume: string): string {
    return `nbd+unix:///${volume}?socket=${this.nbdSocket}`;
  }

  get nbdPort(): number {
    return Number(this.nbd.split(':').pop());
  }

  /** Runs the real CLI against this daemon, with its admin token unless `env` names another. */
  cli(args: string[], env: Record<string, string> = {}): Promise<RunResult> {
    return run(process.execPath, [CLI, ...args], {
      env: {
        ...process.env,
        CORRAL_API: this.api,
        CORRAL_TOKEN: this.token,
        // Node's way to trust another CA, read by its fetch.
        ...(this.#options.caFile !== undefined
          ? { NODE_EXTRA_CA_CERTS: this.#options.caFile }
          : {}),
        ...env,
      },
      timeoutMs: 60_000,
    });
  }

  /** Calls the API as admin (or with `token`; null: with none). */
  async api_<T>(
    method: string,
    route: string,
    body?: unknown,
    token: string | null = this.token,
  ): Promise<{ status: number; json: T }> {
    const response = await (this.#fetch ??= await testFetch(this.#options.caFile))(
      this.api + route,
      {
        method,
        headers: {
          ...(token !== null ? { authorization: `Bearer ${token}` } : {}),
          ...(body === undefined ? {} : { 'content-type': 'application/json' }),
        },
        ...(body === undefined
          ? {}
          : { body: typeof body === 'string' ? body : JSON.stringify(body) }),
      },
    );
    const text = await response.text();
    // Everything answers JSON but /metrics (Prometheus text): that comes back as the string.
    const json = response.headers.get('content-type')?.includes('json')
      ? (JSON.parse(text) as T)
      : ((text || undefined) as T);
    return { status: response.status, json };
  }

  async createVolume(name: string, size: string): Promise<void> {
    const { status, json } = await this.api_('POST', '/v1/volumes', { name, size });
    if (status !== 201) throw new Error(`create ${name}: ${status} ${JSON.stringify(json)}`);
  }

  /** Stops with a signal and waits for the process to exit. */
  async stop(
    signal: NodeJS.Signals = 'SIGTERM',
  ): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 60_000);
    try {
      return await this.#exit;
    } finally {
      clearTimeout(timer);
    }
  }

  kill(): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    return this.stop('SIGKILL');
  }

  /**
   * A new daemon process on the same data dir (and the same ports, when they
   * were given). A port another process took meanwhile — any outgoing
   * connection may get it — is tried again for a few seconds.
   */
  async restart(): Promise<DaemonProcess> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await DaemonProcess.start({ ...this.#options, dataDir: this.dataDir });
      } catch (err) {
        if (attempt >= 20 || !String(err).includes('EADDRINUSE')) throw err;
        await new Promise((r) => setTimeout(r, 250));
      }
    }
  }

  async cleanup(): Promise<void> {
    await this.stop('SIGKILL');
    // A killed daemon leaves its FUSE mount behind, dead: take it away before the folder.
    await run('umount', ['-l', path.join(this.dataDir, 'images')]);
    await fs.promises.rm(this.dataDir, { recursive: true, force: true });
  }
}

function nodeArgs(): string[] {
  const args = process.env.CORRAL_DAEMON_NODE_ARGS?.trim();
  return args ? args.split(/\s+/) : [];
}
