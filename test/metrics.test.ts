import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DaemonProcess, ROOT } from './helpers/daemon.ts';
import { parsePrometheus } from './helpers/prometheus.ts';
import { mustRun, waitFor } from './helpers/run.ts';

/** The value of the one sample of `name` whose labels include `labels`, if any. */
function sample(text: string, name: string, labels: Record<string, string>): number | undefined {
  return parsePrometheus(text).find(
    (m) => m.name === name && Object.entries(labels).every(([k, v]) => m.labels[k] === v),
  )?.value;
}

describe('metrics', () => {
  let d: DaemonProcess | undefined;
  after(() => d?.cleanup());

  it('count exactly the I/O a client did, with latency histograms, and show it in volume stats', async () => {
    d = await DaemonProcess.start();
    await d.createVolume('m', '16M');
    const scrape = async () => {
      const r = await fetch(`${d!.api}/metrics`, {
        headers: { authorization: `Bearer ${d!.token}` },
      });
      assert.equal(r.status, 200);
      assert.match(r.headers.get('content-type') ?? '', /text\/plain/);
      return r.text();
    };
    const before = await scrape();
    const value = (text: string, name: string, kind: string) =>
      sample(text, name, { volume: 'm', kind }) ?? 0;
    // Two writes (64 KiB and 4 KiB) and one read of 64 KiB, through a real client.
    await mustRun('qemu-io', [
      '-f',
      'raw',
      d.uri('m'),
      '-c',
      'write -P 0x11 0 64k',
      '-c',
      'write -P 0x22 64k 4k',
      '-c',
      'read -P 0x11 0 64k',
    ]);
    const now = await scrape();
    const delta = (name: string, kind: string) =>
      value(now, name, kind) - value(before, name, kind);
    assert.equal(delta('corral_volume_ops_total', 'write'), 2);
    assert.equal(delta('corral_volume_bytes_total', 'write'), 65536 + 4096);
    assert.equal(delta('corral_volume_ops_total', 'read'), 1);
    assert.equal(delta('corral_volume_bytes_total', 'read'), 65536);
    assert.equal(delta('corral_volume_errors_total', 'write'), 0);
    const writes = { volume: 'm', kind: 'write' };
    assert.equal(sample(now, 'corral_volume_latency_seconds_count', writes), 2, 'every write once');
    assert.equal(sample(now, 'corral_volume_latency_seconds_bucket', { ...writes, le: '+Inf' }), 2);
    assert.ok((sample(now, 'corral_volume_latency_seconds_sum', writes) ?? 0) > 0);
    assert.equal(sample(now, 'corral_volume_state', { volume: 'm', state: 'healthy' }), 1);
    assert.equal(sample(now, 'corral_volume_state', { volume: 'm', state: 'degraded' }), 0);
    assert.equal(sample(now, 'corral_volume_size_bytes', { volume: 'm' }), 16 << 20);
    assert.ok((sample(now, 'process_resident_memory_bytes', {}) ?? 0) > 0);

    const stats = JSON.parse((await d.cli(['volume', 'stats', 'm', '--json'])).stdout) as {
      writeOps: number;
      writeBytes: number;
      readOps: number;
      writeLatency: { p50: number; p99: number };
    };
    assert.equal(stats.writeOps, 2);
    assert.equal(stats.writeBytes, 69632);
    assert.equal(stats.readOps, 1);
    assert.ok(stats.writeLatency.p50 > 0 && stats.writeLatency.p99 >= stats.writeLatency.p50);

    // Long work is counted as it ends: a backup, with the bytes it stored and when.
    const t0 = Date.now() / 1000;
    const backup = await d.cli(['backup', 'create', 'm', '--json']);
    assert.equal(backup.code, 0, backup.stderr);
    const stored = (JSON.parse(backup.stdout) as { stats: { bytesStored: number } }).stats
      .bytesStored;
    assert.ok(stored > 0);
    const after = await scrape();
    const op = { kind: 'backup', volume: 'm' };
    assert.equal(sample(after, 'corral_operations_total', { ...op, outcome: 'succeeded' }), 1);
    assert.equal(sample(after, 'corral_operation_bytes_total', op), stored);
    const last = sample(after, 'corral_operation_last_success_timestamp_seconds', op) ?? 0;
    assert.ok(last >= Math.floor(t0) && last <= Date.now() / 1000 + 1, `last success ${last}`);
    // A recurring job's last run (every second, croner's six-field form).
    const job = await d.cli([
      'job',
      'add',
      'm',
      '--cron',
      '* * * * * *',
      '--task',
      'snapshot',
      '--retain',
      '1',
      '--json',
    ]);
    assert.equal(job.code, 0, job.stderr);
    const id = (JSON.parse(job.stdout) as { id: string }).id;
    await waitFor('the job to run', async () =>
      sample(await scrape(), 'corral_job_last_run_timestamp_seconds', {
        job: id,
        volume: 'm',
        task: 'snapshot',
        outcome: 'succeeded',
      }),
    );
    assert.equal((await d.cli(['job', 'rm', id])).code, 0);
    // The example dashboard names only metrics the daemon exports.
    const dashboard = fs.readFileSync(
      path.join(ROOT, 'docs', 'grafana', 'corral-dashboard.json'),
      'utf8',
    );
    // Declared by a TYPE line: a gauge with no series yet (no rebuild running) still counts.
    const exported = new Set([...(await scrape()).matchAll(/^# TYPE (\S+)/gm)].map((m) => m[1]!));
    const named = new Set(
      [...dashboard.matchAll(/\b((?:corral|process)_[a-z_]+)/g)].map((m) =>
        m[1]!.replace(/_(bucket|sum|count)$/, ''),
      ),
    );
    assert.ok(named.size >= 10);
    assert.deepEqual(
      [...named].filter((n) => !exported.has(n)),
      [],
    );
    // A removed volume's series go with it.
    assert.equal((await d.cli(['volume', 'rm', 'm'])).code, 0);
    assert.equal(sample(await scrape(), 'corral_volume_ops_total', { volume: 'm' }), undefined);
  });
});
