/**
 * Recipe schedules: one Temporal Schedule per overlay recipe, whose action starts the
 * rebuildOverlay workflow with the recipe as its argument (see src/workflows/rebuild.ts and
 * docs/recipes.md). Create, list, describe, trigger, pause, unpause and delete them; and
 * `onBaseReimported(baseId)` triggers the rebuild of every recipe made on that base.
 *
 * The schedule keeps the recipe in its action's arguments and in its memo (the list of schedules
 * shows memos, not arguments), so nothing else has to store it.
 */
import type { Client, ScheduleDescription, ScheduleSummary } from '@temporalio/client';
import { ScheduleAlreadyRunning, ScheduleNotFoundError, ScheduleOverlapPolicy } from '@temporalio/client';
import { z } from 'zod';
import { parseRecipe, RECIPE_ID_PATTERN, type Recipe } from '../activities/recipes';
import { CloudletError } from '../core/errors';
import { assertHostServing } from '../client/connect';
import { SearchAttributes } from '../common/names';
import type { TriggerOutcome } from './types';
import type { RebuildOverlayResult } from '../workflows/rebuild';

const MEMO_KIND = 'cloudletRecipe';

/** Schedule id of a recipe: says what it is in the Web UI's Schedules page. */
export function recipeScheduleId(recipeId: string): string {
  return `recipe-${recipeId}`;
}

/** Workflow id prefix of a recipe's rebuilds (Temporal appends the scheduled time). */
export function rebuildWorkflowId(recipeId: string): string {
  return `rebuildOverlay/${recipeId}`;
}

/** At most 7 digits: 9,999,999 d is still a finite Temporal duration. */
const DURATION = /^(\d{1,7})\s*(s|m|h|d)$/;
const UNIT_MS: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

export const RecipeScheduleSpecSchema = z
  .object({
    /** How often to rebuild: a number and a unit, s, m, h or d ("30s", "6h", "1d"); at least 10 s. */
    every: z
      .string()
      .regex(DURATION, 'a number (at most 7 digits) and a unit: s, m, h or d, e.g. "6h"')
      .refine((s) => durationMs(s) >= 10_000, 'at least 10 s'),
    /** Create it paused (it still can be triggered). */
    paused: z.boolean().default(false),
    /** A note shown with the schedule (e.g. who made it and why). */
    note: z.string().max(500).optional(),
    /** Also start one rebuild right away. */
    triggerImmediately: z.boolean().default(false),
  })
  .strict();
export type RecipeScheduleSpecInput = z.input<typeof RecipeScheduleSpecSchema>;

function durationMs(s: string): number {
  const m = DURATION.exec(s);
  return m ? Number(m[1]) * (UNIT_MS[m[2] ?? 's'] ?? 1000) : 0;
}

export interface RecipeRun {
  workflowId: string;
  runId: string;
  scheduledAt: string;
  startedAt: string;
}

export interface RecipeScheduleInfo {
  recipeId: string;
  scheduleId: string;
  recipe: Recipe;
  every: string;
  paused: boolean;
  note?: string;
  /** Most recent rebuilds started (by the interval or by a trigger), oldest first. */
  recentRuns: RecipeRun[];
}

export interface RecipeScheduleDetails extends RecipeScheduleInfo {
  nextRunAt?: string;
  runningWorkflowIds: string[];
  actionsTaken: number;
  skippedOverlap: number;
  /** State of the newest run. */
  lastRun?: RecipeRun & { status: string };
  /** Result of the newest successful run among the recent ones: the recipe's current overlay. */
  lastSucceeded?: RecipeRun & { result: RebuildOverlayResult };
}

interface RecipeMemo {
  kind: typeof MEMO_KIND;
  recipe: Recipe;
  every: string;
}

function isRecipeMemo(memo: Record<string, unknown> | undefined): memo is { schedule: RecipeMemo } {
  const m = memo?.schedule as Partial<RecipeMemo> | undefined;
  return m?.kind === MEMO_KIND && typeof m.recipe === 'object' && typeof m.every === 'string';
}

function runOf(r: { scheduledAt: Date; takenAt: Date; action: { workflow: { workflowId: string; firstExecutionRunId: string } } }): RecipeRun {
  return { workflowId: r.action.workflow.workflowId, runId: r.action.workflow.firstExecutionRunId, scheduledAt: r.scheduledAt.toISOString(), startedAt: r.takenAt.toISOString() };
}

