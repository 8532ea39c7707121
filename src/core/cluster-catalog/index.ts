/** Opens the cluster catalog the configuration names: PostgreSQL when a URL is given, else SQLite. */
import { PostgresClusterCatalog } from './postgres';
import { SqliteClusterCatalog } from './sqlite';
import type { ClusterCatalog } from './types';

export * from './types';
export { digestToken, isCatalogToken, mintToken } from './tokens';
export { SqliteClusterCatalog } from './sqlite';
export { PostgresClusterCatalog } from './postgres';
export { tenantOfOperations } from './ownership';

export interface CatalogLocation {
  /** postgres://… (CLOUDLET_CATALOG_URL); when absent, the SQLite file. */
  url?: string;
  /** The SQLite file (CLOUDLET_CATALOG_DB; default <var>/clusters/<namespace>/catalog.sqlite). */
  file: string;
}

export async function openClusterCatalog(where: CatalogLocation): Promise<ClusterCatalog> {
  return where.url ? PostgresClusterCatalog.open(where.url) : new SqliteClusterCatalog(where.file);
}
