import { Ajv, type ValidateFunction } from 'ajv';
import { CorralError } from '../common/errors.ts';
import { accessFor } from './auth.ts';

/** A JSON Schema, as OpenAPI 3.1 takes it. */
type Schema = Record<string, unknown>;

interface RouteDoc {
  summary: string;
  body?: Schema;
  /** Query parameters: name → description. */
  query?: Record<string, string>;
  /** Answers 202 with an operation (or waits with `?wait=true`). */
  operation?: boolean;
}

const str = { type: 'string' };
const int = { type: 'integer' };
/** Booleans may come as strings from forms and query-minded clients ("true", "1"). */
const flag = { type: ['boolean', 'string'] };
const size = {
  type: ['string', 'integer'],
  description: 'bytes, or a size such as 10G, 512M',
  examples: ['10G'],
};
const target = {
  type: 'string',
  description: 'a backup target URL (file:///path, s3://bucket/prefix?endpoint=...); admin only',
};
const object = (properties: Record<string, Schema>, required: string[] = []): Schema => ({
  type: 'object',
  properties,
  ...(required.length > 0 ? { required } : {}),
  additionalProperties: false,
});
const wait = { wait: 'true: wait for the operation and answer with its result' };

/**
 * What each route does and takes, by `METHOD path` as Hono registered it.
 * The routes themselves come from the app (`app.routes`) and the role each
 * needs from `accessFor`, so the document cannot list a route that is not
 * served or miss one that is: `test/api-cli.test.ts` fails on a route
 * without an entry here.
 */
const rate = (what: string): Schema => ({
  oneOf: [
    { type: 'integer', minimum: 0 },
    { type: 'string', description: 'a size per second, such as "100M"' },
  ],
  description: what,
});

/** The I/O limits of a volume (replication/qos.ts): 0 removes one. */
const qosLimits: Schema = object({
  iops: { type: 'integer', minimum: 0, description: 'reads and writes per second, together' },
  bandwidth: rate('bytes read and written per second, together'),
  readIops: { type: 'integer', minimum: 0 },
  writeIops: { type: 'integer', minimum: 0 },
  readBandwidth: rate('bytes read per second'),
  writeBandwidth: rate('bytes written per second'),
  burst: {
    oneOf: [
      { type: 'number', minimum: 0, maximum: 60 },
      { type: 'string', pattern: '^\\d+(\\.\\d+)?x$' },
    ],
    description: "seconds' worth of the limits that may pass at once after an idle spell",
  },
});

