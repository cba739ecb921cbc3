import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { mustRun, run } from '../test/helpers/run.ts';

const ORDER = '/sys/module/page_reporting/parameters/page_reporting_order';
/** Above the buddy allocator's largest block (order 10 on x86-64): no free block is reported. */
const NOTHING = '11';

/**
 * On a VM with free page reporting (virtio-balloon; this machine reports every
 * free 2 MiB block at once), memory the guest frees goes back to the host, and
 * the next write into a page-cache page that lands on it stops while the host
 * faults it in: timed inside the server's `pwrite` copy, that is 40 % to
 * three quarters of a write's CPU on some runs and none on others, depending on
 * which pages a process happens to get after each job's drop_caches. So for its
 * run the bench stops the reporting and touches most of the free memory once
 * (a tmpfs written full and removed), giving every server the same, host-backed
 * memory, as on a machine of its own. The setting is put back when the
 * process exits or is interrupted.
 */
export async function holdFreedMemory(): Promise<void> {
  let before: string;
  try {
    before = fs.readFileSync(ORDER, 'utf8').trim();
    fs.writeFileSync(ORDER, NOTHING);
  } catch {
    return; // not such a VM, or not root: nothing to hold
  }
  console.error(
    `bench: free page reporting off for the run (page_reporting_order ${before} → ${NOTHING})`,
  );
  const restore = () => {
    try {
      fs.writeFileSync(ORDER, before);
    } catch {
      // already gone with the machine's shutdown
    }
  };
  process.once('exit', restore);
  for (const signal of ['SIGINT', 'SIGTERM'] as const)
    process.once(signal, () => {
      restore();
      process.kill(process.pid, signal); // the default action, now that this listener is gone
    });
  const mnt = fs.mkdtempSync(path.join(os.tmpdir(), 'corral-bench-warm-'));
  const bytes = Math.floor(os.freemem() * 0.8);
  try {
    await mustRun('mount', ['-t', 'tmpfs', '-o', `size=${bytes}`, 'tmpfs', mnt]);
    // Written, not fallocated: tmpfs leaves a fallocated page unwritten until first used.
    await mustRun(
      'dd',
      [
        'if=/dev/zero',
        `of=${path.join(mnt, 'touch')}`,
        'bs=1M',
        `count=${Math.floor(bytes / 2 ** 20) - 64}`,
      ],
      { timeoutMs: 600_000 },
    );
  } finally {
    await run('umount', [mnt]);
    fs.rmSync(mnt, { recursive: true, force: true });
  }
}
