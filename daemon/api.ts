import type * as tls from 'node:tls';
import { Hono, type Context } from 'hono';
import { bodyLimit } from 'hono/body-limit';
import { streamSSE } from 'hono/streaming';
import { CorralError, quoted, type ErrorCode } from '../common/errors.ts';
import { accessFor, allows, bearer, type Principal, type Tokens } from './auth.ts';
import type { BackupService } from './backups.ts';
import type { StandbyService } from './standby.ts';
import type { Cluster } from './cluster.ts';
import type { ClusterEvents } from './cluster-events.ts';
import type { Drainer } from './drain.ts';
import type { Metrics } from './metrics.ts';
import type { DaemonEvent, EventLog } from './events.ts';
import type { HostedReplicas } from './hosted.ts';
import type { JobScheduler } from './jobs.ts';
import { checkBody, openApiDocument } from './openapi.ts';
import { operationNode, type Operation, type Operations } from './operations.ts';
import type { VolumeManager } from './volumes.ts';

const STATUS: Partial<Record<ErrorCode, 400 | 401 | 403 | 404 | 409 | 413 | 500 | 503 | 507>> = {
  UNAUTHENTICATED: 401,
  FORBIDDEN: 403,
  INVALID_ARGUMENT: 400,
  INVALID_NAME: 400,
  INVALID_SIZE: 400,
  OUT_OF_RANGE: 400,
  NOT_FOUND: 404,
  ALREADY_EXISTS: 409,
  BUSY: 409,
  LIMIT_REACHED: 409,
  NO_SPACE: 507,
  SHUTTING_DOWN: 503,
  TOO_LARGE: 413,
  UNAVAILABLE: 503,
};

/** Marks a call forwarded from another node of the cluster (never forwarded again). */
const FORWARDED_HEADER = 'x-corral-forwarded';

/** The largest request body the API reads: every control request is a small JSON object. */
export const MAX_BODY_BYTES = 1024 * 1024;

export interface ApiOptions {
  volumes: VolumeManager;
  backups: BackupService;
  jobs: JobScheduler;
  operations: Operations;
  cluster: Cluster;
  hosted: HostedReplicas;
  events: EventLog;
  version: string;
  faultInjection: boolean;
  /** In a cluster: `node drain`. */
  drainer?: Drainer;
  /** In a cluster: a volume's events from every node. */
  clusterEvents?: ClusterEvents;
  /** `/metrics` and volume stats; absent when the daemon runs with `--metrics off`. */
  metrics?: Metrics;
  tokens: Tokens;
  /** Standby (DR) volumes that follow another volume's backups. */
  standby: StandbyService;
  /** The backup target used when a call names none: any other is for `admin` to name. */
  defaultTarget: string;
}

type Env = { Variables: { principal: Principal } };

/** The request's TLS socket under Node (HTTP/1.1, or the HTTP/2 session's). */
function requestSocket<C extends Context>(c: C): tls.TLSSocket | undefined {
  const env = c.env as { incoming?: { socket?: tls.TLSSocket } } | undefined;
  return env?.incoming?.socket;
}

/** The caller's address as the socket has it (Node: the request's socket; Deno: the serve info). */
function remoteAddress<C extends Context>(c: C): string {
  const env = c.env as
    | { incoming?: { socket?: { remoteAddress?: string } }; remoteAddr?: { hostname?: string } }
    | undefined;
  return env?.incoming?.socket?.remoteAddress ?? env?.remoteAddr?.hostname ?? 'unknown';
}

/** A path segment decoded; a malformed escape (`%zz`) is the caller's error, not ours. */
function decodedSegment(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    throw new CorralError('INVALID_ARGUMENT', `Malformed escape in the path: ${quoted(segment)}`);
  }
}

