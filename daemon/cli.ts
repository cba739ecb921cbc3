import { parseDisk } from './disks.ts';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { formatSize, parseSize } from '../common/size.ts';
import { textPieces } from '../common/text-stream.ts';
import { VERSION } from '../common/version.ts';
import { ApiError, authHeaders, call } from './client.ts';
import { follow, keyFrom, print, table, UsageError } from './cli-util.ts';
import type { Operation } from './operations.ts';
import { runBackupCommand, runJobCommand } from './cli-backup.ts';
import { runTokenCommand } from './cli-token.ts';
import { runCertsCommand } from './cli-certs.ts';
import { parseHostPort, startDaemon, type DaemonConfig } from './daemon.ts';
import { defaultDataDir } from './paths.ts';
import { readSecretFile } from './secrets.ts';
import { createLogger, LOG_LEVELS, type LogLevel } from './log.ts';
import type { DaemonEvent } from './events.ts';
import type { VolumeStats } from './metrics.ts';
import type { VolumeInfo } from './volume-info.ts';
import type { NodeInfo } from './node-info.ts';
import type { SnapshotInfo } from '../replication/replica.ts';

/** The CLI's limit flags and the API's names for them. */
const QOS_FLAGS = [
  ['iops-limit', 'iops'],
  ['bandwidth-limit', 'bandwidth'],
  ['read-iops-limit', 'readIops'],
  ['write-iops-limit', 'writeIops'],
  ['read-bandwidth-limit', 'readBandwidth'],
  ['write-bandwidth-limit', 'writeBandwidth'],
  ['burst', 'burst'],
] as const;

const USAGE = `corral ${VERSION} — distributed block storage

  corral daemon [--data-dir DIR] [--listen ADDR] [--nbd ADDR] [--nbd-socket PATH] [--fuse-mount DIR]
                [--ensure-volume NAME=SIZE ...] [--hang-timeout MS]
                [--nbd-handshake-timeout MS] [--nbd-max-connections N] [--merge-rate BYTES/S]
                [--backup-target URL] [--peer URL ...] [--advertise URL]
                [--cluster-secret-file F (or CORRAL_CLUSTER_SECRET)] [--replica-timeout MS]
                [--backup-root DIR ...] [--s3-credential-chain]
                [--rebuild-delay MS] [--rebuild-rate BYTES/S] [--backup-rate BYTES/S] [--repair-metadata]
                [--disk PATH[:tag=T[,T2]] ...]   more disks for replicas (the data dir's stays one)
                [--etcd URL[,URL...] --node-name NAME [--node-ttl MS]] [--metrics on|off]
                [--tls-cert F --tls-key F [--tls-ca F]] [--nbd-tls off|on|require]
                [--nbd-tls-psk FILE] [--log-level debug|info|warn|error] [--log-format json|text]
  corral volume create NAME --size 10G [--replicas N [--allow-same-host]] [--frontend nbd|fuse]
                [--failover auto] [--nbd-allow IDENTITY ...] [--disk-tag T] [--json]
                [--encrypt --key-file FILE | --key-env VAR]   AES-256-XTS at rest; the key is never stored
  corral volume create NAME --from-snapshot VOL@SNAP [--size S]
  corral volume create NAME --standby-from VOL|TARGET_URL?volume=VOL [--poll 1m] [--key-file F]
                a standby (DR) volume: restores VOL's newest backup, then applies each newer one;
                read-only until "corral volume activate NAME" makes it a normal volume
  corral snapshot create VOL [SNAP] | ls VOL | rm VOL SNAP | revert VOL SNAP [--discard-newer]
  corral volume ls [--json] | get NAME [--json] | stats NAME [--watch]
  corral volume attach NAME [--frontend nbd|fuse] [--node N] [--key-file F | --key-env V]
  corral volume detach NAME [--force] | rm NAME [--force]
  corral volume rekey NAME --key-file OLD --new-key-file NEW   (or --key-env/--new-key-env; no data rewritten)
  corral volume set NAME [--iops-limit N] [--bandwidth-limit 100M] [--read-|--write-iops-limit N]
                [--read-|--write-bandwidth-limit S] [--burst 2x]   live; 0 removes a limit
                (the same flags on volume create)
  corral volume activate NAME             a standby stops following and becomes writable
  corral volume expand NAME --size 20G    online, attached volumes; never shrinks (snapshots keep their size)
  corral backup create VOL [--snapshot SNAP] [--target URL] [--encrypt-key-file F | --encrypt-key-env V]
  corral backup ls [VOL] [--target URL]
  corral backup get BACKUP | restore BACKUP NEWVOL [--key-file F | --key-env V] | rm BACKUP | gc   [--target URL]
  corral job add VOL --cron EXPR --task snapshot|backup|scrub --retain N [--target URL] | ls | rm ID
  corral node ls | node cordon N | node uncordon N | node drain N
  corral replica ls VOL | replica rm VOL REPLICA | volume verify VOL | volume scrub VOL
  corral events [--volume NAME] [--follow] [--json]
  corral token create --name NAME --role admin|operator|read-only | ls [--json] | rm NAME
  corral cluster certs --out DIR --node NAME[=ADDR,...] ... [--client NAME ...] [--days N]

BACKUP is a name (in --target, else the daemon's --backup-target) or a URL as printed by
"backup ls --json" (s3://bucket/prefix?endpoint=...&backup=NAME&volume=VOL). Targets:
file:///path and s3://bucket/prefix[?endpoint=URL&region=R]; S3 credentials come from
AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the daemon's environment.

The CLI talks to CORRAL_API (default http://127.0.0.1:9500; https:// trusts the CA in
NODE_EXTRA_CA_CERTS) with the token in CORRAL_TOKEN, or
in the file CORRAL_TOKEN_FILE names, or else the daemon's own admin token (DATA_DIR/admin.token,
readable by the daemon's user only; the data dir is CORRAL_DATA_DIR or the daemon's default).`;

