import type { Fetch } from '../common/tls-fetch.ts';
import { CorralError } from '../common/errors.ts';
import { textPieces } from '../common/text-stream.ts';

/**
 * A small etcd v3 client over etcd's JSON gateway (`/v3/kv/range`, `/v3/kv/txn`,
 * `/v3/lease/*`, `/v3/watch`): keys and values go base64-encoded, 64-bit
 * numbers as decimal strings. The gateway rather than gRPC (the `etcd3`
 * package): no protobuf or gRPC stack in the daemon, the same `fetch` under
 * Node and Deno, and everything Corral needs — ranges, compare-and-swap
 * transactions, leases and prefix watches — is there.
 *
 * Every failure to reach etcd is a CorralError `UNAVAILABLE`, so that a
 * control operation tells its caller "the cluster store does not answer"
 * rather than a 500.
 */

export interface KeyValue {
  key: string;
  value: Buffer;
  modRevision: number;
  createRevision: number;
  /** The lease the key is attached to; 0 for none. */
  lease: string;
}

export interface Compare {
  key: string;
  /** The key's last change (0: the key does not exist). */
  modRevision?: number;
  /** Compared to the key's value. */
  value?: Buffer | string;
}

export type TxnOp =
  { put: string; value: Buffer | string; lease?: string } | { delete: string; prefix?: boolean };

export interface WatchEvent {
  type: 'put' | 'delete';
  key: string;
  value: Buffer;
  modRevision: number;
}

/** A request to etcd gives up after this long. */
const REQUEST_TIMEOUT_MS = 5000;
/** While no endpoint answers, calls are tried again for this long (an election, a restart). */
const RETRY_WINDOW_MS = 3000;

const b64 = (s: Buffer | string): string => Buffer.from(s).toString('base64');
const unb64 = (s: string | undefined): Buffer => Buffer.from(s ?? '', 'base64');

/** The end of the range of every key starting with `prefix` (etcd's `range_end`). */
export function prefixEnd(prefix: string): string {
  const bytes = Buffer.from(prefix);
  for (let i = bytes.length - 1; i >= 0; i--) {
    if (bytes[i]! < 0xff) {
      bytes[i]!++;
      return b64(bytes.subarray(0, i + 1));
    }
  }
  return b64(Buffer.from([0]));
}

interface RawKv {
  key?: string;
  value?: string;
  mod_revision?: string;
  create_revision?: string;
  lease?: string;
}

function toKv(raw: RawKv): KeyValue {
  return {
    key: unb64(raw.key).toString(),
    value: unb64(raw.value),
    modRevision: Number(raw.mod_revision ?? 0),
    createRevision: Number(raw.create_revision ?? 0),
    lease: raw.lease ?? '0',
  };
}

export class EtcdClient {
  readonly #endpoints: string[];
  /** The endpoint that answered last: tried first. */
  #current = 0;
  /** Requests made (a watch counts once per stream opened): an idle node's cost to etcd. */
  requests = 0;

  readonly #fetch: Fetch;

  /** `fetchImpl`: with the node's certificate, for an etcd that takes https and client certificates. */
  constructor(endpoints: string[], fetchImpl: Fetch = fetch) {
    this.#fetch = fetchImpl;
    if (endpoints.length === 0) throw new CorralError('INVALID_ARGUMENT', 'No etcd endpoint given');
    this.#endpoints = endpoints.map((e) => e.replace(/\/+$/, ''));
  }

  get endpoints(): string[] {
    return this.#endpoints;
  }

