import type { Child } from 'hono/jsx';
import { formatSize } from '../../common/size.ts';
import type { SnapshotInfo } from '../../replication/replica.ts';
import type { DaemonEvent } from '../events.ts';
import type { VolumeStats } from '../metrics.ts';
import type { NodeInfo } from '../node-info.ts';
import type { VolumeInfo } from '../volumes.ts';

const STYLE = `
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2327;background:#f6f7f7}
header{background:#23282d;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:center}
header a{color:#c3c4c7;text-decoration:none}header a:hover{color:#fff}header b{color:#fff}
main{padding:1.2em;max-width:70em}
table{border-collapse:collapse;background:#fff;margin:.4em 0 1.2em;min-width:30em}
th,td{text-align:left;padding:.3em .8em;border-bottom:1px solid #dcdcde}th{background:#f0f0f1}
.cards{display:flex;gap:1em;flex-wrap:wrap}.card{background:#fff;padding:.8em 1.2em;border:1px solid #dcdcde}
.card b{display:block;font-size:1.6em}
.state-attached,.mode-RW{color:#007017}.state-failed,.mode-ERR{color:#b32d2e}.mode-WO{color:#996800}
.error{color:#b32d2e;margin:.4em 0}form.inline{display:inline}
input,select,button{font:inherit;margin-right:.4em}
`;

/** The page around every view: the menu, and htmx for the forms and the live parts. */
export function Layout(props: { title: string; children: Child; who?: string }) {
  return (
    <html lang="en">
      <head>
        <meta charset="utf-8" />
        <title>{props.title} · Corral</title>
        <style>{STYLE}</style>
        <script src="/ui/htmx.min.js"></script>
      </head>
      <body>
        <header>
          <b>Corral</b>
          <a href="/ui/">Dashboard</a>
          <a href="/ui/volumes">Volumes</a>
          <a href="/ui/events">Events</a>
          {props.who !== undefined ? (
            <span style="margin-left:auto">
              {props.who} ·{' '}
              <form class="inline" method="post" action="/ui/logout">
                <button>Log out</button>
              </form>
            </span>
          ) : null}
        </header>
        <main>{props.children}</main>
      </body>
    </html>
  );
}

export function Login(props: { error?: string }) {
  return (
    <Layout title="Log in">
      <h1>Log in</h1>
      <p>
        Paste an API token (<code>corral token create</code>; on the daemon's host,{' '}
        <code>admin.token</code> in its data dir).
      </p>
      {props.error !== undefined ? <p class="error">{props.error}</p> : null}
      <form method="post" action="/ui/login">
        <input type="password" name="token" placeholder="corral_..." size={60} autofocus />
        <button>Log in</button>
      </form>
    </Layout>
  );
}

/** Nodes, capacity, volumes by state, recent events: refreshed in place every few seconds. */
export function DashboardBody(props: {
  nodes: NodeInfo[];
  volumes: VolumeInfo[];
  events: DaemonEvent[];
}) {
  const up = props.nodes.filter((n) => n.state === 'up');
  const total = up.reduce((s, n) => s + n.totalBytes, 0);
  const free = up.reduce((s, n) => s + n.freeBytes, 0);
  const byState = new Map<string, number>();
  for (const v of props.volumes) byState.set(v.state, (byState.get(v.state) ?? 0) + 1);
  const degraded = props.volumes.filter(
    (v) => v.replicas.filter((r) => r.mode === 'RW').length < v.replicaCount,
  ).length;
  return (
    <div id="dashboard" hx-get="/ui/fragments/dashboard" hx-trigger="every 5s" hx-swap="outerHTML">
      <div class="cards">
        <div class="card" id="nodes-up">
          <b>
            {up.length}/{props.nodes.length}
          </b>
          nodes up
        </div>
        <div class="card">
          <b>{formatSize(total - free)}</b>used of {formatSize(total)}
        </div>
        <div class="card" id="volume-count">
          <b>{props.volumes.length}</b>volumes
          {[...byState].map(([state, n]) => (
            <div>
              {n} {state}
            </div>
          ))}
        </div>
        <div class="card">
          <b>{degraded}</b>degraded
        </div>
      </div>
      <h2>Nodes</h2>
      <table>
        <tr>
          <th>Node</th>
          <th>State</th>
          <th>Free</th>
          <th>Total</th>
          <th>Replicas</th>
        </tr>
        {props.nodes.map((n) => (
          <tr>
            <td>{n.name ?? n.url}</td>
            <td>
              {n.state}
              {n.cordoned === true ? ' (cordoned)' : ''}
            </td>
            <td>{formatSize(n.freeBytes)}</td>
            <td>{formatSize(n.totalBytes)}</td>
            <td>{n.replicas}</td>
          </tr>
        ))}
      </table>
      <h2>Recent events</h2>
      <EventTable events={props.events.slice(-10).reverse()} />
    </div>
  );
}