function volumeRows(volumes: VolumeInfo[]): string {
  // In a cluster: which node's engine serves each volume.
  const nodes = volumes.some((v) => v.node !== undefined);
  return table([
    ['NAME', 'SIZE', 'REPLICAS', 'FRONTEND', 'STATE', ...(nodes ? ['NODE'] : []), 'CONNECTIONS'],
    ...volumes.map((v) => [
      v.name,
      formatSize(v.sizeBytes),
      `${v.replicas.filter((r) => r.mode === 'RW').length}/${v.replicaCount}`,
      v.frontend,
      v.state,
      ...(nodes ? [v.node ?? ''] : []),
      String(v.nbdConnections),
    ]),
  ]);
}

async function runDaemon(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      'data-dir': { type: 'string' },
      listen: { type: 'string' },
      nbd: { type: 'string' },
      'nbd-socket': { type: 'string' },
      'fuse-mount': { type: 'string' },
      peer: { type: 'string', multiple: true },
      'ensure-volume': { type: 'string', multiple: true },
      'hang-timeout': { type: 'string' },
      'nbd-handshake-timeout': { type: 'string' },
      'nbd-max-connections': { type: 'string' },
      'merge-rate': { type: 'string' },
      'backup-target': { type: 'string' },
      advertise: { type: 'string' },
      'cluster-secret': { type: 'string' },
      'cluster-secret-file': { type: 'string' },
      'backup-root': { type: 'string', multiple: true },
      's3-credential-chain': { type: 'boolean' },
      'replica-timeout': { type: 'string' },
      'rebuild-delay': { type: 'string' },
      'rebuild-rate': { type: 'string' },
      disk: { type: 'string', multiple: true },
      'backup-rate': { type: 'string' },
      'repair-metadata': { type: 'boolean' },
      etcd: { type: 'string' },
      'node-name': { type: 'string' },
      'node-ttl': { type: 'string' },
      metrics: { type: 'string' },
      'tls-cert': { type: 'string' },
      'tls-key': { type: 'string' },
      'tls-ca': { type: 'string' },
      'nbd-tls': { type: 'string' },
      'nbd-tls-psk': { type: 'string' },
      'log-level': { type: 'string' },
      'log-format': { type: 'string' },
    },
    strict: true,
  });
  if (values['cluster-secret'] !== undefined)
    throw new UsageError(
      '--cluster-secret is not taken on the command line (ps shows it to every user): use --cluster-secret-file FILE (0600) or CORRAL_CLUSTER_SECRET',
    );
  // Whatever the daemon creates (metadata, layer files, sockets, tokens) is its user's alone.
  process.umask(0o077);
  const dataDir = path.resolve(values['data-dir'] ?? defaultDataDir());
  const config: DaemonConfig = {
    dataDir,
    listen: parseHostPort(values.listen ?? '127.0.0.1:9500', '--listen'),
    nbd: parseHostPort(values.nbd ?? '127.0.0.1:10809', '--nbd'),
    nbdSocket: path.resolve(values['nbd-socket'] ?? path.join(dataDir, 'nbd.sock')),
    fuseMount: path.resolve(values['fuse-mount'] ?? path.join(dataDir, 'images')),
    hangTimeoutMs: Number(values['hang-timeout'] ?? 30_000),
    nbdHandshakeTimeoutMs: Number(values['nbd-handshake-timeout'] ?? 10_000),
    nbdMaxConnections: Number(values['nbd-max-connections'] ?? 256),
    mergeBytesPerSecond: values['merge-rate'] ? parseSize(values['merge-rate']) : undefined,
    faultInjection: process.env.CORRAL_FAULT_INJECTION === '1',
    backupTarget: values['backup-target'] ?? `file://${path.join(dataDir, 'backups')}`,
    backupRoots: (values['backup-root'] ?? [path.join(dataDir, 'backups')]).map((r) =>
      path.resolve(r),
    ),
    s3CredentialChain: values['s3-credential-chain'] ?? false,
    peers: (values.peer ?? []).map((p) => p.replace(/\/+$/, '')),
    advertise: values.advertise,
    clusterSecret:
      values['cluster-secret-file'] !== undefined
        ? (await readSecretFile(values['cluster-secret-file'], 'cluster secret file'))
            .toString('utf8')
            .trim()
        : process.env.CORRAL_CLUSTER_SECRET,
    replicaTimeoutMs: Number(values['replica-timeout'] ?? 5000),
    rebuildDelayMs: Number(values['rebuild-delay'] ?? 10_000),
    rebuildBytesPerSecond: values['rebuild-rate'] ? parseSize(values['rebuild-rate']) : undefined,
    disks: (values.disk ?? []).map(parseDisk),
    ...(values['backup-rate'] ? { backupBytesPerSecond: parseSize(values['backup-rate']) } : {}),
    repairMetadata: values['repair-metadata'] ?? false,
    metrics: values.metrics !== 'off',
    ...(await tlsConfig(values)),
    ...(values.etcd !== undefined
      ? {
          etcd: {
            endpoints: values.etcd.split(',').map((e) => e.trim().replace(/\/+$/, '')),
            nodeName: values['node-name'] ?? os.hostname(),
            nodeTtlMs: Number(values['node-ttl'] ?? 10_000),
          },
        }
      : {}),
    ensureVolumes: (values['ensure-volume'] ?? []).map((spec) => {
      const [name, size] = spec.split('=');
      if (!name || !size) throw new UsageError(`--ensure-volume takes NAME=SIZE, got "${spec}"`);
      return { name, size };
    }),
  };
  if (!Number.isFinite(config.hangTimeoutMs) || config.hangTimeoutMs < 100) {
    throw new UsageError('--hang-timeout takes milliseconds, at least 100');
  }
  if (!Number.isFinite(config.nbdHandshakeTimeoutMs) || config.nbdHandshakeTimeoutMs < 100) {
    throw new UsageError('--nbd-handshake-timeout takes milliseconds, at least 100');
  }
  if (!Number.isInteger(config.nbdMaxConnections) || config.nbdMaxConnections < 1) {
    throw new UsageError('--nbd-max-connections takes a whole number, at least 1');
  }
  if (config.etcd) {
    if (!Number.isFinite(config.etcd.nodeTtlMs) || config.etcd.nodeTtlMs < 2000)
      throw new UsageError(
        '--node-ttl takes milliseconds, at least 2000 (etcd leases count seconds)',
      );
    if (!/^[a-z0-9][a-z0-9.-]{0,62}$/.test(config.etcd.nodeName))
      throw new UsageError(
        `--node-name "${config.etcd.nodeName}": use up to 63 lower-case letters, digits, dots and dashes`,
      );
    if (config.peers.length > 0)
      throw new UsageError('--peer and --etcd do not mix: in a cluster the nodes come from etcd');
  } else if (values['node-name'] !== undefined || values['node-ttl'] !== undefined) {
    throw new UsageError('--node-name and --node-ttl need --etcd');
  }
  // A daemon outlives whoever reads its output: a closed pipe must not kill it (EPIPE).
  process.stdout.on('error', () => undefined);
  process.stderr.on('error', () => undefined);
  const level = values['log-level'] ?? 'info';
  if (!(LOG_LEVELS as readonly string[]).includes(level))
    throw new UsageError(`--log-level takes ${LOG_LEVELS.join(', ')}`);
  const format = values['log-format'] ?? (process.stderr.isTTY ? 'text' : 'json');
  if (format !== 'json' && format !== 'text')
    throw new UsageError('--log-format takes json or text');
  const logger = createLogger({ level: level as LogLevel, format });
  const log = (line: string): void => logger.info(line);
  const daemon = await startDaemon(config, logger);
  // One machine-readable line on stdout: tests and scripts wait for it.
  console.log(
    `ready ${JSON.stringify({ api: daemon.api, nbd: daemon.nbd, nbdSocket: daemon.nbdSocket, fuseMount: daemon.fuseMount, pid: process.pid })}`,
  );
  log(
    `corral ${VERSION} serving: API ${daemon.api}, NBD nbd://${daemon.nbd}/<volume>, socket ${daemon.nbdSocket}, data ${dataDir}`,
  );
  const stop = (signal: string): void => {
    log(`${signal}: stopping (flushing every volume)`);
    daemon.stop().then(
      () => process.exit(0),
      (err: unknown) => {
        logger.error(`stop failed: ${String(err)}`);
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

/** The TLS flags, read and checked: a key others can read is refused. */
async function tlsConfig(values: {
  'tls-cert'?: string;
  'tls-key'?: string;
  'tls-ca'?: string;
  'nbd-tls'?: string;
  'nbd-tls-psk'?: string;
}): Promise<Pick<DaemonConfig, 'tls' | 'nbdTls' | 'nbdPsk'>> {
  const cert = values['tls-cert'];
  const key = values['tls-key'];
  if ((cert === undefined) !== (key === undefined))
    throw new UsageError('--tls-cert and --tls-key go together');
  if (values['tls-ca'] !== undefined && cert === undefined)
    throw new UsageError('--tls-ca needs --tls-cert and --tls-key');
  const nbdTls = values['nbd-tls'] ?? 'off';
  if (nbdTls !== 'off' && nbdTls !== 'on' && nbdTls !== 'require')
    throw new UsageError('--nbd-tls takes off, on or require');
  const pskFile = values['nbd-tls-psk'];
  if (nbdTls !== 'off' && cert === undefined && pskFile === undefined)
    throw new UsageError('--nbd-tls needs --tls-cert/--tls-key or --nbd-tls-psk');
  if (pskFile !== undefined && nbdTls === 'off')
    throw new UsageError('--nbd-tls-psk needs --nbd-tls on or require');
  let nbdPsk: Map<string, Buffer> | undefined;
  if (pskFile !== undefined) {
    nbdPsk = new Map();
    // psktool's format, as nbdkit and qemu-nbd read it: one `user:hexkey` a line.
    for (const line of (await readSecretFile(pskFile, 'PSK file')).toString('utf8').split('\n')) {
      if (line.trim() === '') continue;
      const m = /^([^:]+):([0-9a-fA-F]+)$/.exec(line.trim());
      if (!m || m[2]!.length % 2 !== 0)
        throw new UsageError(`--nbd-tls-psk ${pskFile}: each line is USER:HEXKEY (psktool)`);
      nbdPsk.set(m[1]!, Buffer.from(m[2]!, 'hex'));
    }
    if (nbdPsk.size === 0) throw new UsageError(`--nbd-tls-psk ${pskFile} holds no key`);
  }
  return {
    ...(cert !== undefined && key !== undefined
      ? {
          tls: {
            cert: await fs.promises.readFile(cert),
            key: await readSecretFile(key, 'TLS key'),
            ca:
              values['tls-ca'] !== undefined
                ? await fs.promises.readFile(values['tls-ca'])
                : undefined,
          },
        }
      : {}),
    nbdTls,
    ...(nbdPsk ? { nbdPsk } : {}),
  };
}

async function runClient(args: string[]): Promise<void> {
  const api = process.env.CORRAL_API ?? 'http://127.0.0.1:9500';
  const [noun, verb, ...rest] = args;
  const parse = () =>
    parseArgs({
      args: rest,
      options: {
        json: { type: 'boolean' },
        force: { type: 'boolean' },
        size: { type: 'string' },
        replicas: { type: 'string' },
        frontend: { type: 'string' },
        'from-snapshot': { type: 'string' },
        'discard-newer': { type: 'boolean' },
        'allow-same-host': { type: 'boolean' },
        node: { type: 'string' },
        failover: { type: 'string' },
        watch: { type: 'boolean' },
        'nbd-allow': { type: 'string', multiple: true },
        'disk-tag': { type: 'string' },
        encrypt: { type: 'boolean' },
        'key-file': { type: 'string' },
        'key-env': { type: 'string' },
        'new-key-file': { type: 'string' },
        'new-key-env': { type: 'string' },
        'standby-from': { type: 'string' },
        poll: { type: 'string' },
        quiet: { type: 'boolean', short: 'q' },
        ...Object.fromEntries(QOS_FLAGS.map(([flag]) => [flag, { type: 'string' as const }])),
      },
      allowPositionals: true,
      strict: true,
    });
  const need = (positionals: string[], what: string): string => {
    const value = positionals[0];
    if (!value) throw new UsageError(`missing ${what}`);
    return value;
  };

  if (noun === 'volume' && verb !== 'verify' && verb !== 'scrub') {
    switch (verb) {
      case 'create': {
        const { values, positionals } = parse();
        const name = need(positionals, 'volume name');
        if (values['standby-from']) {
          const key =
            values['key-file'] || values['key-env']
              ? await keyFrom(values['key-file'], values['key-env'])
              : undefined;
          const { operation } = await call<{ operation: Operation }>(api, 'POST', '/v1/volumes', {
            name,
            standbyFrom: values['standby-from'],
            ...(values.poll ? { pollSeconds: parseSeconds(values.poll, '--poll') } : {}),
            ...(values.replicas ? { replicas: Number(values.replicas) } : {}),
            ...(values.frontend ? { frontend: values.frontend } : {}),
            ...(key !== undefined ? { key } : {}),
          });
          const done = await follow(api, operation, values.json === true || values.quiet === true);
          const volume = done.result as VolumeInfo;
          print(
            values.json === true,
            volume,
            () => `${volumeRows([volume])}\n${standbyLine(volume)}`,
          );
          return;
        }
        if (values.poll) throw new UsageError('--poll is for standby volumes (--standby-from)');
        if (!values.size && !values['from-snapshot']) {
          throw new UsageError('volume create needs --size, for example --size 10G');
        }
        const qos = qosFlags(values);
        const volume = await call<VolumeInfo>(api, 'POST', '/v1/volumes', {
          name,
          ...(values.size ? { size: values.size } : {}),
          ...(values['from-snapshot'] ? { fromSnapshot: values['from-snapshot'] } : {}),
          ...(values.replicas ? { replicas: Number(values.replicas) } : {}),
          ...(values.frontend ? { frontend: values.frontend } : {}),
          ...(values['allow-same-host'] ? { allowSameHost: true } : {}),
          ...(values.failover ? { failover: values.failover } : {}),
          ...(values['nbd-allow'] ? { nbdAllow: values['nbd-allow'] } : {}),
          ...(qos ? { qos } : {}),
          ...(values['disk-tag'] ? { diskTag: values['disk-tag'] } : {}),
          ...(values.encrypt
            ? {
                encrypt: true,
                key: await keyFrom(values['key-file'], values['key-env'], 'an encrypted volume'),
              }
            : {}),
        });
        print(values.json === true, volume, () => volumeRows([volume]));
        return;
      }
      case 'set': {
        const { values, positionals } = parse();
        const name = need(positionals, 'volume name');
        const qos = qosFlags(values);
        if (!qos)
          throw new UsageError(
            `volume set needs a limit: ${QOS_FLAGS.map(([f]) => `--${f}`).join(', ')}`,
          );
        const volume = await call<VolumeInfo>(
          api,
          'POST',
          `/v1/volumes/${encodeURIComponent(name)}/qos`,
          qos,
        );
        print(values.json === true, volume, () => volumeRows([volume]) + `\n${limitsLine(volume)}`);
        return;
      }
      case 'ls': {
        const { values } = parse();
        const { volumes } = await call<{ volumes: VolumeInfo[] }>(api, 'GET', '/v1/volumes');
        print(values.json === true, volumes, () => volumeRows(volumes));
        return;
      }
      case 'stats': {
        const { values, positionals } = parse();
        const name = need(positionals, 'volume name');
        const route = `/v1/volumes/${encodeURIComponent(name)}/stats`;
        const ms = (s: number) => (s === Infinity ? '>2.5s' : `${(s * 1000).toFixed(2)}ms`);
        let last = await call<VolumeStats>(api, 'GET', route);
        if (values.watch !== true) {
          print(values.json === true, last, () =>
            table([
              ['VOLUME', 'READS', 'WRITES', 'READ', 'WRITTEN', 'READ p50/p99', 'WRITE p50/p99'],
              [
                name,
                String(last.readOps),
                String(last.writeOps),
                formatSize(last.readBytes),
                formatSize(last.writeBytes),
                `${ms(last.readLatency.p50)}/${ms(last.readLatency.p99)}`,
                `${ms(last.writeLatency.p50)}/${ms(last.writeLatency.p99)}`,
              ],
            ]),
          );
          return;
        }
        // Like iostat: one line a second of what happened in that second.
        console.log('READ IOPS  WRITE IOPS  READ MB/s  WRITE MB/s  ERRORS');
        for (;;) {
          await new Promise((r) => setTimeout(r, 1000));
          const now = await call<VolumeStats>(api, 'GET', route);
          console.log(
            [
              String(now.readOps - last.readOps).padStart(9),
              String(now.writeOps - last.writeOps).padStart(11),
              ((now.readBytes - last.readBytes) / 1e6).toFixed(1).padStart(10),
              ((now.writeBytes - last.writeBytes) / 1e6).toFixed(1).padStart(11),
              String(now.errors - last.errors).padStart(7),
            ].join(' '),
          );
          last = now;
        }
      }
      case 'get': {
        const { values, positionals } = parse();
        const volume = await call<VolumeInfo>(
          api,
          'GET',
          `/v1/volumes/${encodeURIComponent(need(positionals, 'volume name'))}`,
        );
        print(values.json === true, volume, () =>
          [
            volumeRows([volume]),
            '',
            table([
              ['REPLICA', 'LOCATION', 'MODE', 'REVISION'],
              ...volume.replicas.map((r) => [r.id, r.location, r.mode, r.revision]),
            ]),
            '',
            limitsLine(volume),
            ...(volume.standby ? [standbyLine(volume)] : []),
          ].join('\n'),
        );
        return;
      }
      case 'attach':
      case 'detach': {
        const { values, positionals } = parse();
        const name = need(positionals, 'volume name');
        const volume = await call<VolumeInfo>(
          api,
          'POST',
          `/v1/volumes/${encodeURIComponent(name)}/${verb}`,
          verb === 'detach'
            ? { force: values.force === true }
            : {
                ...(values.frontend ? { frontend: values.frontend } : {}),
                ...(values.node ? { node: values.node } : {}),
                ...(values['key-file'] || values['key-env']
                  ? {
                      key: await keyFrom(
                        values['key-file'],
                        values['key-env'],
                        'an encrypted volume',
                      ),
                    }
                  : {}),
              },
        );
        print(values.json === true, volume, () => volumeRows([volume]));
        return;
      }
      case 'rekey': {
        const { values, positionals } = parse();
        const name = need(positionals, 'volume name');
        const newKey = await keyFrom(values['new-key-file'], values['new-key-env']);
        if (!newKey)
          throw new UsageError('volume rekey needs --new-key-file FILE or --new-key-env VAR');
        const volume = await call<VolumeInfo>(
          api,
          'POST',
          `/v1/volumes/${encodeURIComponent(name)}/key`,
          {
            key: await keyFrom(values['key-file'], values['key-env'], 'an encrypted volume'),
            newKey,
          },
        );
        print(
          values.json === true,
          volume,
          () => `volume ${name} now opens with key ${volume.encrypted?.keyId ?? '?'}`,
        );
        return;
      }
      case 'activate': {
        const { values, positionals } = parse();
        const volume = await call<VolumeInfo>(
          api,
          'POST',
          `/v1/volumes/${encodeURIComponent(need(positionals, 'volume name'))}/activate`,
          {},
        );
        print(values.json === true, volume, () => volumeRows([volume]));
        return;
      }
      case 'expand': {
        const { values, positionals } = parse();
        const name = need(positionals, 'volume name');
        if (!values.size)
          throw new UsageError('volume expand needs --size, for example --size 20G');
        const volume = await call<VolumeInfo>(
          api,
          'POST',
          `/v1/volumes/${encodeURIComponent(name)}/expand`,
          { size: values.size },
        );
        print(values.json === true, volume, () => volumeRows([volume]));
        return;
      }
      case 'rm': {
        const { values, positionals } = parse();
        const name = need(positionals, 'volume name');
        await call(
          api,
          'DELETE',
          `/v1/volumes/${encodeURIComponent(name)}${values.force ? '?force=true' : ''}`,
        );
        print(values.json === true, { removed: name }, () => `removed ${name}`);
        return;
      }
    }
  } else if (noun === 'snapshot') {
    const { values, positionals } = parse();
    const volume = need(positionals, 'volume name');
    const base = `/v1/volumes/${encodeURIComponent(volume)}/snapshots`;
    const snapshotRows = (list: SnapshotInfo[]) =>
      table([
        ['NAME', 'CREATED', 'PARENT', 'SIZE'],
        ...list.map((s) => [s.name, s.createdAt, s.parent ?? '', formatSize(s.allocatedBytes)]),
      ]);
    switch (verb) {
      case 'create': {
        const snap = await call<SnapshotInfo>(
          api,
          'POST',
          base,
          positionals[1] ? { name: positionals[1] } : {},
        );
        print(values.json === true, snap, () => snapshotRows([snap]));
        return;
      }
      case 'ls': {
        const { snapshots } = await call<{ snapshots: SnapshotInfo[] }>(api, 'GET', base);
        print(values.json === true, snapshots, () => snapshotRows(snapshots));
        return;
      }
      case 'rm': {
        const snap = need(positionals.slice(1), 'snapshot name');
        await call(api, 'DELETE', `${base}/${encodeURIComponent(snap)}`);
        print(values.json === true, { removed: snap }, () => `removed snapshot ${volume}@${snap}`);
        return;
      }
      case 'revert': {
        const snap = need(positionals.slice(1), 'snapshot name');
        const result = await call<{ removed: string[] }>(
          api,
          'POST',
          `${base}/${encodeURIComponent(snap)}/revert`,
          {
            discardNewer: values['discard-newer'] === true,
          },
        );
        print(
          values.json === true,
          result,
          () =>
            `reverted ${volume} to ${snap}${result.removed.length ? `; removed newer snapshots ${result.removed.join(', ')}` : ''}`,
        );
        return;
      }
    }
  } else if (noun === 'node' && verb === 'drain') {
    const { values, positionals } = parse();
    const node = need(positionals, 'node name');
    const { operation } = await call<{ operation: Operation }>(
      api,
      'POST',
      `/v1/nodes/${encodeURIComponent(node)}/drain`,
      {},
    );
    const done = await follow(api, operation, values.json === true);
    const r = done.result as {
      enginesMoved: string[];
      replicasMoved: string[];
      left: Array<{ volume: string; why: string }>;
    };
    print(values.json === true, r, () =>
      [
        `drained ${node}: ${r.enginesMoved.length} engines and ${r.replicasMoved.length} replicas moved`,
        ...r.left.map((l) => `  left: a replica of ${l.volume} (${l.why})`),
      ].join('\n'),
    );
    return;
  } else if (noun === 'node' && (verb === 'cordon' || verb === 'uncordon')) {
    const { values, positionals } = parse();
    const node = need(positionals, 'node name');
    await call(api, 'POST', `/v1/nodes/${encodeURIComponent(node)}/${verb}`, {});
    print(values.json === true, { node, cordoned: verb === 'cordon' }, () => `${verb}ed ${node}`);
    return;
  } else if (noun === 'node' && verb === 'ls') {
    const { values } = parse();
    const { nodes } = await call<{ nodes: NodeInfo[] }>(api, 'GET', '/v1/nodes');
    print(
      values.json === true,
      nodes,
      () =>
        table([
          ['URL', 'ID', 'STATE', 'FREE', 'TOTAL', 'REPLICAS'],
          ...nodes.map((n) => [
            n.url,
            n.name ?? n.id,
            n.state + (n.cordoned ? ',cordoned' : ''),
            n.state === 'up' ? formatSize(n.freeBytes) : '',
            n.state === 'up' ? formatSize(n.totalBytes) : '',
            n.state === 'up' ? String(n.replicas) : (n.error ?? ''),
          ]),
        ]) +
        // Each node's disks, when it has more than the data dir's.
        nodes
          .filter((n) => (n.disks?.length ?? 0) > 1)
          .map(
            (n) =>
              `\n\n${n.name ?? n.id} disks:\n` +
              table([
                ['PATH', 'TAGS', 'FREE', 'TOTAL', 'REPLICAS', 'STATE'],
                ...n.disks!.map((d) => [
                  d.path,
                  d.tags.join(',') || '-',
                  formatSize(d.freeBytes),
                  formatSize(d.totalBytes),
                  String(d.replicas),
                  d.state + (d.error ? ` (${d.error})` : ''),
                ]),
              ]),
          )
          .join(''),
    );
    return;
  } else if (noun === 'replica' && verb === 'rm') {
    const { values, positionals } = parse();
    const volume = need(positionals, 'volume name');
    const id = need(positionals.slice(1), 'replica id');
    await call(
      api,
      'DELETE',
      `/v1/volumes/${encodeURIComponent(volume)}/replicas/${encodeURIComponent(id)}`,
    );
    print(
      values.json === true,
      { removed: id },
      () => `removed replica ${id}; a new one will be built`,
    );
    return;
  } else if (noun === 'volume' && verb === 'verify') {
    const { values, positionals } = parse();
    const volume = need(positionals, 'volume name');
    const { operation } = await call<{ operation: Operation }>(
      api,
      'POST',
      `/v1/volumes/${encodeURIComponent(volume)}/verify`,
    );
    const done = await follow(api, operation, values.json === true);
    const r = done.result as {
      replicas: number;
      differences: Array<{ snapshot?: string; offset: number; length: number; replicas: string[] }>;
    };
    print(values.json === true, r, () =>
      r.differences.length === 0
        ? `${r.replicas} replicas of ${volume} are identical (every snapshot and the live volume)`
        : table([
            ['VIEW', 'OFFSET', 'LENGTH', 'DIFFERING REPLICAS'],
            ...r.differences.map((d) => [
              d.snapshot ?? '(live)',
              String(d.offset),
              formatSize(d.length),
              d.replicas.join(', '),
            ]),
          ]),
    );
    if (r.differences.length > 0) process.exitCode = 3;
    return;
  } else if (noun === 'volume' && verb === 'scrub') {
    const { values, positionals } = parse();
    const volume = need(positionals, 'volume name');
    const { operation } = await call<{ operation: Operation }>(
      api,
      'POST',
      `/v1/volumes/${encodeURIComponent(volume)}/scrub`,
    );
    const done = await follow(api, operation, values.json === true);
    const r = done.result as {
      replicas: Array<{
        replica: string;
        location: string;
        bad: Array<{ offset: number; snapshot?: string }>;
        failed: boolean;
      }>;
    };
    const bad = r.replicas.filter((x) => x.bad.length > 0);
    print(values.json === true, r, () =>
      bad.length === 0
        ? `every block of ${r.replicas.length} replica(s) of ${volume} matches its checksum`
        : table([
            ['REPLICA', 'LOCATION', 'BAD BLOCKS', 'FIRST', 'ACTION'],
            ...bad.map((x) => [
              x.replica,
              x.location,
              String(x.bad.length),
              `${x.bad[0]!.snapshot ?? '(head)'} @ ${x.bad[0]!.offset}`,
              x.failed
                ? 'set to ERR: rebuilt from a clean replica'
                : 'no clean replica: reads of these blocks fail',
            ]),
          ]),
    );
    if (bad.length > 0) process.exitCode = 3;
    return;
  } else if (noun === 'replica' && verb === 'ls') {
    const { values, positionals } = parse();
    const volume = need(positionals, 'volume name');
    const { replicas } = await call<{ replicas: VolumeInfo['replicas'] }>(
      api,
      'GET',
      `/v1/volumes/${encodeURIComponent(volume)}/replicas`,
    );
    print(values.json === true, replicas, () =>
      table([
        ['REPLICA', 'LOCATION', 'MODE', 'REVISION', 'REBUILD'],
        ...replicas.map((r) => [
          r.id,
          r.location,
          r.mode,
          r.revision,
          r.rebuild
            ? `${Math.floor((100 * r.rebuild.done) / Math.max(1, r.rebuild.total))}% (${formatSize(r.rebuild.bytesCopied)} copied)`
            : '',
        ]),
      ]),
    );
    return;
  } else if (noun === 'backup') {
    return runBackupCommand(api, verb, rest);
  } else if (noun === 'job') {
    return runJobCommand(api, verb, rest);
  } else if (noun === 'token') {
    return runTokenCommand(api, verb, rest);
  } else if (noun === 'events') {
    const all = [verb, ...rest].filter((x): x is string => x !== undefined);
    const { values } = parseArgs({
      args: all,
      options: {
        json: { type: 'boolean' },
        volume: { type: 'string' },
        follow: { type: 'boolean' },
      },
      strict: true,
    });
    const line = (e: DaemonEvent) =>
      values.json === true
        ? JSON.stringify(e)
        : `${e.time}  ${e.type}  ${e.volume ?? ''}  ${e.node !== undefined ? `${e.node}: ` : ''}${e.message}`;
    if (values.follow === true) {
      // Server-sent events, one line per event as it happens, until interrupted.
      const query = new URLSearchParams({ follow: '1' });
      if (values.volume) query.set('volume', values.volume);
      const response = await fetch(`${api}/v1/events?${query.toString()}`, {
        headers: authHeaders(),
      });
      if (!response.ok || !response.body)
        throw new ApiError(
          'INTERNAL',
          `cannot follow events: HTTP ${response.status}`,
          response.status,
        );
      for await (const event of textPieces(response.body, '\n\n')) {
        const data = event
          .split('\n')
          .filter((l) => l.startsWith('data: '))
          .map((l) => l.slice(6))
          .join('\n');
        if (data) console.log(line(JSON.parse(data) as DaemonEvent));
      }
      return;
    }
    const { events } = await call<{ events: DaemonEvent[] }>(
      api,
      'GET',
      `/v1/events${values.volume ? `?volume=${encodeURIComponent(values.volume)}` : ''}`,
    );
    print(values.json === true, events, () =>
      table([
        ['TIME', 'TYPE', 'VOLUME', 'MESSAGE'],
        ...events.map((e) => [
          e.time,
          e.type,
          e.volume ?? '',
          e.node !== undefined ? `${e.node}: ${e.message}` : e.message,
        ]),
      ]),
    );
    return;
  }
  throw new UsageError(`unknown command: corral ${args.join(' ')}`);
}

async function main(argv: string[]): Promise<void> {
  if (argv.length === 0 || argv[0] === '--help' || argv[0] === '-h' || argv[0] === 'help') {
    console.log(USAGE);
    return;
  }
  if (argv[0] === '--version') {
    console.log(VERSION);
    return;
  }
  if (argv[0] === 'daemon') return runDaemon(argv.slice(1));
  // Local work: no daemon involved.
  if (argv[0] === 'cluster' && argv[1] === 'certs') return runCertsCommand(argv.slice(2));
  return runClient(argv);
}

main(process.argv.slice(2)).catch((err: unknown) => {
  if (
    err instanceof UsageError ||
    (err instanceof TypeError && 'code' in err && String(err.code).startsWith('ERR_PARSE_ARGS'))
  ) {
    console.error(`corral: ${err.message}\n\n${USAGE}`);
    process.exit(2);
  }
  if (err instanceof ApiError) {
    console.error(`corral: ${err.message} (${err.code})`);
    process.exit(1);
  }
  console.error(`corral: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});

/** The limits given as flags, as the API takes them (numbers where they are numbers). */
function qosFlags(values: Record<string, unknown>): Record<string, string | number> | undefined {
  const out: Record<string, string | number> = {};
  for (const [flag, key] of QOS_FLAGS) {
    const v = values[flag];
    if (typeof v !== 'string') continue;
    out[key] = /^\d+(\.\d+)?$/.test(v) ? Number(v) : v;
  }
  return Object.keys(out).length > 0 ? out : undefined;
}

function standbyLine(volume: VolumeInfo): string {
  const s = volume.standby;
  if (!s) return 'standby: no';
  const ago = (seconds: number | undefined) => (seconds === undefined ? '?' : `${seconds}s`);
  return [
    `standby: follows ${s.from} every ${s.pollSeconds}s`,
    `holds ${s.backup ?? '?'} (taken ${s.backupTakenAt ?? '?'}, ${ago(s.behindSeconds)} ago)`,
    `RPO ${ago(s.rpoSeconds)}`,
    ...(s.applying !== undefined ? [`applying ${s.applying}`] : []),
  ].join('; ');
}

/** `90`, `90s`, `5m`, `2h` → seconds. */
function parseSeconds(text: string, flag: string): number {
  const m = /^(\d+)(s|m|h)?$/.exec(text.trim());
  if (!m) throw new UsageError(`${flag} takes a duration like 30s, 5m or 1h, got ${text}`);
  return Number(m[1]) * (m[2] === 'h' ? 3600 : m[2] === 'm' ? 60 : 1);
}

function limitsLine(volume: VolumeInfo): string {
  const set = Object.entries(volume.qos ?? {});
  return `limits: ${set.length === 0 ? 'none' : set.map(([k, v]) => `${k} ${v}`).join(', ')}`;
}
