/**
 * What recipe schedules offer (a Temporal Schedule per overlay recipe rebuilds its overlay; see
 * docs/recipes.md), independent of the API that serves them: the service's RecipeSchedules and
 * the fake implement it, the schedule routes and the typed client use it.
 */
import type { TriggerOutcome } from './types';

export interface RecipeRunInfo {
  workflowId: string;
  runId: string;
  scheduledAt: string;
  startedAt: string;
}

export interface RecipeScheduleSummary {
  recipeId: string;
  scheduleId: string;
  recipe: unknown;
  every: string;
  paused: boolean;
  note?: string;
  recentRuns: RecipeRunInfo[];
}

export interface RecipeScheduleDetail extends RecipeScheduleSummary {
  nextRunAt?: string;
  runningWorkflowIds?: string[];
  actionsTaken?: number;
  skippedOverlap?: number;
  lastRun?: RecipeRunInfo & { status: string };
  lastSucceeded?: RecipeRunInfo & { result: unknown };
}

export interface RecipeScheduleSpec {
  every: string;
  paused?: boolean;
  note?: string;
  triggerImmediately?: boolean;
}

/** What the schedule routes need; NOT_FOUND / CONFLICT / BAD_INPUT CloudletErrors map as elsewhere. */
export interface RecipeScheduleApi {
  create(recipe: unknown, spec: RecipeScheduleSpec): Promise<RecipeScheduleDetail>;
  list(): Promise<RecipeScheduleSummary[]>;
  get(recipeId: string): Promise<RecipeScheduleDetail>;
  trigger(recipeId: string): Promise<TriggerOutcome>;
  pause(recipeId: string, note?: string): Promise<void>;
  unpause(recipeId: string, note?: string): Promise<void>;
  delete(recipeId: string): Promise<void>;
}
