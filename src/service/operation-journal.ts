/**
 * The operations of the cluster's hosts as the service reads them: the ended ones from the cluster
 * catalog (recorded by catalog-sync.ts; they outlive the Temporal server's retention), the running
 * ones from visibility through their search attributes. Without a catalog, all from visibility.
 */
import type { Client } from '@temporalio/client';
import type { ClusterCatalog } from '../core/cluster-catalog';
import { CatalogSync } from './catalog-sync';
import type { OperationKind } from './types';

export interface Closed {
  id: string;
  type: string;
  host: string;
  status: 'succeeded' | 'failed' | 'running';
  startTime: Date;
  closeTime?: Date;
  parentId?: string;
  /** The result, when the catalog holds it. */
  result?: unknown;
}

export class OperationJournal {
  private readonly catalogSync: CatalogSync | undefined;

  constructor(
    private readonly client: Client,
    private readonly hosts: readonly string[],
    private readonly catalog: ClusterCatalog | undefined,
  ) {
    this.catalogSync = catalog ? new CatalogSync(client, catalog, hosts) : undefined;
  }

  /** Records the operations that ended since the last time in the catalog (none without one); how many. */
  async sync(): Promise<number> {
    return this.catalogSync ? this.catalogSync.sync() : 0;
  }

  /**
   * Operations of some kinds, newest first: with a catalog, the ended ones from it (synced first)
   * and the running ones from visibility; without, all from visibility.
   */
  async list(kinds: OperationKind[], status?: 'succeeded' | 'running'): Promise<Closed[]> {
    const catalog = this.catalog;
    if (!catalog) return this.listVisible(kinds, status);
    // Running first: one that ends meanwhile is then found by the sync that follows.
    const running = status === 'succeeded' ? [] : await this.listVisible(kinds, 'running');
    // A sync that fails (the server busy, a result unreadable) leaves what the catalog holds: that is served.
    await this.sync().catch(() => 0);
    const closed = status === 'running' ? [] : await catalog.closedOperations({ kinds, hosts: this.hosts, ...(status ? { status } : {}) });
    const ended = new Set(closed.map((c) => c.id));
    const out: Closed[] = [
      ...running.filter((w) => !ended.has(w.id)),
      ...closed.map((c) => ({
        id: c.id,
        type: c.type,
        host: c.hostId,
        status: c.status,
        startTime: new Date(c.startedAt),
        closeTime: new Date(c.closedAt),
        ...(c.parentId ? { parentId: c.parentId } : {}),
        ...(c.result !== undefined ? { result: c.result } : {}),
      })),
    ];
    return out.sort((a, b) => b.startTime.getTime() - a.startTime.getTime());
  }

  /** Recent operations of some kinds, newest first, from visibility. */
  private async listVisible(kinds: OperationKind[], status?: 'succeeded' | 'running'): Promise<Closed[]> {
    // Only this cluster's hosts: a Temporal namespace may be shared (as on a development machine).
    const parts = [
      `(${kinds.map((k) => `CloudletOperation = '${k}'`).join(' OR ')})`,
      `(${this.hosts.map((h) => `CloudletHost = '${h}'`).join(' OR ')})`,
    ];
    if (status === 'running') parts.push("ExecutionStatus = 'Running'");
    else if (status) parts.push(`CloudletStatus = '${status}'`);
    const out: Closed[] = [];
    for await (const w of this.client.workflow.list({ query: parts.join(' AND '), pageSize: 200 })) {
      out.push({
        id: w.workflowId,
        type: w.type,
        host: String(w.searchAttributes?.CloudletHost?.[0] ?? ''),
        status: String(w.searchAttributes?.CloudletStatus?.[0] ?? 'running') as Closed['status'],
        startTime: w.startTime,
        ...(w.closeTime ? { closeTime: w.closeTime } : {}),
        ...(w.parentExecution?.workflowId ? { parentId: w.parentExecution.workflowId } : {}),
      });
      if (out.length >= 1000) break;
    }
    return out;
  }

  async resultOf<T>(w: Closed | string): Promise<T> {
    if (typeof w !== 'string' && w.result !== undefined) return w.result as T;
    const id = typeof w === 'string' ? w : w.id;
    const rec = await this.catalog?.closedOperation(id);
    if (rec?.result !== undefined) return rec.result as T;
    return (await this.client.workflow.getHandle(id).result()) as T;
  }
}
