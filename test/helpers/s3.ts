import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';
import { ROOT } from './daemon.ts';
import { freePort, waitFor } from './run.ts';

/** s3rver's fixed credentials; the daemons under test get them through the usual variables. */
export const S3_ENV = {
  AWS_ACCESS_KEY_ID: 'S3RVER',
  AWS_SECRET_ACCESS_KEY: 'S3RVER',
  AWS_REGION: 'us-east-1',
};

/** A real S3 server process (s3rver) on loopback with one bucket, and a client to inspect it. */
export class S3Server {
  readonly endpoint: string;
  readonly bucket: string;
  readonly client: S3Client;
  readonly #child: ChildProcess;
  readonly #dir: string;

  private constructor(endpoint: string, bucket: string, child: ChildProcess, dir: string) {
    this.endpoint = endpoint;
    this.bucket = bucket;
    this.#child = child;
    this.#dir = dir;
    this.client = new S3Client({
      endpoint,
      region: S3_ENV.AWS_REGION,
      forcePathStyle: true,
      credentials: {
        accessKeyId: S3_ENV.AWS_ACCESS_KEY_ID,
        secretAccessKey: S3_ENV.AWS_SECRET_ACCESS_KEY,
      },
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
    });
  }

  static async start(bucket = 'corral'): Promise<S3Server> {
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-s3-'));
    const port = await freePort();
    // --openssl-legacy-provider: s3rver's paged listing hashes with MD4.
    const child = spawn(
      process.execPath,
      [
        '--openssl-legacy-provider',
        path.join(ROOT, 'node_modules', 's3rver', 'bin', 's3rver.js'),
        '-d',
        dir,
        '-a',
        '127.0.0.1',
        '-p',
        String(port),
        '--silent',
        '--configure-bucket',
        bucket,
      ],
      { stdio: 'ignore' },
    );
    const endpoint = `http://127.0.0.1:${port}`;
    const server = new S3Server(endpoint, bucket, child, dir);
    await waitFor('s3rver to answer', async () => {
      await server.client.send(new ListObjectsV2Command({ Bucket: bucket }));
      return true;
    });
    return server;
  }

  /** The Corral target URL for a prefix in the bucket. */
  target(prefix: string): string {
    return `s3://${this.bucket}/${prefix}?endpoint=${encodeURIComponent(this.endpoint)}`;
  }

  async keys(prefix: string): Promise<string[]> {
    const out: string[] = [];
    let token: string | undefined;
    do {
      const page = await this.client.send(
        new ListObjectsV2Command({
          Bucket: this.bucket,
          Prefix: prefix,
          ...(token ? { ContinuationToken: token } : {}),
        }),
      );
      for (const o of page.Contents ?? []) if (o.Key) out.push(o.Key);
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
    return out;
  }

  async stop(): Promise<void> {
    this.#child.kill('SIGKILL');
    await fs.promises.rm(this.#dir, { recursive: true, force: true });
  }
}
