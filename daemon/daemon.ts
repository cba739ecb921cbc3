import { Disks } from './disks.ts';
import { punchHoles } from '../replication/punch.ts';
import { syncWrites } from '../replication/file-io.ts';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { systemClock } from '../common/clock.ts';
import { tlsFetch } from '../common/tls-fetch.ts';
import { VERSION } from '../common/version.ts';
import { EtcdClient } from '../kv/etcd.ts';
import { Kv } from '../kv/kv.ts';
import { jobCodec, openSpaces, tokenCodec } from '../kv/spaces.ts';
import { EtcdSpace } from '../kv/etcd-space.ts';
import { NbdServer } from '../nbd/server.ts';
import { FuseFrontend } from '../fuse/fuse-frontend.ts';
import { createApi } from './api.ts';
import { Tokens } from './auth.ts';
import { createUi } from './ui/ui.tsx';
import { randomBytes, randomUUID } from 'node:crypto';
import { BackupService } from './backups.ts';
import { Cluster } from './cluster.ts';
import type { NodeInfo } from './node-info.ts';
import { HostedReplicas } from './hosted.ts';
import { replicaUpgrades } from './replica-io.ts';
import { EventLog } from './events.ts';
import { StandbyService } from './standby.ts';
import { JobScheduler } from './jobs.ts';
import { Operations } from './operations.ts';
import { serveHttp } from './http.ts';
import { ClusterEvents } from './cluster-events.ts';
import { Drainer } from './drain.ts';
import { Metrics } from './metrics.ts';
import { NodeRegistry } from './node-registry.ts';
import { EtcdVolumeRecords, LocalVolumeRecords } from './volume-records.ts';
import { ADMIN_TOKEN_FILE } from './paths.ts';
import { logEvent, type Logger } from './log.ts';
import { VolumeManager } from './volumes.ts';

export interface DaemonConfig {
  dataDir: string;
  listen: { host: string; port: number };
  nbd: { host: string; port: number };
  nbdSocket: string;
  /** Where the FUSE images appear (Node only). */
  fuseMount: string;
  hangTimeoutMs: number;
  mergeBytesPerSecond: number | undefined;
  nbdHandshakeTimeoutMs: number;
  nbdMaxConnections: number;
  faultInjection: boolean;
  /** Where backups go when no target is named: file:///<data dir>/backups by default. */
  backupTarget: string;
  /** Directories `file://` targets may lie in (the default target's is added). */
  backupRoots: string[];
  /** Let the AWS SDK find S3 credentials in profiles or the cloud's metadata service. */
  s3CredentialChain: boolean;
  /** Other daemons' API URLs: replicas can go there. */
  peers: string[];
  /** This daemon's API URL as peers reach it; default http://<listen address>. */
  advertise: string | undefined;
  /** Shared by every daemon of a cluster; default: one made at first start and kept. */
  clusterSecret: string | undefined;
  /** A remote replica request unanswered this long sets it to ERR. */
  replicaTimeoutMs: number;
  /** A replica in ERR this long is rebuilt (in place if its host is back, else elsewhere). */
  rebuildDelayMs: number;
  rebuildBytesPerSecond: number | undefined;
  /** Bytes per second a backup reads or a restore writes (`--backup-rate`); none by default. */
  backupBytesPerSecond?: number;
  /** More disks for replicas (`--disk`); the data dir's is always one. */
  disks?: Array<{ path: string; tags: string[] }>;
  /** Rebuild a damaged metadata store (LevelDB repair) before starting. */
  repairMetadata?: boolean;
  /** A cluster: state in etcd, this daemon one of its nodes. Absent: one host, LevelDB. */
  etcd?: { endpoints: string[]; nodeName: string; nodeTtlMs: number };
  /** The node's certificate and key, and the cluster's CA (`--tls-cert/--tls-key/--tls-ca`). */
  tls?: { cert: Buffer; key: Buffer; ca: Buffer | undefined };
  /** NBD_OPT_STARTTLS: `on` offers it, `require` refuses clients without it. */
  nbdTls?: 'off' | 'on' | 'require';
  /** NBD pre-shared keys by user (`--nbd-tls-psk`, psktool's format). */
  nbdPsk?: Map<string, Buffer>;
  /** Prometheus metrics and per-volume stats (on by default; off only to measure their cost). */
  metrics?: boolean;
  /** Volumes to create if missing, for the quick start. */
  ensureVolumes: Array<{ name: string; size: string }>;
}

export function parseHostPort(value: string, what: string): { host: string; port: number } {
  const match = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(value) ?? /^()()(\d+)$/.exec(value);
  const port = Number(match?.[3]);
  if (!match || !Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(
      `Invalid ${what} address "${value}": use HOST:PORT, for example 127.0.0.1:10809`,
    );
  }
  return { host: match[1] || match[2] || '127.0.0.1', port };
}

