import { parseArgs } from 'node:util';
import { formatSize } from '../common/size.ts';
import type { BackupSummary } from './backups.ts';
import { call } from './client.ts';
import { follow, keyFrom, print, table, UsageError } from './cli-util.ts';
import type { JobInfo } from './jobs.ts';
import type { Operation } from './operations.ts';

function backupRows(list: BackupSummary[]): string {
  return table([
    ['NAME', 'VOLUME', 'SNAPSHOT', 'CREATED', 'SIZE', 'BLOCKS', 'STORED'],
    ...list.map((b) => [
      b.name,
      b.volume,
      b.snapshot,
      b.createdAt,
      formatSize(b.sizeBytes),
      String(b.blocks),
      `${b.stats.blocksStored} (${formatSize(b.stats.bytesStored)})`,
    ]),
  ]);
}

function targetQuery(target: string | undefined, extra: Record<string, string> = {}): string {
  const q = new URLSearchParams({ ...(target ? { target } : {}), ...extra }).toString();
  return q ? `?${q}` : '';
}

/** `corral backup ...`: long work follows its operation with a progress bar. */
export async function runBackupCommand(
  api: string,
  verb: string | undefined,
  rest: string[],
): Promise<void> {
  const { values, positionals } = parseArgs({
    args: rest,
    options: {
      json: { type: 'boolean' },
      target: { type: 'string' },
      snapshot: { type: 'string' },
      quiet: { type: 'boolean', short: 'q' },
      'encrypt-key-file': { type: 'string' },
      'encrypt-key-env': { type: 'string' },
      'key-file': { type: 'string' },
      'key-env': { type: 'string' },
    },
    allowPositionals: true,
    strict: true,
  });
  const json = values.json === true;
  const quiet = values.quiet === true || json;
  const arg = (i: number, what: string): string => {
    const v = positionals[i];
    if (!v) throw new UsageError(`missing ${what}`);
    return v;
  };
  const run = async (method: string, path: string, body?: unknown): Promise<Operation> => {
    const { operation } = await call<{ operation: Operation }>(api, method, path, body);
    return follow(api, operation, quiet);
  };
  switch (verb) {
    case 'create': {
      const op = await run('POST', '/v1/backups', {
        volume: arg(0, 'volume name'),
        ...(values.snapshot ? { snapshot: values.snapshot } : {}),
        ...(values.target ? { target: values.target } : {}),
        ...(values['encrypt-key-file'] || values['encrypt-key-env']
          ? { key: await keyFrom(values['encrypt-key-file'], values['encrypt-key-env']) }
          : {}),
      });
      const b = op.result as BackupSummary;
      print(json, b, () => `${backupRows([b])}\n\n${b.url}`);
      return;
    }
    case 'ls': {
      const volume = positionals[0];
      const out = await call<{ target: string; backups: BackupSummary[] }>(
        api,
        'GET',
        `/v1/backups${targetQuery(values.target, volume ? { volume } : {})}`,
      );
      print(json, out.backups, () => backupRows(out.backups));
      return;
    }
    case 'get': {
      const b = await call<BackupSummary>(
        api,
        'GET',
        `/v1/backups/${encodeURIComponent(arg(0, 'backup'))}${targetQuery(values.target)}`,
      );
      print(json, b, () => `${backupRows([b])}\n\n${b.url}`);
      return;
    }
    case 'restore': {
      const op = await run('POST', '/v1/restores', {
        backup: arg(0, 'backup'),
        volume: arg(1, 'new volume name'),
        ...(values.target ? { target: values.target } : {}),
        ...(values['key-file'] || values['key-env']
          ? { key: await keyFrom(values['key-file'], values['key-env']) }
          : {}),
      });
      print(json, op.result, () => `restored ${positionals[0]} into volume ${positionals[1]}`);
      return;
    }
    case 'rm': {
      const op = await run(
        'DELETE',
        `/v1/backups/${encodeURIComponent(arg(0, 'backup'))}${targetQuery(values.target)}`,
      );
      const r = op.result as { blocksRemoved: number };
      print(
        json,
        r,
        () => `removed ${positionals[0]}; ${r.blocksRemoved} unreferenced blocks removed`,
      );
      return;
    }
    case 'gc': {
      const op = await run(
        'POST',
        '/v1/backups/gc',
        values.target ? { target: values.target } : {},
      );
      const r = op.result as { blocksRemoved: number };
      print(json, r, () => `${r.blocksRemoved} unreferenced blocks removed`);
      return;
    }
  }
  throw new UsageError(`unknown command: corral backup ${verb ?? ''}`);
}

/** `corral job add|ls|rm`. */
export async function runJobCommand(
  api: string,
  verb: string | undefined,
  rest: string[],
): Promise<void> {
  const { values, positionals } = parseArgs({
    args: rest,
    options: {
      json: { type: 'boolean' },
      cron: { type: 'string' },
      task: { type: 'string' },
      retain: { type: 'string' },
      target: { type: 'string' },
    },
    allowPositionals: true,
    strict: true,
  });
  const json = values.json === true;
  const rows = (list: JobInfo[]): string =>
    table([
      ['ID', 'VOLUME', 'TASK', 'CRON', 'RETAIN', 'NEXT RUN', 'LAST RUN', 'LAST OUTCOME'],
      ...list.map((j) => [
        j.id,
        j.volume,
        j.task,
        j.cron,
        String(j.retain),
        j.nextRunAt ?? '',
        j.lastRunAt ?? '',
        j.lastOutcome ?? '',
      ]),
    ]);
  switch (verb) {
    case 'add': {
      const volume = positionals[0];
      if (!volume) throw new UsageError('missing volume name');
      if (!values.cron || !values.task || (!values.retain && values.task !== 'scrub'))
        throw new UsageError('job add needs --cron, --task and --retain (not for scrub)');
      const job = await call<JobInfo>(api, 'POST', '/v1/jobs', {
        volume,
        cron: values.cron,
        task: values.task,
        ...(values.retain !== undefined ? { retain: Number(values.retain) } : {}),
        ...(values.target ? { target: values.target } : {}),
      });
      print(json, job, () => rows([job]));
      return;
    }
    case 'ls': {
      const { jobs } = await call<{ jobs: JobInfo[] }>(api, 'GET', '/v1/jobs');
      print(json, jobs, () => rows(jobs));
      return;
    }
    case 'rm': {
      const id = positionals[0];
      if (!id) throw new UsageError('missing job id');
      await call(api, 'DELETE', `/v1/jobs/${encodeURIComponent(id)}`);
      print(json, { removed: id }, () => `removed job ${id}`);
      return;
    }
  }
  throw new UsageError(`unknown command: corral job ${verb ?? ''}`);
}
