import { DaemonProcess } from './daemon.ts';
import { freePorts } from './run.ts';

export const CLUSTER_SECRET = 'test-cluster-secret';

/**
 * `n` real daemons on loopback that know each other (`--peer`), sharing a
 * cluster secret. Daemon i keeps its data dir and API port across restarts.
 */
export class TestCluster {
  readonly daemons: DaemonProcess[];
  readonly urls: string[];

  private constructor(daemons: DaemonProcess[], urls: string[]) {
    this.daemons = daemons;
    this.urls = urls;
  }

  /** `dataDirs[i]`, where given, is daemon i's data dir (prepared by the test). */
  static async start(
    n: number,
    args: string[] = [],
    dataDirs: (string | undefined)[] = [],
  ): Promise<TestCluster> {
    // Chosen together: ports picked one after another can repeat (each is free once closed).
    const ports = await freePorts(n);
    const urls = ports.map((p) => `http://127.0.0.1:${p}`);
    const started = await Promise.allSettled(
      ports.map((port, i) =>
        DaemonProcess.start({
          ...(dataDirs[i] !== undefined ? { dataDir: dataDirs[i] } : {}),
          args: [
            '--listen',
            `127.0.0.1:${port}`,
            ...urls.filter((_, j) => j !== i).flatMap((u) => ['--peer', u]),
            ...args,
          ],
          env: { CORRAL_CLUSTER_SECRET: CLUSTER_SECRET },
        }),
      ),
    );
    const daemons = started.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
    const failed = started.find((r) => r.status === 'rejected');
    if (failed) {
      // The others stopped: left running, they kept the test's process alive after it failed.
      for (const d of daemons) await d.stop('SIGKILL');
      throw failed.reason;
    }
    return new TestCluster(daemons, urls);
  }

  /** Starts daemon i again on its data dir and port (after a kill). */
  async restart(i: number): Promise<DaemonProcess> {
    const d = await this.daemons[i]!.restart();
    this.daemons[i] = d;
    return d;
  }

  async cleanup(): Promise<void> {
    for (const d of this.daemons) await d.cleanup();
  }
}
