import type * as http from 'node:http';
import type * as net from 'node:net';
import type * as tls from 'node:tls';
import { adoptDirect } from '../common/direct-socket.ts';
import { CorralError } from '../common/errors.ts';
import {
  EPOCH_HEADER,
  PATH_PREFIX,
  UPGRADE_PROTOCOL,
  upgradeAccepted,
  upgradeRefused,
  DirectFrameReader,
} from '../replication/wire.ts';
import type { Cluster } from './cluster.ts';
import type { HostedReplicas } from './hosted.ts';
import type { UpgradeHandler } from './http.ts';

const STATUS: Partial<Record<string, number>> = { NOT_FOUND: 404, BUSY: 409 };

/**
 * `GET /v1/replicas/:id/io` with `Upgrade: corral-replica/3`: one engine's
 * long-lived connection to a replica kept here (replication/wire.ts). The
 * cluster secret and the engine's epoch are checked before the switch.
 */
export function replicaUpgrades(cluster: Cluster, hosted: HostedReplicas): UpgradeHandler {
  return (req: http.IncomingMessage, raw: net.Socket, head: Buffer) => {
    const url = req.url ?? '';
    if (!url.startsWith(PATH_PREFIX) || !url.endsWith('/io')) return false;
    // The connection's socket: `raw`, or the one that reads it in place once the stream starts.
    let socket = raw;
    const refuse = (status: number, code: string, message: string) => {
      socket.end(upgradeRefused(status, code, message));
    };
    const asked = req.headers.upgrade;
    if (asked !== UPGRADE_PROTOCOL) {
      if (!asked?.startsWith('corral-replica/')) return false;
      // Another version of the daemon: its frames would fail every checksum here.
      refuse(
        426,
        'UNSUPPORTED_FORMAT',
        `This node speaks ${UPGRADE_PROTOCOL}, the engine asked for ${asked}: run the same Corral version on every node`,
      );
      return true;
    }
    if (
      !cluster.authorized(req.headers.authorization) &&
      !cluster.isPeerSocket(raw as tls.TLSSocket)
    ) {
      refuse(
        401,
        'UNAUTHENTICATED',
        'Only peer daemons open replica streams (cluster secret or node certificate)',
      );
      return true;
    }
    let id: string;
    try {
      id = decodeURIComponent(url.slice(PATH_PREFIX.length, -'/io'.length));
    } catch {
      refuse(400, 'INVALID_ARGUMENT', 'Malformed escape in the replica id');
      return true;
    }
    const epoch = Number(req.headers[EPOCH_HEADER]);
    socket.setNoDelay(true);
    const out = {
      write: (b: Buffer, done?: () => void) =>
        void socket.write(b, done && ((err) => (err ? undefined : done()))),
      cork: () => socket.cork(),
      uncork: () => socket.uncork(),
    };
    hosted
      .attach(id, epoch, out, () => socket.destroy())
      .then(
        (session) => {
          if (raw.destroyed) {
            void session.closed(); // the engine went away while the replica opened
            return;
          }
          // The engine sends nothing before our answer, so nothing is buffered yet: from
          // here on the kernel copies each write's payload straight into a pooled buffer.
          const reader = new DirectFrameReader(
            session.acquire,
            (frame, pooled) => session.frame(frame, pooled),
            (err) => session.fail(err),
          );
          // Over TLS the bytes are decrypted into buffers of OpenSSL's choosing: no reading in place.
          const encrypted = (raw as tls.TLSSocket).encrypted === true;
          const direct =
            !encrypted && head.length === 0 && raw.readableLength === 0
              ? adoptDirect(raw, reader)
              : undefined;
          if (direct) {
            socket = direct;
          } else {
            if (head.length > 0) session.push(head);
            socket.on('data', (chunk: Buffer) => session.push(chunk));
          }
          socket.write(upgradeAccepted());
          let done = false;
          const finish = (): void => {
            if (done) return;
            done = true;
            void session.closed();
          };
          socket.once('close', finish);
          socket.on('error', finish);
        },
        (err: unknown) => {
          const code = err instanceof CorralError ? err.code : 'INTERNAL';
          refuse(STATUS[code] ?? 500, code, err instanceof Error ? err.message : String(err));
        },
      );
    return true;
  };
}
