import { spawn } from 'node:child_process';
import { mustRun } from './run.ts';
import { createHash } from 'node:crypto';

/** SHA-256 of everything an NBD export holds, read by nbdcopy (a real client) to stdout. */
export function sha256OfExport(uri: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('nbdcopy', [uri, '-'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const hash = createHash('sha256');
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => hash.update(d));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      if (code === 0) resolve(hash.digest('hex'));
      else reject(new Error(`nbdcopy ${uri} - exited ${code}: ${stderr}`));
    });
  });
}

/** The SHA-256 of a volume of `sizeBytes` that holds `pieces` and zeros elsewhere. */
export function sha256OfImage(sizeBytes: number, pieces: Array<[number, Uint8Array]>): string {
  const image = Buffer.alloc(sizeBytes);
  for (const [offset, data] of pieces) image.set(data, offset);
  return createHash('sha256').update(image).digest('hex');
}

/** Fails unless two NBD exports hold the same bytes (qemu-img compare, a real client). */
export async function assertSameBytes(a: string, b: string): Promise<void> {
  await mustRun('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b]);
}

/** Fills `size` of an export with random data, every 1 MiB different (fio --refill_buffers). */
export async function fillRandom(uri: string, size: string): Promise<void> {
  await mustRun(
    'fio',
    [
      '--name=fill',
      '--ioengine=nbd',
      `--uri=${uri}`,
      '--rw=write',
      '--bs=1M',
      `--size=${size}`,
      '--iodepth=8',
      '--refill_buffers',
      '--randrepeat=0',
    ],
    { timeoutMs: 300_000 },
  );
}
