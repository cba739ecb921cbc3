import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { DaemonProcess } from './helpers/daemon.ts';
import { mustRun, run } from './helpers/run.ts';

describe('NBD interop with real clients', () => {
  let daemon: DaemonProcess;
  let tmp: string;

  before(async () => {
    daemon = await DaemonProcess.start();
    tmp = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-interop-'));
    await daemon.createVolume('db1', '10G');
    await daemon.createVolume('small', '64M');
  });
  after(async () => {
    await daemon.cleanup();
    await fs.promises.rm(tmp, { recursive: true, force: true });
  });

  it('nbdinfo shows size, flags and base:allocation', async () => {
    const { stdout } = await mustRun('nbdinfo', ['--json', daemon.uri('db1')]);
    const info = JSON.parse(stdout) as { exports: Array<Record<string, unknown>> };
    const e = info.exports[0]!;
    assert.equal(e['export-size'], 10 * 1024 ** 3);
    for (const flag of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_multi_conn']) {
      assert.equal(e[flag], true, flag);
    }
    assert.equal(e.is_read_only, false);
    assert.deepEqual(e.contexts, ['base:allocation']);
    assert.equal(e.block_size_minimum, 1);
    assert.equal(e.block_size_preferred, 4096);
    assert.equal(e.block_size_maximum, 32 * 1024 * 1024);
  });

  it('lists exports with nbdinfo --list and nbd-client -l', async () => {
    const { stdout } = await mustRun('nbdinfo', ['--list', '--json', `nbd://${daemon.nbd}`]);
    const names = (JSON.parse(stdout) as { exports: Array<{ 'export-name': string }> }).exports
      .map((e) => e['export-name'])
      .sort();
    assert.deepEqual(names, ['db1', 'small']);
    const [host, port] = daemon.nbd.split(':');
    const list = await mustRun('nbd-client', ['-l', host!, port!]);
    assert.match(list.stdout, /^db1$/m);
    assert.match(list.stdout, /^small$/m);
  });

  it('refuses an unknown export', async () => {
    const result = await run('nbdinfo', [daemon.uri('nope')]);
    assert.notEqual(result.code, 0);
    assert.match(result.stderr, /nope|unknown|not found/i);
  });

  it('qemu-io verifies patterns at aligned, 512-byte, straddling and last-block offsets', async () => {
    const size = 64 * 1024 * 1024;
    const cases: Array<[number, number, string]> = [
      [0, 1024 * 1024, '0xab'],
      [512, 512, '0x11'],
      [4096 - 512, 1024, '0x22'], // straddles a block boundary
      [3 * 4096 + 100, 10_000, '0x33'], // unaligned start and end, several blocks
      [size - 8192, 8192 - 512, '0x44'], // up to the last sector
      [size - 512, 512, '0x55'], // last sector
    ];
    const args = ['-f', 'raw', daemon.uri('small')];
    for (const [offset, length, pattern] of cases)
      args.push('-c', `write -P ${pattern} ${offset} ${length}`);
    // The first write is partly overwritten by the next ones: check it where it is not.
    for (const [offset, length, pattern] of cases.slice(1))
      args.push('-c', `read -P ${pattern} ${offset} ${length}`);
    // Neighbours of sub-block writes keep their bytes.
    args.push(
      '-c',
      `read -P 0xab 1024 ${4096 - 512 - 1024}`,
      '-c',
      'read -P 0xab 0 512',
      '-c',
      `read -P 0xab ${3 * 4096 + 100 + 10_000} 65536`,
    );
    const { stdout } = await mustRun('qemu-io', args);
    assert.doesNotMatch(stdout, /Pattern verification failed/);
    assert.equal((stdout.match(/^read /gm) ?? []).length, cases.length - 1 + 3);
  });

  it('fails an out-of-range read cleanly and keeps serving', async () => {
    const size = 64 * 1024 * 1024;
    const bad = await run('qemu-io', [
      '-f',
      'raw',
      daemon.uri('small'),
      '-c',
      `read ${size - 4096} 8192`,
    ]);
    assert.match(bad.stdout + bad.stderr, /read failed|Invalid argument|Input\/output error/i);
    await mustRun('qemu-io', [
      '-f',
      'raw',
      daemon.uri('small'),
      '-c',
      `read -P 0x44 ${size - 8192} 4096`,
    ]);
  });

  it('write-zeroes and discard read back as zeros and show as holes', async () => {
    const mib = 1024 * 1024;
    await mustRun('qemu-io', [
      '-f',
      'raw',
      daemon.uri('db1'),
      '-c',
      `write -P 0x77 ${8 * mib} ${8 * mib}`,
      '-c',
      `write -z -u ${9 * mib} ${mib}`, // zero with unmap: may become a hole
      '-c',
      `discard ${11 * mib} ${2 * mib}`,
      '-c',
      `read -P 0 ${9 * mib} ${mib}`,
      '-c',
      `read -P 0 ${11 * mib} ${2 * mib}`,
      '-c',
      `read -P 0x77 ${8 * mib} ${mib}`,
      '-c',
      `read -P 0x77 ${10 * mib} ${mib}`,
      '-c',
      `read -P 0x77 ${13 * mib} ${3 * mib}`,
    ]);
    const { stdout } = await mustRun('nbdinfo', ['--map', '--json', daemon.uri('db1')]);
    const map = JSON.parse(stdout) as Array<{ offset: number; length: number; type: number }>;
    const at = (offset: number) =>
      map.find((e) => e.offset <= offset && offset < e.offset + e.length)!;
    assert.equal(at(8 * mib).type, 0, 'written data is allocated');
    assert.equal(at(9 * mib).type, 3, 'zeroed range is hole,zero');
    assert.equal(at(12 * mib).type, 3, 'discarded range is hole,zero');
    assert.equal(at(10 * mib).type, 0);
    assert.equal(at(5 * 1024 ** 3).type, 3, 'never written is hole,zero');
  });

  it('round-trips 64 MiB of random data through nbdcopy, byte for byte', async () => {
    const src = path.join(tmp, 'in.raw');
    const back = path.join(tmp, 'out.raw');
    const data = randomBytes(64 * 1024 * 1024);
    await fs.promises.writeFile(src, data);
    await mustRun('nbdcopy', [src, daemon.uri('small')]);
    await mustRun('nbdcopy', [daemon.uri('small'), back]);
    const out = await fs.promises.readFile(back);
    assert.equal(out.length, data.length);
    assert.equal(
      createHash('sha256').update(out).digest('hex'),
      createHash('sha256').update(data).digest('hex'),
    );
  });

  it('serves the same volume on the Unix socket', async () => {
    await mustRun('qemu-io', ['-f', 'raw', daemon.unixUri('db1'), '-c', 'write -P 0x5a 0 65536']);
    await mustRun('qemu-io', ['-f', 'raw', daemon.uri('db1'), '-c', 'read -P 0x5a 0 65536']);
  });

  it('fio with crc32c verify and 32 requests in flight', async () => {
    const { stdout } = await mustRun(
      'fio',
      [
        '--name=verify',
        '--ioengine=nbd',
        `--uri=${daemon.uri('small')}`,
        '--rw=randwrite',
        '--bs=4k',
        '--iodepth=32',
        '--size=32m',
        '--verify=crc32c',
        '--verify_state_save=0',
        '--verify_fatal=1',
        '--do_verify=1',
        '--randrepeat=0',
        '--output-format=json',
      ],
      { timeoutMs: 300_000 },
    );
    const job = (
      JSON.parse(stdout.slice(stdout.indexOf('{'))) as {
        jobs: Array<{ error: number; write: { io_bytes: number }; read: { io_bytes: number } }>;
      }
    ).jobs[0]!;
    assert.equal(job.error, 0);
    assert.equal(job.write.io_bytes, 32 * 1024 * 1024);
    assert.equal(job.read.io_bytes, 32 * 1024 * 1024, 'verify read everything back');
  });
});
