/**
 * Records ended operations in the cluster catalog from Temporal's visibility: the runs of this
 * cluster's hosts that closed since the sync's mark (less a margin, as visibility may list closes a
 * little out of order) and that their workflows did not record themselves (operation-record.ts in
 * the workflows), with their results or failures. The API runs it before it lists (coalesced) and
 * every 30 s, so what it lists outlives the Temporal server's retention of the runs.
 */
import type { Client } from '@temporalio/client';
import type { ClosedOperation, ClusterCatalog } from '../core/cluster-catalog';
import { CANCELLED } from '../common/failure-summary';
import { failureOf } from './failure';
import type { OperationKind } from './types';

export const SYNCED_KINDS: readonly OperationKind[] = ['importBaseVm', 'resumeBaseVm', 'createOverlay', 'synthesizeVm', 'terminateVm', 'rebuildOverlay', 'handoffVm', 'receiveHandoff', 'deployOverlay', 'reconcileHost'];

/** How far before the latest recorded close a sync looks again. */
const MARGIN_MS = 10 * 60_000;
export class CatalogSync {
  private inflight: Promise<number> | undefined;
  /** The sync that starts when the running one ends, shared by everyone who asks meanwhile. */
  private next: Promise<number> | undefined;

  constructor(
    private readonly client: Client,
    private readonly catalog: ClusterCatalog,
    private readonly hosts: readonly string[],
  ) {}

  /**
   * Records what closed since the last sync; the number of operations recorded. The sync it
   * waits for begins after the call (a caller that saw a run running finds it recorded if it
   * closed meanwhile): a running sync is not joined, the next one is.
   */
  async sync(): Promise<number> {
    if (!this.inflight) return this.begin();
    this.next ??= this.inflight.catch(() => 0).then(() => {
      this.next = undefined;
      return this.begin();
    });
    return this.next;
  }

  private begin(): Promise<number> {
    const run = this.run().finally(() => {
      if (this.inflight === run) this.inflight = undefined;
    });
    this.inflight = run;
    return run;
  }

  private async run(): Promise<number> {
    const last = await this.catalog.syncMark();
    const parts = [
      "ExecutionStatus != 'Running'",
      `(${SYNCED_KINDS.map((k) => `CloudletOperation = '${k}'`).join(' OR ')})`,
      `(${this.hosts.map((h) => `CloudletHost = '${h}'`).join(' OR ')})`,
    ];
    if (last) parts.push(`CloseTime >= '${new Date(Date.parse(last) - MARGIN_MS).toISOString()}'`);
    const seen: Array<{ id: string; runId: string; kind: string; type: string; host: string; statusName: string; startTime: Date; closeTime: Date; parentId?: string }> = [];
    for await (const w of this.client.workflow.list({ query: parts.join(' AND '), pageSize: 500 })) {
      seen.push({
        id: w.workflowId,
        runId: w.runId,
        kind: String(w.searchAttributes?.CloudletOperation?.[0] ?? ''),
        type: w.type,
        host: String(w.searchAttributes?.CloudletHost?.[0] ?? ''),
        statusName: w.status.name,
        startTime: w.startTime,
        closeTime: w.closeTime ?? w.startTime,
        ...(w.parentExecution?.workflowId ? { parentId: w.parentExecution.workflowId } : {}),
      });
    }
    // Most operations were recorded by their own workflows as they ended: only the others (a run
    // terminated or timed out, a record that failed, a run of an older worker) are read here.
    const known = await this.catalog.knownClosed(seen.map((w) => w.id));
    const fresh = seen.filter((w) => !known.has(w.id));
    let mark = '';
    for (const w of seen) if (known.has(w.id)) mark = maxIso(mark, w.closeTime.toISOString());
    const records: ClosedOperation[] = [];
    for (const w of fresh) {
      const completed = w.statusName === 'COMPLETED';
      const rec: ClosedOperation = {
        id: w.id,
        kind: w.kind,
        type: w.type,
        hostId: w.host,
        status: completed ? 'succeeded' : 'failed',
        startedAt: w.startTime.toISOString(),
        closedAt: w.closeTime.toISOString(),
        ...(w.parentId ? { parentId: w.parentId } : {}),
      };
      try {
        const result: unknown = await this.client.workflow.getHandle(w.id, w.runId).result();
        if (completed) rec.result = result;
      } catch (e) {
        // A completed run whose result could not be read now is left for a later sync (recorded
        // without it, it would stay without it).
        if (completed) continue;
        rec.error = w.statusName === 'CANCELED' || w.statusName === 'CANCELLED' ? CANCELLED : failureOf(e, w.statusName);
      }
      records.push(rec);
      mark = maxIso(mark, rec.closedAt);
    }
    await this.catalog.recordClosed(records);
    if (mark) await this.catalog.advanceSyncMark(mark);
    return records.length;
  }
}

function maxIso(a: string, b: string): string {
  return b > a ? b : a;
}