async function jsonBody(c: Context): Promise<Record<string, unknown>> {
  const text = await c.req.text();
  let body: unknown = {};
  try {
    if (text.trim() !== '') body = JSON.parse(text);
  } catch {
    throw new CorralError('INVALID_ARGUMENT', 'Request body is not valid JSON');
  }
  if (typeof body !== 'object' || body === null || Array.isArray(body)) {
    throw new CorralError('INVALID_ARGUMENT', 'Request body must be a JSON object');
  }
  checkBody(c.req.method, c.req.routePath, body);
  return body as Record<string, unknown>;
}

function flag(value: unknown): boolean {
  return value === true || value === 'true' || value === '1';
}

/** The control API under /v1: JSON in and out, errors as { error: { code, message } }. */
export function createApi(options: ApiOptions): Hono<Env> {
  const { volumes, events, backups, standby, jobs, operations, cluster, hosted, tokens } = options;

  /** Long work answers 202 with its operation, or with `?wait=true` waits and answers with the result. */
  const started = async (
    c: Context,
    run: { operation: Operation; done: Promise<unknown> },
  ): Promise<Response> => {
    if (!flag(c.req.query('wait'))) return c.json({ operation: run.operation }, 202);
    const result = await run.done;
    return c.json({ operation: run.operation, result }, 200);
  };
  const app = new Hono<Env>();
  /** Refuses a call, and records who tried what from where (never the token itself). */
  const refuse = <C extends Context<Env>>(
    c: C,
    who: string,
    code: ErrorCode,
    message: string,
  ): never => {
    events.add({
      type: 'access-denied',
      message: `${who} from ${remoteAddress(c)}: ${c.req.method} ${c.req.path}: ${message}`,
    });
    throw new CorralError(code, message);
  };
  /** A call that names a backup target other than the default: only an admin may point the daemon elsewhere. */
  const targetNamed = <C extends Context<Env>>(c: C, target: unknown): void => {
    if (target === undefined || target === null || target === options.defaultTarget) return;
    const p = c.get('principal');
    if (p.kind === 'peer' || p.role === 'admin') return;
    refuse(
      c,
      `${p.role} token "${p.name}"`,
      'FORBIDDEN',
      'Naming a backup target other than the default needs the admin role',
    );
  };
  /**
   * Sends a request on to the node serving `volume`, once (the header stops
   * a second hop). Undefined when that node does not answer a read: it may
   * have just died (its lease not yet expired), and this node answers.
   */
  const forward = async (
    owner: string,
    volume: string,
    request: {
      pathAndQuery: string;
      method: string;
      authorization: string | undefined;
      contentType?: string;
      body?: string | ArrayBuffer;
    },
  ): Promise<Response | undefined> => {
    const { method } = request;
    let response: Response;
    try {
      response = await cluster.fetch(owner + request.pathAndQuery, {
        method,
        headers: {
          [FORWARDED_HEADER]: '1',
          // The owner checks the caller again: tokens are the cluster's (etcd), valid on every node.
          ...(request.authorization !== undefined ? { authorization: request.authorization } : {}),
          ...(request.contentType !== undefined ? { 'content-type': request.contentType } : {}),
        },
        ...(method === 'GET' || method === 'HEAD'
          ? { signal: AbortSignal.timeout(5000) }
          : request.body !== undefined
            ? { body: request.body }
            : {}),
      });
    } catch (err) {
      if (method === 'GET') return undefined;
      throw new CorralError(
        'UNAVAILABLE',
        `The node serving volume ${volume} (${owner}) does not answer: ${err instanceof Error ? err.message : String(err)}`,
      );
    }
    return new Response(response.body, { status: response.status, headers: response.headers });
  };
  const clusterRegistry = () => {
    const registry = cluster.registry;
    if (!registry)
      throw new CorralError(
        'INVALID_ARGUMENT',
        'Nodes are cordoned in a cluster: start the daemons with --etcd',
      );
    return registry;
  };

  app.onError((err, c) => {
    if (err instanceof CorralError) {
      return c.json({ error: { code: err.code, message: err.message } }, STATUS[err.code] ?? 500);
    }
    return c.json(
      { error: { code: 'INTERNAL', message: err instanceof Error ? err.message : String(err) } },
      500,
    );
  });
  app.notFound((c) =>
    c.json(
      { error: { code: 'NOT_FOUND', message: `No route ${c.req.method} ${c.req.path}` } },
      404,
    ),
  );

  // Bodies are read whole into memory: without a limit one request could take gigabytes.
  app.use(
    '*',
    bodyLimit({
      maxSize: MAX_BODY_BYTES,
      onError: () => {
        throw new CorralError(
          'TOO_LARGE',
          `Request body too large: the limit is ${MAX_BODY_BYTES} bytes`,
        );
      },
    }),
  );

  // Every call but the health check names its caller: a token, or a peer's secret or certificate.
  app.use('*', async (c, next) => {
    const need = accessFor(c.req.method, c.req.path);
    if (need === 'none') return next();
    const header = c.req.header('authorization');
    let principal: Principal | undefined;
    if (cluster.authorized(header) || cluster.isPeerSocket(requestSocket(c)))
      principal = { kind: 'peer' };
    else {
      const token = bearer(header);
      const holder = token !== undefined ? await tokens.check(token) : undefined;
      if (token === undefined)
        refuse(
          c,
          'no token',
          'UNAUTHENTICATED',
          'This call needs a token (Authorization: Bearer ...; the CLI reads CORRAL_TOKEN or CORRAL_TOKEN_FILE)',
        );
      if (!holder)
        refuse(c, 'an unknown token', 'UNAUTHENTICATED', 'The token is not valid (removed?)');
      principal = { kind: 'token', ...holder! };
    }
    if (principal.kind === 'token' && (need === 'peer' || !allows(principal.role, need)))
      refuse(
        c,
        `${principal.role} token "${principal.name}"`,
        'FORBIDDEN',
        need === 'peer'
          ? 'Only peer daemons make this call'
          : `This call needs the ${need} role; the token has ${principal.role}`,
      );
    c.set('principal', principal);
    return next();
  });

  app.get('/v1/whoami', (c) => {
    const p = c.get('principal');
    return c.json(p.kind === 'peer' ? { peer: true } : { name: p.name, role: p.role });
  });
  app.get('/v1/health', (c) => c.json({ ok: true, version: options.version }));
  app.get('/metrics', async (c) => {
    if (!options.metrics)
      throw new CorralError('NOT_FOUND', 'Metrics are off on this daemon (--metrics off)');
    return c.body(await options.metrics.registry.metrics(), 200, {
      'content-type': options.metrics.registry.contentType,
    });
  });

  // In a cluster a volume's calls are answered by the node whose engine serves it: forwarded
  // there once (the header stops a second hop). Attach is not: it brings the engine here.
  app.use('/v1/volumes/*', async (c, next) => {
    const parts = c.req.path.split('/');
    const name = parts[3];
    if (!name || parts[4] === 'attach' || c.req.header(FORWARDED_HEADER) !== undefined)
      return next();
    const volume = decodedSegment(name);
    const owner = await volumes.engineElsewhere(volume);
    if (owner === undefined) return next();
    const url = new URL(c.req.url);
    const method = c.req.method;
    const contentType = c.req.header('content-type');
    const sent = await forward(owner, volume, {
      pathAndQuery: url.pathname + url.search,
      method,
      authorization: c.req.header('authorization'),
      ...(contentType !== undefined ? { contentType } : {}),
      ...(method === 'GET' || method === 'HEAD' ? {} : { body: await c.req.arrayBuffer() }),
    });
    return sent ?? next();
  });

  app.get('/v1/volumes', async (c) => c.json({ volumes: await volumes.list() }));
  app.post('/v1/volumes', async (c) => {
    const body = await jsonBody(c);
    if (body.standbyFrom !== undefined) {
      // A standby restores its first backup: an operation, like a restore.
      if (typeof body.standbyFrom === 'string' && body.standbyFrom.includes('://'))
        targetNamed(c, body.standbyFrom);
      return started(
        c,
        await standby.create({
          name: body.name,
          from: body.standbyFrom,
          pollSeconds: body.pollSeconds,
          replicas: body.replicas,
          frontend: body.frontend,
          key: body.key,
        }),
      );
    }
    const volume = await volumes.create({
      name: body.name,
      size: body.size,
      replicas: body.replicas,
      frontend: body.frontend,
      fromSnapshot: body.fromSnapshot,
      allowSameHost: body.allowSameHost,
      failover: body.failover,
      nbdAllow: body.nbdAllow,
      qos: body.qos,
      diskTag: body.diskTag,
      encrypt: body.encrypt,
      key: body.key,
    });
    return c.json(volume, 201);
  });
  app.get('/v1/volumes/:name', async (c) => c.json(await volumes.get(c.req.param('name'))));
  app.get('/v1/volumes/:name/stats', async (c) => {
    const name = c.req.param('name');
    await volumes.get(name);
    if (!options.metrics)
      throw new CorralError('NOT_FOUND', 'Stats are off on this daemon (--metrics off)');
    return c.json(await options.metrics.stats(name));
  });
  app.post('/v1/volumes/:name/attach', async (c) => {
    const body = await jsonBody(c);
    const name = c.req.param('name');
    // A standby following encrypted backups takes their key here again after a restart.
    const backupKey = body.key !== undefined && (await standby.takesBackupKey(name));
    if (backupKey) await standby.giveKey(name, body.key);
    return c.json(
      await volumes.attach(name, {
        frontend: body.frontend,
        node: body.node,
        ...(backupKey ? {} : { key: body.key }),
      }),
    );
  });
  app.post('/v1/volumes/:name/activate', async (c) =>
    c.json(await standby.activate(c.req.param('name'))),
  );
  app.post('/v1/volumes/:name/detach', async (c) => {
    const body = await jsonBody(c);
    return c.json(await volumes.detach(c.req.param('name'), { force: flag(body.force) }));
  });
  app.post('/v1/volumes/:name/key', async (c) => {
    const body = await jsonBody(c);
    return c.json(await volumes.rekey(c.req.param('name'), { key: body.key, newKey: body.newKey }));
  });
  app.post('/v1/volumes/:name/qos', async (c) => {
    const body = await jsonBody(c);
    return c.json(await volumes.setQos(c.req.param('name'), body));
  });
  app.post('/v1/volumes/:name/expand', async (c) => {
    const body = await jsonBody(c);
    return c.json(await volumes.expand(c.req.param('name'), body.size));
  });
  app.delete('/v1/volumes/:name', async (c) => {
    await volumes.remove(c.req.param('name'), { force: flag(c.req.query('force')) });
    return c.body(null, 204);
  });

  app.get('/v1/volumes/:name/snapshots', async (c) =>
    c.json({ snapshots: await volumes.snapshots(c.req.param('name')) }),
  );
  app.post('/v1/volumes/:name/snapshots', async (c) => {
    const body = await jsonBody(c);
    return c.json(await volumes.createSnapshot(c.req.param('name'), body.name), 201);
  });
  app.delete('/v1/volumes/:name/snapshots/:snapshot', async (c) => {
    await volumes.deleteSnapshot(c.req.param('name'), c.req.param('snapshot'));
    return c.body(null, 204);
  });
  app.post('/v1/volumes/:name/snapshots/:snapshot/revert', async (c) => {
    const body = await jsonBody(c);
    return c.json(
      await volumes.revert(c.req.param('name'), c.req.param('snapshot'), {
        discardNewer: flag(body.discardNewer),
      }),
    );
  });

  app.get('/v1/node', async (c) => c.json(await cluster.self()));
  app.get('/v1/nodes', async (c) => c.json({ nodes: await cluster.nodes() }));
  // A planned move: the node taking the volume asks this one to let go of it.
  app.post('/v1/peer/volumes/:name/release', async (c) => {
    await volumes.release(c.req.param('name'));
    return c.body(null, 204);
  });
  app.post('/v1/nodes/:name/cordon', async (c) => {
    await clusterRegistry().setCordoned(c.req.param('name'), true);
    return c.body(null, 204);
  });
  app.post('/v1/nodes/:name/drain', async (c) => {
    if (!options.drainer)
      throw new CorralError(
        'INVALID_ARGUMENT',
        'Nodes are drained in a cluster: start the daemons with --etcd',
      );
    return started(c, options.drainer.start(c.req.param('name')));
  });
  app.post('/v1/nodes/:name/uncordon', async (c) => {
    await clusterRegistry().setCordoned(c.req.param('name'), false);
    return c.body(null, 204);
  });
  app.post('/v1/replicas', async (c) => {
    const body = await jsonBody(c);
    return c.json(
      await hosted.create({
        volume: body.volume,
        sizeBytes: body.sizeBytes,
        engine: body.engine,
        epoch: body.epoch,
        diskTag: body.diskTag,
      }),
      201,
    );
  });
  app.delete('/v1/replicas/:id', async (c) => {
    await hosted.remove(c.req.param('id'));
    return c.body(null, 204);
  });
  app.delete('/v1/volumes/:name/replicas/:id', async (c) => {
    await volumes.removeReplica(c.req.param('name'), c.req.param('id'));
    return c.body(null, 204);
  });
  app.post('/v1/volumes/:name/verify', async (c) =>
    started(c, await volumes.verify(c.req.param('name'))),
  );
  app.post('/v1/volumes/:name/scrub', async (c) =>
    started(c, await volumes.scrub(c.req.param('name'))),
  );
  app.get('/v1/volumes/:name/replicas', async (c) =>
    c.json({ replicas: (await volumes.get(c.req.param('name'))).replicas }),
  );

  app.get('/v1/operations', (c) => c.json({ operations: operations.list() }));
  app.get('/v1/operations/:id', async (c) => {
    const id = c.req.param('id');
    // In a cluster, an operation started through a forwarded call lives on the node it names.
    const node = operationNode(id);
    if (node !== undefined && cluster.registry && node !== cluster.nodeName) {
      const at = (await cluster.nodes({ cached: true })).find((n) => n.name === node);
      if (!at) throw new CorralError('NOT_FOUND', `No node named ${node} in the cluster`);
      return c.json(await cluster.call<Operation>(at.url, 'GET', `/v1/operations/${id}`));
    }
    return c.json(operations.get(id));
  });

  app.get('/v1/backups', async (c) => {
    targetNamed(c, c.req.query('target'));
    return c.json({
      target: (await backups.store(c.req.query('target'))).url,
      backups: await backups.list({ target: c.req.query('target'), volume: c.req.query('volume') }),
    });
  });
  app.post('/v1/backups', async (c) => {
    const body = await jsonBody(c);
    targetNamed(c, body.target);
    // A backup reads the volume's snapshot where its engine runs.
    const owner =
      typeof body.volume === 'string' && c.req.header(FORWARDED_HEADER) === undefined
        ? await volumes.engineElsewhere(body.volume)
        : undefined;
    if (owner !== undefined) {
      const url = new URL(c.req.url);
      return (await forward(owner, String(body.volume), {
        pathAndQuery: url.pathname + url.search,
        method: 'POST',
        authorization: c.req.header('authorization'),
        contentType: 'application/json',
        body: JSON.stringify(body),
      }))!;
    }
    return started(
      c,
      await backups.create({
        volume: body.volume,
        snapshot: body.snapshot,
        target: body.target,
        key: body.key,
      }),
    );
  });
  app.post('/v1/backups/gc', async (c) => {
    const body = await jsonBody(c);
    return started(c, await backups.gc(body.target));
  });
  app.post('/v1/restores', async (c) => {
    const body = await jsonBody(c);
    if (typeof body.backup !== 'string')
      throw new CorralError('INVALID_ARGUMENT', 'backup must be a backup name or URL');
    targetNamed(c, body.target);
    // A backup's URL names its target too.
    if (body.backup.includes('://')) targetNamed(c, body.backup);
    return started(
      c,
      await backups.restore({
        backup: body.backup,
        volume: body.volume,
        target: body.target,
        key: body.key,
      }),
    );
  });
  app.get('/v1/backups/:ref', async (c) => {
    targetNamed(c, c.req.query('target'));
    if (c.req.param('ref').includes('://')) targetNamed(c, c.req.param('ref'));
    return c.json(await backups.get(c.req.param('ref'), c.req.query('target')));
  });
  app.delete('/v1/backups/:ref', async (c) =>
    started(c, await backups.remove(c.req.param('ref'), c.req.query('target'))),
  );

  app.get('/v1/jobs', async (c) => c.json({ jobs: await jobs.list() }));
  app.post('/v1/jobs', async (c) => {
    const body = await jsonBody(c);
    targetNamed(c, body.target);
    return c.json(
      await jobs.add({
        volume: body.volume,
        cron: body.cron,
        task: body.task,
        retain: body.retain,
        target: body.target,
      }),
      201,
    );
  });
  app.delete('/v1/jobs/:id', async (c) => {
    await jobs.remove(c.req.param('id'));
    return c.body(null, 204);
  });

  app.get('/v1/tokens', async (c) => c.json({ tokens: await tokens.list() }));
  app.post('/v1/tokens', async (c) => {
    const body = await jsonBody(c);
    const { record, token } = await tokens.create(body.name, body.role);
    events.add({ type: 'token-created', message: `token "${record.name}" (${record.role})` });
    return c.json(
      { name: record.name, role: record.role, createdAt: record.createdAt, token },
      201,
    );
  });
  app.delete('/v1/tokens/:name', async (c) => {
    await tokens.remove(c.req.param('name'));
    events.add({ type: 'token-removed', message: `token "${c.req.param('name')}"` });
    return c.body(null, 204);
  });

  app.get('/v1/events', async (c) => {
    const since = c.req.query('since');
    const volume = c.req.query('volume');
    // Server-sent events: what is recorded after `since` (or from now), then each as it comes.
    if (flag(c.req.query('follow')))
      return streamSSE(c, async (stream) => {
        const pending: DaemonEvent[] = [];
        let wake: (() => void) | undefined;
        const stop = events.follow((e) => {
          if (volume !== undefined && e.volume !== volume) return;
          pending.push(e);
          wake?.();
        });
        stream.onAbort(() => {
          stop();
          wake?.();
        });
        try {
          if (since !== undefined)
            pending.unshift(
              ...events.list({
                sinceId: Number(since),
                ...(volume !== undefined ? { volume } : {}),
              }),
            );
          while (!stream.aborted) {
            for (const e of pending.splice(0))
              await stream.writeSSE({ event: e.type, id: String(e.id), data: JSON.stringify(e) });
            // A comment line now and then: a dead client is noticed, a proxy keeps the stream.
            await Promise.race([
              new Promise<void>((r) => (wake = r)),
              new Promise<void>((r) => setTimeout(r, 15_000)),
            ]);
            wake = undefined;
            if (pending.length === 0 && !stream.aborted) await stream.write(': keep-alive\n\n');
          }
        } finally {
          stop();
        }
      });
    // In a cluster a volume's events come from every node (etcd keeps them a day).
    if (volume !== undefined && since === undefined && options.clusterEvents)
      return c.json({ events: await options.clusterEvents.list(volume) });
    return c.json({
      events: events.list({
        ...(since !== undefined ? { sinceId: Number(since) } : {}),
        ...(volume !== undefined ? { volume } : {}),
      }),
    });
  });

  // Last: the document lists every route registered above (app.routes), with the role each needs.
  app.get('/v1/openapi.json', (c) => c.json(openApiDocument(app.routes, options.version)));

  if (options.faultInjection) {
    app.post('/v1/debug/volumes/:name/fault', async (c) => {
      const body = await jsonBody(c);
      const mode = body.mode;
      if (mode !== 'none' && mode !== 'throw' && mode !== 'hang') {
        throw new CorralError('INVALID_ARGUMENT', 'mode must be none, throw or hang');
      }
      volumes.setFault(c.req.param('name'), mode);
      return c.json({ ok: true });
    });
  }
  return app;
}
