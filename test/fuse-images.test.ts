import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, describe, it } from 'node:test';
import { DaemonProcess } from './helpers/daemon.ts';
import { mustRun, run } from './helpers/run.ts';

async function losetup(image: string): Promise<string> {
  return (await mustRun('losetup', ['--find', '--show', image])).stdout.trim();
}

async function writeFiles(
  dir: string,
  count: number,
  prefix: string,
): Promise<Map<string, string>> {
  const sums = new Map<string, string>();
  for (let i = 0; i < count; i++) {
    const data = randomBytes(Math.floor(Math.random() * 64 * 1024));
    const name = `${prefix}${i}.bin`;
    await fs.promises.writeFile(path.join(dir, name), data);
    sums.set(name, createHash('sha256').update(data).digest('hex'));
  }
  return sums;
}

async function checkFiles(dir: string, sums: Map<string, string>): Promise<void> {
  for (const [name, sum] of sums) {
    const data = await fs.promises.readFile(path.join(dir, name));
    assert.equal(createHash('sha256').update(data).digest('hex'), sum, name);
  }
}

describe('FUSE images', () => {
  const cleanups: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanups.reverse()) await c().catch(() => undefined);
  });

  async function mnt(): Promise<string> {
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-fmnt-'));
    cleanups.push(async () => {
      await run('umount', ['-l', dir]);
      await fs.promises.rm(dir, { recursive: true, force: true });
    });
    return dir;
  }

  it('ext4 on a loop device over the image: 1000 files, e2fsck clean, checksums match, also after a restart', async () => {
    let d = await DaemonProcess.start();
    const first = d;
    cleanups.push(() => first.cleanup());
    const created = await d.cli([
      'volume',
      'create',
      'web',
      '--size',
      '512M',
      '--frontend',
      'fuse',
    ]);
    assert.equal(created.code, 0, created.stderr);
    const image = path.join(d.dataDir, 'images', 'web.img');
    assert.equal((await fs.promises.stat(image)).size, 512 * 1024 * 1024);
    const dir = await mnt();
    let loop = await losetup(image);
    await mustRun('mkfs.ext4', ['-q', '-F', loop]);
    await mustRun('mount', [loop, dir]);
    const sums = await writeFiles(dir, 1000, 'f');
    await mustRun('sync', []);
    await mustRun('umount', [dir]);
    const fsck = await run('e2fsck', ['-fn', loop]);
    assert.equal(fsck.code, 0, fsck.stdout + fsck.stderr);
    await mustRun('mount', [loop, dir]);
    await checkFiles(dir, sums);
    await mustRun('umount', [dir]);
    await mustRun('losetup', ['-d', loop]);

    assert.equal((await d.stop('SIGTERM')).code, 0);
    d = await d.restart();
    const second = d;
    cleanups.push(() => second.stop('SIGKILL'));
    loop = await losetup(image);
    const fsck2 = await run('e2fsck', ['-fn', loop]);
    assert.equal(fsck2.code, 0, fsck2.stdout + fsck2.stderr);
    await mustRun('mount', [loop, dir]);
    await checkFiles(dir, sums);

    // Refused while the loop device holds it, naming what holds it.
    const detach = await d.cli(['volume', 'detach', 'web']);
    assert.equal(detach.code, 1);
    assert.match(detach.stderr, new RegExp(`image is open \\(${loop}`));
    await mustRun('umount', [dir]);
    await mustRun('losetup', ['-d', loop]);
  });

  it('refuses truncate, rename, unlink and writes past the end with the right errno', async () => {
    const d = await DaemonProcess.start();
    cleanups.push(() => d.cleanup());
    await d.cli(['volume', 'create', 'img', '--size', '16M', '--frontend', 'fuse']);
    const image = path.join(d.dataDir, 'images', 'img.img');
    await assert.rejects(() => fs.promises.truncate(image, 4096), { code: 'EPERM' });
    await assert.rejects(() => fs.promises.rename(image, image + '.x'), { code: 'EPERM' });
    await assert.rejects(() => fs.promises.unlink(image), { code: 'EPERM' });
    await assert.rejects(
      () => fs.promises.writeFile(path.join(d.dataDir, 'images', 'new.img'), 'x'),
      { code: 'EPERM' },
    );
    const handle = await fs.promises.open(image, 'r+');
    try {
      await assert.rejects(() => handle.write(Buffer.alloc(4096), 0, 4096, 16 * 1024 * 1024), {
        code: 'ENOSPC',
      });
      // Straddling the end: what fits is written, like a block device.
      const { bytesWritten } = await handle.write(
        Buffer.alloc(8192, 1),
        0,
        8192,
        16 * 1024 * 1024 - 4096,
      );
      assert.equal(bytesWritten, 4096);
      await handle.sync();
    } finally {
      await handle.close();
    }
    assert.equal((await fs.promises.stat(image)).size, 16 * 1024 * 1024, 'the size never changes');
  });

  it('fio verifies 4k-1M writes through a loop device over the image, 32 in flight, and after a restart', async () => {
    const d = await DaemonProcess.start();
    cleanups.push(() => d.cleanup());
    await d.cli(['volume', 'create', 'fio', '--size', '256M', '--frontend', 'fuse']);
    const image = path.join(d.dataDir, 'images', 'fio.img');
    const loop = (
      await mustRun('losetup', ['--find', '--show', '--direct-io=on', image])
    ).stdout.trim();
    const job = [
      '--name=verify',
      `--filename=${loop}`,
      '--ioengine=libaio',
      '--direct=1',
      '--iodepth=32',
      '--bsrange=4k-1M',
      '--size=192M',
      '--verify=crc32c',
      '--verify_fatal=1',
      '--randrepeat=1',
    ];
    try {
      await mustRun('fio', [...job, '--rw=randwrite'], { timeoutMs: 300_000 });
    } finally {
      await mustRun('losetup', ['-d', loop]);
    }
    assert.equal((await d.stop('SIGTERM')).code, 0);
    const d2 = await d.restart();
    cleanups.push(() => d2.stop('SIGKILL'));
    const loop2 = (
      await mustRun('losetup', ['--find', '--show', '--direct-io=on', image])
    ).stdout.trim();
    try {
      // The same seed regenerates the same blocks: every one of them is checked.
      await mustRun('fio', [...job, '--rw=randwrite', '--verify_only'], { timeoutMs: 300_000 });
    } finally {
      await mustRun('losetup', ['-d', loop2]);
    }
  });

  it('punch-hole, zero-range and a loop device discard read back as zeros; the bytes around stay', async () => {
    const d = await DaemonProcess.start();
    cleanups.push(() => d.cleanup());
    await d.cli(['volume', 'create', 'holes', '--size', '16M', '--frontend', 'fuse']);
    const image = path.join(d.dataDir, 'images', 'holes.img');
    const expected = randomBytes(16 * 1024 * 1024);
    await fs.promises.writeFile(image, expected, { flag: 'r+' });
    const zeroOut = (offset: number, length: number) => expected.fill(0, offset, offset + length);
    // Unaligned edges on purpose: the partial blocks must keep their other bytes.
    await mustRun('fallocate', ['--punch-hole', '--offset', '4608', '--length', '70000', image]);
    zeroOut(4608, 70000);
    await mustRun('fallocate', [
      '--zero-range',
      '--offset',
      '1048576',
      '--length',
      '2097152',
      image,
    ]);
    zeroOut(1048576, 2097152);
    const loop = await losetup(image);
    try {
      await mustRun('blkdiscard', ['--offset', '8388608', '--length', '4194304', loop]);
      zeroOut(8388608, 4194304);
    } finally {
      await mustRun('losetup', ['-d', loop]);
    }
    const actual = await fs.promises.readFile(image);
    assert.ok(
      actual.equals(expected),
      'the image holds the written bytes with the punched ranges zero',
    );
    // A punched whole-block range is a hole to NBD clients too.
    const map = await mustRun('nbdinfo', ['--map', '--json', d.uri('holes')]);
    const extents = JSON.parse(map.stdout) as { offset: number; length: number; type: number }[];
    assert.ok(
      extents.some(
        (e) => e.offset <= 8388608 && e.offset + e.length >= 12582912 && (e.type & 1) === 1,
      ),
      `the discarded range is a hole: ${map.stdout}`,
    );
    // Allocating past the end of the image is refused like growing it.
    const past = await run('fallocate', ['--offset', '16777216', '--length', '4096', image]);
    assert.notEqual(past.code, 0);
  });

  it("NBD and FUSE see each other's writes on a volume attached to both", async () => {
    const d = await DaemonProcess.start();
    cleanups.push(() => d.cleanup());
    await d.cli(['volume', 'create', 'both', '--size', '16M', '--frontend', 'fuse']);
    const image = path.join(d.dataDir, 'images', 'both.img');
    await mustRun('qemu-io', ['-f', 'raw', d.uri('both'), '-c', 'write -P 0x5a 1M 64k']);
    const handle = await fs.promises.open(image, 'r+');
    try {
      const buf = Buffer.alloc(65536);
      await handle.read(buf, 0, buf.length, 1024 * 1024);
      assert.ok(
        buf.every((b) => b === 0x5a),
        'FUSE reads what NBD wrote',
      );
      await handle.write(Buffer.alloc(65536, 0xa5), 0, 65536, 2 * 1024 * 1024);
    } finally {
      await handle.close();
    }
    await mustRun('qemu-io', ['-f', 'raw', d.uri('both'), '-c', 'read -P 0xa5 2M 64k']);
  });

  it('SIGKILL while ext4 is being written: after e2fsck -fy every file fsynced before the kill is intact', async () => {
    const d = await DaemonProcess.start();
    cleanups.push(() => d.cleanup());
    await d.cli(['volume', 'create', 'crash', '--size', '256M', '--frontend', 'fuse']);
    const image = path.join(d.dataDir, 'images', 'crash.img');
    const dir = await mnt();
    const loop = await losetup(image);
    await mustRun('mkfs.ext4', ['-q', '-F', loop]);
    await mustRun('mount', [loop, dir]);
    const synced = new Map<string, string>();
    for (let i = 0; i < 100; i++) {
      const data = randomBytes(4096 + Math.floor(Math.random() * 60_000));
      const handle = await fs.promises.open(path.join(dir, `s${i}.bin`), 'w');
      await handle.write(data);
      await handle.sync();
      await handle.close();
      synced.set(`s${i}.bin`, createHash('sha256').update(data).digest('hex'));
    }
    // The directory entries must be durable too.
    const dirHandle = await fs.promises.open(dir, 'r');
    await dirHandle.sync();
    await dirHandle.close();
    // Keep writing, unsynced, while the daemon dies.
    const writer = writeFiles(dir, 200, 'u').catch(() => undefined);
    await d.kill();
    await writer;
    await run('umount', ['-l', dir]);
    await run('losetup', ['-d', loop]);

    const d2 = await d.restart(); // finds the dead FUSE mount and replaces it
    cleanups.push(() => d2.stop('SIGKILL'));
    const loop2 = await losetup(image);
    const fsck = await run('e2fsck', ['-fy', loop2]);
    assert.ok(
      fsck.code === 0 || fsck.code === 1,
      `e2fsck -fy left errors (${fsck.code}):\n${fsck.stdout}`,
    );
    const dir2 = await mnt();
    await mustRun('mount', [loop2, dir2]);
    await checkFiles(dir2, synced);
    await mustRun('umount', [dir2]);
    await mustRun('losetup', ['-d', loop2]);
  });
});

