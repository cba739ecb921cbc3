import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import * as fs from 'node:fs';
import { CorralError, quoted } from '../common/errors.ts';
import type { TokenRecord } from '../kv/spaces.ts';
import { writeSecretFile } from './secrets.ts';

export type Role = TokenRecord['role'];
export const ROLES: readonly Role[] = ['read-only', 'operator', 'admin'];
const RANK: Record<Role, number> = { 'read-only': 1, operator: 2, admin: 3 };

/** Who made a request: a token's holder, or another daemon of the cluster. */
export type Principal = { kind: 'token'; name: string; role: Role } | { kind: 'peer' };

/** What a route asks of its caller: nothing (health), a role, or to be a peer daemon. */
export type Access = 'none' | Role | 'peer';

/** Where token records are kept: LevelDB on one host, etcd in a cluster (valid on every node). */
export interface TokenSpace {
  get(name: string): Promise<TokenRecord | undefined>;
  put(name: string, record: TokenRecord): Promise<void>;
  del(name: string): Promise<void>;
  entries(): Promise<Array<[string, TokenRecord]>>;
}

const TOKEN_NAME = /^[a-z0-9][a-z0-9._@-]{0,62}$/;
/** `corral_<name>_<64 hex>`: the name finds the record, the hash of the whole is compared. */
const TOKEN = /^corral_([a-z0-9][a-z0-9._@-]{0,62})_([0-9a-f]{64})$/;

function hashOf(token: string): Buffer {
  return createHash('sha256').update(token).digest();
}

export function validateTokenName(name: unknown): string {
  if (typeof name !== 'string' || !TOKEN_NAME.test(name))
    throw new CorralError(
      'INVALID_NAME',
      `Invalid token name ${quoted(name)}: use 1-63 lowercase letters, digits, '.', '_', '@' or '-'`,
    );
  return name;
}

export function validateRole(role: unknown): Role {
  if (typeof role !== 'string' || !(ROLES as readonly string[]).includes(role))
    throw new CorralError(
      'INVALID_ARGUMENT',
      `Invalid role ${quoted(role)}: use ${ROLES.join(', ')}`,
    );
  return role as Role;
}

export function allows(role: Role, need: Role): boolean {
  return RANK[role] >= RANK[need];
}

/**
 * API tokens. Only a SHA-256 of each is kept (a token is 256 random bits, so
 * a slow hash would add nothing); the comparison is constant-time. Records
 * are read from memory: the LevelDB copy is loaded once (only this daemon
 * writes it), the etcd copy is kept by a watch.
 */
export class Tokens {
  readonly #space: TokenSpace;
  readonly #byName = new Map<string, TokenRecord>();
  readonly #cached: boolean;

  /** `cached`: the space reads from memory itself (etcd); else its records are loaded here. */
  constructor(space: TokenSpace, options: { cached?: boolean } = {}) {
    this.#space = space;
    this.#cached = options.cached ?? false;
  }

