import * as fs from 'node:fs';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { BufferPool } from '../common/buffer-pool.ts';
import { ByteQueue } from './byte-queue.ts';
import { NbdConnection, type ConnectionLog } from './connection.ts';
import {
  negotiate,
  ProtocolError,
  type Channel,
  type ExportProvider,
  type NegotiationTls,
} from './handshake.ts';
import { MAX_REQUEST_BYTES } from '../replication/block-device.ts';

export interface NbdServerOptions {
  exports: ExportProvider;
  log: ConnectionLog;
  /** Connections beyond this are closed at once (qemu CVE-2024-7409: no unbounded handshakes). */
  maxConnections?: number;
  /** A client that has not finished negotiating by then is dropped. */
  handshakeTimeoutMs?: number;
  /** NBD_OPT_STARTTLS: offered (`on`) or required (`require`); absent: no TLS. */
  tls?: NbdTlsOptions;
}

export interface NbdTlsOptions {
  mode: 'on' | 'require';
  /** The server's certificate and key, and the CA that client certificates must chain to. */
  x509?: { cert: Buffer; key: Buffer; ca?: Buffer };
  /** Pre-shared keys by user name (psktool's `user:hexkey` file). */
  psk?: Map<string, Buffer>;
}

/** Unread request bytes we hold per connection before pausing the socket. */
const QUEUE_HIGH_WATER_BYTES = 2 * MAX_REQUEST_BYTES + 64 * 1024;

/** The NBD server: every attached volume under its name, on TCP and a Unix socket. */
export class NbdServer {
  readonly #options: Required<Omit<NbdServerOptions, 'tls'>>;
  readonly #servers: net.Server[] = [];
  readonly #sockets = new Set<net.Socket>();
  readonly #connections = new Map<net.Socket, NbdConnection>();
  readonly #running = new Set<Promise<void>>();
  /** Large request buffers, shared by all connections. */
  readonly #pool = new BufferPool(64 * 1024 * 1024);

  readonly #tls: NegotiationTls | undefined;

