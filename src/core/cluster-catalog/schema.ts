/**
 * The catalog's tables, written once for both engines (docs/security.md describes them). Times
 * are ISO-8601 text so both engines store and return them alike.
 */
export const CATALOG_SCHEMA_VERSION = 1;

export function catalogDdl(engine: 'sqlite' | 'postgres'): string {
  const int = engine === 'postgres' ? 'BIGINT' : 'INTEGER';
  return `
    CREATE TABLE IF NOT EXISTS tokens (
      id TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
      role TEXT NOT NULL CHECK (role IN ('admin', 'member', 'reader')), name TEXT NOT NULL,
      created_at TEXT NOT NULL, revoked_at TEXT);
    CREATE TABLE IF NOT EXISTS owners (
      operation_id TEXT PRIMARY KEY, tenant TEXT, created_at TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS owners_by_tenant ON owners (tenant);
    CREATE TABLE IF NOT EXISTS quotas (
      tenant TEXT PRIMARY KEY, instances ${int}, memory_mib ${int});
  `;
}
