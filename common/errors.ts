/**
 * Stable error codes. Callers branch on `code`, never on `message`
 * (docs/CONTRIBUTING.md, after abstract-level's LEVEL_NOT_FOUND). The HTTP API and the NBD
 * server map codes to statuses and errnos in one place each.
 */
export type ErrorCode =
  | 'INVALID_ARGUMENT'
  | 'INVALID_NAME'
  | 'INVALID_SIZE'
  | 'OUT_OF_RANGE'
  | 'NOT_FOUND'
  | 'ALREADY_EXISTS'
  | 'BUSY'
  | 'READ_ONLY'
  | 'NO_SPACE'
  | 'LIMIT_REACHED'
  | 'IO_ERROR'
  | 'NO_HEALTHY_REPLICA'
  | 'ENGINE_FAILED'
  | 'SHUTTING_DOWN'
  | 'UNSUPPORTED_FORMAT'
  | 'CORRUPT_METADATA'
  | 'DATA_CORRUPT'
  | 'TOO_LARGE'
  | 'UNAVAILABLE'
  | 'UNAUTHENTICATED'
  | 'FORBIDDEN'
  | 'INTERNAL';

export class CorralError extends Error {
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = 'CorralError';
  }
}

export function isCorralError(err: unknown, code?: ErrorCode): err is CorralError {
  return err instanceof CorralError && (code === undefined || err.code === code);
}

/** Node's system errors carry an errno string in `code` (ENOSPC, EIO, ...). */
export function systemErrorCode(err: unknown): string | undefined {
  if (typeof err === 'object' && err !== null && 'code' in err) {
    const code = err.code;
    return typeof code === 'string' ? code : undefined;
  }
  return undefined;
}

/** Wraps a file-system failure into a CorralError keeping the cause. */
export function ioError(what: string, err: unknown): CorralError {
  // Already classified (the metadata store says NO_SPACE): keep its code.
  if (err instanceof CorralError)
    return new CorralError(err.code, `${what}: ${err.message}`, { cause: err });
  const sys = systemErrorCode(err);
  if (sys === 'ENOSPC' || sys === 'EDQUOT' || sys === 'EFBIG') {
    return new CorralError('NO_SPACE', `${what}: no space left (${sys})`, { cause: err });
  }
  return new CorralError('IO_ERROR', `${what}: ${sys ?? String(err)}`, { cause: err });
}

/** Longest piece of a caller's input quoted back in an error message. */
const MAX_QUOTED_CHARS = 80;

/**
 * A caller's value as it appears in an error: JSON-quoted and cut short, so
 * a 10 MB name is not echoed back whole.
 */
export function quoted(value: unknown): string {
  const text = JSON.stringify(value) ?? String(value);
  return text.length <= MAX_QUOTED_CHARS
    ? text
    : `${text.slice(0, MAX_QUOTED_CHARS)}… (${text.length} characters)`;
}
