import type * as http2 from 'node:http2';
import { CorralError } from '../common/errors.ts';
import { EPOCH_HEADER, PATH_PREFIX } from '../replication/wire.ts';
import type { Cluster } from './cluster.ts';
import type { HostedReplicas } from './hosted.ts';
import type { StreamHandler } from './http.ts';

const STATUS: Partial<Record<string, number>> = { NOT_FOUND: 404, BUSY: 409 };

function refuse(res: http2.Http2ServerResponse, status: number, code: string, message: string) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ error: { code, message } }));
}

/**
 * `POST /v1/replicas/:id/io` over HTTP/2: one engine's long-lived stream of
 * frames to a replica kept here (replication/wire.ts). Served beside Hono,
 * not through it: the request body and the response stay open both ways.
 */
export function replicaStreams(cluster: Cluster, hosted: HostedReplicas): StreamHandler {
  return (req, res) => {
    const url = req.url;
    if (req.method !== 'POST' || !url.startsWith(PATH_PREFIX) || !url.endsWith('/io')) return false;
    if (!cluster.authorized(req.headers.authorization)) {
      refuse(res, 401, 'UNAUTHORIZED', 'The cluster secret is missing or wrong');
      return true;
    }
    const id = decodeURIComponent(url.slice(PATH_PREFIX.length, -'/io'.length));
    const epoch = Number(req.headers[EPOCH_HEADER]);
    const stream = res.stream;
    const out = {
      write: (b: Buffer) => void stream.write(b),
      cork: () => stream.cork(),
      uncork: () => stream.uncork(),
    };
    hosted
      .attach(id, epoch, out, () => stream.close())
      .then(
        (session) => {
          res.writeHead(200, { 'content-type': 'application/octet-stream' });
          req.on('data', (chunk: Buffer) => session.push(chunk));
          let done = false;
          const finish = (): void => {
            if (done) return;
            done = true;
            void session.closed().finally(() => {
              if (!stream.destroyed) res.end();
            });
          };
          req.once('end', finish);
          stream.once('close', finish);
        },
        (err: unknown) => {
          const code = err instanceof CorralError ? err.code : 'INTERNAL';
          refuse(res, STATUS[code] ?? 500, code, err instanceof Error ? err.message : String(err));
        },
      );
    return true;
  };
}
