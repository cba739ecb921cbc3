import * as fs from 'node:fs';
import * as net from 'node:net';
import { BufferPool } from '../common/buffer-pool.ts';
import { ByteQueue } from './byte-queue.ts';
import { NbdConnection, type ConnectionLog } from './connection.ts';
import { negotiate, ProtocolError, type ExportProvider } from './handshake.ts';
import { MAX_REQUEST_BYTES } from '../replication/block-device.ts';

export interface NbdServerOptions {
  exports: ExportProvider;
  log: ConnectionLog;
  /** Connections beyond this are closed at once (qemu CVE-2024-7409: no unbounded handshakes). */
  maxConnections?: number;
  /** A client that has not finished negotiating by then is dropped. */
  handshakeTimeoutMs?: number;
}

/** Unread request bytes we hold per connection before pausing the socket. */
const QUEUE_HIGH_WATER_BYTES = 2 * MAX_REQUEST_BYTES + 64 * 1024;

/** The NBD server: every attached volume under its name, on TCP and a Unix socket. */
export class NbdServer {
  readonly #options: Required<NbdServerOptions>;
  readonly #servers: net.Server[] = [];
  readonly #sockets = new Set<net.Socket>();
  readonly #connections = new Map<net.Socket, NbdConnection>();
  readonly #running = new Set<Promise<void>>();
  /** Large request buffers, shared by all connections. */
  readonly #pool = new BufferPool(64 * 1024 * 1024);

  constructor(options: NbdServerOptions) {
    this.#options = { maxConnections: 256, handshakeTimeoutMs: 10_000, ...options };
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
    const { socket, queue } = ByteQueue.attach(raw, QUEUE_HIGH_WATER_BYTES);
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
    try {
      negotiated = await negotiate(socket, queue, this.#options.exports);
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
    const connection = new NbdConnection(socket, queue, negotiated, this.#options.log, this.#pool);
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
