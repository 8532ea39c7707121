/**
 * The neighbour registry: the clusters this cluster may hand VMs to, with the credentials to ask
 * them and the RTT last measured to each (docs/mobility.md). Kept behind the async
 * `NeighbourRegistry` interface, which assumes nothing about where it lives; the embedded default
 * is SQLite (better-sqlite3) in one file every process of the cluster on this machine opens (WAL).
 * A deployment over several machines implements the interface on its shared database.
 */
import path from 'node:path';
import type Database from 'better-sqlite3';
import { openPrivateSqlite } from '../private-sqlite';
import { CloudletError } from '../errors';

export interface Neighbour {
  name: string;
  apiUrl: string;
  addedAt: string;
  /** Last successful measurement of this cluster's RTT to the neighbour's API. */
  rtt?: { ms: number; measuredAt: string; servingHosts: number };
  /** Last failed attempt (cleared by a success). */
  lastError?: { message: string; at: string };
}

/** A neighbour as shown: with `status` derived from its measurements and the time. */
export interface NeighbourView extends Neighbour {
  /** fresh: measured within staleAfterMs; stale: older; unreachable: the last attempt failed; unmeasured. */
  status: 'fresh' | 'stale' | 'unreachable' | 'unmeasured';
}

export type Measurement = { ok: true; rttMs: number; servingHosts: number; at: Date } | { ok: false; error: string; at: Date };

export interface NeighbourRegistry {
  /** CONFLICT when a neighbour of that name exists. */
  add(n: { name: string; apiUrl: string; token: string }, now?: Date): Promise<Neighbour>;
  list(): Promise<Neighbour[]>;
  get(name: string): Promise<Neighbour | undefined>;
  /** The token to ask the neighbour with; never in a listing. */
  token(name: string): Promise<string | undefined>;
  remove(name: string): Promise<boolean>;
  record(name: string, m: Measurement): Promise<void>;
  close(): Promise<void>;
}

export const NEIGHBOUR_NAME_PATTERN = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

/** Derived status of a neighbour (staleAfterMs: how old a measurement may be and count as fresh). */
export function neighbourView(n: Neighbour, now: number, staleAfterMs: number): NeighbourView {
  const okAt = n.rtt ? Date.parse(n.rtt.measuredAt) : undefined;
  const errAt = n.lastError ? Date.parse(n.lastError.at) : undefined;
  let status: NeighbourView['status'];
  if (errAt !== undefined && (okAt === undefined || errAt >= okAt)) status = 'unreachable';
  else if (okAt === undefined) status = 'unmeasured';
  else status = now - okAt <= staleAfterMs ? 'fresh' : 'stale';
  return { ...n, status };
}

/**
 * A neighbour's API URL as stored: http(s), no credentials, query or fragment, and (when the
 * cluster lists allowed hosts) a host on that list. `allowedHosts` entries are host names or
 * addresses, `*.example.org` for a domain's hosts; empty or absent allows any host.
 */
export function parseNeighbourUrl(text: string, allowedHosts: readonly string[] = []): string {
  let u: URL;
  try {
    u = new URL(text);
  } catch {
    throw new CloudletError('BAD_INPUT', 'the neighbour URL is not a URL', { fix: 'give the neighbour cluster API base URL, e.g. https://west.example.org:8080' });
  }
  // Errors name the scheme and host only: the rest may carry a secret.
  const shown = `${u.protocol}//${u.host}`;
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new CloudletError('BAD_INPUT', `neighbour URL ${u.protocol}//… is not http(s)`, { fix: 'use the http:// or https:// URL of its API' });
  if (u.username || u.password) throw new CloudletError('BAD_INPUT', `neighbour URL ${shown} carries credentials in the URL`, { fix: 'pass the token in the token field instead' });
  if (u.search || u.hash) throw new CloudletError('BAD_INPUT', `neighbour URL ${shown} has a query or fragment`, { fix: 'give the base URL of its API only' });
  const host = u.hostname.replace(/^\[|\]$/g, '').toLowerCase();
  if (allowedHosts.length > 0 && !allowedHosts.some((a) => (a.startsWith('*.') ? host.endsWith(a.slice(1).toLowerCase()) : host === a.toLowerCase()))) {
    throw new CloudletError('FORBIDDEN', `neighbour host ${host} is not allowed here`, { fix: `this cluster accepts neighbours on ${allowedHosts.join(', ')} (CLOUDLET_NEIGHBOUR_HOSTS)` });
  }
  return `${u.origin}${u.pathname.replace(/\/+$/, '')}`;
}