  constructor(options: NbdServerOptions) {
    this.#options = {
      maxConnections: 256,
      handshakeTimeoutMs: 10_000,
      ...options,
    };
    this.#tls = options.tls ? tlsUpgrade(options.tls) : undefined;
  }

  /** Listens on host:port (port 0 picks one); resolves with the bound address. */
  async listenTcp(host: string, port: number): Promise<net.AddressInfo> {
    const server = this.#server();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => resolve());
    });
    return server.address() as net.AddressInfo;
  }

  async listenUnix(path: string): Promise<void> {
    // A socket file left by a killed daemon would make listen fail with EADDRINUSE.
    await fs.promises.rm(path, { force: true });
    const server = this.#server();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => resolve());
    });
  }

  #server(): net.Server {
    // Paused: ByteQueue.attach decides how the connection is read (common/direct-socket.ts).
    const server = net.createServer({ pauseOnConnect: true }, (socket) => this.#accept(socket));
    this.#servers.push(server);
    return server;
  }

  /** Open connections to a volume's export and to its snapshots' (`name@snapshot`). */
  connectionsTo(name: string): number {
    let n = 0;
    for (const c of this.#connections.values()) if (sameVolume(c.name, name)) n++;
    return n;
  }

  /** Drops every connection to a volume and its snapshots (forced detach). */
  disconnect(name: string): void {
    for (const [socket, c] of this.#connections) if (sameVolume(c.name, name)) socket.destroy();
  }

  #accept(raw: net.Socket): void {
    if (this.#sockets.size >= this.#options.maxConnections) {
      this.#options.log.warn(
        `NBD: connection limit ${this.#options.maxConnections} reached, refusing a client`,
      );
      raw.destroy();
      return;
    }
    // A connection that may turn to TLS is read through 'data' events: TLS takes the socket's
    // reading over, which a socket read in place (common/direct-socket.ts) cannot hand on.
    const { socket, queue } = ByteQueue.attach(raw, QUEUE_HIGH_WATER_BYTES, {
      direct: this.#tls === undefined,
    });
    this.#sockets.add(socket);
    socket.on('error', () => undefined); // reported through 'close'; nothing to do per error
    socket.once('close', () => {
      this.#sockets.delete(socket);
      this.#connections.delete(socket);
    });
    socket.setNoDelay(true);
    const task = this.#serve(socket, queue).catch((err: unknown) => {
      this.#options.log.warn(
        `NBD: connection failed: ${err instanceof Error ? err.message : String(err)}`,
      );
      socket.destroy();
    });
    this.#running.add(task);
    void task.finally(() => this.#running.delete(task));
  }

  async #serve(socket: net.Socket, queue: ByteQueue): Promise<void> {
    const timer = setTimeout(() => {
      this.#options.log.warn(
        `NBD: handshake not finished in ${this.#options.handshakeTimeoutMs} ms, closing`,
      );
      socket.destroy();
    }, this.#options.handshakeTimeoutMs);
    let negotiated;
    const channel: Channel = { socket, queue };
    try {
      negotiated = await negotiate(channel, this.#options.exports, this.#tls);
    } catch (err) {
      if (err instanceof ProtocolError)
        this.#options.log.warn(`NBD: handshake refused: ${err.message}`);
      socket.destroy();
      return;
    } finally {
      clearTimeout(timer);
    }
    if (!negotiated) {
      socket.end();
      return;
    }
    // Keyed by the TCP socket (a forced detach destroys it, TLS and all); served over the
    // channel's socket, the TLS one after STARTTLS.
    const connection = new NbdConnection(
      channel.socket,
      channel.queue,
      negotiated,
      this.#options.log,
      this.#pool,
    );
    this.#connections.set(socket, connection);
    await connection.run();
  }

  /** Stops accepting, lets in-flight requests finish and answer, then closes every connection. */
  async close(): Promise<void> {
    await Promise.all(
      this.#servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))),
    );
    await Promise.all([...this.#connections.values()].map((c) => c.quiesce()));
    for (const socket of this.#sockets) socket.destroy();
    await Promise.allSettled([...this.#running]);
  }
}

function sameVolume(exportName: string, volume: string): boolean {
  return exportName === volume || exportName.startsWith(`${volume}@`);
}

/**
 * STARTTLS: the TCP socket is handed to a TLS server of its own, which checks
 * the client's certificate the way every TLS server of Node does (a bare
 * TLSSocket would not); the TLS socket is then read through a new queue.
 */
function tlsUpgrade(options: NbdTlsOptions): NegotiationTls {
  const psk = options.psk;
  const serverOptions: tls.TlsOptions = {
    ...(options.x509 ? { cert: options.x509.cert, key: options.x509.key } : {}),
    ...(options.x509?.ca ? { ca: options.x509.ca } : {}),
    // TLS 1.2 PSK suites for clients that do not do 1.3 PSK; 1.3 suites stay as they are.
    ...(psk ? { ciphers: `${tls.DEFAULT_CIPHERS}:PSK` } : {}),
    // Client certificates are asked for, not required: a client may prove itself by PSK, or
    // prove nothing where no allow list asks it to. One that shows a bad one is refused below.
    requestCert: options.x509?.ca !== undefined,
    rejectUnauthorized: false,
    handshakeTimeout: 0, // the NBD handshake's own timeout covers it
  };
  return {
    mode: options.mode,
    upgrade: (channel) =>
      new Promise((resolve, reject) => {
        const raw = channel.socket;
        raw.removeAllListeners('data');
        raw.pause();
        let pskUser: string | undefined;
        const server = new tls.Server({
          ...serverOptions,
          ...(psk
            ? {
                pskCallback: (_socket: tls.TLSSocket, user: string) => {
                  const key = psk.get(user);
                  if (key) pskUser = user;
                  return key ?? null;
                },
              }
            : {}),
        });
        let settled = false;
        const fail = (err: Error): void => {
          if (settled) return;
          settled = true;
          raw.destroy();
          reject(new ProtocolError(`TLS handshake failed: ${err.message}`));
        };
        server.once('tlsClientError', fail);
        raw.once('close', () => fail(new Error('connection closed')));
        server.once('secureConnection', (secure: tls.TLSSocket) => {
          let identity = pskUser;
          if (identity === undefined && options.x509?.ca) {
            const cert = secure.getPeerCertificate();
            const shown = Object.keys(cert).length > 0;
            if (shown && !secure.authorized) {
              fail(new Error(`client certificate refused: ${String(secure.authorizationError)}`));
              return;
            }
            if (shown && typeof cert.subject.CN === 'string') identity = cert.subject.CN;
          }
          settled = true;
          const attached = ByteQueue.attach(secure, QUEUE_HIGH_WATER_BYTES, {
            direct: false,
          });
          channel.socket = attached.socket;
          channel.queue = attached.queue;
          resolve({ identity });
        });
        server.emit('connection', raw);
      }),
  };
}
