import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CreateMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  UploadPartCommand,
} from '@aws-sdk/client-s3';
import { concurrently } from '../common/concurrently.ts';
import { CorralError } from '../common/errors.ts';
import type { BackupTarget } from './target.ts';

/** Objects larger than this go up in parts, several at a time. */
export const MULTIPART_THRESHOLD = 16 * 1024 * 1024;
const PART_BYTES = 8 * 1024 * 1024;
const PART_CONCURRENCY = 4;

function isMissing(err: unknown): boolean {
  const e = err as { name?: string; $metadata?: { httpStatusCode?: number } };
  return e.name === 'NotFound' || e.name === 'NoSuchKey' || e.$metadata?.httpStatusCode === 404;
}

function s3Error(what: string, url: string, err: unknown): CorralError {
  const e = err as { name?: string; message?: string };
  return new CorralError(
    'IO_ERROR',
    `${what} at ${url}: ${e.name ?? 'error'}${e.message ? `: ${e.message}` : ''}`,
    { cause: err },
  );
}

/**
 * A backupstore in an S3 bucket (AWS or any S3-compatible server). The URL
 * is `s3://bucket/prefix`, with `?endpoint=http://host:port` for other
 * servers (path-style addressing then), `&region=`; credentials come from
 * AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), and from the
 * SDK's own chain (profiles, the cloud's metadata service) only when asked.
 * A single PUT is atomic in S3, and a multipart upload appears only when complete.
 */
export class S3Target implements BackupTarget {
  readonly url: string;
  readonly #client: S3Client;
  readonly #bucket: string;
  readonly #prefix: string;

  private constructor(url: string, client: S3Client, bucket: string, prefix: string) {
    this.url = url;
    this.#client = client;
    this.#bucket = bucket;
    this.#prefix = prefix;
  }

  static open(url: URL, credentialChain: boolean): S3Target {
    const bucket = url.hostname;
    if (bucket === '') {
      throw new CorralError(
        'INVALID_ARGUMENT',
        `Backup target ${url.href} names no bucket: use s3://bucket/prefix`,
      );
    }
    const prefix = decodeURIComponent(url.pathname).replace(/^\/+|\/+$/g, '');
    const endpoint = url.searchParams.get('endpoint') ?? process.env.AWS_ENDPOINT_URL;
    const region =
      url.searchParams.get('region') ??
      process.env.AWS_REGION ??
      process.env.AWS_DEFAULT_REGION ??
      'us-east-1';
    const pathStyle = url.searchParams.get('pathStyle') ?? (endpoint ? 'true' : 'false');
    const accessKeyId = process.env.AWS_ACCESS_KEY_ID;
    const secretAccessKey = process.env.AWS_SECRET_ACCESS_KEY;
    const sessionToken = process.env.AWS_SESSION_TOKEN;
    if ((!accessKeyId || !secretAccessKey) && !credentialChain)
      throw new CorralError(
        'INVALID_ARGUMENT',
        `Backup target ${url.protocol}//${bucket}: no S3 credentials. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the daemon's environment, or start it with --s3-credential-chain to let the AWS SDK look in profiles and the cloud's metadata service`,
      );
    const client = new S3Client({
      region,
      ...(accessKeyId && secretAccessKey
        ? {
            credentials: {
              accessKeyId,
              secretAccessKey,
              ...(sessionToken ? { sessionToken } : {}),
            },
          }
        : {}),
      ...(endpoint ? { endpoint } : {}),
      forcePathStyle: pathStyle === 'true',
      // Streamed uploads with checksums are stored with their chunk framing by
      // some S3-compatible servers: only compute checksums where S3 needs them.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
    });
    const shown = new URL(url.href);
    shown.username = '';
    shown.password = '';
    return new S3Target(shown.href, client, bucket, prefix);
  }