function infoOf(s: ScheduleSummary | ScheduleDescription): RecipeScheduleInfo | undefined {
  if (!isRecipeMemo(s.memo)) return undefined;
  const { recipe, every } = s.memo.schedule;
  return {
    recipeId: recipe.recipeId,
    scheduleId: s.scheduleId,
    recipe,
    every,
    paused: s.state.paused,
    ...(s.state.note ? { note: s.state.note } : {}),
    recentRuns: s.info.recentActions.map(runOf),
  };
}

export interface RecipeSchedulesOptions {
  /** The queue of workflow tasks the rebuilds run on (config.workflowTaskQueue). */
  workflowTaskQueue: string;
  /** Check that the recipe's host has a worker before creating/triggering (default true). */
  checkHost?: boolean;
}

/** How long trigger() reads the schedule for the action it caused (the scheduler acts in ~0.1-1 s). */
const TRIGGER_SEEN_WITHIN_MS = 10_000;

export class RecipeSchedules {
  constructor(
    private readonly client: Client,
    private readonly options: RecipeSchedulesOptions,
  ) {}

  private handle(recipeId: string) {
    if (!RECIPE_ID_PATTERN.test(recipeId)) throw new CloudletError('BAD_INPUT', `invalid recipe id "${recipeId}"`, { fix: 'use lower-case letters, digits and dashes (at most 40)' });
    return this.client.schedule.getHandle(recipeScheduleId(recipeId));
  }

  private async describe(recipeId: string): Promise<ScheduleDescription> {
    try {
      return await this.handle(recipeId).describe();
    } catch (e) {
      if (e instanceof ScheduleNotFoundError) {
        throw new CloudletError('NOT_FOUND', `there is no schedule for recipe ${recipeId}`, { fix: 'list the recipe schedules, or create one', details: { recipeId } });
      }
      throw e;
    }
  }

  /** Create the schedule of a recipe (CONFLICT if the recipe has one already). */
  async create(recipeInput: unknown, specInput: unknown): Promise<RecipeScheduleDetails> {
    const recipe = parseRecipe(recipeInput);
    const spec = RecipeScheduleSpecSchema.safeParse(specInput);
    if (!spec.success) {
      const problems = spec.error.issues.map((i) => `${i.path.join('.') || '(schedule)'}: ${i.message}`).join('; ');
      throw new CloudletError('BAD_INPUT', `invalid recipe schedule (${problems})`, { fix: 'e.g. { "every": "6h" }' });
    }
    if (this.options.checkHost ?? true) await assertHostServing(this.client, recipe.hostId);
    const memo: RecipeMemo = { kind: MEMO_KIND, recipe, every: spec.data.every };
    try {
      await this.client.schedule.create({
        scheduleId: recipeScheduleId(recipe.recipeId),
        spec: { intervals: [{ every: durationMs(spec.data.every) }] },
        action: {
          type: 'startWorkflow',
          workflowType: 'rebuildOverlay',
          workflowId: rebuildWorkflowId(recipe.recipeId),
          taskQueue: this.options.workflowTaskQueue,
          args: [recipe],
          // A stuck rebuild must not block the schedule for ever (overlap policy SKIP).
          workflowExecutionTimeout: `${recipe.timeoutSeconds + 3600} seconds`,
          typedSearchAttributes: [
            { key: SearchAttributes.host, value: recipe.hostId },
            { key: SearchAttributes.baseId, value: recipe.baseId },
            { key: SearchAttributes.operation, value: 'rebuildOverlay' },
          ],
          staticSummary: `Rebuild the overlay of recipe ${recipe.recipeId} on host ${recipe.hostId} (base ${recipe.baseId.slice(0, 12)}), verify it, make it current`,
        },
        policies: { overlap: ScheduleOverlapPolicy.SKIP, catchupWindow: '10 minutes', pauseOnFailure: false },
        state: { paused: spec.data.paused, ...(spec.data.note ? { note: spec.data.note } : {}), triggerImmediately: spec.data.triggerImmediately },
        memo: { schedule: memo },
        typedSearchAttributes: [
          { key: SearchAttributes.host, value: recipe.hostId },
          { key: SearchAttributes.baseId, value: recipe.baseId },
          { key: SearchAttributes.operation, value: 'rebuildOverlay' },
        ],
      });
    } catch (e) {
      if (e instanceof ScheduleAlreadyRunning) {
        throw new CloudletError('CONFLICT', `recipe ${recipe.recipeId} already has a schedule (${recipeScheduleId(recipe.recipeId)})`, {
          fix: 'delete it first, or trigger it',
          details: { recipeId: recipe.recipeId },
        });
      }
      throw e;
    }
    return this.get(recipe.recipeId);
  }

