/** Text renderings of what the cloudlet API returns (the --json output is the raw data). */
import type { RecipeScheduleDetail, RecipeScheduleSummary } from '../service/schedule-types';
import { formatBytes } from '../core/progress';
import type { BaseInfo, HostInfo, InstanceInfo, OperationStatus, OverlayInfo } from '../service/types';
import { table } from './format';

export function hostsText(hosts: HostInfo[]): string {
  if (hosts.length === 0) return 'no hosts in this cloudlet';
  return table(['HOST', 'WORKER'], hosts.map((h) => [h.id, h.serving ? 'serving' : 'NOT SERVING (no worker polls its queue)']));
}

export function remoteBaseListText(bases: BaseInfo[]): string {
  if (bases.length === 0) return 'no bases in this cloudlet';
  return table(
    ['BASE ID', 'HOSTS', 'DISK', 'MEMORY', 'CPU', 'IMPORTED'],
    bases.map((b) => [b.id, b.hostIds.join(',') || '-', formatBytes(b.diskBytes), formatBytes(b.memoryBytes), b.cpuModel ?? '-', b.importedAt]),
  );
}

export function remoteBaseText(b: BaseInfo): string {
  return [
    `base       ${b.id}`,
    `hosts      ${b.hostIds.join(', ') || '(none)'}`,
    `disk       ${formatBytes(b.diskBytes)}`,
    `memory     ${formatBytes(b.memoryBytes)}`,
    `cpu model  ${b.cpuModel ?? '(none recorded)'}`,
    `imported   ${b.importedAt}`,
  ].join('\n');
}

export function remoteOverlayListText(overlays: OverlayInfo[]): string {
  if (overlays.length === 0) return 'no overlays in this cloudlet';
  return table(['OVERLAY ID', 'SIZE', 'BASE', 'CREATED', 'URL'], overlays.map((o) => [o.id, formatBytes(o.bytes), o.baseId.slice(0, 12), o.createdAt, o.url]));
}

export function remoteOverlayText(o: OverlayInfo): string {
  return [
    `overlay    ${o.id}`,
    `base       ${o.baseId}`,
    `size       ${formatBytes(o.bytes)} (${o.bytes} bytes)`,
    `url        ${o.url}`,
    `created    ${o.createdAt}${o.fromInstanceId ? ` from instance ${o.fromInstanceId}` : ''}`,
  ].join('\n');
}

export function instanceListText(instances: InstanceInfo[]): string {
  if (instances.length === 0) return 'no instances in this cloudlet';
  return table(
    ['INSTANCE', 'HOST', 'STATE', 'BASE', 'OVERLAY', 'APP'],
    instances.map((i) => [i.id, i.hostId, i.state, i.baseId.slice(0, 12), i.overlayId?.slice(0, 12) ?? '-', i.appEndpoint ?? '-']),
  );
}

export function instanceText(i: InstanceInfo): string {
  const lines = [
    `instance   ${i.id}`,
    `host       ${i.hostId}`,
    `state      ${i.state}`,
    `base       ${i.baseId}`,
    ...(i.overlayId ? [`overlay    ${i.overlayId}`] : []),
    ...(i.appEndpoint ? [`app        ${i.appEndpoint}`] : []),
    `operation  ${i.operationId}`,
  ];
  if (i.timings && Object.keys(i.timings).length > 0) lines.push('timings', timingsText(i.timings));
  return lines.join('\n');
}

/** One line per stage, milliseconds right-aligned (the first-response breakdown of synthesis). */
export function timingsText(timings: Record<string, unknown>): string {
  const entries = Object.entries(timings).filter((e): e is [string, number] => typeof e[1] === 'number');
  const width = Math.max(0, ...entries.map(([k]) => k.length));
  return entries.map(([k, v]) => `  ${k.padEnd(width)}  ${v.toFixed(0).padStart(7)} ms`).join('\n');
}

export function operationText(s: OperationStatus): string {
  const lines = [`operation  ${s.id}`, `kind       ${s.kind}`, `host       ${s.hostId || '?'}`, `state      ${s.state}`];
  if (s.progress && s.state === 'running') {
    const done = s.progress.done.length > 0 ? ` (done: ${s.progress.done.join(', ')})` : '';
    lines.push(`stage      ${s.progress.stage}${done}`);
    if (s.progress.bytesTotal !== undefined) lines.push(`bytes      ${formatBytes(s.progress.bytesDone ?? 0)} / ${formatBytes(s.progress.bytesTotal)}`);
  }
  lines.push(`started    ${s.startedAt}`);
  if (s.closedAt) lines.push(`closed     ${s.closedAt}`);
  if (s.webUiUrl) lines.push(`web UI     ${s.webUiUrl}`);
  if (s.error) lines.push(`error      ${s.error.type}: ${s.error.message}${s.error.nonRetryable ? ' (non-retryable)' : ''}`);
  if (s.result !== undefined) lines.push(`result     ${JSON.stringify(s.result)}`);
  return lines.join('\n');
}

export function scheduleListText(list: RecipeScheduleSummary[]): string {
  if (list.length === 0) return 'no recipe schedules';
  return table(
    ['RECIPE', 'SCHEDULE', 'EVERY', 'STATE', 'LAST RUN'],
    list.map((s) => [s.recipeId, s.scheduleId, s.every, s.paused ? 'paused' : 'active', s.recentRuns.at(-1)?.startedAt ?? '-']),
  );
}

export function scheduleText(s: RecipeScheduleDetail): string {
  const lines = [`recipe     ${s.recipeId}`, `schedule   ${s.scheduleId}`, `every      ${s.every}`, `state      ${s.paused ? 'paused' : 'active'}${s.note ? ` (${s.note})` : ''}`];
  if (s.nextRunAt) lines.push(`next run   ${s.nextRunAt}`);
  if (s.actionsTaken !== undefined) lines.push(`runs       ${s.actionsTaken}${s.skippedOverlap ? ` (${s.skippedOverlap} skipped: one was running)` : ''}`);
  for (const id of s.runningWorkflowIds ?? []) lines.push(`running    ${id}`);
  if (s.lastRun) lines.push(`last run   ${s.lastRun.workflowId} ${s.lastRun.status} (started ${s.lastRun.startedAt})`);
  if (s.lastSucceeded) lines.push(`last good  ${s.lastSucceeded.workflowId}: ${JSON.stringify(s.lastSucceeded.result)}`);
  for (const r of s.recentRuns) lines.push(`  run ${r.workflowId} started ${r.startedAt}`);
  return lines.join('\n');
}
