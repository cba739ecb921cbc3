import * as fs from 'node:fs';

/** User + system CPU seconds a process has used so far (/proc/<pid>/stat). */
export function cpuSeconds(pid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** The machine's CPU time so far, by state (/proc/stat's first line, in clock ticks). */
export function machineTicks(): { busy: number; iowait: number; total: number } {
  const [user, nice, system, idle, iowait, irq, softirq, steal] = fs
    .readFileSync('/proc/stat', 'utf8')
    .split('\n')[0]!
    .trim()
    .split(/\s+/)
    .slice(1)
    .map(Number);
  const busy = user! + nice! + system! + irq! + softirq! + (steal ?? 0);
  return { busy, iowait: iowait!, total: busy + idle! + iowait! };
}

/** Busy and iowait shares of every core between two `machineTicks()`. */
export function machineShare(
  a: ReturnType<typeof machineTicks>,
  b: ReturnType<typeof machineTicks>,
): { busy: number; iowait: number } {
  const total = b.total - a.total || 1;
  return { busy: (b.busy - a.busy) / total, iowait: (b.iowait - a.iowait) / total };
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}
