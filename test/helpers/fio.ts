import { run, type RunResult } from './run.ts';

/**
 * fio writing random 4 KiB blocks to an NBD export and checking each with
 * crc32c (`verify_fatal`): the well-behaved client that must see nothing
 * while a test does something hostile beside it.
 */
export function verifyingFio(uri: string, size: string): Promise<RunResult> {
  return run(
    'fio',
    [
      '--name=steady',
      '--ioengine=nbd',
      `--uri=${uri}`,
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=8',
      `--size=${size}`,
      '--verify=crc32c',
      '--do_verify=1',
      '--verify_fatal=1',
    ],
    { timeoutMs: 300_000 },
  );
}
