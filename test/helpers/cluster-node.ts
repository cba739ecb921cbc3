import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { CLUSTER_SECRET } from './cluster.ts';
import { DaemonProcess } from './daemon.ts';
import { mustRun } from './run.ts';

/**
 * A daemon that is a node of a cluster in etcd, on its own loopback address
 * (so that a partition can single it out), with the short timings the
 * cluster tests use: a 2 s node TTL, rebuilds after `rebuildDelayMs`.
 */
export function startClusterNode(options: {
  /** etcd client URLs, comma-separated. */
  etcd: string;
  name: string;
  host: string;
  netns?: string;
  rebuildDelayMs?: number;
}): Promise<DaemonProcess> {
  return DaemonProcess.start({
    args: [
      '--listen',
      `${options.host}:0`,
      '--nbd',
      `${options.host}:0`,
      '--etcd',
      options.etcd,
      '--node-name',
      options.name,
      '--node-ttl',
      '2000',
      '--rebuild-delay',
      String(options.rebuildDelayMs ?? 1000),
      '--replica-timeout',
      '1500',
      // Tests keep their backup stores in the temp dir.
      '--backup-root',
      os.tmpdir(),
    ],
    env: { CORRAL_CLUSTER_SECRET: CLUSTER_SECRET },
    ...(options.netns !== undefined ? { netns: options.netns } : {}),
  });
}

/** Runs the CLI with --json against a node and parses what it prints (the call must succeed). */
export async function cliJson<T>(d: DaemonProcess, args: string[]): Promise<T> {
  const r = await d.cli([...args, '--json']);
  assert.equal(r.code, 0, `corral ${args.join(' ')}: ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

/** The first `length` bytes of a volume, read through a node's NBD export. */
export async function readVolume(
  d: DaemonProcess,
  volume: string,
  length: number,
): Promise<Buffer> {
  const out = path.join(os.tmpdir(), `corral-read-${process.pid}-${Date.now()}`);
  try {
    await mustRun('nbdcopy', [d.uri(volume), out]);
    return (await fs.promises.readFile(out)).subarray(0, length);
  } finally {
    await fs.promises.rm(out, { force: true });
  }
}
