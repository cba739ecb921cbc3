import type { DiskInfo } from './disks.ts';
import { timingSafeEqual } from 'node:crypto';
import * as fs from 'node:fs';
import type * as tls from 'node:tls';
import { CorralError } from '../common/errors.ts';
import type { Fetch, TlsFiles } from '../common/tls-fetch.ts';
import type { NodeInfo } from './node-info.ts';
import type { NodeRegistry } from './node-registry.ts';

export interface ClusterOptions {
  /** This daemon's API URL as its peers reach it. */
  selfUrl: string;
  nodeId: string;
  peers: string[];
  secret: string;
  dataDir: string;
  version: string;
  /** Replicas this host keeps (its own volumes' and those hosted for peers). */
  replicaCount: () => Promise<number>;
  /** This node's disks, with their replicas. */
  disks?: () => Promise<DiskInfo[]>;
  /** In a cluster (`--etcd`): the nodes come from etcd, not from `--peer`. */
  registry?: NodeRegistry;
  /** In a cluster: how many requests this node made to etcd. */
  etcdRequests?: () => number;
  /** How peers are called: with the node's certificate when the cluster runs TLS. */
  fetch?: Fetch;
  /** The node's certificate, key and CA (`--tls-*`): peers are reached and known by them. */
  tls?: TlsFiles;
}

/** Peer calls give up after this long: a node that does not answer is down. */
const PEER_TIMEOUT_MS = 3000;

/**
 * The hosts this daemon knows — itself and its `--peer`s, or in a cluster
 * every node registered in etcd — and the shared cluster secret every peer
 * call carries as a bearer token.
 */
export class Cluster {
  readonly #o: ClusterOptions;

  constructor(options: ClusterOptions) {
    this.#o = options;
  }

  get selfUrl(): string {
    return this.#o.selfUrl;
  }

  set selfUrl(url: string) {
    this.#o.selfUrl = url;
  }

  get secret(): string {
    return this.#o.secret;
  }

  get peers(): string[] {
    return this.#o.peers;
  }

  /** The node registry when the daemon runs in a cluster (`--etcd`). */
  get registry(): NodeRegistry | undefined {
    return this.#o.registry;
  }

  /** This node's name in a cluster; undefined when it runs alone or with `--peer`s. */
  get nodeName(): string | undefined {
    return this.#o.registry?.name;
  }

  /** How this node calls its peers (their API, forwarded calls). */
  get fetch(): Fetch {
    return this.#o.fetch ?? fetch;
  }

  /** The node's TLS files, when the cluster runs TLS: replica streams connect with them. */
  get tls(): TlsFiles | undefined {
    return this.#o.tls;
  }

  /**
   * Whether a connection's TLS peer is another daemon of the cluster: a
   * certificate the CA signed for a node (`OU=node` in its subject, as
   * `corral cluster certs` makes them), verified by the TLS handshake.
   */
  isPeerSocket(socket: tls.TLSSocket | undefined): boolean {
    if (!this.#o.tls?.ca || socket?.encrypted !== true || !socket.authorized) return false;
    const ou: unknown = socket.getPeerCertificate().subject?.OU;
    return ou === 'node' || (Array.isArray(ou) && ou.includes('node'));
  }

  /** Whether a request carries the cluster secret. */
  authorized(header: string | undefined): boolean {
    const want = Buffer.from(`Bearer ${this.#o.secret}`);
    const got = Buffer.from(header ?? '');
    return got.length === want.length && timingSafeEqual(got, want);
  }

  async self(): Promise<NodeInfo> {
    const st = await fs.promises.statfs(this.#o.dataDir);
    const name = this.#o.registry?.name;
    return {
      id: name ?? this.#o.nodeId,
      ...(name !== undefined ? { name } : {}),
      url: this.#o.selfUrl,
      state: 'up',
      totalBytes: st.blocks * st.bsize,
      freeBytes: st.bavail * st.bsize,
      replicas: await this.#o.replicaCount(),
      ...(this.#o.disks ? { disks: await this.#o.disks() } : {}),
      version: this.#o.version,
      ...(this.#o.etcdRequests ? { etcdRequests: this.#o.etcdRequests() } : {}),
    };
  }

  /** Calls a peer's API with the cluster secret; errors come back as CorralErrors. */
  async call<T>(
    url: string,
    method: string,
    route: string,
    body?: unknown,
    options: { timeoutMs?: number } = {},
  ): Promise<T> {
    let response: Response;
    try {
      response = await this.fetch(url + route, {
        method,
        headers: {
          authorization: `Bearer ${this.#o.secret}`,
          ...(body === undefined ? {} : { 'content-type': 'application/json' }),
        },
        ...(body === undefined ? {} : { body: JSON.stringify(body) }),
        signal: AbortSignal.timeout(options.timeoutMs ?? PEER_TIMEOUT_MS),
      });
    } catch (err) {
      throw new CorralError(
        'IO_ERROR',
        `Peer ${url} does not answer: ${err instanceof Error ? (err.cause instanceof Error ? err.cause.message : err.message) : String(err)}`,
      );
    }
    if (response.status === 204) return undefined as T;
    const json = (await response.json().catch(() => ({}))) as {
      error?: { code: CorralError['code']; message: string };
    };
    if (!response.ok)
      throw new CorralError(
        json.error?.code ?? 'IO_ERROR',
        `Peer ${url}: ${json.error?.message ?? `HTTP ${response.status}`}`,
      );
    return json as T;
  }

  /**
   * This node first, then every other: in a cluster as etcd has them (down
   * when their lease expired; `cached`: as the watches last told, no
   * request), else every peer, those that do not answer as down.
   */
  async nodes(options: { cached?: boolean } = {}): Promise<NodeInfo[]> {
    const registry = this.#o.registry;
    if (registry) {
      const all = options.cached ? await registry.cachedNodes() : await registry.nodes();
      const self = all.find((n) => n.name === registry.name);
      return [
        ...(self ? [{ ...self, ...(await this.self()), cordoned: self.cordoned ?? false }] : []),
        ...all.filter((n) => n !== self),
      ];
    }
    const peers = await Promise.all(
      this.#o.peers.map(async (url): Promise<NodeInfo> => {
        try {
          return { ...(await this.call<NodeInfo>(url, 'GET', '/v1/node')), url };
        } catch (err) {
          return {
            id: '',
            url,
            state: 'down',
            totalBytes: 0,
            freeBytes: 0,
            replicas: 0,
            error: err instanceof Error ? err.message : String(err),
          };
        }
      }),
    );
    return [await this.self(), ...peers];
  }
}
