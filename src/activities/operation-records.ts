/**
 * Records an operation's end in the cluster catalog, from the operation's own workflow as it ends
 * (src/workflows/operation-record.ts), so the catalog holds it whether or not an API process runs.
 * The worker opens the catalog its configuration names (CLOUDLET_CATALOG_URL, else the SQLite
 * file), on first use, once per location in the process.
 */
import { openClusterCatalog, type CatalogLocation, type ClosedOperation, type ClusterCatalog } from '../core/cluster-catalog';

export interface OperationRecordActivities {
  recordOperationEnd(op: ClosedOperation): Promise<void>;
}

const opened = new Map<string, Promise<ClusterCatalog>>();

/** The catalog at `where`, opened once per process; a failed open is tried again next time. */
export function catalogAt(where: CatalogLocation): () => Promise<ClusterCatalog> {
  const key = where.url ?? where.file;
  return () => {
    let c = opened.get(key);
    if (!c) {
      c = openClusterCatalog(where);
      opened.set(key, c);
      c.catch(() => opened.delete(key));
    }
    return c;
  };
}

export function createOperationRecordActivities(deps: { catalog: () => Promise<ClusterCatalog> }): OperationRecordActivities {
  return {
    async recordOperationEnd(op) {
      const catalog = await deps.catalog();
      await catalog.recordClosed([op]);
      // A receiving run that ended (the VM arrived, or it failed, was aborted or gave up) ends
      // its handoff's ticket: the catalog lists it so, and the API refuses it from then on.
      const handoffId = op.kind === 'receiveHandoff' ? /\/(ho-[a-z0-9-]+)$/.exec(op.id)?.[1] : undefined;
      if (handoffId) await catalog.endTicket(handoffId, op.status === 'succeeded' ? 'used' : 'aborted');
    },
  };
}
