import * as http from 'node:http';
import * as http2 from 'node:http2';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { getRequestListener } from '@hono/node-server';
import type { TlsFiles } from '../common/tls-fetch.ts';

type Fetch = (request: Request, env?: unknown) => Response | Promise<Response>;

export interface HttpServer {
  port: number;
  close(): Promise<void>;
}

interface DenoServe {
  serve(
    options: { hostname: string; port: number; onListen?: (addr: { port: number }) => void },
    handler: Fetch,
  ): { shutdown(): Promise<void>; addr: { port: number } };
}

/** The HTTP/2 connection preface a prior-knowledge (h2c) client opens with. */
const H2_PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');

/** The first byte of a TLS record carrying a handshake (a ClientHello). */
const TLS_HANDSHAKE = 0x16;

const PLAIN_REFUSED = Buffer.from(
  'HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n' +
    '{"error":{"code":"TLS_REQUIRED","message":"This daemon speaks TLS only: use https://"}}\n',
);

/** Takes an HTTP/1.1 Upgrade (the replica data connections); false when it is not one of ours. */
export type UpgradeHandler = (
  req: http.IncomingMessage,
  socket: net.Socket,
  head: Buffer,
) => boolean;

/**
 * Serves the API on one port for both peers and people: HTTP/2 cleartext for
 * daemons and tools, HTTP/1.1 for curl and browsers (and the replica data
 * connections, upgraded from HTTP/1.1). Node's http2 server has no cleartext
 * HTTP/1.1 fallback, so we look at the first bytes of each connection and
 * hand it to the right server. Under Deno, whose node:http2 server aborts
 * under load (denoland/deno#36788), Deno.serve does it all.
 */
export async function serveHttp(
  fetch: Fetch,
  host: string,
  port: number,
  upgrades?: UpgradeHandler,
  tlsFiles?: TlsFiles,
): Promise<HttpServer> {
  const deno = (globalThis as { Deno?: DenoServe }).Deno;
  if (deno) {
    if (tlsFiles) throw new Error('TLS (--tls-cert) is served under Node only, not yet under Deno');
    let listening!: (port: number) => void;
    const bound = new Promise<number>((resolve) => (listening = resolve));
    const server = deno.serve(
      { hostname: host, port, onListen: (addr) => listening(addr.port) },
      fetch,
    );
    return { port: await bound, close: () => server.shutdown() };
  }

  const listener = getRequestListener(fetch);
  const h1 = http.createServer((req, res) => void listener(req, res));
  h1.on('upgrade', (req: http.IncomingMessage, socket: net.Socket, head: Buffer) => {
    if (!upgrades?.(req, socket, head)) socket.destroy();
  });
  const h2 = http2.createServer((req, res) => void listener(req, res));
  // With TLS, ALPN picks the protocol: h2 for daemons and tools, http/1.1 for curl, browsers
  // and replica streams. Client certificates are asked for and checked, not required: people
  // come with tokens, peers with the node certificates the CA signed (cluster.ts).
  const secure = tlsFiles
    ? tls.createServer(
        {
          cert: tlsFiles.cert,
          key: tlsFiles.key,
          ...(tlsFiles.ca ? { ca: tlsFiles.ca, requestCert: true } : {}),
          rejectUnauthorized: false,
          ALPNProtocols: ['h2', 'http/1.1'],
        },
        (socket) => {
          socket.setNoDelay(true);
          (socket.alpnProtocol === 'h2' ? h2 : h1).emit('connection', socket);
        },
      )
    : undefined;
  secure?.on('tlsClientError', (_err, socket) => socket.destroy());
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    // Replica replies are small and latency-bound: no Nagle delay.
    socket.setNoDelay(true);
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
    socket.once('readable', () => {
      const head = socket.read(Math.min(socket.readableLength, H2_PREFACE.length)) as Buffer | null;
      if (head === null) {
        socket.destroy();
        return;
      }
      socket.unshift(head);
      if (secure) {
        // Plain HTTP on a TLS port gets a readable answer, not a failed handshake.
        if (head[0] === TLS_HANDSHAKE) secure.emit('connection', socket);
        else socket.end(PLAIN_REFUSED);
        return;
      }
      const isH2 = head.length > 0 && H2_PREFACE.subarray(0, head.length).equals(head);
      (isH2 ? h2 : h1).emit('connection', socket);
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  return {
    port: (server.address() as net.AddressInfo).port,
    close: async () => {
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const s of sockets) s.destroy();
      });
    },
  };
}
