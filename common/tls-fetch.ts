/** `fetch` as the runtime has it: the global one, or one that shows a client certificate. */
export type Fetch = (url: string, init?: RequestInit) => Promise<Response>;

/** A node's TLS identity and the CA it trusts, as PEM. */
export interface TlsFiles {
  cert: Buffer;
  key: Buffer;
  ca: Buffer | undefined;
}

/**
 * A `fetch` that trusts `ca` and shows the node's certificate (mutual TLS
 * between daemons, and to etcd). Node's global fetch takes neither, so this
 * is undici's own, with an agent that keeps connections open.
 */
export async function tlsFetch(files: TlsFiles): Promise<Fetch> {
  const undici = await import('undici');
  const dispatcher = new undici.Agent({
    connect: { cert: files.cert, key: files.key, ...(files.ca ? { ca: files.ca } : {}) },
  });
  return (url, init) =>
    undici.fetch(url, {
      ...(init as Parameters<typeof undici.fetch>[1]),
      dispatcher,
    }) as unknown as Promise<Response>;
}
