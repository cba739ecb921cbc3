import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { mustRun } from './run.ts';

/** `openssl req` arguments for a new P-256 key, unencrypted (the file is 0600). */
const NEW_EC_KEY = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];

/** A certificate and its key, as files. */
export interface CertFiles {
  cert: string;
  key: string;
}

/**
 * A test CA made with openssl, and certificates it signs. `clientDir` lays a
 * client's files out as libnbd and qemu read them (ca-cert.pem,
 * client-cert.pem, client-key.pem).
 */
export class TestCa {
  readonly dir: string;
  readonly ca: CertFiles;

  private constructor(dir: string, ca: CertFiles) {
    this.dir = dir;
    this.ca = ca;
  }

  static async create(name = 'corral-test-ca'): Promise<TestCa> {
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-certs-'));
    const ca = { cert: path.join(dir, 'ca.pem'), key: path.join(dir, 'ca.key') };
    await mustRun('openssl', [
      'req',
      '-x509',
      ...NEW_EC_KEY,
      '-keyout',
      ca.key,
      '-out',
      ca.cert,
      '-days',
      '2',
      '-subj',
      `/O=corral-test/CN=${name}`,
      '-addext',
      'basicConstraints=critical,CA:TRUE',
      '-addext',
      'keyUsage=critical,keyCertSign,cRLSign',
    ]);
    return new TestCa(dir, ca);
  }

  /**
   * A certificate for `cn` signed by this CA: `subject` extra fields such as
   * `OU=node`; `ips`/`dns` become subject alternative names.
   */
  async issue(
    file: string,
    cn: string,
    options: { ou?: string; ips?: string[]; dns?: string[]; days?: number } = {},
  ): Promise<CertFiles> {
    const out = {
      cert: path.join(this.dir, `${file}.pem`),
      key: path.join(this.dir, `${file}.key`),
    };
    const csr = path.join(this.dir, `${file}.csr`);
    const ext = path.join(this.dir, `${file}.ext`);
    const san = [
      ...(options.ips ?? []).map((ip) => `IP:${ip}`),
      ...(options.dns ?? []).map((d) => `DNS:${d}`),
    ];
    await fs.promises.writeFile(
      ext,
      [
        'basicConstraints=CA:FALSE',
        'keyUsage=critical,digitalSignature,keyEncipherment',
        'extendedKeyUsage=serverAuth,clientAuth',
        ...(san.length > 0 ? [`subjectAltName=${san.join(',')}`] : []),
      ].join('\n'),
    );
    await mustRun('openssl', [
      'req',
      ...NEW_EC_KEY,
      '-keyout',
      out.key,
      '-out',
      csr,
      '-subj',
      `/O=corral-test${options.ou !== undefined ? `/OU=${options.ou}` : ''}/CN=${cn}`,
    ]);
    await mustRun('openssl', [
      'x509',
      '-req',
      '-in',
      csr,
      '-CA',
      this.ca.cert,
      '-CAkey',
      this.ca.key,
      '-CAcreateserial',
      '-out',
      out.cert,
      '-days',
      String(options.days ?? 2),
      '-extfile',
      ext,
    ]);
    await fs.promises.chmod(out.key, 0o600);
    return out;
  }

  /** A directory as libnbd's `tls-certificates=` and qemu's `tls-creds-x509` read it. */
  async clientDir(name: string, client?: CertFiles): Promise<string> {
    const dir = path.join(this.dir, `client-${name}`);
    await fs.promises.mkdir(dir, { recursive: true });
    await fs.promises.copyFile(this.ca.cert, path.join(dir, 'ca-cert.pem'));
    if (client) {
      await fs.promises.copyFile(client.cert, path.join(dir, 'client-cert.pem'));
      await fs.promises.copyFile(client.key, path.join(dir, 'client-key.pem'));
    }
    return dir;
  }

  async cleanup(): Promise<void> {
    await fs.promises.rm(this.dir, { recursive: true, force: true });
  }
}
