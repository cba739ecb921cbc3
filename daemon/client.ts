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
      headers: body === undefined ? {} : { 'content-type': 'application/json' },
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