export function EventTable(props: { events: DaemonEvent[] }) {
  return (
    <table id="events">
      <tr>
        <th>Time</th>
        <th>Type</th>
        <th>Volume</th>
        <th>Message</th>
      </tr>
      {props.events.map((e) => (
        <tr>
          <td>{e.time}</td>
          <td>{e.type}</td>
          <td>{e.volume ?? ''}</td>
          <td>{e.node !== undefined ? `${e.node}: ${e.message}` : e.message}</td>
        </tr>
      ))}
    </table>
  );
}

export function VolumeList(props: { volumes: VolumeInfo[]; error?: string }) {
  return (
    <div id="volume-list">
      {props.error !== undefined ? <p class="error">{props.error}</p> : null}
      <table>
        <tr>
          <th>Name</th>
          <th>Size</th>
          <th>Replicas</th>
          <th>Frontend</th>
          <th>State</th>
          <th>Node</th>
          <th>Connections</th>
        </tr>
        {props.volumes.map((v) => (
          <tr data-volume={v.name}>
            <td>
              <a href={`/ui/volumes/${encodeURIComponent(v.name)}`}>{v.name}</a>
            </td>
            <td>{formatSize(v.sizeBytes)}</td>
            <td>
              {v.replicas.filter((r) => r.mode === 'RW').length}/{v.replicaCount}
            </td>
            <td>{v.frontend}</td>
            <td class={`state-${v.state}`}>{v.state}</td>
            <td>{v.node ?? ''}</td>
            <td>{v.nbdConnections}</td>
          </tr>
        ))}
      </table>
      <h2>New volume</h2>
      <form hx-post="/ui/volumes" hx-target="#volume-list" hx-swap="outerHTML">
        <input name="name" placeholder="name" required />
        <input name="size" placeholder="10G" required size={6} />
        <select name="replicas">
          <option>1</option>
          <option>2</option>
          <option>3</option>
        </select>
        <button>Create</button>
      </form>
    </div>
  );
}

function ms(seconds: number): string {
  return seconds === Infinity ? '>2.5 s' : `${(seconds * 1000).toFixed(2)} ms`;
}

export function StatsTable(props: { name: string; stats: VolumeStats | undefined }) {
  const s = props.stats;
  return (
    <div
      id="stats"
      hx-get={`/ui/fragments/volumes/${encodeURIComponent(props.name)}/stats`}
      hx-trigger="every 2s"
      hx-swap="outerHTML"
    >
      {s ? (
        <table>
          <tr>
            <th>Reads</th>
            <th>Writes</th>
            <th>Read</th>
            <th>Written</th>
            <th>Read p50 / p99</th>
            <th>Write p50 / p99</th>
            <th>Errors</th>
          </tr>
          <tr>
            <td>{s.readOps}</td>
            <td>{s.writeOps}</td>
            <td>{formatSize(s.readBytes)}</td>
            <td>{formatSize(s.writeBytes)}</td>
            <td>
              {ms(s.readLatency.p50)} / {ms(s.readLatency.p99)}
            </td>
            <td>
              {ms(s.writeLatency.p50)} / {ms(s.writeLatency.p99)}
            </td>
            <td>{s.errors}</td>
          </tr>
        </table>
      ) : (
        <p>No stats (metrics are off).</p>
      )}
    </div>
  );
}