export const ROUTE_DOCS: Record<string, RouteDoc> = {
  'GET /v1/health': { summary: 'Liveness; no token needed' },
  'GET /v1/openapi.json': { summary: 'This document; no token needed' },
  'GET /v1/whoami': { summary: 'The caller: token name and role' },
  'GET /metrics': { summary: 'Prometheus text format (docs/METRICS.md)' },
  'GET /v1/volumes': { summary: 'Every volume' },
  'POST /v1/volumes': {
    summary: 'Create a volume, or clone one from a snapshot',
    body: object(
      {
        name: str,
        size,
        replicas: { type: 'integer', minimum: 1, maximum: 16 },
        frontend: { enum: ['nbd', 'fuse'] },
        fromSnapshot: { type: 'string', description: 'VOLUME@SNAPSHOT' },
        allowSameHost: flag,
        failover: { enum: ['off', 'auto'] },
        nbdAllow: { type: 'array', items: str, description: 'TLS identities that may open it' },
        qos: qosLimits,
        diskTag: { type: 'string', description: 'its replicas go to disks with this tag' },
        encrypt: flag,
        key: {
          type: 'string',
          description:
            'with encrypt: the user key, base64 of ≥ 32 bytes; with standbyFrom: the backups’ key',
        },
        standbyFrom: {
          type: 'string',
          description:
            'a standby following this volume’s backups: TARGET_URL?volume=NAME or a volume name in the default target (answers with an operation)',
        },
        pollSeconds: { type: 'integer', minimum: 1, maximum: 86400, description: 'default 60' },
      },
      ['name'],
    ),
  },
  'GET /v1/volumes/:name': { summary: 'One volume: state, replicas, connections' },
  'DELETE /v1/volumes/:name': {
    summary: 'Remove a volume and free its space',
    query: { force: 'true: drop connected clients' },
  },
  'GET /v1/volumes/:name/stats': { summary: 'Requests, bytes and latency quantiles' },
  'POST /v1/volumes/:name/attach': {
    summary: 'Attach (in a cluster: on this node, or on `node`)',
    body: object({
      frontend: { enum: ['nbd', 'fuse'] },
      node: str,
      key: { type: 'string', description: "an encrypted volume's user key, base64" },
    }),
  },
  'POST /v1/volumes/:name/activate': {
    summary:
      'Make a standby volume a normal, writable one (at the newest complete backup, polled once more)',
  },
  'POST /v1/volumes/:name/detach': {
    summary: 'Detach; refused while clients are connected unless forced',
    body: object({ force: flag }),
  },
  'POST /v1/volumes/:name/key': {
    summary: "Change an encrypted volume's key (the master key is re-wrapped; no data rewritten)",
    body: object(
      {
        key: { type: 'string', description: 'the current user key, base64' },
        newKey: { type: 'string', description: 'the new user key, base64 of ≥ 32 bytes' },
      },
      ['key', 'newKey'],
    ),
  },
  'POST /v1/volumes/:name/qos': {
    summary: 'Change I/O limits live (those given replace, 0 removes one)',
    body: qosLimits,
  },
  'POST /v1/volumes/:name/expand': {
    summary: 'Grow an attached volume online (never shrinks); snapshots keep their size',
    body: object({ size }, ['size']),
  },
  'GET /v1/volumes/:name/snapshots': { summary: "A volume's snapshots, oldest first" },
  'POST /v1/volumes/:name/snapshots': {
    summary: 'Take a crash-consistent snapshot',
    body: object({ name: str }),
  },
  'DELETE /v1/volumes/:name/snapshots/:snapshot': { summary: 'Delete a snapshot (online merge)' },
  'POST /v1/volumes/:name/snapshots/:snapshot/revert': {
    summary: 'Revert the volume to a snapshot (online)',
    body: object({ discardNewer: flag }),
  },
  'GET /v1/volumes/:name/replicas': { summary: 'Replicas: location, mode, revision, rebuild' },
  'DELETE /v1/volumes/:name/replicas/:id': {
    summary: 'Remove a replica; a new one is placed and rebuilt',
  },
  'POST /v1/volumes/:name/verify': {
    summary: 'Compare every replica, snapshots included',
    query: wait,
    operation: true,
  },
  'POST /v1/volumes/:name/scrub': {
    summary: 'Check every block against its checksum; bad replicas are rebuilt',
    query: wait,
    operation: true,
  },
  'GET /v1/node': { summary: 'This node' },
  'GET /v1/nodes': { summary: 'Every node of the cluster, up or down' },
  'POST /v1/nodes/:name/cordon': { summary: 'No new replicas or engines on the node' },
  'POST /v1/nodes/:name/uncordon': { summary: 'Undo cordon' },
  'POST /v1/nodes/:name/drain': {
    summary: 'Cordon, move its engines, rebuild its replicas elsewhere',
    query: wait,
    operation: true,
  },
  'GET /v1/operations': { summary: 'Long operations, running and recent' },
  'GET /v1/operations/:id': { summary: 'One operation: phase, progress, result' },
  'GET /v1/backups': {
    summary: 'Backups in a target',
    query: { target: 'a target URL (admin), else the default', volume: 'only this volume' },
  },
  'POST /v1/backups': {
    summary: 'Back up a snapshot (one is taken when none is named)',
    body: object(
      {
        volume: str,
        snapshot: str,
        target,
        key: {
          type: 'string',
          description: 'a backup key, base64 of ≥ 32 bytes: blocks encrypted',
        },
      },
      ['volume'],
    ),
    query: wait,
    operation: true,
  },
  'POST /v1/backups/gc': {
    summary: 'Finish deletes that were cut off',
    body: object({ target }),
    query: wait,
    operation: true,
  },
  'GET /v1/backups/:ref': {
    summary: 'One backup, by name or URL',
    query: { target: 'a target URL (admin)' },
  },
  'DELETE /v1/backups/:ref': {
    summary: 'Delete a backup and the blocks no other lists',
    query: { target: 'a target URL', ...wait },
    operation: true,
  },
  'POST /v1/restores': {
    summary: 'Restore a backup into a new volume',
    body: object(
      {
        backup: str,
        volume: str,
        target,
        key: { type: 'string', description: "an encrypted backup's key, base64" },
      },
      ['backup', 'volume'],
    ),
    query: wait,
    operation: true,
  },
  'GET /v1/jobs': { summary: 'Recurring jobs' },
  'POST /v1/jobs': {
    summary: 'Add a recurring snapshot, backup or scrub',
    body: object(
      {
        volume: str,
        cron: { type: 'string', examples: ['0 * * * *'] },
        task: { enum: ['snapshot', 'backup', 'scrub'] },
        retain: int,
        target,
      },
      ['volume', 'cron', 'task'],
    ),
  },
  'DELETE /v1/jobs/:id': { summary: 'Remove a job' },
  'GET /v1/events': {
    summary: 'Events; with follow=1 a stream of server-sent events',
    query: {
      volume: 'only this volume',
      since: 'after this event id',
      follow: '1: server-sent events as they happen',
    },
  },
  'GET /v1/tokens': { summary: 'API tokens (never their secret)' },
  'POST /v1/tokens': {
    summary: 'Create a token; the answer holds it, once',
    body: object({ name: str, role: { enum: ['read-only', 'operator', 'admin'] } }, [
      'name',
      'role',
    ]),
  },
  'DELETE /v1/tokens/:name': { summary: 'Revoke a token' },
  'POST /v1/replicas': { summary: 'Peers: keep a replica here for an engine elsewhere' },
  'DELETE /v1/replicas/:id': { summary: 'Peers: remove a replica kept here' },
  'POST /v1/peer/volumes/:name/release': {
    summary: 'Peers: let go of a volume for a planned move',
  },
  'POST /v1/debug/volumes/:name/fault': {
    summary: 'Tests only (CORRAL_FAULT_INJECTION=1): make a volume fail or hang',
    body: object({ mode: { enum: ['none', 'throw', 'hang'] } }, ['mode']),
  },
};

