import { CorralError, quoted } from '../common/errors.ts';
import type { BackupTarget, TargetPolicy } from './target.ts';

// Apart from target.ts, which the targets themselves import for its interface: the
// targets are loaded on first use (the S3 one brings the AWS SDK).
/** Parses `file:///path` or `s3://bucket/prefix?endpoint=...&region=...` and opens it. */
export async function openTarget(url: string, policy: TargetPolicy): Promise<BackupTarget> {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new CorralError(
      'INVALID_ARGUMENT',
      `Invalid backup target ${quoted(url)}: use file:///path or s3://bucket/prefix`,
    );
  }
  if (parsed.protocol === 'file:') {
    const { FileTarget } = await import('./file-target.ts');
    return FileTarget.open(parsed, policy.fileRoots);
  }
  if (parsed.protocol === 's3:') {
    const { S3Target } = await import('./s3-target.ts');
    return S3Target.open(parsed, policy.s3CredentialChain);
  }
  throw new CorralError(
    'INVALID_ARGUMENT',
    `Unsupported backup target ${quoted(url)}: use file:///path or s3://bucket/prefix`,
  );
}
