/**
 * The page records of a save file as the split met them, and their encoding into skeleton ops:
 * runs of consecutive final records; records superseded by a later copy of the same page become
 * literals (read back from the save file).
 */
import type { SkeletonOp } from './skeleton';

/** One entry of the save file in order: a literal (non-page bytes) or a page record number. */
export type StreamEvent = Buffer | number;

export class PageRecords {
  private readonly block: number[] = [];
  private readonly page: number[] = [];
  /** 0: PAGE; 1 + fill byte: ZERO. */
  private readonly zero: number[] = [];
  private readonly named: number[] = [];
  private readonly start: number[] = [];
  private readonly len: number[] = [];
  /** Per block, per page: 1 + number of the last record of that page (0: never sent). */
  private readonly last: Uint32Array[] = [];

  addBlock(pages: number): void {
    this.last.push(new Uint32Array(pages));
  }

  get count(): number {
    return this.block.length;
  }

  /** Records a page record; returns the record number and whether the page was sent before. */
  add(block: number, page: number, fill: number | undefined, named: boolean, start: number, len: number): { rec: number; resent: boolean } {
    const rec = this.block.length;
    this.block.push(block);
    this.page.push(page);
    this.zero.push(fill === undefined ? 0 : 1 + fill);
    this.named.push(named ? 1 : 0);
    this.start.push(start);
    this.len.push(len);
    const seen = this.last[block] as Uint32Array;
    const resent = (seen[page] ?? 0) !== 0;
    seen[page] = rec + 1;
    return { rec, resent };
  }

  /** Encodes `events` as skeleton ops; `readRecord(start, len)` returns a superseded record's bytes. */
  async toOps(events: readonly StreamEvent[], readRecord: (start: number, len: number) => Promise<Buffer>): Promise<{ ops: SkeletonOp[]; runs: number }> {
    const ops: SkeletonOp[] = [];
    let lits: Buffer[] = [];
    let runs = 0;
    let run: { block: number; firstPage: number; count: number; named: boolean; zero: number[]; fills: Map<number, number> } | undefined;
    const closeRun = (): void => {
      if (!run) return;
      const zeroBits = Buffer.alloc(Math.ceil(run.count / 8));
      for (const i of run.zero) zeroBits[i >> 3] = (zeroBits[i >> 3] as number) | (1 << (i & 7));
      ops.push({ op: 'run', block: run.block, firstPage: run.firstPage, count: run.count, named: run.named, zeroBits, fills: run.fills });
      runs++;
      run = undefined;
    };
    const closeLit = (): void => {
      if (lits.length) ops.push({ op: 'lit', data: lits.length === 1 ? (lits[0] as Buffer) : Buffer.concat(lits) });
      lits = [];
    };
    for (const ev of events) {
      if (typeof ev !== 'number') {
        closeRun();
        lits.push(ev);
        continue;
      }
      const block = this.block[ev] as number;
      const page = this.page[ev] as number;
      const named = this.named[ev] === 1;
      if ((this.last[block] as Uint32Array)[page] !== ev + 1) {
        closeRun();
        lits.push(await readRecord(this.start[ev] as number, this.len[ev] as number));
        continue;
      }
      if (!(run && run.block === block && page === run.firstPage + run.count && !named)) {
        closeRun();
        closeLit();
        run = { block, firstPage: page, count: 0, named, zero: [], fills: new Map() };
      }
      const z = this.zero[ev] ?? 0;
      if (z > 0) {
        run.zero.push(run.count);
        if (z > 1) run.fills.set(run.count, z - 1);
      }
      run.count++;
    }
    closeRun();
    closeLit();
    return { ops, runs };
  }
}
