import * as fs from 'node:fs';
import * as path from 'node:path';
import { CorralError } from '../common/errors.ts';

/**
 * Reads a file that holds a secret (a private key, a PSK, a cluster secret,
 * a token). One that others can read is refused, as ssh refuses such keys:
 * the secret may already be known to them, and saying so beats serving with it.
 */
export async function readSecretFile(file: string, what: string): Promise<Buffer> {
  let st: fs.Stats;
  try {
    st = await fs.promises.stat(file);
  } catch (err) {
    throw new CorralError(
      'INVALID_ARGUMENT',
      `Cannot read ${what} ${file}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`,
    );
  }
  const loose = openToOthers(what, file, st.mode);
  if (loose !== undefined) throw new CorralError('INVALID_ARGUMENT', loose);
  return fs.promises.readFile(file);
}

/** Why a secret file with this mode is refused (group or others may read it), or undefined. */
export function openToOthers(what: string, file: string, mode: number): string | undefined {
  return (mode & 0o077) !== 0
    ? `${what} ${file} can be read by others (mode ${(mode & 0o777).toString(8)}): chmod 600 ${file}`
    : undefined;
}

/** Writes a secret to a file only its owner can read, whole or not at all. */
export async function writeSecretFile(file: string, content: string): Promise<void> {
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  const handle = await fs.promises.open(tmp, 'w', 0o600);
  try {
    await handle.writeFile(content);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await fs.promises.rename(tmp, file);
}
