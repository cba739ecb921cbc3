import type { Socket } from 'node:net';
import { MAX_REQUEST_BYTES, BLOCK_SIZE, type BlockDevice } from '../replication/block-device.ts';
import type { ByteQueue } from './byte-queue.ts';
import * as P from './protocol.ts';

/** What the server serves; the daemon answers with its attached volumes. */
export interface ExportProvider {
  names(): string[];
  lookup(name: string): BlockDevice | undefined;
  /**
   * Whether a client may open an export: `identity` is its TLS identity (a
   * certificate's CN or a PSK user), undefined without TLS. Absent: all may.
   */
  permits?(name: string, identity: string | undefined): boolean;
}

export interface Negotiated {
  name: string;
  device: BlockDevice;
  structured: boolean;
  /** base:allocation was selected for this export. */
  metaContext: boolean;
}

/** The connection being negotiated: STARTTLS replaces both with their TLS counterparts. */
export interface Channel {
  socket: Socket;
  queue: ByteQueue;
}

/** The server's TLS: offered (`on`) or required (`require`); `upgrade` runs the TLS handshake. */
export interface NegotiationTls {
  mode: 'on' | 'require';
  /** Wraps the channel in TLS; resolves with the client's identity, if it proved one. */
  upgrade(channel: Channel): Promise<{ identity: string | undefined }>;
}

export class ProtocolError extends Error {
  override name = 'ProtocolError';
}

/** Option payloads larger than this are refused; larger than the hard limit end the connection. */
const MAX_OPTION_BYTES = 64 * 1024;
const HARD_OPTION_LIMIT_BYTES = 16 * 1024 * 1024;
const MAX_META_QUERIES = 128;
const MAX_OPTIONS = 1000;

const encoder = new TextEncoder();

function u32(n: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(n);
  return b;
}

function str(s: string): Buffer {
  const bytes = Buffer.from(encoder.encode(s));
  return Buffer.concat([u32(bytes.length), bytes]);
}

export function transmissionFlags(device: BlockDevice, structured: boolean): number {
  const caps = device.capabilities();
  let flags = P.TF_HAS_FLAGS | P.TF_SEND_CACHE;
  if (caps.readOnly) flags |= P.TF_READ_ONLY;
  if (caps.flush) flags |= P.TF_SEND_FLUSH;
  if (caps.fua) flags |= P.TF_SEND_FUA;
  if (caps.trim && !caps.readOnly) flags |= P.TF_SEND_TRIM;
  if (caps.zero && !caps.readOnly) flags |= P.TF_SEND_WRITE_ZEROES;
  if (caps.multiConn) flags |= P.TF_CAN_MULTI_CONN;
  // DF only means something with structured replies.
  if (structured) flags |= P.TF_SEND_DF;
  return flags;
}

/**
 * Fixed newstyle negotiation. Resolves with the export chosen by GO or
 * EXPORT_NAME, or undefined when the client aborted; throws ProtocolError
 * when the client breaks the protocol (the caller closes the connection).
 */
