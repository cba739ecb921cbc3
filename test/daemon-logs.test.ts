import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { DaemonProcess } from './helpers/daemon.ts';
import { mustRun } from './helpers/run.ts';

interface Line {
  level: number;
  time: string;
  msg: string;
  event?: string;
  volume?: string;
}

function lines(stderr: string): Line[] {
  return stderr
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l) as Line);
}

describe('daemon logs', () => {
  const daemons: DaemonProcess[] = [];
  after(async () => {
    for (const d of daemons) await d.cleanup();
  });

  it('are JSON lines when not on a terminal: one per operation with its id, none per I/O', async () => {
    const d = await DaemonProcess.start();
    daemons.push(d);
    await d.createVolume('logged', '16M');
    const before = lines(d.stderr).length;
    await mustRun('qemu-io', [
      '-f',
      'raw',
      d.uri('logged'),
      '-c',
      'write -P 0x11 0 1M',
      '-c',
      'read -P 0x11 0 1M',
    ]);
    assert.equal(lines(d.stderr).length, before, 'I/O writes no log lines');
    const backup = await d.cli(['backup', 'create', 'logged', '--json']);
    assert.equal(backup.code, 0, backup.stderr);
    const all = lines(d.stderr); // every line parses as JSON
    const started = all.find((l) => l.event === 'backup-started');
    assert.ok(started, JSON.stringify(all.slice(-5)));
    assert.equal(started.volume, 'logged');
    assert.equal(started.level, 30);
    const id = /operation (op-[0-9a-f]+)/.exec(started.msg)?.[1];
    assert.ok(id !== undefined, started.msg);
    assert.ok(all.some((l) => l.event === 'backup-succeeded' && l.volume === 'logged'));
    assert.ok(!Number.isNaN(Date.parse(started.time)));
    // A refusal is a warning.
    await d.api_('GET', '/v1/volumes', undefined, null);
    assert.ok(lines(d.stderr).some((l) => l.event === 'access-denied' && l.level === 40));
  });

  it('--log-level warn keeps warnings and drops the rest', async () => {
    const d = await DaemonProcess.start({ args: ['--log-level', 'warn'] });
    daemons.push(d);
    await d.createVolume('quiet', '16M');
    await d.api_('GET', '/v1/volumes', undefined, null);
    const all = lines(d.stderr);
    assert.ok(all.length > 0);
    assert.deepEqual(
      all.filter((l) => l.level < 40).map((l) => l.msg),
      [],
    );
    assert.ok(all.some((l) => l.event === 'access-denied'));
  });
});
