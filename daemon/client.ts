import * as fs from 'node:fs';
import * as path from 'node:path';
import { ADMIN_TOKEN_FILE, defaultDataDir } from './paths.ts';
import { openToOthers } from './secrets.ts';

/** The CLI's view of the API: one call, JSON back, API errors thrown with their code. */
export class ApiError extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly status: number,
  ) {
    super(message);
  }
}

let token: string | undefined | null = null;

/**
 * The CLI's token: `CORRAL_TOKEN`, else the file `CORRAL_TOKEN_FILE` names,
 * else the daemon's own admin token when this user can read it (the CLI on
 * the daemon's host just works). Never from argv: `ps` shows argv to everyone.
 */
export function cliToken(): string | undefined {
  if (token !== null) return token;
  token = undefined;
  if (process.env.CORRAL_TOKEN) return (token = process.env.CORRAL_TOKEN.trim());
  const named = process.env.CORRAL_TOKEN_FILE;
  const file = named ?? path.join(defaultDataDir(), ADMIN_TOKEN_FILE);
  let content: string;
  let mode: number;
  try {
    mode = fs.statSync(file).mode;
    content = fs.readFileSync(file, 'utf8');
  } catch (err) {
    // The daemon's own token is only a guess (another user's daemon, or none here); a named file is not.
    if (named === undefined) return token;
    throw new ApiError(
      'BAD_TOKEN_FILE',
      `Cannot read CORRAL_TOKEN_FILE ${file}: ${String(err)}`,
      0,
    );
  }
  const loose = openToOthers('Token file', file, mode);
  if (loose !== undefined) throw new ApiError('BAD_TOKEN_FILE', loose, 0);
  token = content.trim();
  return token;
}

/** Headers every CLI request carries: its token, when it has one. */
export function authHeaders(): Record<string, string> {
  const t = cliToken();
  return t !== undefined ? { authorization: `Bearer ${t}` } : {};
}

export async function call<T>(
  base: string,
  method: string,
  path: string,
  body?: unknown,
): Promise<T> {
  let response: Response;
  try {
    response = await fetch(base + path, {
      method,
      headers: {
        ...authHeaders(),
        ...(body === undefined ? {} : { 'content-type': 'application/json' }),
      },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    });
  } catch (err) {
    throw new ApiError(
      'UNREACHABLE',
      `Cannot reach the corral daemon at ${base}: ${err instanceof Error ? (err.cause instanceof Error ? err.cause.message : err.message) : String(err)}. Is it running? (corral daemon, or set CORRAL_API)`,
      0,
    );
  }
  if (response.status === 204) return undefined as T;
  const text = await response.text();
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new ApiError(
      'BAD_RESPONSE',
      `The daemon answered ${response.status} with a body that is not JSON`,
      response.status,
    );
  }
  if (!response.ok) {
    const err = (json as { error?: { code?: string; message?: string } }).error;
    throw new ApiError(
      err?.code ?? 'ERROR',
      err?.message ?? `HTTP ${response.status}`,
      response.status,
    );
  }
  return json as T;
}
