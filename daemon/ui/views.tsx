import type { Child } from 'hono/jsx';
import { formatSize } from '../../common/size.ts';
import type { SnapshotInfo } from '../../replication/replica.ts';
import type { BackupSummary } from '../backups.ts';
import type { DaemonEvent } from '../events.ts';
import type { JobInfo } from '../jobs.ts';
import type { Operation } from '../operations.ts';
import type { VolumeStats } from '../metrics.ts';
import type { NodeInfo } from '../node-info.ts';
import type { VolumeInfo } from '../volume-info.ts';

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
.scroll{overflow-x:auto}.actions button{margin:0 .2em}
.progress{background:#dcdcde;height:.8em;width:16em;display:inline-block;vertical-align:middle}
.progress>div{background:#2271b1;height:100%}
svg.chart{background:#fff;border:1px solid #dcdcde}
@media (max-width:40em){main{padding:.5em}header{flex-wrap:wrap;gap:.8em}
table{min-width:0;display:block;overflow-x:auto;max-width:100%}}
`;

/** A table's header row. */
function Head(props: { cols: string[] }) {
  return (
    <tr>
      {props.cols.map((c) => (
        <th>{c}</th>
      ))}
    </tr>
  );
}

/** The page around every view: the menu, and htmx for the forms and the live parts. */
export function Layout(props: { title: string; children: Child; who?: string }) {
  return (
    <html lang="en">
      <head>
        <meta charset="utf-8" />
        <meta name="viewport" content="width=device-width, initial-scale=1" />
        <title>{props.title} · Corral</title>
        <style>{STYLE}</style>
        <script src="/ui/htmx.min.js"></script>
      </head>
      <body>
        <header>
          <b>Corral</b>
          <a href="/ui/">Dashboard</a>
          <a href="/ui/volumes">Volumes</a>
          <a href="/ui/backups">Backups</a>
          <a href="/ui/nodes">Nodes</a>
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
        <Head cols={['Node', 'State', 'Free', 'Total', 'Replicas']} />
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
      <Head cols={['Time', 'Type', 'Volume', 'Message']} />
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

/** Attach or detach, and delete (after a confirmation): each answers with `target` redrawn. */
export function VolumeActions(props: { volume: VolumeInfo; target: string }) {
  const base = `/ui/volumes/${encodeURIComponent(props.volume.name)}`;
  const hx = { 'hx-target': props.target, 'hx-swap': 'outerHTML' };
  return (
    <>
      {props.volume.attached ? (
        <button hx-post={`${base}/detach`} {...hx} data-action="detach">
          Detach
        </button>
      ) : (
        <button hx-post={`${base}/attach`} {...hx} data-action="attach">
          Attach
        </button>
      )}
      <button
        hx-post={`${base}/delete`}
        hx-confirm={`Delete volume ${props.volume.name} and all its data?`}
        {...hx}
        data-action="delete"
      >
        Delete
      </button>
    </>
  );
}

export function VolumeList(props: { volumes: VolumeInfo[]; error?: string }) {
  return (
    <div id="volume-list" class="scroll">
      {props.error !== undefined ? <p class="error">{props.error}</p> : null}
      <table>
        <Head cols={['Name', 'Size', 'Replicas', 'Frontend', 'State', 'Node', 'Connections', '']} />
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
            <td class="actions">
              <VolumeActions volume={v} target="#volume-list" />
            </td>
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

export function StatsTable(props: {
  name: string;
  stats: VolumeStats | undefined;
  history: IopsSample[];
}) {
  const s = props.stats;
  return (
    <div
      id="stats"
      hx-get={`/ui/fragments/volumes/${encodeURIComponent(props.name)}/stats`}
      hx-trigger="every 2s"
      hx-swap="outerHTML"
    >
      <IopsChart history={props.history} />
      {s ? (
        <table>
          <Head
            cols={[
              'Reads',
              'Writes',
              'Read',
              'Written',
              'Read p50 / p99',
              'Write p50 / p99',
              'Errors',
            ]}
          />
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

export function Snapshots(props: {
  name: string;
  snapshots: SnapshotInfo[];
  error?: string;
  notice?: string;
}) {
  const base = `/ui/volumes/${encodeURIComponent(props.name)}`;
  return (
    <div id="snapshots">
      {props.error !== undefined ? <p class="error">{props.error}</p> : null}
      {props.notice !== undefined ? <p class="notice">{props.notice}</p> : null}
      <table>
        <Head cols={['Snapshot', 'Taken', 'Holds', '']} />
        {props.snapshots.map((s) => {
          const at = `${base}/snapshots/${encodeURIComponent(s.name)}`;
          const hx = { 'hx-target': '#snapshots', 'hx-swap': 'outerHTML' };
          return (
            <tr data-snapshot={s.name}>
              <td>{s.name}</td>
              <td>{s.createdAt}</td>
              <td>{formatSize(s.allocatedBytes)}</td>
              <td class="actions">
                <button
                  hx-post={`${at}/revert`}
                  hx-confirm={`Revert ${props.name} to ${s.name}? Writes since then are lost.`}
                  {...hx}
                  data-action="revert"
                >
                  Revert
                </button>
                <button
                  hx-post={`${at}/delete`}
                  hx-confirm={`Delete snapshot ${s.name}?`}
                  {...hx}
                  data-action="delete"
                >
                  Delete
                </button>
                <form class="inline" hx-post={`${at}/clone`} {...hx}>
                  <input name="clone" placeholder="new volume" size={10} required />
                  <button>Clone</button>
                </form>
              </td>
            </tr>
          );
        })}
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
  history: IopsSample[];
  backups: BackupSummary[];
  jobs: JobInfo[];
}) {
  const v = props.volume;
  return (
    <div id="volume">
      <h1>{v.name}</h1>
      <p class="actions">
        <VolumeActions volume={v} target="#volume" />
      </p>
      <p>
        {formatSize(v.sizeBytes)}, {v.frontend}, <span class={`state-${v.state}`}>{v.state}</span>
        {v.node !== undefined ? ` on ${v.node}` : ''}, {v.nbdConnections} NBD connection(s)
      </p>
      {v.encrypted || (v.qos && Object.keys(v.qos).length > 0) ? (
        <p id="settings">
          {v.encrypted ? `Encrypted at rest (key ${v.encrypted.keyId}). ` : ''}
          {v.qos && Object.keys(v.qos).length > 0
            ? `Limits: ${Object.entries(v.qos)
                .map(([k, n]) => `${k} ${n}`)
                .join(', ')}.`
            : ''}
        </p>
      ) : (
        ''
      )}
      {v.standby ? <StandbyLine name={v.name} standby={v.standby} /> : ''}
      <h2>I/O</h2>
      <StatsTable name={v.name} stats={props.stats} history={props.history} />
      <h2>Replicas</h2>
      <table id="replicas">
        <Head cols={['Replica', 'Where', 'Mode', 'Rebuild']} />
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
      <h2>Backups</h2>
      <Backups volume={v.name} backups={props.backups} />
      <h2>Recurring jobs</h2>
      <Jobs volume={v.name} jobs={props.jobs} />
    </div>
  );
}

/** A standby volume: what it follows, the backup it holds, how far behind, its RPO. */
function StandbyLine(props: { name: string; standby: NonNullable<VolumeInfo['standby']> }) {
  const s = props.standby;
  return (
    <p id="standby">
      Standby (read-only): follows <code>{s.from}</code> every {s.pollSeconds} s; holds{' '}
      <code>{s.backup ?? '?'}</code>
      {s.behindSeconds !== undefined ? `, ${s.behindSeconds} s behind` : ''}
      {s.rpoSeconds !== undefined ? `, RPO ${s.rpoSeconds} s` : ''}
      {s.applying !== undefined ? `; applying ${s.applying}` : ''}. After a disaster:{' '}
      <code>corral volume activate {props.name}</code>.
    </p>
  );
}

export function Jobs(props: { volume: string; jobs: JobInfo[]; error?: string }) {
  const base = `/ui/volumes/${encodeURIComponent(props.volume)}/jobs`;
  const hx = { 'hx-target': '#jobs', 'hx-swap': 'outerHTML' };
  return (
    <div id="jobs" class="scroll">
      {props.error !== undefined ? <p class="error">{props.error}</p> : null}
      <table>
        <Head cols={['Task', 'When (cron)', 'Keeps', 'Next run', 'Last run', '']} />
        {props.jobs.map((j) => (
          <tr data-job={j.id}>
            <td>{j.task}</td>
            <td>
              <code>{j.cron}</code>
            </td>
            <td>{j.task === 'scrub' ? '' : j.retain}</td>
            <td>{j.nextRunAt ?? ''}</td>
            <td>
              {j.lastRunAt !== undefined ? `${j.lastRunAt}: ${j.lastOutcome ?? ''}` : 'never'}
            </td>
            <td>
              <button
                hx-post={`${base}/${encodeURIComponent(j.id)}/delete`}
                hx-confirm={`Remove the ${j.task} job (${j.cron})?`}
                {...hx}
                data-action="delete"
              >
                Remove
              </button>
            </td>
          </tr>
        ))}
      </table>
      <form hx-post={base} {...hx}>
        <select name="task">
          <option>snapshot</option>
          <option>backup</option>
          <option>scrub</option>
        </select>
        <input name="cron" placeholder="0 * * * *" size={12} required />
        <input name="retain" placeholder="keep" size={4} />
        <button>Add job</button>
      </form>
    </div>
  );
}

/** A running operation's progress, polled until it ends (then it stops asking). */
export function OperationProgress(props: { op: Operation }) {
  const op = props.op;
  const running = op.state === 'running';
  const pct = op.progress.total > 0 ? Math.floor((100 * op.progress.done) / op.progress.total) : 0;
  return (
    <div
      class="operation"
      data-state={op.state}
      {...(running
        ? {
            'hx-get': `/ui/fragments/operations/${encodeURIComponent(op.id)}`,
            'hx-trigger': 'every 1s',
            'hx-swap': 'outerHTML',
          }
        : op.state === 'succeeded' && op.kind === 'backup' && op.volume !== undefined
          ? {
              // Done: the volume's backup list is drawn again, the new one in it.
              'hx-get': `/ui/fragments/volumes/${encodeURIComponent(op.volume)}/backups`,
              'hx-trigger': 'load delay:1s',
              'hx-target': '#backups',
              'hx-swap': 'outerHTML',
            }
          : {})}
    >
      {op.kind} {op.subject}: {op.state}
      {running ? (
        <>
          {' '}
          {op.progress.phase}{' '}
          <span class="progress">
            <div style={`width:${pct}%`}></div>
          </span>{' '}
          {pct} %
        </>
      ) : op.error ? (
        <span class="error"> {op.error.message}</span>
      ) : null}
    </div>
  );
}

export function Backups(props: {
  volume?: string;
  backups: BackupSummary[];
  started?: Operation;
  error?: string;
}) {
  const base = props.volume !== undefined ? `/ui/volumes/${encodeURIComponent(props.volume)}` : '';
  return (
    <div id="backups" class="scroll">
      {props.error !== undefined ? <p class="error">{props.error}</p> : null}
      {props.started ? <OperationProgress op={props.started} /> : null}
      <table>
        <tr>
          {props.volume === undefined ? <th>Volume</th> : null}
          <th>Backup</th>
          <th>Snapshot</th>
          <th>Created</th>
          <th>Stored</th>
          <th>Restore into</th>
        </tr>
        {props.backups.map((b) => (
          <tr data-backup={b.name}>
            {props.volume === undefined ? <td>{b.volume}</td> : null}
            <td>{b.name}</td>
            <td>{b.snapshot}</td>
            <td>{b.createdAt}</td>
            <td>{formatSize(b.stats.bytesStored)}</td>
            <td>
              <form class="inline" hx-post="/ui/restores" hx-target="#backups" hx-swap="outerHTML">
                <input type="hidden" name="backup" value={b.url} />
                <input type="hidden" name="volume" value={props.volume ?? ''} />
                <input name="into" placeholder="new volume" size={10} required />
                <button>Restore</button>
              </form>
            </td>
          </tr>
        ))}
      </table>
      {props.volume !== undefined ? (
        <button hx-post={`${base}/backups`} hx-target="#backups" hx-swap="outerHTML">
          Back up now
        </button>
      ) : null}
    </div>
  );
}

export function NodeList(props: { nodes: NodeInfo[]; error?: string }) {
  return (
    <div id="node-list" class="scroll">
      {props.error !== undefined ? <p class="error">{props.error}</p> : null}
      <table>
        <Head cols={['Node', 'Address', 'State', 'Free', 'Total', 'Replicas', 'Version', '']} />
        {props.nodes.map((n) => {
          const name = n.name;
          const at = name !== undefined ? `/ui/nodes/${encodeURIComponent(name)}` : '';
          const hx = { 'hx-target': '#node-list', 'hx-swap': 'outerHTML' };
          return (
            <tr data-node={name ?? n.url}>
              <td>{name ?? n.id}</td>
              <td>{n.url}</td>
              <td>
                {n.state}
                {n.cordoned === true ? ' (cordoned)' : ''}
              </td>
              <td>{formatSize(n.freeBytes)}</td>
              <td>{formatSize(n.totalBytes)}</td>
              <td>{n.replicas}</td>
              <td>{n.version ?? ''}</td>
              <td class="actions">
                {name !== undefined ? (
                  <>
                    <button
                      hx-post={`${at}/${n.cordoned === true ? 'uncordon' : 'cordon'}`}
                      {...hx}
                    >
                      {n.cordoned === true ? 'Uncordon' : 'Cordon'}
                    </button>
                    <button
                      hx-post={`${at}/drain`}
                      hx-confirm={`Drain ${name}: move its engines and rebuild its replicas elsewhere?`}
                      {...hx}
                    >
                      Drain
                    </button>
                  </>
                ) : null}
              </td>
            </tr>
          );
        })}
      </table>
    </div>
  );
}

/** One sample of a volume's counters, for the chart: when, and the totals then. */
export interface IopsSample {
  t: number;
  reads: number;
  writes: number;
}

/** Reads and writes per second over the last samples, as an SVG (no client script). */
export function IopsChart(props: { history: IopsSample[] }) {
  const h = props.history;
  const rates = h.slice(1).map((s, i) => {
    const dt = Math.max(0.001, (s.t - h[i]!.t) / 1000);
    return { r: (s.reads - h[i]!.reads) / dt, w: (s.writes - h[i]!.writes) / dt };
  });
  const W = 300;
  const H = 60;
  const max = Math.max(1, ...rates.map((x) => Math.max(x.r, x.w)));
  const line = (pick: (x: { r: number; w: number }) => number) =>
    rates
      .map((x, i) => `${((i + 1) * W) / Math.max(1, rates.length)},${H - (pick(x) / max) * H}`)
      .join(' ');
  const last = rates[rates.length - 1];
  const per = (x: number) => (x < 10 ? x.toFixed(1) : String(Math.round(x)));
  return (
    <div>
      <svg class="chart" width={W} height={H} viewBox={`0 0 ${W} ${H}`}>
        <polyline
          fill="none"
          stroke="#2271b1"
          stroke-width="2"
          points={`0,${H} ${line((x) => x.r)}`}
        />
        <polyline
          fill="none"
          stroke="#b32d2e"
          stroke-width="2"
          points={`0,${H} ${line((x) => x.w)}`}
        />
      </svg>
      <div id="iops">
        {last ? `${per(last.r)} reads/s, ${per(last.w)} writes/s (peak ${per(max)})` : 'measuring…'}
      </div>
    </div>
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
        <Head cols={['Method', 'Path', 'What', 'Who', 'Body']} />
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