export function Snapshots(props: { name: string; snapshots: SnapshotInfo[]; error?: string }) {
  const base = `/ui/volumes/${encodeURIComponent(props.name)}`;
  return (
    <div id="snapshots">
      {props.error !== undefined ? <p class="error">{props.error}</p> : null}
      <table>
        <tr>
          <th>Snapshot</th>
          <th>Taken</th>
          <th>Holds</th>
        </tr>
        {props.snapshots.map((s) => (
          <tr data-snapshot={s.name}>
            <td>{s.name}</td>
            <td>{s.createdAt}</td>
            <td>{formatSize(s.allocatedBytes)}</td>
          </tr>
        ))}
      </table>
      <form hx-post={`${base}/snapshots`} hx-target="#snapshots" hx-swap="outerHTML">
        <input name="name" placeholder="name (optional)" />
        <button>Take snapshot</button>
      </form>
    </div>
  );
}

export function VolumeDetail(props: {
  volume: VolumeInfo;
  snapshots: SnapshotInfo[];
  stats: VolumeStats | undefined;
}) {
  const v = props.volume;
  return (
    <>
      <h1>{v.name}</h1>
      <p>
        {formatSize(v.sizeBytes)}, {v.frontend}, <span class={`state-${v.state}`}>{v.state}</span>
        {v.node !== undefined ? ` on ${v.node}` : ''}, {v.nbdConnections} NBD connection(s)
      </p>
      <h2>I/O</h2>
      <StatsTable name={v.name} stats={props.stats} />
      <h2>Replicas</h2>
      <table id="replicas">
        <tr>
          <th>Replica</th>
          <th>Where</th>
          <th>Mode</th>
          <th>Rebuild</th>
        </tr>
        {v.replicas.map((r) => (
          <tr>
            <td>{r.id}</td>
            <td>{r.location}</td>
            <td class={`mode-${r.mode}`}>{r.mode}</td>
            <td>
              {r.rebuild
                ? `${Math.floor((100 * r.rebuild.done) / Math.max(1, r.rebuild.total))} %`
                : ''}
            </td>
          </tr>
        ))}
      </table>
      <h2>Snapshots</h2>
      <Snapshots name={v.name} snapshots={props.snapshots} />
    </>
  );
}

interface OpenApiOperation {
  summary: string;
  description: string;
  requestBody?: { content: { 'application/json': { schema: { properties?: object } } } };
}

/** The API described: every route, the role it needs, what it takes (from /v1/openapi.json). */
export function ApiDocs(props: {
  document: { paths: Record<string, Record<string, OpenApiOperation>> };
}) {
  const rows = Object.entries(props.document.paths).flatMap(([path, methods]) =>
    Object.entries(methods).map(([method, op]) => ({ path, method, op })),
  );
  return (
    <Layout title="API">
      <h1>Corral API</h1>
      <p>
        JSON in and out under <code>/v1</code>; errors are{' '}
        <code>{'{"error": {"code", "message"}}'}</code>; <code>Authorization: Bearer TOKEN</code> on
        every call but the health check. Machine-readable:{' '}
        <a href="/v1/openapi.json">/v1/openapi.json</a> (OpenAPI 3.1).
      </p>
      <table id="routes">
        <tr>
          <th>Method</th>
          <th>Path</th>
          <th>What</th>
          <th>Who</th>
          <th>Body</th>
        </tr>
        {rows.map(({ path, method, op }) => (
          <tr>
            <td>{method.toUpperCase()}</td>
            <td>
              <code>{path}</code>
            </td>
            <td>{op.summary}</td>
            <td>{op.description}</td>
            <td>
              {Object.keys(
                op.requestBody?.content['application/json'].schema.properties ?? {},
              ).join(', ')}
            </td>
          </tr>
        ))}
      </table>
    </Layout>
  );
}
