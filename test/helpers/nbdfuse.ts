import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { mustRun, run, waitFor } from './run.ts';

/**
 * How a host whose kernel has no nbd module attaches an export: nbdfuse
 * shows it as a file, losetup makes that file a block device.
 */
export class NbdFuseLoop {
  readonly dir: string;
  readonly device: string;
  readonly #nbdfuse: ChildProcess;

  private constructor(dir: string, nbdfuse: ChildProcess, device: string) {
    this.dir = dir;
    this.#nbdfuse = nbdfuse;
    this.device = device;
  }

  static async attach(uri: string): Promise<NbdFuseLoop> {
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'corral-nbdfuse-'));
    const child = spawn('nbdfuse', [dir, uri], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const file = path.join(dir, 'nbd');
    await waitFor(`nbdfuse to show ${file} (${stderr})`, async () => {
      if (child.exitCode !== null) throw new Error(`nbdfuse exited: ${stderr}`);
      const st = await fs.promises.stat(file).catch(() => undefined);
      return st && st.size > 0 ? true : undefined;
    });
    const { stdout } = await mustRun('losetup', ['--find', '--show', '--direct-io=on', file]).catch(
      () => mustRun('losetup', ['--find', '--show', file]),
    );
    return new NbdFuseLoop(dir, child, stdout.trim());
  }

  async detach(): Promise<void> {
    await run('losetup', ['-d', this.device]);
    await run('fusermount3', ['-u', this.dir]).then((r) =>
      r.code === 0 ? r : run('fusermount', ['-u', this.dir]),
    );
    await waitFor(
      'nbdfuse to exit',
      () => (this.#nbdfuse.exitCode !== null ? true : undefined),
      20_000,
    ).catch(() => {
      this.#nbdfuse.kill('SIGKILL');
    });
    await fs.promises.rm(this.dir, { recursive: true, force: true });
  }
}
