import { readSecretFile } from './secrets.ts';
import { formatSize } from '../common/size.ts';
import { ApiError, call } from './client.ts';
import type { Operation } from './operations.ts';

export class UsageError extends Error {}

export function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  return rows
    .map((r) =>
      r
        .map((cell, i) => cell.padEnd(widths[i]!))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

export function print(json: boolean, value: unknown, text: () => string): void {
  console.log(json ? JSON.stringify(value, null, 2) : text());
}

function bar(op: Operation): string {
  const { phase, done, total } = op.progress;
  const ratio = total > 0 ? done / total : 0;
  const width = 30;
  const filled = Math.round(ratio * width);
  return `${phase.padEnd(10)} [${'#'.repeat(filled)}${'-'.repeat(width - filled)}] ${String(Math.floor(ratio * 100)).padStart(3)}%  ${done}/${total}  ${formatSize(op.bytesPerSecond)}/s`;
}

/**
 * Follows an operation to its end, drawing its progress on stderr (a bar
 * redrawn in place on a terminal, a line per 10% otherwise); throws its error.
 */
export async function follow(api: string, start: Operation, quiet: boolean): Promise<Operation> {
  const tty = process.stderr.isTTY === true && !quiet;
  let op = start;
  let lastTenth = -1;
  for (;;) {
    if (!quiet) {
      if (tty) process.stderr.write(`\r${bar(op)}`);
      else {
        const tenth =
          op.progress.total > 0 ? Math.floor((10 * op.progress.done) / op.progress.total) : 0;
        if (tenth !== lastTenth && op.progress.total > 0) {
          lastTenth = tenth;
          process.stderr.write(`${bar(op)}\n`);
        }
      }
    }
    if (op.state !== 'running') break;
    await new Promise((r) => setTimeout(r, 200));
    op = await call<Operation>(api, 'GET', `/v1/operations/${op.id}`);
  }
  if (tty) process.stderr.write('\n');
  if (op.state === 'failed')
    throw new ApiError(op.error?.code ?? 'ERROR', op.error?.message ?? 'operation failed', 0);
  return op;
}

/**
 * A key for the API, base64: from a file that only its owner may read (as
 * `admin.token`), or from an environment variable; never from the command
 * line, where `ps` shows it. Undefined when neither is given and `needed`
 * does not say what needs one.
 */
export async function keyFrom(
  file: unknown,
  env: unknown,
  needed?: string,
): Promise<string | undefined> {
  if (typeof file === 'string' && typeof env === 'string')
    throw new UsageError('give a key file or a key variable, not both');
  if (typeof file === 'string') return (await readSecretFile(file, 'key file')).toString('base64');
  if (typeof env === 'string') {
    const value = process.env[env];
    if (!value) throw new UsageError(`the environment variable ${env} is not set`);
    return Buffer.from(value).toString('base64');
  }
  if (needed) throw new UsageError(`${needed} needs a key: --key-file FILE or --key-env VAR`);
  return undefined;
}
