import { spawn } from 'node:child_process';
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
