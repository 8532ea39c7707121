/** Human-readable renderings of command results (the --json output is the raw data). */
import type { BaseManifest, BaseSummary } from '../core/base';
import { formatBytes } from '../core/progress';

export function manifestText(m: BaseManifest): string {
  return [
    `base       ${m.baseId}`,
    `disk       ${formatBytes(m.disk.size)} (${m.disk.size} bytes, ${m.disk.chunkCount} chunks) sha256 ${m.disk.sha256}`,
    `memory     save file ${formatBytes(m.memory.saveFileSize)} sha256 ${m.memory.saveFileSha256}`,
    `           image ${formatBytes(m.memory.imageSize)} (${m.memory.chunkCount} chunks, ${m.memory.mode})`,
    ...m.memory.blocks.map((b) => `           block ${b.name} ${formatBytes(b.size)} at ${b.imageOffset}`),
    `cpu model  ${m.cpuModel ?? '(none recorded)'}`,
    `format     ${m.format} v${m.formatVersion}`,
  ].join('\n');
}

export function baseListText(list: BaseSummary[]): string {
  if (list.length === 0) return 'no bases in the store';
  const rows = list.map((b) => [b.baseId, formatBytes(b.diskSize), formatBytes(b.memorySize), b.cpuModel ?? '-', b.addedAt]);
  return table(['BASE ID', 'DISK', 'MEMORY', 'CPU', 'ADDED'], rows);
}

export function table(head: string[], rows: string[][]): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (r: string[]): string => r.map((c, i) => c.padEnd(widths[i] ?? 0)).join('  ').trimEnd();
  return [line(head), ...rows.map(line)].join('\n');
}

export function secondsText(s: number): string {
  return `${s.toFixed(2)} s`;
}
