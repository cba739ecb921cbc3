import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { mustRun, run } from './run.ts';

/** A small filesystem of a test's own (tests run as root), mounted at `mnt`. */
export interface ScratchFs {
  mnt: string;
  /** Lazily unmounts (a daemon killed a moment ago may still hold a file) and removes it all. */
  remove(): Promise<void>;
}

async function scratch(prefix: string, mount: (dir: string, mnt: string) => Promise<void>) {
  const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), `corral-${prefix}-`));
  const mnt = path.join(dir, 'mnt');
  await fs.promises.mkdir(mnt);
  try {
    await mount(dir, mnt);
  } catch (err) {
    await fs.promises.rm(dir, { recursive: true, force: true });
    throw err;
  }
  return {
    mnt,
    async remove() {
      await run('umount', ['-l', mnt]);
      await fs.promises.rm(dir, { recursive: true, force: true });
    },
  } satisfies ScratchFs;
}

/** A tmpfs of `size` (`48m`): a disk that fills when a test wants it to. */
export function mountTmpfs(prefix: string, size: string): Promise<ScratchFs> {
  return scratch(prefix, (_, mnt) =>
    mustRun('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', mnt]).then(() => undefined),
  );
}

/** A fresh ext4 of `bytes` on a loop-mounted file: a filesystem that `fsfreeze` can stop. */
export function mountExt4(prefix: string, bytes: number): Promise<ScratchFs> {
  return scratch(prefix, async (dir, mnt) => {
    const image = path.join(dir, 'fs.img');
    await fs.promises.writeFile(image, '');
    await fs.promises.truncate(image, bytes);
    await mustRun('mkfs.ext4', ['-q', '-F', image]);
    await mustRun('mount', ['-o', 'loop', image, mnt]);
  });
}