export async function negotiate(
  channel: Channel,
  exports: ExportProvider,
  tls?: NegotiationTls,
): Promise<Negotiated | undefined> {
  let { socket, queue } = channel;
  const greeting = Buffer.allocUnsafe(18);
  greeting.writeBigUInt64BE(P.NBDMAGIC, 0);
  greeting.writeBigUInt64BE(P.IHAVEOPT, 8);
  greeting.writeUInt16BE(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES, 16);
  socket.write(greeting);

  const clientFlags = (await queue.read(4)).readUInt32BE(0);
  if ((clientFlags & ~(P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES)) !== 0) {
    throw new ProtocolError(`unknown client flags 0x${clientFlags.toString(16)}`);
  }
  const noZeroes = (clientFlags & P.CLIENT_FLAG_NO_ZEROES) !== 0;

  // Negotiation state: all of it is forgotten at STARTTLS (what was said in the clear is not
  // trusted after it: the class of CVE-2021-3716).
  let structured = false;
  let metaExport: string | undefined;
  let metaSelected = false;
  let secure = false;
  let identity: string | undefined;
  const refused = (name: string): string | undefined =>
    exports.permits && !exports.permits(name, identity)
      ? `export "${name}" is open only to the TLS identities on its allow list${identity === undefined ? ' (this client has none)' : ''}`
      : undefined;

  const reply = (option: number, type: number, data: Buffer = Buffer.alloc(0)): void => {
    const header = Buffer.allocUnsafe(20);
    header.writeBigUInt64BE(P.OPTION_REPLY_MAGIC, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(type, 12);
    header.writeUInt32BE(data.length, 16);
    socket.write(Buffer.concat([header, data]));
  };
  const error = (option: number, type: number, message: string): void =>
    reply(option, type, Buffer.from(message));

  for (let count = 0; ; count++) {
    const header = await queue.read(16);
    if (header.readBigUInt64BE(0) !== P.IHAVEOPT) throw new ProtocolError('bad option magic');
    const option = header.readUInt32BE(8);
    const length = header.readUInt32BE(12);
    if (count >= MAX_OPTIONS) throw new ProtocolError('too many options');
    if (length > HARD_OPTION_LIMIT_BYTES)
      throw new ProtocolError(`option ${option} of ${length} bytes`);
    if (length > MAX_OPTION_BYTES) {
      await queue.skip(length);
      error(
        option,
        P.REP_ERR_TOO_BIG,
        `option data of ${length} bytes is over the limit of ${MAX_OPTION_BYTES}`,
      );
      continue;
    }
    const data = length > 0 ? Buffer.from(await queue.read(length)) : Buffer.alloc(0);

    if (tls?.mode === 'require' && !secure && option !== P.OPT_STARTTLS && option !== P.OPT_ABORT) {
      // EXPORT_NAME has no error reply: the spec says close.
      if (option === P.OPT_EXPORT_NAME) throw new ProtocolError('TLS is required (EXPORT_NAME)');
      error(option, P.REP_ERR_TLS_REQD, 'this server requires TLS: use NBD_OPT_STARTTLS');
      continue;
    }

    switch (option) {
      case P.OPT_EXPORT_NAME: {
        const name = data.toString('utf8');
        const device = exports.lookup(name);
        // No way to say "unknown" here: the protocol says close.
        if (!device) throw new ProtocolError(`unknown export "${name}"`);
        const no = refused(name);
        if (no !== undefined) throw new ProtocolError(no);
        const out = Buffer.alloc(noZeroes ? 10 : 134);
        out.writeBigUInt64BE(BigInt(device.sizeBytes), 0);
        out.writeUInt16BE(transmissionFlags(device, structured), 8);
        socket.write(out);
        return { name, device, structured, metaContext: metaSelected && metaExport === name };
      }
      case P.OPT_ABORT:
        reply(option, P.REP_ACK);
        return undefined;
      case P.OPT_LIST: {
        if (length !== 0) {
          error(option, P.REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
          break;
        }
        for (const name of exports.names())
          if (refused(name) === undefined) reply(option, P.REP_SERVER, str(name));
        reply(option, P.REP_ACK);
        break;
      }
      case P.OPT_STRUCTURED_REPLY:
        if (length !== 0) {
          error(option, P.REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
          break;
        }
        structured = true;
        reply(option, P.REP_ACK);
        break;
      case P.OPT_INFO:
      case P.OPT_GO: {
        const parsed = parseInfoRequest(data);
        if (!parsed) {
          error(option, P.REP_ERR_INVALID, 'malformed NBD_OPT_INFO/GO data');
          break;
        }
        const device = exports.lookup(parsed.name);
        if (!device) {
          error(option, P.REP_ERR_UNKNOWN, `no export named "${parsed.name}"`);
          break;
        }
        const no = refused(parsed.name);
        if (no !== undefined) {
          error(option, P.REP_ERR_POLICY, no);
          break;
        }
        const info = Buffer.allocUnsafe(12);
        info.writeUInt16BE(P.INFO_EXPORT, 0);
        info.writeBigUInt64BE(BigInt(device.sizeBytes), 2);
        info.writeUInt16BE(transmissionFlags(device, structured), 10);
        reply(option, P.REP_INFO, info);
        const sizes = Buffer.allocUnsafe(14);
        sizes.writeUInt16BE(P.INFO_BLOCK_SIZE, 0);
        sizes.writeUInt32BE(1, 2);
        sizes.writeUInt32BE(BLOCK_SIZE, 6);
        sizes.writeUInt32BE(MAX_REQUEST_BYTES, 10);
        reply(option, P.REP_INFO, sizes);
        if (parsed.requests.includes(P.INFO_NAME)) {
          const nameBytes = Buffer.from(parsed.name);
          const nameInfo = Buffer.allocUnsafe(2);
          nameInfo.writeUInt16BE(P.INFO_NAME, 0);
          reply(option, P.REP_INFO, Buffer.concat([nameInfo, nameBytes]));
        }
        reply(option, P.REP_ACK);
        if (option === P.OPT_GO) {
          return {
            name: parsed.name,
            device,
            structured,
            metaContext: metaSelected && metaExport === parsed.name,
          };
        }
        break;
      }
      case P.OPT_LIST_META_CONTEXT:
      case P.OPT_SET_META_CONTEXT: {
        const set = option === P.OPT_SET_META_CONTEXT;
        if (set) {
          // Replaces the selection even when it fails.
          metaSelected = false;
          metaExport = undefined;
        }
        if (!structured) {
          error(option, P.REP_ERR_INVALID, 'negotiate structured replies first');
          break;
        }
        const parsed = parseMetaRequest(data);
        if (parsed === 'too-big') {
          error(option, P.REP_ERR_TOO_BIG, `more than ${MAX_META_QUERIES} queries`);
          break;
        }
        if (!parsed) {
          error(option, P.REP_ERR_INVALID, 'malformed meta context request');
          break;
        }
        if (!exports.lookup(parsed.name)) {
          error(option, P.REP_ERR_UNKNOWN, `no export named "${parsed.name}"`);
          break;
        }
        const matches = set
          ? parsed.queries.some((q) => q === P.BASE_ALLOCATION)
          : parsed.queries.length === 0 ||
            parsed.queries.some((q) => q === 'base:' || q === P.BASE_ALLOCATION);
        if (matches) {
          reply(
            option,
            P.REP_META_CONTEXT,
            Buffer.concat([u32(set ? P.BASE_ALLOCATION_ID : 0), Buffer.from(P.BASE_ALLOCATION)]),
          );
        }
        if (set) {
          metaSelected = matches;
          metaExport = parsed.name;
        }
        reply(option, P.REP_ACK);
        break;
      }
      case P.OPT_STARTTLS: {
        if (!tls) {
          error(option, P.REP_ERR_UNSUP, 'TLS is not offered by this server (--nbd-tls)');
          break;
        }
        if (secure) {
          error(option, P.REP_ERR_INVALID, 'TLS is already on');
          break;
        }
        if (length !== 0) {
          error(option, P.REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
          break;
        }
        // Bytes sent after STARTTLS but before the TLS handshake would be plaintext taken as
        // if it came through TLS (an injection): a client that sends any is cut off.
        if (queue.buffered > 0) throw new ProtocolError('data after NBD_OPT_STARTTLS');
        reply(option, P.REP_ACK);
        identity = (await tls.upgrade(channel)).identity;
        ({ socket, queue } = channel);
        secure = true;
        structured = false;
        metaExport = undefined;
        metaSelected = false;
        break;
      }
      default:
        error(option, P.REP_ERR_UNSUP, `option ${option} is not supported`);
    }
  }
}

function parseInfoRequest(data: Buffer): { name: string; requests: number[] } | undefined {
  if (data.length < 6) return undefined;
  const nameLength = data.readUInt32BE(0);
  if (4 + nameLength + 2 > data.length) return undefined;
  const name = data.toString('utf8', 4, 4 + nameLength);
  const count = data.readUInt16BE(4 + nameLength);
  if (4 + nameLength + 2 + 2 * count !== data.length) return undefined;
  const requests: number[] = [];
  for (let i = 0; i < count; i++) requests.push(data.readUInt16BE(4 + nameLength + 2 + 2 * i));
  return { name, requests };
}

function parseMetaRequest(
  data: Buffer,
): { name: string; queries: string[] } | 'too-big' | undefined {
  if (data.length < 8) return undefined;
  const nameLength = data.readUInt32BE(0);
  if (4 + nameLength + 4 > data.length) return undefined;
  const name = data.toString('utf8', 4, 4 + nameLength);
  let at = 4 + nameLength;
  const count = data.readUInt32BE(at);
  at += 4;
  if (count > MAX_META_QUERIES) return 'too-big';
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) return undefined;
    const len = data.readUInt32BE(at);
    at += 4;
    if (at + len > data.length) return undefined;
    queries.push(data.toString('utf8', at, at + len));
    at += len;
  }
  if (at !== data.length) return undefined;
  return { name, queries };
}
