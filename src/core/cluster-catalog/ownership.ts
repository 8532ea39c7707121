/** Whose an object is, from the owners of the operations that made it. */
import type { ClusterCatalog } from './types';

/** The tenant of the first of these operations that has one (undefined: the admins', or no record). */
export async function tenantOfOperations(catalog: Pick<ClusterCatalog, 'ownersOf'>, operationIds: ReadonlyArray<string | undefined>): Promise<string | undefined> {
  const ids = operationIds.filter((x): x is string => x !== undefined);
  if (ids.length === 0) return undefined;
  const owners = await catalog.ownersOf(ids);
  return ids.map((o) => owners.get(o)?.tenant).find((t) => t !== undefined);
}
