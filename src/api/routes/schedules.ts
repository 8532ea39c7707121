/**
 * Recipe schedules: a Temporal Schedule per overlay recipe rebuilds its overlay on its own. The
 * API offers create, list, show, trigger, pause, unpause and delete over a `RecipeScheduleApi`
 * (src/service/schedule-types.ts; the service's RecipeSchedules implements it); a server built without one answers
 * 501 on these routes.
 */
import type { FastifyReply } from 'fastify';
import type { RecipeScheduleApi, RecipeScheduleSpec } from '../../service/schedule-types';
import { ApiError } from '../errors';
import { defineRoute, R, type Route } from '../route';
import { CreateScheduleBodySchema, RecipeParamsSchema, ScheduleInfoSchema, ScheduleListSchema, ScheduleNoteBodySchema, TriggeredSchema } from '../schemas';

export function schedulePath(recipeId: string): string {
  return `/v1/schedules/${encodeURIComponent(recipeId)}`;
}

/** The schedule routes, over `schedules` (undefined: every route answers 501). */
export function scheduleRoutes(schedules: RecipeScheduleApi | undefined): Route[] {
  const need = (): RecipeScheduleApi => {
    if (!schedules) {
      throw new ApiError(501, 'NOT_IMPLEMENTED', 'this API server was started without recipe schedules', {
        fix: 'start the API with the Temporal-backed service (its RecipeSchedules)',
      });
    }
    return schedules;
  };
  const noContent = (reply: FastifyReply) => reply.code(204).send();
  const notImplemented = { description: 'The server runs without recipe schedules.' };
  return [
    defineRoute({
      method: 'POST',
      path: '/v1/schedules',
      operationId: 'createSchedule',
      access: 'admin',
      summary: 'Create the rebuild schedule of an overlay recipe',
      description: 'The recipe names its host and base; every "every" the rebuildOverlay workflow resumes the base, runs the recipe, makes, verifies and publishes the overlay.',
      tag: 'schedules',
      body: CreateScheduleBodySchema,
      responses: {
        201: { description: 'Created (Location: the schedule).', schema: ScheduleInfoSchema, headers: { Location: 'The schedule URL' } },
        400: R.badInput,
        401: R.unauthorized,
        409: { description: 'The recipe has a schedule already.' },
        422: R.unprocessable,
        501: notImplemented,
      },
      handler: async ({ body, reply }) => {
        const spec: RecipeScheduleSpec = { every: body.every };
        if (body.paused !== undefined) spec.paused = body.paused;
        if (body.note !== undefined) spec.note = body.note;
        if (body.triggerImmediately !== undefined) spec.triggerImmediately = body.triggerImmediately;
        const created = await need().create(body.recipe, spec);
        void reply.code(201).header('location', schedulePath(created.recipeId));
        return created;
      },
    }),
    defineRoute({
      method: 'GET',
      path: '/v1/schedules',
      operationId: 'listSchedules',
      access: 'admin',
      summary: 'List recipe schedules',
      tag: 'schedules',
      responses: { 200: { description: 'The schedules.', schema: ScheduleListSchema }, 401: R.unauthorized, 501: notImplemented },
      handler: async () => ({ schedules: await need().list() }),
    }),
    defineRoute({
      method: 'GET',
      path: '/v1/schedules/{recipeId}',
      operationId: 'getSchedule',
      access: 'admin',
      summary: 'Show a recipe schedule: next run, recent runs, the current (last verified) overlay',
      tag: 'schedules',
      params: RecipeParamsSchema,
      responses: { 200: { description: 'The schedule.', schema: ScheduleInfoSchema }, 400: R.badInput, 401: R.unauthorized, 404: R.notFound, 501: notImplemented },
      handler: async ({ params }) => need().get(params.recipeId),
    }),
    defineRoute({
      method: 'POST',
      path: '/v1/schedules/{recipeId}/trigger',
      operationId: 'triggerSchedule',
      access: 'admin',
      summary: 'Rebuild now (skipped while a rebuild of the recipe runs)',
      tag: 'schedules',
      params: RecipeParamsSchema,
      responses: {
        202: { description: 'Triggered: the rebuild it started (follow it at statusUrl), or the running rebuilds it was skipped for.', schema: TriggeredSchema },
        400: R.badInput, 401: R.unauthorized, 404: R.notFound, 501: notImplemented,
      },
      handler: async ({ params, reply }) => {
        const outcome = await need().trigger(params.recipeId);
        const statusUrl = outcome.started !== undefined ? `/v1/operations/${encodeURIComponent(outcome.started)}` : undefined;
        void reply.code(202).header('location', statusUrl ?? schedulePath(params.recipeId));
        return {
          recipeId: params.recipeId,
          scheduleUrl: schedulePath(params.recipeId),
          ...(outcome.started !== undefined ? { operation: { id: outcome.started, kind: 'rebuildOverlay' as const }, statusUrl } : {}),
          ...(outcome.skippedWhileRunning ? { skippedWhileRunning: outcome.skippedWhileRunning } : {}),
        };
      },
    }),
    defineRoute({
      method: 'POST',
      path: '/v1/schedules/{recipeId}/pause',
      operationId: 'pauseSchedule',
      access: 'admin',
      summary: 'Pause a recipe schedule (it can still be triggered)',
      tag: 'schedules',
      params: RecipeParamsSchema,
      body: ScheduleNoteBodySchema,
      bodyOptional: true,
      responses: { 204: { description: 'Paused.' }, 400: R.badInput, 401: R.unauthorized, 404: R.notFound, 501: notImplemented },
      handler: async ({ params, body, reply }) => {
        await need().pause(params.recipeId, body.note);
        return noContent(reply);
      },
    }),
    defineRoute({
      method: 'POST',
      path: '/v1/schedules/{recipeId}/unpause',
      operationId: 'unpauseSchedule',
      access: 'admin',
      summary: 'Resume a paused recipe schedule',
      tag: 'schedules',
      params: RecipeParamsSchema,
      body: ScheduleNoteBodySchema,
      bodyOptional: true,
      responses: { 204: { description: 'Unpaused.' }, 400: R.badInput, 401: R.unauthorized, 404: R.notFound, 501: notImplemented },
      handler: async ({ params, body, reply }) => {
        await need().unpause(params.recipeId, body.note);
        return noContent(reply);
      },
    }),
    defineRoute({
      method: 'DELETE',
      path: '/v1/schedules/{recipeId}',
      operationId: 'deleteSchedule',
      access: 'admin',
      summary: 'Delete a recipe schedule (running rebuilds finish; its overlays stay)',
      tag: 'schedules',
      params: RecipeParamsSchema,
      responses: { 204: { description: 'Deleted.' }, 400: R.badInput, 401: R.unauthorized, 404: R.notFound, 501: notImplemented },
      handler: async ({ params, reply }) => {
        await need().delete(params.recipeId);
        return noContent(reply);
      },
    }),
  ];
}
