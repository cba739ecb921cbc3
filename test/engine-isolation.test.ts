import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { DaemonProcess } from './helpers/daemon.ts';
import { CMD, RawNbd } from './helpers/nbd-client.ts';
import { mustRun, run, waitFor } from './helpers/run.ts';

interface Volume {
  engineRestarts: number;
}
interface Events {
  events: Array<{ type: string; volume?: string }>;
}

describe('a fault in one volume engine does not stop another', () => {
  let daemon: DaemonProcess;
  before(async () => {
    daemon = await DaemonProcess.start({
      env: { CORRAL_FAULT_INJECTION: '1' },
      args: ['--hang-timeout', '1000'],
    });
    await daemon.createVolume('sick', '64M');
    await daemon.createVolume('healthy', '64M');
    await mustRun('qemu-io', [
      '-f',
      'raw',
      daemon.uri('sick'),
      '-c',
      'write -P 0x21 0 1M',
      '-c',
      'flush',
    ]);
  });
  after(() => daemon.cleanup());

  async function fault(mode: string): Promise<void> {
    const r = await daemon.api_('POST', '/v1/debug/volumes/sick/fault', { mode });
    assert.equal(r.status, 200);
  }

  it('a snapshot export opened before an engine restart reads from the new engine', async () => {
    assert.equal(
      (await daemon.api_('POST', '/v1/volumes/sick/snapshots', { name: 's1' })).status,
      201,
    );
    await mustRun('qemu-io', ['-f', 'raw', daemon.uri('sick'), '-c', 'write -P 0x22 2M 1M']);
    const c = await RawNbd.connect({ port: daemon.nbdPort });
    await c.greet();
    await c.go('sick@s1', { structured: false });
    const readSnap = async () => {
      c.request(CMD.READ, 0, 65536);
      return c.reply(65536);
    };
    assert.ok((await readSnap()).data.equals(Buffer.alloc(65536, 0x21)));
    const before = (await daemon.api_<Volume>('GET', '/v1/volumes/sick')).json.engineRestarts;
    await fault('throw');
    await run('qemu-io', ['-f', 'raw', daemon.uri('sick'), '-c', 'read 0 4096']);
    await waitFor('the engine to restart', async () => {
      const v = (await daemon.api_<Volume>('GET', '/v1/volumes/sick')).json;
      return v.engineRestarts > before ? true : undefined;
    });
    // The same connection: served by the restarted engine, not the abandoned one.
    const after = await readSnap();
    assert.equal(after.error, 0);
    assert.ok(after.data.equals(Buffer.alloc(65536, 0x21)));
    c.close();
  });

  for (const mode of ['throw', 'hang'] as const) {
    it(`engine ${mode}: the other volume keeps serving, the faulty one restarts with its flushed data`, async () => {
      const before = (await daemon.api_<Volume>('GET', '/v1/volumes/sick')).json.engineRestarts;
      // Keep the healthy volume busy the whole time.
      const busy = mustRun(
        'fio',
        [
          '--name=busy',
          '--ioengine=nbd',
          `--uri=${daemon.uri('healthy')}`,
          '--rw=randrw',
          '--bs=4k',
          '--iodepth=8',
          '--size=16m',
          '--time_based',
          '--runtime=4',
          '--verify=crc32c',
          '--verify_state_save=0',
          '--verify_fatal=1',
        ],
        { timeoutMs: 120_000 },
      );
      await fault(mode);
      // This request meets the fault: it fails with an I/O error instead of hanging forever.
      const failed = await run('qemu-io', ['-f', 'raw', daemon.uri('sick'), '-c', 'read 0 4096'], {
        timeoutMs: 60_000,
      });
      assert.match(failed.stdout + failed.stderr, /failed|error/i);
      await waitFor('the engine to restart', async () => {
        const v = (await daemon.api_<Volume>('GET', '/v1/volumes/sick')).json;
        return v.engineRestarts > before ? true : undefined;
      });
      await mustRun('qemu-io', ['-f', 'raw', daemon.uri('sick'), '-c', 'read -P 0x21 0 1M']);
      await busy; // fio verified every block on the healthy volume, with no error
      const events = (await daemon.api_<Events>('GET', '/v1/events?volume=sick')).json.events.map(
        (e) => e.type,
      );
      assert.ok(events.includes('engine-crashed'));
      assert.ok(events.includes('engine-restarted'));
    });
  }
});
