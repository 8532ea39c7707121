/**
 * Records ended operations in the cluster catalog: the runs of this cluster's hosts that closed
 * since the last record (less a margin, as visibility may list closes a little out of order),
 * with their results or failures. The API runs it before it lists (coalesced) and every 30 s, so
 * what it lists comes from the catalog and outlives the Temporal server's retention of the runs.
 */
import type { Client } from '@temporalio/client';
import type { ClosedOperation, ClusterCatalog } from '../core/cluster-catalog';
import { failureOf } from './failure';
import type { OperationKind } from './types';

export const SYNCED_KINDS: readonly OperationKind[] = ['importBaseVm', 'resumeBaseVm', 'createOverlay', 'synthesizeVm', 'terminateVm', 'rebuildOverlay', 'handoffVm', 'receiveHandoff', 'deployOverlay', 'reconcileHost'];

/** How far before the latest recorded close a sync looks again. */
const MARGIN_MS = 10 * 60_000;
/** Syncs closer together than this are one. */
const MIN_INTERVAL_MS = 300;

export class CatalogSync {
  private inflight: Promise<number> | undefined;
  private lastDone = 0;

  constructor(
    private readonly client: Client,
    private readonly catalog: ClusterCatalog,
    private readonly hosts: readonly string[],
  ) {}

  /** Records what closed since the last sync; the number of operations recorded. */
  async sync(): Promise<number> {
    if (this.inflight) return this.inflight;
    if (Date.now() - this.lastDone < MIN_INTERVAL_MS) return 0;
    this.inflight = this.run().finally(() => {
      this.inflight = undefined;
      this.lastDone = Date.now();
    });
    return this.inflight;
  }

  private async run(): Promise<number> {
    const last = await this.catalog.lastClosedAt();
    const parts = [
      "ExecutionStatus != 'Running'",
      `(${SYNCED_KINDS.map((k) => `CloudletOperation = '${k}'`).join(' OR ')})`,
      `(${this.hosts.map((h) => `CloudletHost = '${h}'`).join(' OR ')})`,
    ];
    if (last) parts.push(`CloseTime >= '${new Date(Date.parse(last) - MARGIN_MS).toISOString()}'`);
    const seen: Array<{ id: string; runId: string; kind: string; type: string; host: string; completed: boolean; startTime: Date; closeTime: Date; parentId?: string }> = [];
    for await (const w of this.client.workflow.list({ query: parts.join(' AND '), pageSize: 500 })) {
      seen.push({
        id: w.workflowId,
        runId: w.runId,
        kind: String(w.searchAttributes?.CloudletOperation?.[0] ?? ''),
        type: w.type,
        host: String(w.searchAttributes?.CloudletHost?.[0] ?? ''),
        completed: w.status.name === 'COMPLETED',
        startTime: w.startTime,
        closeTime: w.closeTime ?? w.startTime,
        ...(w.parentExecution?.workflowId ? { parentId: w.parentExecution.workflowId } : {}),
      });
    }
    const known = await this.catalog.knownClosed(seen.map((w) => w.id));
    const fresh = seen.filter((w) => !known.has(w.id));
    const records: ClosedOperation[] = [];
    for (const w of fresh) {
      const rec: ClosedOperation = {
        id: w.id,
        kind: w.kind,
        type: w.type,
        hostId: w.host,
        status: w.completed ? 'succeeded' : 'failed',
        startedAt: w.startTime.toISOString(),
        closedAt: w.closeTime.toISOString(),
        ...(w.parentId ? { parentId: w.parentId } : {}),
      };
      try {
        const result: unknown = await this.client.workflow.getHandle(w.id, w.runId).result();
        if (w.completed) rec.result = result;
      } catch (e) {
        const f = failureOf(e, w.completed ? 'COMPLETED' : 'FAILED');
        rec.error = { type: f.type, message: f.message };
      }
      records.push(rec);
    }
    await this.catalog.recordClosed(records);
    return records.length;
  }
}
