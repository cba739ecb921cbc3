import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { Kv } from '../../kv/kv.ts';
import { openSpaces, type Spaces } from '../../kv/spaces.ts';
import { LocalReplica } from '../../replication/local-replica.ts';
import { RemoteReplica } from '../../replication/remote-replica.ts';
import type { Replica } from '../../replication/replica.ts';
import { ReplicaSession } from '../../replication/replica-server.ts';
import { upgradeAccepted } from '../../replication/wire.ts';

/** A metadata store and a replica root in a temporary directory, and what to close at the end. */
export interface ReplicaEnv {
  dir: string;
  root: string;
  kv: Kv;
  spaces: Spaces;
  open: Array<{ close(): Promise<void> }>;
  servers: net.Server[];
  /** The streams' server ends, to cut like a host that vanished. */
  sockets: net.Socket[];
}

export async function replicaEnv(): Promise<ReplicaEnv> {
  const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-unit-'));
  const kv = await Kv.open(path.join(dir, 'meta'));
  return {
    dir,
    root: path.join(dir, 'replicas'),
    kv,
    spaces: openSpaces(kv),
    open: [],
    servers: [],
    sockets: [],
  };
}

export async function closeReplicaEnv(env: ReplicaEnv): Promise<void> {
  for (const o of env.open.reverse()) await o.close().catch(() => undefined);
  for (const s of env.sockets) s.destroy();
  for (const s of env.servers) s.close();
  await env.kv.close();
  await fs.promises.rm(env.dir, { recursive: true, force: true });
}

export async function newReplica(env: ReplicaEnv, sizeBytes: number): Promise<LocalReplica> {
  return LocalReplica.create({
    spaces: env.spaces,
    root: env.root,
    volume: 'v',
    sizeBytes,
    now: new Date(),
  });
}

/**
 * `replica` served over a real replica stream (TCP on loopback, the
 * daemon's wire format, its session code) and the engine-side handle to it;
 * the HTTP upgrade is answered without the daemon's API in between.
 */
export async function overStream(env: ReplicaEnv, replica: Replica): Promise<RemoteReplica> {
  const server = net.createServer((socket) => {
    env.sockets.push(socket);
    let head = Buffer.alloc(0);
    const onHead = (chunk: Buffer): void => {
      head = Buffer.concat([head, chunk]);
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) return;
      socket.off('data', onHead);
      const session = new ReplicaSession(replica, socket, () => socket.destroy());
      socket.on('data', (c: Buffer) => session.push(c));
      socket.write(upgradeAccepted());
      const rest = head.subarray(end + 4);
      if (rest.length > 0) session.push(rest);
      socket.once('close', () => session.close());
    };
    socket.on('data', onHead);
  });
  env.servers.push(server);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  return RemoteReplica.connect({
    url: `http://127.0.0.1:${port}`,
    id: replica.id,
    secret: 'test',
    epoch: 1,
    timeoutMs: 10_000,
  });
}
