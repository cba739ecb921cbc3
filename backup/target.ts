/**
 * Where a backupstore lives. Keys are `/`-separated paths below the store's
 * root; every `put` is atomic (a reader sees the whole object or none), so a
 * job cut off half way never leaves a torn file behind a name.
 */
export interface BackupTarget {
  /** The URL it was opened from, without credentials. */
  readonly url: string;
  /** The object's bytes, or undefined when there is none. */
  get(key: string): Promise<Buffer | undefined>;
  /** Writes the object; several chunks are written one after another (no copy into one buffer). */
  put(key: string, data: Uint8Array | readonly Uint8Array[]): Promise<void>;
  exists(key: string): Promise<boolean>;
  /** Keys below `prefix` (recursively), in no particular order. */
  list(prefix: string): Promise<string[]>;
  /** Removing an absent key is not an error. */
  delete(key: string): Promise<void>;
  /** Makes every `put` so far durable (a file target syncs; S3 acknowledges durably). */
  sync(): Promise<void>;
}

/** What a daemon lets a target be: a way to its data must not be a way out of its host. */
export interface TargetPolicy {
  /** `file://` targets must lie below one of these directories (symbolic links followed). */
  fileRoots: readonly string[];
  /**
   * Let the AWS SDK look for credentials its own way (profiles, the cloud's
   * metadata service) when AWS_ACCESS_KEY_ID is not set. Off by default: a
   * target naming any endpoint would otherwise make the daemon fetch and send
   * the host's cloud credentials.
   */
  s3CredentialChain: boolean;
}

/**
 * A filter for crash tests (nbdkit's delay filter): every operation waits
 * `ms` first, so that a test can SIGKILL a job in the middle. Used only
 * with CORRAL_FAULT_INJECTION=1 and CORRAL_BACKUP_DELAY_MS.
 */
export function delayed(target: BackupTarget, ms: number): BackupTarget {
  const wait = (): Promise<void> => new Promise((r) => setTimeout(r, ms));
  return {
    url: target.url,
    get: async (key) => (await wait(), target.get(key)),
    put: async (key, data) => (await wait(), target.put(key, data)),
    exists: async (key) => (await wait(), target.exists(key)),
    list: async (prefix) => (await wait(), target.list(prefix)),
    delete: async (key) => (await wait(), target.delete(key)),
    sync: () => target.sync(),
  };
}