export interface RunningDaemon {
  api: string;
  nbd: string;
  nbdSocket: string;
  fuseMount: string | null;
  stop(): Promise<void>;
}

export async function startDaemon(config: DaemonConfig, log: Logger): Promise<RunningDaemon> {
  // Volume data, metadata and the host's admin token live here: the owner's alone.
  await fs.promises.mkdir(config.dataDir, { recursive: true, mode: 0o700 });
  if (((await fs.promises.stat(config.dataDir)).mode & 0o077) !== 0) {
    await fs.promises.chmod(config.dataDir, 0o700);
    log.warn(`data dir ${config.dataDir} was open to others: now 0700`);
  }
  const metaDir = path.join(config.dataDir, 'meta');
  if (config.repairMetadata) {
    const copy = await Kv.repair(metaDir, new Date());
    log.warn(`metadata store ${metaDir} repaired; the damaged one was copied to ${copy}`);
  }
  const kv = await Kv.open(metaDir, { reserve: true });
  const spaces = openSpaces(kv);
  const events = new EventLog();
  // Writes that stall the event loop stall every volume and the API: say so when the gate
  // sends them off the loop (at most once a second, less while the disk stays slow).
  const onBackoff = (root: string, tookMs: number, backoffMs: number): void => {
    const { slowMs, windowMs } = syncWrites.for(root);
    log.warn(
      `two writes under ${root} took over ${slowMs} ms on the event loop within ${windowMs / 1000} s (the last ${tookMs.toFixed(0)} ms: a disk that falls behind, or a frozen filesystem); that disk's writes go to the thread pool for the next ${(backoffMs / 1000).toFixed(0)} s`,
    );
  };
  syncWrites.onBackoff = onBackoff;
  // One log line per event: operations with their ids, failures, refusals; never per I/O.
  events.follow((e) => logEvent(log, e));
  let node = await spaces.node.get('self');
  if (!node) {
    node = {
      id: randomUUID(),
      secret: randomBytes(24).toString('base64url'),
      createdAt: new Date().toISOString(),
    };
    await spaces.node.put('self', node);
  }
  const replicaRoot = path.join(config.dataDir, 'replicas');
  const disks = new Disks(replicaRoot, config.disks ?? []);
  await disks.prepare();
  const hosted = new HostedReplicas({
    spaces,
    root: replicaRoot,
    clock: systemClock,
    events,
    disks,
  });
  // Peers (and etcd, when its endpoints are https) are called with this node's certificate.
  const peerFetch = config.tls ? await tlsFetch(config.tls) : undefined;
  const etcd = config.etcd ? new EtcdClient(config.etcd.endpoints, peerFetch) : undefined;
  const clusterEvents =
    etcd && config.etcd ? new ClusterEvents(etcd, config.etcd.nodeName) : undefined;
  if (clusterEvents) events.onAdd = (e) => clusterEvents.publish(e);
  const registry: NodeRegistry | undefined =
    etcd && config.etcd
      ? new NodeRegistry({
          etcd,
          name: config.etcd.nodeName,
          ttlMs: config.etcd.nodeTtlMs,
          status: (): Promise<NodeInfo> => cluster.self(),
          onError: (err) =>
            events.add({ type: 'cluster-store-error', message: `node lease: ${err.message}` }),
        })
      : undefined;
  // The URL is known once the API listens (the port may be 0): filled in below.
  const cluster = new Cluster({
    ...(registry ? { registry } : {}),
    ...(etcd ? { etcdRequests: () => etcd.requests } : {}),
    selfUrl: config.advertise ?? '',
    ...(peerFetch ? { fetch: peerFetch } : {}),
    ...(config.tls ? { tls: config.tls } : {}),
    nodeId: node.id,
    peers: config.peers,
    secret: config.clusterSecret ?? node.secret,
    dataDir: config.dataDir,
    version: VERSION,
    replicaCount: async () => (await spaces.replicas.keys()).length,
    disks: async () => {
      const roots = (await spaces.replicas.entries()).map(([, r]) => r.root ?? replicaRoot);
      return disks.info((root) => roots.filter((r) => r === root).length);
    },
  });
  // The NBD server asks the volume manager for exports and the manager asks the server for
  // connection counts: tie the knot through these late-bound functions.
  const late: { nbd?: NbdServer; fuse?: FuseFrontend } = {};
  const operations = new Operations(events, 200, config.etcd?.nodeName);
  // Late-bound like the frontends: the metrics read volumes, volumes feed the metrics.
  const lateVolumes: { manager?: VolumeManager; jobs?: JobScheduler } = {};
  const metrics =
    config.metrics === false
      ? undefined
      : new Metrics({
          volumes: () => lateVolumes.manager?.list() ?? Promise.resolve([]),
          node: () => cluster.self(),
          jobs: () => lateVolumes.jobs?.list() ?? Promise.resolve([]),
        });
  if (metrics) operations.onFinish = (op) => metrics.operationEnded(op);
  const etcdRecords = etcd ? new EtcdVolumeRecords(etcd) : undefined;
  const volumes = new VolumeManager({
    spaces,
    ...(metrics ? { meters: metrics } : {}),
    ...(etcd ? { hosted } : {}),
    records: etcdRecords ?? new LocalVolumeRecords(spaces.volumes),
    replicaRoot,
    disks,
    cluster,
    replicaTimeoutMs: config.replicaTimeoutMs,
    hostedIds: () => hosted.ids(),
    metadata: { created: kv.created, sinceMs: Date.parse(node.createdAt) },
    quarantineRoot: path.join(config.dataDir, 'quarantine'),
    diskFull: () => kv.diskFull(),
    operations,
    rebuildDelayMs: config.rebuildDelayMs,
    ...(config.rebuildBytesPerSecond
      ? { rebuildBytesPerSecond: config.rebuildBytesPerSecond }
      : {}),
    clock: systemClock,
    events,
    hangTimeoutMs: config.hangTimeoutMs,
    faultInjection: config.faultInjection,
    mergeBytesPerSecond: config.mergeBytesPerSecond,
    connections: (name) => late.nbd?.connectionsTo(name) ?? 0,
    disconnect: (name) => late.nbd?.disconnect(name),
    resized: async (name) => {
      await late.fuse?.resized(name);
    },
    imageHolders: async (name) => {
      const fuse = late.fuse;
      if (!fuse || fuse.openCount(name) === 0) return [];
      const holders = await fuse.holders(name);
      return holders.length > 0 ? holders : [`${fuse.openCount(name)} open file handle(s)`];
    },
  });
  lateVolumes.manager = volumes;
  const nbdTls = config.nbdTls ?? 'off';
  const nbd = new NbdServer({
    exports: {
      names: () => volumes.attachedNames(),
      lookup: (name) => volumes.device(name),
      permits: (name, identity) => volumes.nbdPermits(name, identity),
    },
    ...(nbdTls !== 'off'
      ? {
          // PSK or certificates, as qemu-nbd takes one kind of credentials: a server holding
          // both picks the certificate suites and a PSK-only client (GnuTLS) gives up.
          tls: {
            mode: nbdTls,
            ...(config.nbdPsk ? { psk: config.nbdPsk } : config.tls ? { x509: config.tls } : {}),
          },
        }
      : {}),
    log: { warn: (m) => log.warn(m) },
    handshakeTimeoutMs: config.nbdHandshakeTimeoutMs,
    maxConnections: config.nbdMaxConnections,
  });
  late.nbd = nbd;
  const nbdAddr = await nbd.listenTcp(config.nbd.host, config.nbd.port);
  await nbd.listenUnix(config.nbdSocket);
  // FUSE images are served through a libuv pipe handle on /dev/fuse, which only Node offers.
  const isDeno = (globalThis as { Deno?: unknown }).Deno !== undefined;
  let fuse: FuseFrontend | undefined;
  if (!isDeno) {
    try {
      fuse = await FuseFrontend.mount({
        mountpoint: config.fuseMount,
        volumes: { names: () => volumes.fuseNames(), device: (name) => volumes.fuseDevice(name) },
        log: { warn: (m) => log.warn(m) },
      });
      late.fuse = fuse;
    } catch (err) {
      log.warn(
        `FUSE images are off: cannot mount ${config.fuseMount}: ${err instanceof Error ? err.message : String(err)}`,
      );
    }
  }
  const backups = new BackupService({
    volumes,
    operations,
    events,
    clock: systemClock,
    ...(config.backupBytesPerSecond ? { bytesPerSecond: config.backupBytesPerSecond } : {}),
    defaultTarget: config.backupTarget,
    targetPolicy: {
      fileRoots: [
        ...new Set([
          ...config.backupRoots,
          ...(config.backupTarget.startsWith('file://')
            ? [decodeURIComponent(new URL(config.backupTarget).pathname)]
            : []),
        ]),
      ],
      s3CredentialChain: config.s3CredentialChain,
    },
    ...(config.faultInjection && process.env.CORRAL_BACKUP_DELAY_MS
      ? { delayMs: Number(process.env.CORRAL_BACKUP_DELAY_MS) }
      : {}),
  });
  // In a cluster jobs are the cluster's: kept in etcd, run by the node serving their volume.
  const etcdJobs = etcd ? new EtcdSpace(etcd, '/corral/jobs/', jobCodec) : undefined;
  const nodeName = config.etcd?.nodeName;
  const jobs = new JobScheduler({
    jobs: etcdJobs ?? spaces.jobs,
    ...(etcdRecords
      ? {
          runsHere: (volume: string) => {
            const r = etcdRecords.peek(volume);
            return Promise.resolve(r?.attached === true && r.engineNode === nodeName);
          },
        }
      : {}),
    volumes,
    backups,
    operations,
    clock: systemClock,
  });
  jobs.start();
  lateVolumes.jobs = jobs;
  const standby = new StandbyService({
    volumes,
    backups,
    operations,
    events,
    clock: systemClock,
  });
  const drainer = etcdRecords
    ? new Drainer({
        cluster,
        records: etcdRecords,
        operations,
        clock: systemClock,
        attach: (volume, node) => volumes.attach(volume, { node }),
      })
    : undefined;
  // Tokens are the cluster's in etcd (valid on every node), the host's in LevelDB otherwise.
  const etcdTokens = etcd ? new EtcdSpace(etcd, '/corral/tokens/', tokenCodec) : undefined;
  await etcdTokens?.start((err) =>
    events.add({ type: 'cluster-store-error', message: `token watch: ${err.message}` }),
  );
  const tokens = new Tokens(etcdTokens ?? spaces.tokens, { cached: etcdTokens !== undefined });
  await tokens.load();
  await tokens.ensureHostToken(
    path.join(config.dataDir, ADMIN_TOKEN_FILE),
    nodeName !== undefined ? `admin@${nodeName}` : 'host-admin',
  );
  const app = createApi({
    tokens,
    defaultTarget: config.backupTarget,
    ...(metrics ? { metrics } : {}),
    ...(drainer ? { drainer } : {}),
    ...(clusterEvents ? { clusterEvents } : {}),
    volumes,
    backups,
    standby,
    jobs,
    operations,
    cluster,
    hosted,
    events,
    version: VERSION,
    faultInjection: config.faultInjection,
  });
  // The web UI at / and /ui/: a client of the API, in process, with the user's token.
  const ui = createUi(app.fetch, { secure: config.tls !== undefined });
  const http = await serveHttp(
    (request, env) => {
      const at = new URL(request.url).pathname;
      return at === '/' || at === '/docs' || at === '/ui' || at.startsWith('/ui/')
        ? ui.fetch(request, env)
        : app.fetch(request, env);
    },
    config.listen.host,
    config.listen.port,
    replicaUpgrades(cluster, hosted),
    config.tls,
  );
  const scheme = config.tls ? 'https' : 'http';
  cluster.selfUrl = config.advertise ?? `${scheme}://${config.listen.host}:${http.port}`;
  // Registered before the volumes start: placement and engines look nodes up in etcd.
  await registry?.start(cluster.selfUrl);
  if (registry) log.info(`node ${registry.name} registered in etcd ${etcd!.endpoints.join(',')}`);
  if (!punchHoles)
    log.warn(
      'trimmed blocks read as zeros but their space is not returned to the filesystem: native/punch.node is not built (scripts/build-native.sh)',
    );
  await etcdRecords?.start((err) =>
    events.add({ type: 'cluster-store-error', message: `volume watch: ${err.message}` }),
  );
  await etcdJobs?.start((err) =>
    events.add({ type: 'cluster-store-error', message: `job watch: ${err.message}` }),
  );
  await registry?.follow(
    (name) => {
      events.add({ type: 'node-down', message: `node ${name}: its lease ended` });
      void volumes.failover
        ?.nodeDown(name)
        .catch((err: unknown) => events.add({ type: 'failover-failed', message: String(err) }));
    },
    (err) => events.add({ type: 'cluster-store-error', message: `node watch: ${err.message}` }),
  );
  // Volumes attach once the API serves: their replicas on peers are reached from here.
  await volumes.start();
  volumes.startRepairs();
  standby.start();
  for (const v of config.ensureVolumes) {
    if (!(await volumes.list()).some((x) => x.name === v.name))
      await volumes.create({ name: v.name, size: v.size });
  }

  let stopping: Promise<void> | undefined;
  return {
    api: `${scheme}://${config.listen.host}:${http.port}`,
    nbd: `${nbdAddr.address}:${nbdAddr.port}`,
    nbdSocket: config.nbdSocket,
    fuseMount: fuse ? fuse.mountpoint : null,
    stop: () =>
      (stopping ??= (async () => {
        await http.close();
        await jobs.stop();
        await standby.stop();
        await nbd.close();
        await fuse?.unmount();
        await volumes.stop();
        await hosted.stop();
        etcdRecords?.stop();
        etcdJobs?.stop();
        etcdTokens?.stop();
        await registry?.stop();
        await kv.close();
        if (syncWrites.onBackoff === onBackoff) syncWrites.onBackoff = undefined;
      })()),
  };
}
