import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { EtcdClient } from '../kv/etcd.ts';
import { volumeCodec, type VolumeRecord } from '../kv/spaces.ts';
import type { NodeInfo } from '../daemon/node-info.ts';
import { ALIVE_PREFIX, NODES_PREFIX, NodeRegistry } from '../daemon/node-registry.ts';
import { placeReplicas } from '../daemon/placement.ts';
import { VOLUMES_PREFIX } from '../daemon/volume-records.ts';
import { CLUSTER_SECRET } from './helpers/cluster.ts';
import { DaemonProcess } from './helpers/daemon.ts';
import { EtcdProcess } from './helpers/etcd.ts';
import { concurrently } from '../common/concurrently.ts';

const NODES = 200;
const VOLUMES = 10_000;
const GiB = 1024 ** 3;

/**
 * The control plane past this machine: a real etcd holding 200 nodes
 * (lightweight: a lease and two keys each, as a node registers) and 10,000
 * volume records, and one real daemon among them.
 */
describe('a cluster of 200 nodes and 10,000 volumes in etcd', () => {
  let etcd: EtcdProcess | undefined;
  let daemon: DaemonProcess | undefined;
  after(async () => {
    await daemon?.cleanup();
    await etcd?.cleanup();
  });

  it('lists every volume in under a second, places replicas in under 10 ms, and idles at under one etcd request per second', async () => {
    etcd = await EtcdProcess.start();
    const client = new EtcdClient([etcd.url]);
    const names = Array.from({ length: NODES }, (_, i) => `sim-${String(i).padStart(3, '0')}`);
    await concurrently(NODES, 16, async (i) => {
      const name = names[i]!;
      const lease = await client.grantLease(600);
      const url = `http://10.99.${Math.floor(i / 250)}.${(i % 250) + 1}:9500`;
      await client.put(
        NODES_PREFIX + name,
        JSON.stringify({ name, url, registeredAt: '2026-12-03T00:00:00Z' }),
      );
      await client.put(
        ALIVE_PREFIX + name,
        JSON.stringify({
          url,
          totalBytes: 4096 * GiB,
          freeBytes: (i + 1) * GiB,
          replicas: 150,
          since: '2026-12-03T00:00:00Z',
        }),
        lease,
      );
    });
    await concurrently(VOLUMES / 100, 8, async (b) => {
      const ops = Array.from({ length: 100 }, (_, j) => {
        const n = b * 100 + j;
        const record: VolumeRecord = {
          name: `vol-${n}`,
          sizeBytes: 20 * GiB,
          replicaCount: 3,
          frontend: 'nbd',
          createdAt: '2026-12-03T00:00:00Z',
          attached: true,
          replicaIds: [],
          remoteReplicas: [0, 1, 2].map((k) => {
            const node = names[(n + k * 67) % NODES]!;
            return { id: `${n}-${k}`, url: `http://${node}:9500`, node };
          }),
          epoch: 1,
          engineNode: names[n % NODES]!,
        };
        return {
          put: VOLUMES_PREFIX + record.name,
          value: Buffer.from(volumeCodec.encode(record)),
        };
      });
      const { ok } = await client.txn([], ops);
      assert.ok(ok);
    });

    daemon = await DaemonProcess.start({
      args: ['--etcd', etcd.url, '--node-name', 'real'],
      env: { CORRAL_CLUSTER_SECRET: CLUSTER_SECRET },
    });
    const d = daemon;

    // volume ls from the real node: every record, with the nodes' states.
    let best = Infinity;
    for (let i = 0; i < 3; i++) {
      const t = performance.now();
      const { status, json } = await d.api_<{ volumes: unknown[] }>('GET', '/v1/volumes');
      best = Math.min(best, performance.now() - t);
      assert.equal(status, 200);
      assert.equal(json.volumes.length, VOLUMES);
    }

    // A placement decision, as a node makes it: the registry as its watches keep it, then the
    // choice. (Reading the registry from etcd instead is timed too, for the record.)
    const registry = new NodeRegistry({
      etcd: client,
      name: 'probe',
      ttlMs: 10_000,
      status: () => Promise.reject(new Error('not registered')),
    });
    after(() => registry.stop());
    const t0 = performance.now();
    await registry.nodes();
    const fresh = performance.now() - t0;
    await registry.follow(
      () => undefined,
      () => undefined,
    );
    const t1 = performance.now();
    let nodes: NodeInfo[] = [];
    let chosen: NodeInfo[] = [];
    for (let i = 0; i < 100; i++) {
      nodes = await registry.cachedNodes();
      chosen = placeReplicas({
        volume: 'x',
        sizeBytes: 20 * GiB,
        count: 3,
        nodes,
        selfRequired: false,
      });
    }
    const place = (performance.now() - t1) / 100;
    assert.equal(nodes.length, NODES + 1);
    assert.deepEqual(
      chosen.map((n) => n.name),
      [
        nodes[0]!.name,
        ...['sim-199', 'sim-198', 'sim-197'].filter((n) => n !== nodes[0]!.name),
      ].slice(0, 3),
    );
    assert.ok(best < 1000, `volume ls took ${best.toFixed(0)} ms`);
    assert.ok(place < 10, `placement took ${place.toFixed(2)} ms`);

    // An idle node: its lease renewals only (TTL 10 s: one every 3.3 s).
    const before = (await d.api_<NodeInfo>('GET', '/v1/node')).json.etcdRequests!;
    const idleMs = 8000;
    await new Promise((r) => setTimeout(r, idleMs));
    const after_ = (await d.api_<NodeInfo>('GET', '/v1/node')).json.etcdRequests!;
    const perSecond = (after_ - before) / (idleMs / 1000);
    assert.ok(perSecond < 1, `${perSecond} etcd requests per second while idle`);
    console.log(
      `scale figures: volume ls of ${VOLUMES} volumes ${best.toFixed(0)} ms; placement among ${NODES + 1} nodes ${place.toFixed(2)} ms (reading the registry from etcd instead: ${fresh.toFixed(1)} ms); idle node ${perSecond.toFixed(2)} etcd requests/s`,
    );
  });
});