  /**
   * One gateway call: each endpoint in turn from the last one that answered,
   * and again for a few seconds while none does — an election after a
   * member died takes about a second, and a user must not see it.
   */
  async #call<T>(route: string, body: unknown, signal?: AbortSignal): Promise<T> {
    const errors: string[] = [];
    const n = this.#endpoints.length;
    const until = Date.now() + RETRY_WINDOW_MS;
    for (let round = 0; ; round++) {
      // The order is fixed for the round: other calls move #current meanwhile.
      const first = this.#current;
      for (let i = 0; i < n; i++) {
        const at = (first + i) % n;
        const endpoint = this.#endpoints[at]!;
        this.requests++;
        let response: Response;
        try {
          response = await this.#fetch(endpoint + route, {
            method: 'POST',
            headers: { 'content-type': 'application/json' },
            body: JSON.stringify(body),
            signal: signal ?? AbortSignal.timeout(REQUEST_TIMEOUT_MS),
          });
        } catch (err) {
          errors.push(
            `${endpoint}: ${err instanceof Error ? (err.cause instanceof Error ? err.cause.message : err.message) : String(err)}`,
          );
          continue;
        }
        const json = (await response.json().catch(() => ({}))) as T & {
          error?: string;
          message?: string;
          code?: number;
        };
        // 14 UNAVAILABLE (no leader, leader changed, a member cut off): another may answer.
        if (json.code === 14 || response.status === 503) {
          errors.push(`${endpoint}: ${json.message ?? `HTTP ${response.status}`}`);
          continue;
        }
        this.#current = at;
        if (!response.ok || json.error !== undefined) {
          throw new CorralError(
            'UNAVAILABLE',
            `etcd ${endpoint}${route}: ${json.message ?? json.error ?? `HTTP ${response.status}`}`,
          );
        }
        return json;
      }
      if (Date.now() >= until || signal?.aborted) break;
      await new Promise((r) => setTimeout(r, Math.min(100 * 2 ** round, 800)));
    }
    throw new CorralError(
      'UNAVAILABLE',
      `The cluster store (etcd) does not answer: ${errors.slice(-n).join('; ')}`,
    );
  }

  async get(key: string): Promise<KeyValue | undefined> {
    const r = await this.#call<{ kvs?: RawKv[] }>('/v3/kv/range', { key: b64(key) });
    return r.kvs?.[0] ? toKv(r.kvs[0]) : undefined;
  }

  /** Every key starting with `prefix`, in key order. */
  async range(prefix: string, options: { keysOnly?: boolean } = {}): Promise<KeyValue[]> {
    return (await this.snapshot(prefix, options)).kvs;
  }

  /** `range`, with the store's revision it was read at (a watch from revision + 1 misses nothing). */
  async snapshot(
    prefix: string,
    options: { keysOnly?: boolean } = {},
  ): Promise<{ kvs: KeyValue[]; revision: number }> {
    const r = await this.#call<{ kvs?: RawKv[]; header?: { revision?: string } }>('/v3/kv/range', {
      key: b64(prefix),
      range_end: prefixEnd(prefix),
      ...(options.keysOnly ? { keys_only: true } : {}),
    });
    return { kvs: (r.kvs ?? []).map(toKv), revision: Number(r.header?.revision ?? 0) };
  }

  /** The number of keys starting with `prefix`. */
  async count(prefix: string): Promise<number> {
    const r = await this.#call<{ count?: string }>('/v3/kv/range', {
      key: b64(prefix),
      range_end: prefixEnd(prefix),
      count_only: true,
    });
    return Number(r.count ?? 0);
  }

  async put(key: string, value: Buffer | string, lease?: string): Promise<number> {
    const r = await this.#call<{ header?: { revision?: string } }>('/v3/kv/put', {
      key: b64(key),
      value: b64(value),
      ...(lease !== undefined ? { lease } : {}),
    });
    return Number(r.header?.revision ?? 0);
  }

  async delete(key: string, options: { prefix?: boolean } = {}): Promise<void> {
    await this.#call('/v3/kv/deleterange', {
      key: b64(key),
      ...(options.prefix ? { range_end: prefixEnd(key) } : {}),
    });
  }

  /**
   * Compare-and-swap: when every comparison holds, the operations are
   * applied at one revision and the result is `{ ok: true, revision }`.
   */
  async txn(compare: Compare[], ops: TxnOp[]): Promise<{ ok: boolean; revision: number }> {
    const r = await this.#call<{ succeeded?: boolean; header?: { revision?: string } }>(
      '/v3/kv/txn',
      {
        compare: compare.map((c) =>
          c.value !== undefined
            ? { key: b64(c.key), target: 'VALUE', result: 'EQUAL', value: b64(c.value) }
            : {
                key: b64(c.key),
                target: 'MOD',
                result: 'EQUAL',
                mod_revision: String(c.modRevision ?? 0),
              },
        ),
        success: ops.map((op) =>
          'put' in op
            ? {
                request_put: {
                  key: b64(op.put),
                  value: b64(op.value),
                  ...(op.lease !== undefined ? { lease: op.lease } : {}),
                },
              }
            : {
                request_delete_range: {
                  key: b64(op.delete),
                  ...(op.prefix ? { range_end: prefixEnd(op.delete) } : {}),
                },
              },
        ),
      },
    );
    // proto3's JSON leaves out false.
    return { ok: r.succeeded === true, revision: Number(r.header?.revision ?? 0) };
  }

  /** A lease of `ttlSeconds`: keys put with it go when it is not kept alive. */
  async grantLease(ttlSeconds: number): Promise<string> {
    const r = await this.#call<{ ID?: string }>('/v3/lease/grant', { TTL: String(ttlSeconds) });
    if (!r.ID) throw new CorralError('UNAVAILABLE', 'etcd granted no lease');
    return r.ID;
  }

  /** Renews a lease; false when it has expired already (its keys are gone). */
  async keepAlive(id: string): Promise<boolean> {
    const r = await this.#call<{ result?: { TTL?: string } }>('/v3/lease/keepalive', { ID: id });
    return Number(r.result?.TTL ?? 0) > 0;
  }

  async revokeLease(id: string): Promise<void> {
    await this.#call('/v3/lease/revoke', { ID: id }).catch(() => undefined);
  }

  /**
   * Follows every change under `prefix` after `fromRevision` until `signal`
   * aborts. The stream is opened again when it breaks (from the last
   * revision seen, so no change is missed or seen twice); `onError` hears
   * of each break.
   */
  watch(
    prefix: string,
    fromRevision: number,
    onEvent: (e: WatchEvent) => void,
    signal: AbortSignal,
    onError: (err: Error) => void = () => undefined,
  ): void {
    let next = fromRevision;
    const once = async (): Promise<void> => {
      const endpoint = this.#endpoints[this.#current]!;
      this.requests++;
      const response = await this.#fetch(endpoint + '/v3/watch', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({
          create_request: {
            key: b64(prefix),
            range_end: prefixEnd(prefix),
            start_revision: String(next),
          },
        }),
        signal,
      });
      if (!response.body) throw new Error('etcd watch: no response body');
      for await (const piece of textPieces(response.body, '\n')) {
        const line = piece.trim();
        if (line) this.#watchLine(line, onEvent, (r) => (next = r + 1));
      }
      throw new Error('etcd watch stream ended');
    };
    const loop = async (): Promise<void> => {
      while (!signal.aborted) {
        try {
          await once();
        } catch (err) {
          if (signal.aborted) return;
          onError(err instanceof Error ? err : new Error(String(err)));
          this.#current = (this.#current + 1) % this.#endpoints.length;
          await new Promise((r) => setTimeout(r, 500));
        }
      }
    };
    void loop();
  }

  #watchLine(line: string, onEvent: (e: WatchEvent) => void, seen: (revision: number) => void) {
    const msg = JSON.parse(line) as {
      result?: { events?: Array<{ type?: string; kv?: RawKv }>; compact_revision?: string };
      error?: { message?: string };
    };
    if (msg.error) throw new Error(`etcd watch: ${msg.error.message ?? 'error'}`);
    for (const e of msg.result?.events ?? []) {
      if (!e.kv) continue;
      const kv = toKv(e.kv);
      onEvent({
        type: e.type === 'DELETE' ? 'delete' : 'put',
        key: kv.key,
        value: kv.value,
        modRevision: kv.modRevision,
      });
      seen(kv.modRevision);
    }
  }
}
