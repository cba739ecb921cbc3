import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { CorralError, ioError, systemErrorCode } from '../common/errors.ts';
import type { BackupTarget } from './target.ts';

const TMP_MARK = '.tmp-';

/** The real path of `p`, or of its nearest existing ancestor with the rest appended. */
async function realpathOfNearest(p: string): Promise<string> {
  const rest: string[] = [];
  let at = p;
  for (;;) {
    try {
      return path.join(await fs.promises.realpath(at), ...rest.reverse());
    } catch (err) {
      const parent = path.dirname(at);
      if (systemErrorCode(err) !== 'ENOENT' || parent === at)
        throw ioError(`Cannot resolve ${p}`, err);
      rest.push(path.basename(at));
      at = parent;
    }
  }
}

/**
 * A backupstore in a directory (local disk or an NFS mount). A put writes a
 * temporary file, fsyncs it and renames it over the name, so a name always
 * holds a whole object; `sync` then fsyncs the directories that got new names.
 */
export class FileTarget implements BackupTarget {
  readonly url: string;
  readonly #root: string;
  readonly #dirsToSync = new Set<string>();
  readonly #madeDirs = new Set<string>();

  private constructor(url: string, root: string) {
    this.url = url;
    this.#root = root;
  }

  /** Opens a directory below one of `roots`; nothing is created until the first write. */
  static async open(url: URL, roots: readonly string[]): Promise<FileTarget> {
    if (url.host !== '' && url.host !== 'localhost') {
      throw new CorralError(
        'INVALID_ARGUMENT',
        `Backup target ${url.href}: a file URL names a local path (file:///srv/backups); mount NFS and give its path`,
      );
    }
    const root = path.resolve(decodeURIComponent(url.pathname));
    const real = await realpathOfNearest(root);
    const allowed = await Promise.all(roots.map((r) => realpathOfNearest(path.resolve(r))));
    if (!allowed.some((r) => real === r || real.startsWith(r.endsWith('/') ? r : r + '/')))
      throw new CorralError(
        'INVALID_ARGUMENT',
        `Backup target ${url.href} lies outside the daemon's backup roots (${roots.join(', ')}): start it with --backup-root to allow another directory`,
      );
    return new FileTarget(`file://${root}`, root);
  }

  #path(key: string): string {
    if (key.split('/').some((part) => part === '..' || part === '')) {
      throw new CorralError('INVALID_ARGUMENT', `Invalid backupstore key ${key}`);
    }
    return path.join(this.#root, key);
  }

  async get(key: string): Promise<Buffer | undefined> {
    try {
      return await fs.promises.readFile(this.#path(key));
    } catch (err) {
      if (systemErrorCode(err) === 'ENOENT') return undefined;
      throw ioError(`Cannot read ${key} from ${this.url}`, err);
    }
  }

  async put(key: string, data: Uint8Array | readonly Uint8Array[]): Promise<void> {
    const file = this.#path(key);
    const dir = path.dirname(file);
    const tmp = `${file}${TMP_MARK}${randomBytes(4).toString('hex')}`;
    try {
      if (!this.#madeDirs.has(dir)) {
        await fs.promises.mkdir(dir, { recursive: true });
        this.#madeDirs.add(dir);
      }
      const handle = await fs.promises.open(tmp, 'w');
      try {
        const chunks = data instanceof Uint8Array ? [data] : data;
        const total = chunks.reduce((n, c) => n + c.length, 0);
        let written = 0;
        while (written < total) {
          // writev may write less than asked: go on from where it stopped.
          let skip = written;
          const rest: Uint8Array[] = [];
          for (const c of chunks) {
            if (skip >= c.length) skip -= c.length;
            else {
              rest.push(skip > 0 ? c.subarray(skip) : c);
              skip = 0;
            }
          }
          const { bytesWritten } = await handle.writev(rest);
          written += bytesWritten;
        }
        await handle.datasync();
      } finally {
        await handle.close();
      }
      await fs.promises.rename(tmp, file);
      this.#dirsToSync.add(dir);
    } catch (err) {
      await fs.promises.rm(tmp, { force: true }).catch(() => undefined);
      throw ioError(`Cannot write ${key} to ${this.url}`, err);
    }
  }

  async exists(key: string): Promise<boolean> {
    try {
      await fs.promises.access(this.#path(key));
      return true;
    } catch {
      return false;
    }
  }

  async list(prefix: string): Promise<string[]> {
    const out: string[] = [];
    const walk = async (rel: string): Promise<void> => {
      let entries: fs.Dirent[];
      try {
        entries = await fs.promises.readdir(path.join(this.#root, rel), { withFileTypes: true });
      } catch (err) {
        if (systemErrorCode(err) === 'ENOENT') return;
        throw ioError(`Cannot list ${rel} in ${this.url}`, err);
      }
      for (const e of entries) {
        const key = rel === '' ? e.name : `${rel}/${e.name}`;
        if (e.isDirectory()) await walk(key);
        else out.push(key);
      }
    };
    await walk(prefix.replace(/\/+$/, ''));
    return out;
  }

  async delete(key: string): Promise<void> {
    try {
      await fs.promises.rm(this.#path(key), { force: true });
    } catch (err) {
      throw ioError(`Cannot delete ${key} from ${this.url}`, err);
    }
    this.#dirsToSync.add(path.dirname(this.#path(key)));
  }

  async sync(): Promise<void> {
    const dirs = [...this.#dirsToSync];
    this.#dirsToSync.clear();
    await Promise.all(
      dirs.map(async (dir) => {
        let handle: fs.promises.FileHandle | undefined;
        try {
          handle = await fs.promises.open(dir, 'r');
          await handle.sync();
        } catch (err) {
          if (systemErrorCode(err) !== 'ENOENT')
            throw ioError(`Cannot sync ${dir} in ${this.url}`, err);
        } finally {
          await handle?.close();
        }
      }),
    );
  }
}
