import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { DaemonProcess } from './helpers/daemon.ts';
import { mustRun } from './helpers/run.ts';

describe('the same sources under Deno 2', () => {
  const daemons: DaemonProcess[] = [];
  after(async () => {
    for (const d of daemons.slice(1)) await d.stop('SIGKILL');
    await daemons[0]?.cleanup();
  });

  it('serves the API and NBD, and its data dir opens under Node', async () => {
    const deno = await DaemonProcess.start({ deno: true });
    daemons.push(deno);
    const health = await deno.api_<{ ok: boolean }>('GET', '/v1/health');
    assert.equal(health.json.ok, true);
    await deno.createVolume('dv', '64M');
    const { stdout } = await mustRun('fio', [
      '--name=deno',
      '--ioengine=nbd',
      `--uri=${deno.uri('dv')}`,
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=32',
      '--size=16m',
      '--verify=crc32c',
      '--verify_state_save=0',
      '--verify_fatal=1',
      '--output-format=json',
    ]);
    assert.equal(
      (JSON.parse(stdout.slice(stdout.indexOf('{'))) as { jobs: Array<{ error: number }> }).jobs[0]!
        .error,
      0,
    );
    await mustRun('qemu-io', ['-f', 'raw', deno.uri('dv'), '-c', 'write -P 0x5d 32M 1M']);
    const stopped = await deno.stop('SIGTERM');
    assert.equal(stopped.code, 0);

    const node = await DaemonProcess.start({ dataDir: deno.dataDir });
    daemons.push(node);
    await mustRun('qemu-io', ['-f', 'raw', node.uri('dv'), '-c', 'read -P 0x5d 32M 1M']);
  });
});