  async load(): Promise<void> {
    if (this.#cached) return;
    for (const [name, record] of await this.#space.entries()) this.#byName.set(name, record);
  }

  async #record(name: string): Promise<TokenRecord | undefined> {
    return this.#cached ? this.#space.get(name) : this.#byName.get(name);
  }

  /** The holder of a bearer token, or undefined when it is not one of ours. */
  async check(token: string): Promise<{ name: string; role: Role } | undefined> {
    const match = TOKEN.exec(token);
    if (!match) return undefined;
    const record = await this.#record(match[1]!);
    if (!record) return undefined;
    const want = Buffer.from(record.hash, 'hex');
    const got = hashOf(token);
    return want.length === got.length && timingSafeEqual(want, got)
      ? { name: record.name, role: record.role }
      : undefined;
  }

  /** Makes a token; the only time it is seen whole. */
  async create(nameIn: unknown, roleIn: unknown): Promise<{ record: TokenRecord; token: string }> {
    const name = validateTokenName(nameIn);
    const role = validateRole(roleIn);
    if (await this.#record(name))
      throw new CorralError('ALREADY_EXISTS', `A token named ${name} exists: remove it first`);
    return this.#issue(name, role);
  }

  async #issue(name: string, role: Role): Promise<{ record: TokenRecord; token: string }> {
    const token = `corral_${name}_${randomBytes(32).toString('hex')}`;
    const record: TokenRecord = {
      name,
      role,
      hash: hashOf(token).toString('hex'),
      createdAt: new Date().toISOString(),
    };
    await this.#space.put(name, record);
    if (!this.#cached) this.#byName.set(name, record);
    return { record, token };
  }

  async list(): Promise<Array<Omit<TokenRecord, 'hash'>>> {
    const all = this.#cached
      ? (await this.#space.entries()).map(([, r]) => r)
      : [...this.#byName.values()].sort((a, b) => (a.name < b.name ? -1 : 1));
    return all.map(({ name, role, createdAt }) => ({ name, role, createdAt }));
  }

  async remove(nameIn: unknown): Promise<void> {
    const name = validateTokenName(nameIn);
    if (!(await this.#record(name))) throw new CorralError('NOT_FOUND', `No token named ${name}`);
    await this.#space.del(name);
    this.#byName.delete(name);
  }

  /**
   * The host's admin token in `file` (0600): kept when it is still valid, made
   * anew when the file is missing or its token was removed (`token rm` revokes
   * it; the next start writes a fresh one that only this host's root can read).
   */
  async ensureHostToken(file: string, name: string): Promise<void> {
    let current: string | undefined;
    try {
      current = (await fs.promises.readFile(file, 'utf8')).trim();
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    if (current !== undefined && (await this.check(current))?.role === 'admin') return;
    if (await this.#record(name)) await this.remove(name);
    const { token } = await this.#issue(name, 'admin');
    await writeSecretFile(file, token + '\n');
  }
}

/** The bearer token of an Authorization header, if it has one. */
export function bearer(header: string | undefined): string | undefined {
  const match = /^Bearer\s+(\S+)\s*$/i.exec(header ?? '');
  return match?.[1];
}

/**
 * What each route asks of its caller. Reading is `read-only`; the day's work
 * on volumes (create, attach, detach, snapshot, backup, restore, verify,
 * scrub, jobs) is `operator`; whatever destroys data or changes who may do
 * what (every DELETE, revert, backup gc, nodes, tokens, fault injection) is
 * `admin`; replica traffic and the calls daemons make of each other are for
 * peers. A route missing from this table asks for `admin`: a new route is
 * closed until it is placed here. Naming a backup target other than the
 * default is `admin` too (checked where the body is read: api.ts).
 */
export function accessFor(method: string, path: string): Access {
  if (path === '/v1/health' || path === '/v1/openapi.json') return 'none';
  if (path === '/v1/replicas' || path.startsWith('/v1/replicas/') || path.startsWith('/v1/peer/'))
    return 'peer';
  if (path.startsWith('/v1/tokens') || path.startsWith('/v1/debug/')) return 'admin';
  if (method === 'GET' || method === 'HEAD') return 'read-only';
  if (method === 'DELETE') return 'admin';
  if (method !== 'POST') return 'admin';
  const parts = path.split('/').slice(2); // after '/v1'
  const [noun, , action, , sub] = parts;
  if (noun === 'volumes') {
    if (parts.length === 1) return 'operator'; // create
    if (
      action === 'attach' ||
      action === 'activate' ||
      action === 'detach' ||
      action === 'expand' ||
      action === 'qos' ||
      action === 'verify' ||
      action === 'scrub'
    )
      return parts.length === 3 ? 'operator' : 'admin';
    if (action === 'snapshots') {
      if (parts.length === 3) return 'operator';
      if (parts.length === 5 && sub === 'revert') return 'admin';
    }
    return 'admin';
  }
  if ((noun === 'backups' || noun === 'restores' || noun === 'jobs') && parts.length === 1)
    return 'operator';
  return 'admin';
}
