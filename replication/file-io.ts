import * as fs from 'node:fs';

/*
 * Callback fs wrapped by hand: the FileHandle promise API costs noticeably
 * more per call, and the block path makes tens of thousands of calls a second.
 */

/**
 * Requests up to this size are done synchronously on the event loop. A small
 * pread or pwrite that hits the page cache takes a few microseconds; sending
 * it to libuv's thread pool costs a queue, a thread wake-up and a completion
 * wake-up, which on two cores cut 4 KiB random I/O by more than half
 * (docs/PERFORMANCE.md). The price: a read that misses the page cache stalls
 * the loop for one disk access. 0 turns it off. 128 KiB was chosen when
 * FUSE requests stopped at 128 KiB (libfuse2): going synchronous there took
 * a loop device's 1M reads from ~820 to ~1100 MiB/s.
 */
export const SYNC_IO_MAX_BYTES = Number(process.env.CORRAL_SYNC_IO_MAX_BYTES ?? 128 * 1024);

export function pread(
  fd: number,
  buf: Uint8Array,
  bufOffset: number,
  length: number,
  position: number,
): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, bufOffset, length, position, (err, bytesRead) =>
      err ? reject(err) : resolve(bytesRead),
    );
  });
}

/** Reads exactly `length` bytes; a file shorter than that reads as zeros past its end. */
export async function preadFull(
  fd: number,
  buf: Uint8Array,
  bufOffset: number,
  length: number,
  position: number,
): Promise<void> {
  let done = 0;
  if (length <= SYNC_IO_MAX_BYTES) {
    while (done < length) {
      const n = fs.readSync(fd, buf, bufOffset + done, length - done, position + done);
      if (n === 0) {
        buf.fill(0, bufOffset + done, bufOffset + length);
        return;
      }
      done += n;
    }
    return;
  }
  while (done < length) {
    const n = await pread(fd, buf, bufOffset + done, length - done, position + done);
    if (n === 0) {
      buf.fill(0, bufOffset + done, bufOffset + length);
      return;
    }
    done += n;
  }
}

export async function pwriteFull(fd: number, buf: Uint8Array, position: number): Promise<void> {
  let done = 0;
  if (buf.length <= SYNC_IO_MAX_BYTES) {
    while (done < buf.length)
      done += fs.writeSync(fd, buf, done, buf.length - done, position + done);
    return;
  }
  while (done < buf.length) {
    done += await new Promise<number>((resolve, reject) => {
      fs.write(fd, buf, done, buf.length - done, position + done, (err, written) =>
        err ? reject(err) : resolve(written),
      );
    });
  }
}

export function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) =>
    fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())),
  );
}

export function closeFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.close(fd, (err) => (err ? reject(err) : resolve())));
}

/** Makes a directory entry (a new or removed file) durable. */
export async function fsyncDir(dir: string): Promise<void> {
  const handle = await fs.promises.open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
