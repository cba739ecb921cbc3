import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { UsageError } from './cli-util.ts';

/** `openssl req` arguments for a new P-256 key, unencrypted (the file is 0600). */
const NEW_EC_KEY = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];

function openssl(args: string[]): Promise<void> {
  return new Promise((resolve, reject) =>
    execFile('openssl', args, (err, _stdout, stderr) =>
      err ? reject(new Error(`openssl ${args[0]}: ${stderr.trim() || err.message}`)) : resolve(),
    ),
  );
}

/**
 * `corral cluster certs`: a CA and certificates for a lab cluster, made with
 * openssl. Node certificates carry `OU=node` (what a daemon looks for in a
 * peer's certificate) and the names and addresses peers reach them by;
 * client certificates (`OU=client`) are NBD identities for `--nbd-allow`.
 * Production brings its own PKI: the same fields are all it needs.
 */
export async function runCertsCommand(rest: string[]): Promise<void> {
  const { values } = parseArgs({
    args: rest,
    options: {
      out: { type: 'string' },
      node: { type: 'string', multiple: true },
      client: { type: 'string', multiple: true },
      days: { type: 'string' },
    },
    strict: true,
  });
  const out = values.out;
  const nodes = values.node ?? [];
  if (!out || nodes.length === 0)
    throw new UsageError(
      'cluster certs needs --out DIR and --node NAME[=ADDR,ADDR...] (one per node)',
    );
  const days = values.days ?? '365';
  if (!/^[1-9]\d{0,4}$/.test(days)) throw new UsageError('--days takes a whole number of days');
  await fs.promises.mkdir(out, { recursive: true, mode: 0o700 });
  const file = (name: string) => path.join(out, name);
  if (fs.existsSync(file('ca.pem')))
    throw new UsageError(`${file('ca.pem')} exists: give another --out, or remove it first`);
  await openssl([
    'req',
    '-x509',
    ...NEW_EC_KEY,
    '-keyout',
    file('ca.key'),
    '-out',
    file('ca.pem'),
    '-days',
    days,
    '-subj',
    '/O=corral/CN=corral cluster CA',
    '-addext',
    'basicConstraints=critical,CA:TRUE',
    '-addext',
    'keyUsage=critical,keyCertSign,cRLSign',
  ]);
  const issue = async (name: string, ou: 'node' | 'client', addresses: string[]) => {
    if (!/^[a-zA-Z0-9][a-zA-Z0-9.-]{0,62}$/.test(name))
      throw new UsageError(`certificate name "${name}": letters, digits, dots and dashes`);
    const san = [`DNS:${name}`, ...addresses.map((a) => (net.isIP(a) ? `IP:${a}` : `DNS:${a}`))];
    await fs.promises.writeFile(
      file(`${name}.ext`),
      [
        'basicConstraints=CA:FALSE',
        'keyUsage=critical,digitalSignature,keyEncipherment',
        'extendedKeyUsage=serverAuth,clientAuth',
        `subjectAltName=${san.join(',')}`,
      ].join('\n'),
    );
    await openssl([
      'req',
      ...NEW_EC_KEY,
      '-keyout',
      file(`${name}.key`),
      '-out',
      file(`${name}.csr`),
      '-subj',
      `/O=corral/OU=${ou}/CN=${name}`,
    ]);
    await openssl([
      'x509',
      '-req',
      '-in',
      file(`${name}.csr`),
      '-CA',
      file('ca.pem'),
      '-CAkey',
      file('ca.key'),
      '-CAcreateserial',
      '-out',
      file(`${name}.pem`),
      '-days',
      days,
      '-extfile',
      file(`${name}.ext`),
    ]);
    await fs.promises.rm(file(`${name}.csr`));
    await fs.promises.rm(file(`${name}.ext`));
    await fs.promises.chmod(file(`${name}.key`), 0o600);
  };
  for (const spec of nodes) {
    const [name, addresses] = spec.split('=');
    await issue(
      name!,
      'node',
      (addresses ?? '').split(',').filter((a) => a !== ''),
    );
  }
  for (const name of values.client ?? []) await issue(name, 'client', []);
  await fs.promises.chmod(file('ca.key'), 0o600);
  console.log(
    `Wrote ${file('ca.pem')} and a certificate and key per node and client into ${out}.\n` +
      `Start each node with --tls-cert ${file('NODE.pem')} --tls-key ${file('NODE.key')} --tls-ca ${file('ca.pem')};\n` +
      `the CLI trusts the CA with NODE_EXTRA_CA_CERTS=${file('ca.pem')}. Keep ca.key offline.`,
  );
}
