import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import { Hono, type Context } from 'hono';
import { deleteCookie, getCookie, setCookie } from 'hono/cookie';
import type { SnapshotInfo } from '../../replication/replica.ts';
import type { DaemonEvent } from '../events.ts';
import type { VolumeStats } from '../metrics.ts';
import type { NodeInfo } from '../node-info.ts';
import type { VolumeInfo } from '../volume-info.ts';
import type { BackupSummary } from '../backups.ts';
import type { JobInfo } from '../jobs.ts';
import type { Operation } from '../operations.ts';
import {
  ApiDocs,
  Backups,
  DashboardBody,
  Jobs,
  NodeList,
  OperationProgress,
  type IopsSample,
  EventTable,
  Layout,
  Login,
  Snapshots,
  StatsTable,
  VolumeDetail,
  VolumeList,
} from './views.tsx';

/** The API's own fetch: the UI is one of its clients, with the caller's token, in process. */
export type ApiFetch = (request: Request, env: unknown) => Response | Promise<Response>;

const COOKIE = 'corral_token';

interface Answer<T> {
  ok: boolean;
  status: number;
  json: T;
  error?: string;
}

/**
 * The web UI at `/` (server-rendered with hono/jsx; htmx for the forms and
 * the parts that refresh themselves). It reads and acts through the API with
 * the token the user logged in with, so every role rule of the API holds
 * here too. The token sits in an HttpOnly, SameSite=Strict cookie, and a
 * POST from another origin is refused (no cross-site form can act for you).
 */