const ajv = new Ajv({ allErrors: false, strict: false });
const validators = new Map<string, ValidateFunction | undefined>();

/**
 * Checks a request body against its route's schema above: the document and
 * the validation are one (a field the document does not name is refused).
 * The services still check meaning (names, sizes, states) themselves.
 */
export function checkBody(method: string, routePath: string, body: unknown): void {
  const key = `${method} ${routePath}`;
  if (!validators.has(key)) {
    const schema = ROUTE_DOCS[key]?.body;
    validators.set(key, schema ? ajv.compile(schema) : undefined);
  }
  const validate = validators.get(key);
  if (!validate || validate(body)) return;
  const e = validate.errors?.[0];
  const where = e?.instancePath ? `field ${e.instancePath.slice(1)}` : 'the body';
  const detail =
    e?.keyword === 'additionalProperties'
      ? `unknown field "${String((e.params as { additionalProperty?: unknown }).additionalProperty)}"`
      : `${where} ${e?.message ?? 'is not valid'}`;
  throw new CorralError('INVALID_ARGUMENT', `Request body: ${detail} (see /v1/openapi.json)`);
}

const ERROR = {
  description: 'An error',
  content: {
    'application/json': {
      schema: object({ error: object({ code: str, message: str }, ['code', 'message']) }, [
        'error',
      ]),
    },
  },
};

/** The OpenAPI 3.1 document of the routes an app serves. */
export function openApiDocument(
  routes: ReadonlyArray<{ method: string; path: string }>,
  version: string,
): Record<string, unknown> {
  const paths: Record<string, Record<string, unknown>> = {};
  for (const { method, path } of routes) {
    if (method === 'ALL' || path.includes('*')) continue;
    const key = `${method} ${path}`;
    const doc = ROUTE_DOCS[key];
    const openPath = path.replace(/:([a-z]+)/gi, '{$1}');
    const access = accessFor(method, path.replace(/:([a-z]+)/gi, 'x'));
    const params = [...path.matchAll(/:([a-z]+)/gi)].map((m) => ({
      name: m[1],
      in: 'path',
      required: true,
      schema: str,
    }));
    const query = Object.entries(doc?.query ?? {}).map(([name, description]) => ({
      name,
      in: 'query',
      required: false,
      description,
      schema: str,
    }));
    (paths[openPath] ??= {})[method.toLowerCase()] = {
      summary: doc?.summary ?? '',
      description:
        access === 'none'
          ? 'No token needed.'
          : access === 'peer'
            ? 'Peer daemons only (cluster secret or node certificate).'
            : `Needs a token with the ${access} role or above.`,
      ...(access !== 'none' ? { security: [{ bearer: [] }] } : {}),
      ...(params.length + query.length > 0 ? { parameters: [...params, ...query] } : {}),
      ...(doc?.body
        ? { requestBody: { content: { 'application/json': { schema: doc.body } } } }
        : {}),
      responses: {
        ...(doc?.operation
          ? { '202': { description: 'Started: the operation, to follow at /v1/operations/{id}' } }
          : {}),
        '200': { description: 'OK' },
        '401': ERROR,
        '403': ERROR,
        '4XX': ERROR,
      },
    };
  }
  return {
    openapi: '3.1.0',
    info: {
      title: 'Corral API',
      version,
      description:
        'Distributed block storage. Errors are {"error": {"code", "message"}}; every call but the health check takes Authorization: Bearer TOKEN.',
    },
    components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
    paths,
  };
}
