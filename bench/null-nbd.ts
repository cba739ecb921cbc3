/**
 * The NBD layer alone over a device that stores nothing (or, with a file
 * argument, does nothing but pwrite): the ceiling of our socket path.
 * `node --import tsx bench/null-nbd.ts PORT [FILE]`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdServer } from '../nbd/server.ts';
import type { BlockDevice } from '../replication/block-device.ts';
import { pwriteFull, syncWrites } from '../replication/file-io.ts';

const port = Number(process.argv[2] ?? 10897);
const file = process.argv[3];
const fd = file ? fs.openSync(file, 'r+') : undefined;
const gate = syncWrites.for(path.dirname(file ?? '.'));
const size = 1024 ** 3;
const device: BlockDevice = {
  sizeBytes: size,
  capabilities: () => ({
    readOnly: false,
    flush: true,
    fua: true,
    trim: true,
    zero: true,
    extents: false,
    multiConn: true,
  }),
  read: (_o, length, into) => Promise.resolve(into ?? new Uint8Array(length)),
  write: (offset, data) =>
    fd === undefined ? Promise.resolve() : pwriteFull(fd, data, offset, gate),
  flush: () => Promise.resolve(),
  trim: () => Promise.resolve(),
  zero: () => Promise.resolve(),
  extents: (_o, length) => Promise.resolve([{ lengthBytes: length, hole: false, zero: false }]),
};
const server = new NbdServer({
  exports: { names: () => ['null'], lookup: (n) => (n === 'null' ? device : undefined) },
  log: console,
});
await server.listenTcp('127.0.0.1', port);
console.error(`null NBD on ${port}`);