interface Row {
  name: string;
  api_url: string;
  token: string;
  added_at: string;
  rtt_ms: number | null;
  measured_at: string | null;
  serving_hosts: number | null;
  error: string | null;
  error_at: string | null;
}

const fromRow = (r: Row): Neighbour => ({
  name: r.name,
  apiUrl: r.api_url,
  addedAt: r.added_at,
  ...(r.rtt_ms !== null && r.measured_at ? { rtt: { ms: r.rtt_ms, measuredAt: r.measured_at, servingHosts: r.serving_hosts ?? 0 } } : {}),
  ...(r.error !== null && r.error_at ? { lastError: { message: r.error, at: r.error_at } } : {}),
});

export class SqliteNeighbourRegistry implements NeighbourRegistry {
  private readonly db: Database.Database;

  constructor(readonly file: string) {
    try {
      // Tokens are secrets: a file of mode 0600.
      this.db = openPrivateSqlite(file);
      this.db.exec(`CREATE TABLE IF NOT EXISTS neighbours (
        name TEXT PRIMARY KEY, api_url TEXT NOT NULL, token TEXT NOT NULL, added_at TEXT NOT NULL,
        rtt_ms REAL, measured_at TEXT, serving_hosts INTEGER, error TEXT, error_at TEXT)`);
    } catch (e) {
      throw new CloudletError('SERVICE_UNAVAILABLE', `cannot open the neighbour registry ${file}: ${(e as Error).message}`, { fix: 'check the directory exists and is writable (CLOUDLET_VAR, CLOUDLET_NEIGHBOURS_DB)', cause: e });
    }
  }

  async add(n: { name: string; apiUrl: string; token: string }, now = new Date()): Promise<Neighbour> {
    if (!NEIGHBOUR_NAME_PATTERN.test(n.name)) throw new CloudletError('BAD_INPUT', `neighbour name "${n.name}" is not a DNS label`, { fix: 'use lower-case letters, digits and dashes, e.g. "west"' });
    const r = this.db.prepare('INSERT INTO neighbours (name, api_url, token, added_at) VALUES (?, ?, ?, ?) ON CONFLICT(name) DO NOTHING').run(n.name, n.apiUrl, n.token, now.toISOString());
    if (r.changes === 0) throw new CloudletError('CONFLICT', `a neighbour named ${n.name} exists`, { fix: 'remove it first (DELETE /v1/neighbours/{name}) or choose another name' });
    return { name: n.name, apiUrl: n.apiUrl, addedAt: now.toISOString() };
  }

  async list(): Promise<Neighbour[]> {
    return (this.db.prepare('SELECT * FROM neighbours ORDER BY name').all() as Row[]).map(fromRow);
  }

  async get(name: string): Promise<Neighbour | undefined> {
    const r = this.db.prepare('SELECT * FROM neighbours WHERE name = ?').get(name) as Row | undefined;
    return r ? fromRow(r) : undefined;
  }

  async token(name: string): Promise<string | undefined> {
    return (this.db.prepare('SELECT token FROM neighbours WHERE name = ?').get(name) as { token: string } | undefined)?.token;
  }

  async remove(name: string): Promise<boolean> {
    return this.db.prepare('DELETE FROM neighbours WHERE name = ?').run(name).changes > 0;
  }

  async record(name: string, m: Measurement): Promise<void> {
    if (m.ok) {
      this.db.prepare('UPDATE neighbours SET rtt_ms = ?, measured_at = ?, serving_hosts = ?, error = NULL, error_at = NULL WHERE name = ?').run(m.rttMs, m.at.toISOString(), m.servingHosts, name);
    } else {
      this.db.prepare('UPDATE neighbours SET error = ?, error_at = ? WHERE name = ?').run(m.error.slice(0, 500), m.at.toISOString(), name);
    }
  }

  async close(): Promise<void> {
    this.db.close();
  }
}

/** Where the embedded registry of a cluster (a Temporal namespace) lives under the var directory. */
export function neighbourRegistryFile(varDir: string, namespace: string): string {
  return path.join(varDir, 'clusters', namespace, 'neighbours.sqlite');
}