  /** Every recipe schedule of the namespace (schedules that are not recipes are left out). */
  async list(): Promise<RecipeScheduleInfo[]> {
    const out: RecipeScheduleInfo[] = [];
    for await (const s of this.client.schedule.list()) {
      const info = infoOf(s);
      if (info) out.push(info);
    }
    return out.sort((a, b) => a.recipeId.localeCompare(b.recipeId));
  }

  /** A recipe's schedule with its recent runs and the result of its newest successful one. */
  async get(recipeId: string): Promise<RecipeScheduleDetails> {
    const d = await this.describe(recipeId);
    const info = infoOf(d);
    if (!info) throw new CloudletError('NOT_FOUND', `schedule ${d.scheduleId} is not a recipe schedule`, { fix: 'it was not made by the cloudlet service' });
    const details: RecipeScheduleDetails = {
      ...info,
      ...(d.info.nextActionTimes[0] ? { nextRunAt: d.info.nextActionTimes[0].toISOString() } : {}),
      runningWorkflowIds: d.info.runningActions.map((a) => a.workflow.workflowId),
      actionsTaken: d.info.numActionsTaken,
      skippedOverlap: d.info.numActionsSkippedOverlap,
    };
    const newestFirst = [...info.recentRuns].reverse();
    for (const run of newestFirst) {
      const h = this.client.workflow.getHandle<(r: unknown) => Promise<RebuildOverlayResult>>(run.workflowId, run.runId);
      const status = (await h.describe().catch(() => undefined))?.status.name ?? 'UNKNOWN';
      if (!details.lastRun) details.lastRun = { ...run, status };
      if (status === 'COMPLETED') {
        details.lastSucceeded = { ...run, result: await h.result() };
        break;
      }
    }
    return details;
  }

  /**
   * Start a rebuild now and say which (its workflow id), reading the schedule until its counters
   * show the action taken. With the default SKIP, nothing starts while a rebuild is running: the
   * outcome then names the running ones.
   */
  async trigger(recipeId: string, overlap: ScheduleOverlapPolicy = ScheduleOverlapPolicy.SKIP): Promise<TriggerOutcome> {
    const d = await this.describe(recipeId);
    const info = infoOf(d);
    if (info && (this.options.checkHost ?? true)) await assertHostServing(this.client, info.recipe.hostId);
    const taken = d.info.numActionsTaken;
    const skipped = d.info.numActionsSkippedOverlap;
    await this.handle(recipeId).trigger(overlap);
    const deadline = Date.now() + TRIGGER_SEEN_WITHIN_MS;
    for (;;) {
      const now = await this.describe(recipeId);
      if (now.info.numActionsTaken > taken) {
        const newest = [...now.info.recentActions].sort((a, b) => a.takenAt.getTime() - b.takenAt.getTime()).at(-1);
        if (newest) return { started: newest.action.workflow.workflowId };
      }
      if (now.info.numActionsSkippedOverlap > skipped) return { skippedWhileRunning: now.info.runningActions.map((a) => a.workflow.workflowId) };
      // The trigger is accepted; if the scheduler has not acted on it yet, say so rather than wait on.
      if (Date.now() > deadline) return {};
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  async pause(recipeId: string, note = 'paused through the cloudlet service'): Promise<void> {
    await this.describe(recipeId);
    await this.handle(recipeId).pause(note);
  }

  async unpause(recipeId: string, note = 'unpaused through the cloudlet service'): Promise<void> {
    await this.describe(recipeId);
    await this.handle(recipeId).unpause(note);
  }

  /** Delete the schedule; running rebuilds finish, and the recipe's overlays stay on the host. */
  async delete(recipeId: string): Promise<void> {
    await this.describe(recipeId);
    await this.handle(recipeId).delete();
  }

  /**
   * A base VM was (re-)imported: rebuild every recipe made on it (on `hostId` only, if given).
   * Paused schedules are left alone (an operator paused them). A rebuild already running gets
   * one more after it (BUFFER_ONE), so the new base is always used.
   */
  async onBaseReimported(baseId: string, opts: { hostId?: string } = {}): Promise<{ triggered: string[]; skippedPaused: string[] }> {
    const triggered: string[] = [];
    const skippedPaused: string[] = [];
    for (const s of await this.list()) {
      if (s.recipe.baseId !== baseId || (opts.hostId !== undefined && s.recipe.hostId !== opts.hostId)) continue;
      // The list comes from the visibility store and may lag: read the schedule's own state.
      if ((await this.describe(s.recipeId)).state.paused) {
        skippedPaused.push(s.recipeId);
        continue;
      }
      await this.handle(s.recipeId).trigger(ScheduleOverlapPolicy.BUFFER_ONE);
      triggered.push(s.recipeId);
    }
    return { triggered, skippedPaused };
  }
}