describe('FUSE images and a faulty engine', () => {
  it('a hung engine fails its own reads with EIO and never blocks another image', async () => {
    const d = await DaemonProcess.start({
      env: { CORRAL_FAULT_INJECTION: '1' },
      args: ['--hang-timeout', '2000'],
    });
    try {
      for (const name of ['sick', 'well']) {
        const r = await d.cli(['volume', 'create', name, '--size', '16M', '--frontend', 'fuse']);
        assert.equal(r.code, 0, r.stderr);
      }
      const images = path.join(d.dataDir, 'images');
      await fs.promises.writeFile(path.join(images, 'well.img'), Buffer.alloc(65536, 0x77), {
        flag: 'r+',
      });
      assert.equal(
        (await d.api_('POST', '/v1/debug/volumes/sick/fault', { mode: 'hang' })).status,
        200,
      );
      // A separate process reads the sick image: the read must end in EIO, not hang.
      const reader = `const fs = require('fs'); const fd = fs.openSync(${JSON.stringify(path.join(images, 'sick.img'))}, 'r'); fs.readSync(fd, Buffer.alloc(4096), 0, 4096, 20480);`;
      const stuck = run(process.execPath, ['-e', reader], { timeoutMs: 60_000 });
      // Meanwhile the other image answers at once.
      const data = await fs.promises.readFile(path.join(images, 'well.img'));
      assert.ok(data.subarray(0, 65536).every((b) => b === 0x77));
      const result = await stuck;
      assert.notEqual(result.code, 0);
      assert.match(result.stderr, /EIO/);
    } finally {
      await d.cleanup();
    }
  });
});
