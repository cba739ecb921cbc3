import * as fs from 'node:fs';
import * as path from 'node:path';
import { CorralError } from '../common/errors.ts';

/** One disk replicas can go to: a folder on its own filesystem, with tags to select it. */
export interface Disk {
  /** As given (`--disk PATH`), or the data dir for the default disk. */
  path: string;
  /** Where its replicas' folders go. */
  root: string;
  tags: string[];
}

/** A disk as `node ls` and the API show it. */
export interface DiskInfo {
  path: string;
  tags: string[];
  freeBytes: number;
  totalBytes: number;
  replicas: number;
  /** `failed`: its filesystem cannot be read (gone, I/O errors); `full`: under 1 % free. */
  state: 'ok' | 'full' | 'failed';
  error?: string;
}

/** `PATH[:tag=T[,T2]]`, the daemon's `--disk`. */
export function parseDisk(spec: string): { path: string; tags: string[] } {
  const [where, ...options] = spec.split(':');
  if (!where || !path.isAbsolute(where))
    throw new CorralError('INVALID_ARGUMENT', `--disk ${spec}: the path must be absolute`);
  const tags: string[] = [];
  for (const option of options) {
    const m = /^tags?=([a-z0-9][a-z0-9-]{0,31}(,[a-z0-9][a-z0-9-]{0,31})*)$/.exec(option);
    if (!m)
      throw new CorralError(
        'INVALID_ARGUMENT',
        `--disk ${spec}: options are tag=NAME[,NAME] (lower-case letters, digits, dashes)`,
      );
    tags.push(...m[1]!.split(','));
  }
  return { path: path.resolve(where), tags };
}

/**
 * The disks of this host. The data dir's stays the default (untagged);
 * `--disk` adds more. A new replica goes to the disk with the most free
 * space among those with the tag asked for, avoiding disks that hold a
 * replica of the same volume already (two copies on one disk die together).
 */
export class Disks {
  readonly #disks: Disk[];

  constructor(defaultRoot: string, extra: Array<{ path: string; tags: string[] }>) {
    this.#disks = [{ path: path.dirname(defaultRoot), root: defaultRoot, tags: [] }];
    for (const d of extra) {
      if (this.#disks.some((x) => x.path === d.path))
        throw new CorralError('INVALID_ARGUMENT', `--disk ${d.path} is given twice`);
      this.#disks.push({ path: d.path, root: path.join(d.path, 'replicas'), tags: d.tags });
    }
  }

  get all(): readonly Disk[] {
    return this.#disks;
  }

  async prepare(): Promise<void> {
    for (const d of this.#disks) await fs.promises.mkdir(d.root, { recursive: true, mode: 0o700 });
  }

  async #space(d: Disk): Promise<{ free: number; total: number } | Error> {
    try {
      const s = await fs.promises.statfs(d.root);
      return { free: s.bavail * s.bsize, total: s.blocks * s.bsize };
    } catch (err) {
      return err instanceof Error ? err : new Error(String(err));
    }
  }

  /** Where a new replica of `sizeBytes` goes: see the class comment. */
  async choose(options: { tag?: string; avoid?: ReadonlySet<string> }): Promise<Disk> {
    const tagged = this.#disks.filter((d) => !options.tag || d.tags.includes(options.tag));
    if (tagged.length === 0)
      throw new CorralError(
        'INVALID_ARGUMENT',
        `No disk of this host is tagged ${options.tag}: its disks are ${this.#disks
          .map((d) => `${d.path}${d.tags.length ? ` (${d.tags.join(', ')})` : ''}`)
          .join(', ')}`,
      );
    const spaces = await Promise.all(tagged.map(async (d) => ({ d, s: await this.#space(d) })));
    const usable = spaces.flatMap(({ d, s }) => (s instanceof Error ? [] : [{ d, free: s.free }]));
    if (usable.length === 0)
      throw new CorralError(
        'NO_SPACE',
        `No disk${options.tag ? ` tagged ${options.tag}` : ''} of this host can be read`,
      );
    const fresh = usable.filter(({ d }) => !options.avoid?.has(d.root));
    const pool = fresh.length > 0 ? fresh : usable;
    return pool.reduce((best, x) => (x.free > best.free ? x : best)).d;
  }

  async info(replicasOn: (root: string) => number): Promise<DiskInfo[]> {
    return Promise.all(
      this.#disks.map(async (d) => {
        const s = await this.#space(d);
        const base = { path: d.path, tags: d.tags, replicas: replicasOn(d.root) };
        if (s instanceof Error)
          return {
            ...base,
            freeBytes: 0,
            totalBytes: 0,
            state: 'failed' as const,
            error: s.message,
          };
        return {
          ...base,
          freeBytes: s.free,
          totalBytes: s.total,
          state: s.free < s.total / 100 ? ('full' as const) : ('ok' as const),
        };
      }),
    );
  }
}