export function createUi(api: ApiFetch, options: { secure: boolean }): Hono {
  const ui = new Hono();
  const htmx = fs.readFileSync(createRequire(import.meta.url).resolve('htmx.org/dist/htmx.min.js'));

  const call = async <T,>(
    c: Context,
    method: string,
    path: string,
    body?: unknown,
    /** Given only at login; else the session's, whose refusal ends the session. */
    explicitToken?: string,
  ): Promise<Answer<T>> => {
    const token = explicitToken ?? getCookie(c, COOKIE) ?? '';
    const response = await api(
      new Request(`http://ui.invalid${path}`, {
        method,
        headers: {
          authorization: `Bearer ${token}`,
          ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
        },
        ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
      }),
      c.env,
    );
    // A session token the API no longer takes (removed, or the store lost): back to the login.
    if (response.status === 401 && explicitToken === undefined) throw new LoggedOut();
    const text = await response.text();
    const json = (text ? JSON.parse(text) : undefined) as T & { error?: { message: string } };
    return {
      ok: response.ok,
      status: response.status,
      json,
      ...(response.ok ? {} : { error: json.error?.message ?? `HTTP ${response.status}` }),
    };
  };
  /** An answer the page cannot do without. */
  const need = <T,>(a: Answer<T>): T => {
    if (!a.ok) throw new Error(a.error);
    return a.json;
  };
  ui.onError((err, c) => {
    if (err instanceof LoggedOut) {
      deleteCookie(c, COOKIE, { path: '/' });
      if (c.req.header('hx-request') !== undefined) {
        c.header('HX-Redirect', '/ui/login');
        return c.body(null, 200);
      }
      return c.redirect('/ui/login');
    }
    return c.html(
      <Layout title="Error">
        <p class="error">{err.message}</p>
      </Layout>,
      500,
    );
  });

  ui.get('/', (c) => c.redirect('/ui/'));
  ui.get('/ui', (c) => c.redirect('/ui/'));
  ui.get('/ui/htmx.min.js', (c) =>
    c.body(htmx, 200, {
      'content-type': 'text/javascript; charset=utf-8',
      'cache-control': 'max-age=86400',
    }),
  );
  ui.get('/ui/login', (c) => c.html(<Login />));
  ui.get('/docs', async (c) => {
    const doc = await call<Parameters<typeof ApiDocs>[0]['document']>(c, 'GET', '/v1/openapi.json');
    return c.html(<ApiDocs document={doc.json} />);
  });
  // Cross-site requests may not act: the browser names the page a POST comes from.
  ui.use('/ui/*', async (c, next) => {
    if (c.req.method === 'POST') {
      const origin = c.req.header('origin');
      if (origin !== undefined && new URL(origin).host !== new URL(c.req.url).host)
        return c.text('Cross-origin request refused', 403);
    }
    return next();
  });
  ui.post('/ui/login', async (c) => {
    const form = await c.req.parseBody();
    const token = typeof form.token === 'string' ? form.token.trim() : '';
    const who = await call<{ name?: string }>(c, 'GET', '/v1/whoami', undefined, token);
    if (!who.ok) return c.html(<Login error={who.error ?? 'That token is not valid'} />, 401);
    setCookie(c, COOKIE, token, {
      httpOnly: true,
      sameSite: 'Strict',
      secure: options.secure,
      path: '/',
    });
    return c.redirect('/ui/');
  });
  ui.post('/ui/logout', (c) => {
    deleteCookie(c, COOKIE, { path: '/' });
    return c.redirect('/ui/login');
  });
  // Every other page needs a login.
  ui.use('/ui/*', async (c, next) => {
    if (c.req.header('cookie')?.includes(`${COOKIE}=`) !== true) throw new LoggedOut();
    return next();
  });

  const whoami = async (c: Context): Promise<string> => {
    const w = need(await call<{ name?: string; role?: string }>(c, 'GET', '/v1/whoami'));
    return w.name !== undefined ? `${w.name} (${w.role})` : 'peer';
  };
  const dashboard = async (c: Context) => {
    const [nodes, volumes, events] = await Promise.all([
      call<{ nodes: NodeInfo[] }>(c, 'GET', '/v1/nodes'),
      call<{ volumes: VolumeInfo[] }>(c, 'GET', '/v1/volumes'),
      call<{ events: DaemonEvent[] }>(c, 'GET', '/v1/events'),
    ]);
    return (
      <DashboardBody
        nodes={need(nodes).nodes}
        volumes={need(volumes).volumes}
        events={need(events).events}
      />
    );
  };
  ui.get('/ui/', async (c) =>
    c.html(
      <Layout title="Dashboard" who={await whoami(c)}>
        <h1>Dashboard</h1>
        {await dashboard(c)}
      </Layout>,
    ),
  );
  ui.get('/ui/fragments/dashboard', async (c) => c.html(await dashboard(c)));

  const volumeList = async (c: Context, error?: string) => (
    <VolumeList
      volumes={need(await call<{ volumes: VolumeInfo[] }>(c, 'GET', '/v1/volumes')).volumes}
      {...(error !== undefined ? { error } : {})}
    />
  );
  ui.get('/ui/volumes', async (c) =>
    c.html(
      <Layout title="Volumes" who={await whoami(c)}>
        <h1>Volumes</h1>
        {await volumeList(c)}
      </Layout>,
    ),
  );
  ui.post('/ui/volumes', async (c) => {
    const form = await c.req.parseBody();
    const created = await call(c, 'POST', '/v1/volumes', {
      name: form.name,
      size: form.size,
      replicas: Number(form.replicas ?? 1),
    });
    return c.html(await volumeList(c, created.error));
  });

  /** Recent samples of each volume's counters, for the IOPS chart (taken as the page asks). */
  const history = new Map<string, IopsSample[]>();
  const stats = async (c: Context, name: string) => {
    const s = await call<VolumeStats>(c, 'GET', `/v1/volumes/${encodeURIComponent(name)}/stats`);
    if (!s.ok) return { stats: undefined, history: [] };
    const samples = history.get(name) ?? [];
    samples.push({ t: Date.now(), reads: s.json.readOps, writes: s.json.writeOps });
    if (samples.length > 60) samples.shift();
    history.delete(name); // re-inserted last: the map stays ordered by use
    history.set(name, samples);
    if (history.size > 1000) history.delete(history.keys().next().value!);
    return { stats: s.json, history: samples };
  };
  const volumePath = (name: string) => `/v1/volumes/${encodeURIComponent(name)}`;
  const backupsOf = async (c: Context, volume: string | undefined) => {
    const list = await call<{ backups: BackupSummary[] }>(
      c,
      'GET',
      `/v1/backups${volume !== undefined ? `?volume=${encodeURIComponent(volume)}` : ''}`,
    );
    return list.ok ? list.json.backups : [];
  };
  const jobsOf = async (c: Context, volume: string) => {
    const list = await call<{ jobs: JobInfo[] }>(c, 'GET', '/v1/jobs');
    return list.ok ? list.json.jobs.filter((j) => j.volume === volume) : [];
  };
  const detail = async (c: Context, name: string) => {
    const [volume, snapshots, backups, s, jobs] = await Promise.all([
      call<VolumeInfo>(c, 'GET', volumePath(name)),
      call<{ snapshots: SnapshotInfo[] }>(c, 'GET', `${volumePath(name)}/snapshots`),
      backupsOf(c, name),
      stats(c, name),
      jobsOf(c, name),
    ]);
    return (
      <VolumeDetail
        volume={need(volume)}
        snapshots={snapshots.ok ? snapshots.json.snapshots : []}
        stats={s.stats}
        history={s.history}
        backups={backups}
        jobs={jobs}
      />
    );
  };
  ui.get('/ui/volumes/:name', async (c) =>
    c.html(
      <Layout title={c.req.param('name')} who={await whoami(c)}>
        {await detail(c, c.req.param('name'))}
      </Layout>,
    ),
  );
  ui.get('/ui/fragments/volumes/:name/stats', async (c) => {
    const s = await stats(c, c.req.param('name'));
    return c.html(<StatsTable name={c.req.param('name')} stats={s.stats} history={s.history} />);
  });
  // Attach, detach, delete: from the list (the list is redrawn) or the volume's page. Routes of
  // their own, not a `:action{a|b}` pattern: Hono's pattern is a regular expression that is not
  // bounded by the path's slashes, and `{...|delete}` matched `/jobs/ID/delete` — which then
  // deleted the volume (caught by the UI test).
  const volumeAction = async (c: Context, action: 'attach' | 'detach' | 'delete') => {
    const name = c.req.param('name')!;
    const done =
      action === 'delete'
        ? await call(c, 'DELETE', volumePath(name))
        : await call(c, 'POST', `${volumePath(name)}/${action}`, {});
    if (c.req.header('hx-target') === 'volume-list') return c.html(await volumeList(c, done.error));
    if (action === 'delete' && done.ok) {
      c.header('HX-Redirect', '/ui/volumes');
      return c.body(null, 200);
    }
    if (!done.ok) return c.html(<p class="error">{done.error}</p>, 200);
    return c.html(await detail(c, name));
  };
  for (const action of ['attach', 'detach', 'delete'] as const)
    ui.post(`/ui/volumes/:name/${action}`, (c) => volumeAction(c, action));

  const snapshotList = async (
    c: Context,
    name: string,
    answer: Answer<unknown>,
    notice?: string,
  ) => {
    const list = await call<{ snapshots: SnapshotInfo[] }>(
      c,
      'GET',
      `${volumePath(name)}/snapshots`,
    );
    return c.html(
      <Snapshots
        name={name}
        snapshots={list.ok ? list.json.snapshots : []}
        {...(answer.error !== undefined ? { error: answer.error } : {})}
        {...(answer.ok && notice !== undefined ? { notice } : {})}
      />,
    );
  };
  ui.post('/ui/volumes/:name/snapshots', async (c) => {
    const name = c.req.param('name');
    const form = await c.req.parseBody();
    const taken = await call(
      c,
      'POST',
      `${volumePath(name)}/snapshots`,
      typeof form.name === 'string' && form.name !== '' ? { name: form.name } : {},
    );
    return snapshotList(c, name, taken);
  });
  const snapshotAction = async (c: Context, action: 'revert' | 'delete' | 'clone') => {
    const name = c.req.param('name')!;
    const snapshot = c.req.param('snapshot')!;
    const at = `${volumePath(name)}/snapshots/${encodeURIComponent(snapshot)}`;
    switch (action) {
      case 'revert':
        return snapshotList(
          c,
          name,
          await call(c, 'POST', `${at}/revert`, {}),
          `Reverted to ${snapshot}`,
        );
      case 'delete':
        return snapshotList(c, name, await call(c, 'DELETE', at));
      default: {
        const form = await c.req.parseBody();
        const clone = typeof form.clone === 'string' ? form.clone : '';
        const made = await call(c, 'POST', '/v1/volumes', {
          name: clone,
          fromSnapshot: `${name}@${snapshot}`,
        });
        return snapshotList(c, name, made, `Cloned into volume ${clone}`);
      }
    }
  };
  for (const action of ['revert', 'delete', 'clone'] as const)
    ui.post(`/ui/volumes/:name/snapshots/:snapshot/${action}`, (c) => snapshotAction(c, action));

  // Recurring jobs of a volume: added and removed in place.
  const jobList = async (c: Context, volume: string, answer: Answer<unknown>) => {
    return c.html(
      <Jobs
        volume={volume}
        jobs={await jobsOf(c, volume)}
        {...(answer.error !== undefined ? { error: answer.error } : {})}
      />,
    );
  };
  ui.post('/ui/volumes/:name/jobs', async (c) => {
    const name = c.req.param('name');
    const form = await c.req.parseBody();
    const retain =
      typeof form.retain === 'string' && form.retain !== '' ? Number(form.retain) : undefined;
    const added = await call(c, 'POST', '/v1/jobs', {
      volume: name,
      cron: form.cron,
      task: form.task,
      ...(retain !== undefined ? { retain } : {}),
    });
    return jobList(c, name, added);
  });
  ui.post('/ui/volumes/:name/jobs/:id/delete', async (c) =>
    jobList(
      c,
      c.req.param('name'),
      await call(c, 'DELETE', `/v1/jobs/${encodeURIComponent(c.req.param('id'))}`),
    ),
  );

  // Backups: started as operations, whose progress the page follows.
  ui.post('/ui/volumes/:name/backups', async (c) => {
    const name = c.req.param('name');
    const started = await call<{ operation: Operation }>(c, 'POST', '/v1/backups', {
      volume: name,
    });
    return c.html(
      <Backups
        volume={name}
        backups={await backupsOf(c, name)}
        {...(started.ok ? { started: started.json.operation } : { error: started.error! })}
      />,
    );
  });
  ui.post('/ui/restores', async (c) => {
    const form = await c.req.parseBody();
    const volume = typeof form.volume === 'string' && form.volume !== '' ? form.volume : undefined;
    const started = await call<{ operation: Operation }>(c, 'POST', '/v1/restores', {
      backup: form.backup,
      volume: form.into,
    });
    return c.html(
      <Backups
        {...(volume !== undefined ? { volume } : {})}
        backups={await backupsOf(c, volume)}
        {...(started.ok ? { started: started.json.operation } : { error: started.error! })}
      />,
    );
  });
  ui.get('/ui/fragments/volumes/:name/backups', async (c) =>
    c.html(
      <Backups volume={c.req.param('name')} backups={await backupsOf(c, c.req.param('name'))} />,
    ),
  );
  ui.get('/ui/fragments/operations/:id', async (c) => {
    const op = need(
      await call<Operation>(c, 'GET', `/v1/operations/${encodeURIComponent(c.req.param('id'))}`),
    );
    return c.html(<OperationProgress op={op} />);
  });
  ui.get('/ui/backups', async (c) =>
    c.html(
      <Layout title="Backups" who={await whoami(c)}>
        <h1>Backups</h1>
        <p>In the daemon's default target; restore one into a new volume.</p>
        <Backups backups={await backupsOf(c, undefined)} />
      </Layout>,
    ),
  );

  const nodeList = async (c: Context, error?: string) => (
    <NodeList
      nodes={need(await call<{ nodes: NodeInfo[] }>(c, 'GET', '/v1/nodes')).nodes}
      {...(error !== undefined ? { error } : {})}
    />
  );
  ui.get('/ui/nodes', async (c) =>
    c.html(
      <Layout title="Nodes" who={await whoami(c)}>
        <h1>Nodes</h1>
        {await nodeList(c)}
      </Layout>,
    ),
  );
  for (const action of ['cordon', 'uncordon', 'drain'] as const)
    ui.post(`/ui/nodes/:name/${action}`, async (c) => {
      const done = await call(
        c,
        'POST',
        `/v1/nodes/${encodeURIComponent(c.req.param('name'))}/${action}`,
        {},
      );
      return c.html(await nodeList(c, done.error));
    });

  ui.get('/ui/events', async (c) => {
    const events = need(await call<{ events: DaemonEvent[] }>(c, 'GET', '/v1/events')).events;
    return c.html(
      <Layout title="Events" who={await whoami(c)}>
        <h1>Events</h1>
        <EventTable events={[...events].reverse()} />
      </Layout>,
    );
  });
  return ui;
}

class LoggedOut extends Error {}
