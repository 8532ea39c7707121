/**
 * The catalog: which bases and overlays a store holds, with their manifests. Kept behind the small
 * `Catalog` interface; the default implementation is SQLite (better-sqlite3) in
 * `<storeRoot>/catalog.db`. The files are the truth; the catalog is the index over them.
 */
import Database from 'better-sqlite3';
import { CloudletError } from '../errors';

export interface BaseRecord {
  id: string;
  /** ISO time the base entered this store. */
  addedAt: string;
  diskSize: number;
  memorySize: number;
  /** The base's manifest.json, as stored (parsed by src/core/base). */
  manifest: unknown;
}

export interface OverlayRecord {
  /** sha256 (hex) of the overlay file; its file is `overlays/<digest>.overlay`. */
  digest: string;
  size: number;
  baseId: string | undefined;
  addedAt: string;
  /** The overlay's meta (from readOverlayMeta), when known. */
  meta: unknown;
}

export interface Catalog {
  putBase(rec: BaseRecord): void;
  getBase(id: string): BaseRecord | undefined;
  listBases(): BaseRecord[];
  removeBase(id: string): boolean;
  putOverlay(rec: OverlayRecord): void;
  getOverlay(digest: string): OverlayRecord | undefined;
  listOverlays(): OverlayRecord[];
  removeOverlay(digest: string): boolean;
  close(): void;
}

const SCHEMA_VERSION = 1;

interface BaseRow {
  id: string;
  added_at: string;
  disk_size: number;
  memory_size: number;
  manifest: string;
}
interface OverlayRow {
  digest: string;
  size: number;
  base_id: string | null;
  added_at: string;
  meta: string | null;
}

export class SqliteCatalog implements Catalog {
  private readonly db: Database.Database;

  constructor(file: string) {
    try {
      this.db = new Database(file);
      this.db.pragma('journal_mode = WAL');
      this.db.pragma('busy_timeout = 5000');
      const version = this.db.pragma('user_version', { simple: true }) as number;
      if (version > SCHEMA_VERSION) {
        throw new CloudletError('UNSUPPORTED_VERSION', `catalog ${file} has schema version ${version}; this cloudlet knows up to ${SCHEMA_VERSION}`, {
          fix: 'use a newer cloudlet, or another --store',
        });
      }
      this.db.exec(`
        CREATE TABLE IF NOT EXISTS bases (
          id TEXT PRIMARY KEY, added_at TEXT NOT NULL, disk_size INTEGER NOT NULL,
          memory_size INTEGER NOT NULL, manifest TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS overlays (
          digest TEXT PRIMARY KEY, size INTEGER NOT NULL, base_id TEXT,
          added_at TEXT NOT NULL, meta TEXT);
      `);
      this.db.pragma(`user_version = ${SCHEMA_VERSION}`);
    } catch (e) {
      if (e instanceof CloudletError) throw e;
      throw new CloudletError('CORRUPT', `cannot open the store catalog ${file}: ${(e as Error).message}`, {
        fix: 'check the file and its permissions; a damaged catalog can be moved away and the bases imported again',
        cause: e,
      });
    }
  }

  putBase(rec: BaseRecord): void {
    this.db
      .prepare('INSERT OR REPLACE INTO bases (id, added_at, disk_size, memory_size, manifest) VALUES (?, ?, ?, ?, ?)')
      .run(rec.id, rec.addedAt, rec.diskSize, rec.memorySize, JSON.stringify(rec.manifest));
  }

  getBase(id: string): BaseRecord | undefined {
    const row = this.db.prepare('SELECT * FROM bases WHERE id = ?').get(id) as BaseRow | undefined;
    return row && baseFromRow(row);
  }

  listBases(): BaseRecord[] {
    return (this.db.prepare('SELECT * FROM bases ORDER BY added_at, id').all() as BaseRow[]).map(baseFromRow);
  }

  removeBase(id: string): boolean {
    return this.db.prepare('DELETE FROM bases WHERE id = ?').run(id).changes > 0;
  }

  putOverlay(rec: OverlayRecord): void {
    this.db
      .prepare('INSERT OR REPLACE INTO overlays (digest, size, base_id, added_at, meta) VALUES (?, ?, ?, ?, ?)')
      .run(rec.digest, rec.size, rec.baseId ?? null, rec.addedAt, rec.meta === undefined ? null : JSON.stringify(rec.meta));
  }

  getOverlay(digest: string): OverlayRecord | undefined {
    const row = this.db.prepare('SELECT * FROM overlays WHERE digest = ?').get(digest) as OverlayRow | undefined;
    return row && overlayFromRow(row);
  }

  listOverlays(): OverlayRecord[] {
    return (this.db.prepare('SELECT * FROM overlays ORDER BY added_at, digest').all() as OverlayRow[]).map(overlayFromRow);
  }

  removeOverlay(digest: string): boolean {
    return this.db.prepare('DELETE FROM overlays WHERE digest = ?').run(digest).changes > 0;
  }

  close(): void {
    if (this.db.open) this.db.close();
  }
}

function baseFromRow(r: BaseRow): BaseRecord {
  return { id: r.id, addedAt: r.added_at, diskSize: r.disk_size, memorySize: r.memory_size, manifest: JSON.parse(r.manifest) as unknown };
}

function overlayFromRow(r: OverlayRow): OverlayRecord {
  return {
    digest: r.digest,
    size: r.size,
    baseId: r.base_id ?? undefined,
    addedAt: r.added_at,
    meta: r.meta === null ? undefined : (JSON.parse(r.meta) as unknown),
  };
}