  #key(key: string): string {
    return this.#prefix === '' ? key : `${this.#prefix}/${key}`;
  }

  async get(key: string): Promise<Buffer | undefined> {
    try {
      const out = await this.#client.send(
        new GetObjectCommand({ Bucket: this.#bucket, Key: this.#key(key) }),
      );
      if (!out.Body) return Buffer.alloc(0);
      return Buffer.from(await out.Body.transformToByteArray());
    } catch (err) {
      if (isMissing(err)) return undefined;
      throw s3Error(`Cannot read ${key}`, this.url, err);
    }
  }

  async put(key: string, chunks: Uint8Array | readonly Uint8Array[]): Promise<void> {
    const data = chunks instanceof Uint8Array ? chunks : Buffer.concat(chunks);
    if (data.length > MULTIPART_THRESHOLD) return this.#putMultipart(key, data);
    try {
      await this.#client.send(
        new PutObjectCommand({
          Bucket: this.#bucket,
          Key: this.#key(key),
          Body: data,
          ContentLength: data.length,
        }),
      );
    } catch (err) {
      throw s3Error(`Cannot write ${key}`, this.url, err);
    }
  }

  async #putMultipart(key: string, data: Uint8Array): Promise<void> {
    const Key = this.#key(key);
    const created = await this.#client
      .send(new CreateMultipartUploadCommand({ Bucket: this.#bucket, Key }))
      .catch((err: unknown) => {
        throw s3Error(`Cannot start a multipart upload of ${key}`, this.url, err);
      });
    const UploadId = created.UploadId;
    if (!UploadId) throw new CorralError('IO_ERROR', `${this.url} gave no upload id for ${key}`);
    try {
      const count = Math.ceil(data.length / PART_BYTES);
      const etags: string[] = new Array<string>(count);
      await concurrently(count, PART_CONCURRENCY, async (i) => {
        const body = data.subarray(i * PART_BYTES, Math.min(data.length, (i + 1) * PART_BYTES));
        const out = await this.#client.send(
          new UploadPartCommand({
            Bucket: this.#bucket,
            Key,
            UploadId,
            PartNumber: i + 1,
            Body: body,
            ContentLength: body.length,
          }),
        );
        etags[i] = out.ETag ?? '';
      });
      await this.#client.send(
        new CompleteMultipartUploadCommand({
          Bucket: this.#bucket,
          Key,
          UploadId,
          MultipartUpload: { Parts: etags.map((ETag, i) => ({ ETag, PartNumber: i + 1 })) },
        }),
      );
    } catch (err) {
      await this.#client
        .send(new AbortMultipartUploadCommand({ Bucket: this.#bucket, Key, UploadId }))
        .catch(() => undefined);
      throw s3Error(`Cannot upload ${key} in parts`, this.url, err);
    }
  }

  async exists(key: string): Promise<boolean> {
    try {
      await this.#client.send(new HeadObjectCommand({ Bucket: this.#bucket, Key: this.#key(key) }));
      return true;
    } catch (err) {
      if (isMissing(err)) return false;
      throw s3Error(`Cannot look up ${key}`, this.url, err);
    }
  }

  async list(prefix: string): Promise<string[]> {
    const full = this.#key(prefix.replace(/\/+$/, '')) + '/';
    const strip = this.#prefix === '' ? 0 : this.#prefix.length + 1;
    const out: string[] = [];
    let token: string | undefined;
    do {
      let page;
      try {
        page = await this.#client.send(
          new ListObjectsV2Command({
            Bucket: this.#bucket,
            Prefix: full,
            ...(token ? { ContinuationToken: token } : {}),
          }),
        );
      } catch (err) {
        throw s3Error(`Cannot list ${prefix}`, this.url, err);
      }
      for (const o of page.Contents ?? []) if (o.Key) out.push(o.Key.slice(strip));
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
    return out;
  }

  async delete(key: string): Promise<void> {
    try {
      // One key per request: multi-key deletes race in some S3-compatible servers.
      await this.#client.send(
        new DeleteObjectCommand({ Bucket: this.#bucket, Key: this.#key(key) }),
      );
    } catch (err) {
      if (!isMissing(err)) throw s3Error(`Cannot delete ${key}`, this.url, err);
    }
  }

  sync(): Promise<void> {
    return Promise.resolve();
  }
}
