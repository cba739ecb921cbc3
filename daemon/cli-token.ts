import { parseArgs } from 'node:util';
import { call } from './client.ts';
import { print, table, UsageError } from './cli-util.ts';

interface TokenInfo {
  name: string;
  role: string;
  createdAt: string;
}

/** `corral token ...`: the token is printed once, alone on stdout, so `T=$(corral token create ...)` works. */
export async function runTokenCommand(
  api: string,
  verb: string | undefined,
  rest: string[],
): Promise<void> {
  const { values, positionals } = parseArgs({
    args: rest,
    options: { json: { type: 'boolean' }, name: { type: 'string' }, role: { type: 'string' } },
    allowPositionals: true,
    strict: true,
  });
  switch (verb) {
    case 'create': {
      const name = values.name ?? positionals[0];
      if (!name || !values.role)
        throw new UsageError('token create needs --name NAME and --role admin|operator|read-only');
      const made = await call<TokenInfo & { token: string }>(api, 'POST', '/v1/tokens', {
        name,
        role: values.role,
      });
      if (values.json === true) console.log(JSON.stringify(made, null, 2));
      else {
        console.log(made.token);
        console.error(
          `token "${made.name}" (${made.role}): shown this once; keep it in a file (0600)`,
        );
      }
      return;
    }
    case 'ls': {
      const { tokens } = await call<{ tokens: TokenInfo[] }>(api, 'GET', '/v1/tokens');
      print(values.json === true, tokens, () =>
        table([['NAME', 'ROLE', 'CREATED'], ...tokens.map((t) => [t.name, t.role, t.createdAt])]),
      );
      return;
    }
    case 'rm': {
      const name = positionals[0];
      if (!name) throw new UsageError('missing token name');
      await call(api, 'DELETE', `/v1/tokens/${encodeURIComponent(name)}`);
      return;
    }
    default:
      throw new UsageError(`unknown command: corral token ${verb ?? ''}`);
  }
}
