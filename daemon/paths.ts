import * as os from 'node:os';
import * as path from 'node:path';

/** The host's admin token, in the data dir (0600): the CLI on this host finds it there. */
export const ADMIN_TOKEN_FILE = 'admin.token';

/** `CORRAL_DATA_DIR`, else /var/lib/corral for root and ~/.local/share/corral for others. */
export function defaultDataDir(): string {
  if (process.env.CORRAL_DATA_DIR) return process.env.CORRAL_DATA_DIR;
  const uid = typeof process.getuid === 'function' ? process.getuid() : -1;
  return uid === 0 ? '/var/lib/corral' : path.join(os.homedir(), '.local', 'share', 'corral');
}
