/**
 * `cloudlet --api URL schedule create|list|info|trigger|pause|unpause|delete`: the Temporal
 * Schedules that rebuild an overlay from its recipe (docs/recipes.md).
 */
import { promises as fsp } from 'node:fs';
import type { Command } from 'commander';
import type { RecipeScheduleSpec } from '../../service/schedule-types';
import { CloudletError } from '../../core/errors';
import { summary } from '../remote';
import { operationText, scheduleListText, scheduleText } from '../remote-format';
import type { CommandEnv } from './env';

export function registerScheduleCommands(program: Command, env: CommandEnv): void {
  const schedule = program.command('schedule').description('scheduled overlay rebuilds from recipes, on the cloudlet behind --api');

  schedule
    .command('create')
    .description("create a recipe's rebuild schedule (a Temporal Schedule running rebuildOverlay)")
    .requiredOption('--recipe <file.json>', 'the recipe: {recipeId, hostId, baseId, files?, command, check?, appPort?} (docs/recipes.md)')
    .requiredOption('--every <interval>', 'rebuild interval: a number and s, m, h or d (at least 10 s), e.g. 6h')
    .option('--paused', 'create it paused')
    .option('--note <text>', 'a note shown with the schedule')
    .option('--now', 'also start one rebuild right away')
    .action(
      env.api(async (ctx, remote, opts: { recipe: string; every: string; paused?: boolean; note?: string; now?: boolean }) => {
        const recipe = await readRecipe(opts.recipe);
        const spec: RecipeScheduleSpec = { every: opts.every };
        if (opts.paused) spec.paused = true;
        if (opts.note !== undefined) spec.note = opts.note;
        if (opts.now) spec.triggerImmediately = true;
        const s = await remote.client.createSchedule(recipe, spec);
        ctx.print(s, () => `created schedule ${s.scheduleId}\n${scheduleText(s)}`);
      }),
    );

  schedule
    .command('list')
    .description('list the recipe schedules')
    .action(
      env.api(async (ctx, remote) => {
        const list = await remote.client.listSchedules();
        ctx.print(list, () => scheduleListText(list));
      }),
    );

  schedule
    .command('info')
    .description('show a schedule: next run, recent runs, last run, last verified overlay')
    .argument('<recipeId>', 'recipe id')
    .action(
      env.api(async (ctx, remote, recipeId: string) => {
        const s = await remote.client.getSchedule(recipeId);
        if (!s) throw new CloudletError('NOT_FOUND', `there is no schedule for recipe ${recipeId}`, { fix: 'list them with `cloudlet --api URL schedule list`' });
        ctx.print(s, () => scheduleText(s));
      }),
    );

  schedule
    .command('trigger')
    .description('rebuild now (skipped while a rebuild of this recipe runs)')
    .argument('<recipeId>', 'recipe id')
    .option('--wait', 'follow the rebuild it started with progress until it ends (exit 1 if it failed)')
    .action(
      env.api(async (ctx, remote, recipeId: string, opts: { wait?: boolean }) => {
        const t = await remote.client.triggerSchedule(recipeId);
        if (t.operation && opts.wait) {
          const s = await remote.follow(ctx, t.operation);
          ctx.print({ recipeId, operation: summary(s), result: s.result }, () => operationText(s));
          return;
        }
        ctx.print({ recipeId, ...t }, () => {
          if (t.operation) return `started rebuild ${t.operation.id} of recipe ${recipeId}; follow it with \`cloudlet operation wait ${t.operation.id}\``;
          if (t.skippedWhileRunning) return `nothing started: a rebuild of recipe ${recipeId} is running (${t.skippedWhileRunning.join(', ')}); follow it with \`cloudlet operation wait <id>\``;
          return `triggered a rebuild of recipe ${recipeId}; the scheduler has not started it yet: see \`cloudlet schedule info ${recipeId}\``;
        });
      }),
    );

  for (const [name, verb] of [
    ['pause', 'paused'],
    ['unpause', 'unpaused'],
  ] as const) {
    schedule
      .command(name)
      .description(`${name} a schedule (running rebuilds go on)`)
      .argument('<recipeId>', 'recipe id')
      .option('--note <text>', 'why (shown with the schedule)')
      .action(
        env.api(async (ctx, remote, recipeId: string, opts: { note?: string }) => {
          await (name === 'pause' ? remote.client.pauseSchedule(recipeId, opts.note) : remote.client.unpauseSchedule(recipeId, opts.note));
          ctx.print({ recipeId, paused: name === 'pause' }, () => `${verb} the schedule of recipe ${recipeId}`);
        }),
      );
  }

  schedule
    .command('delete')
    .description('delete a schedule (running rebuilds finish; overlays stay)')
    .argument('<recipeId>', 'recipe id')
    .action(
      env.api(async (ctx, remote, recipeId: string) => {
        await remote.client.deleteSchedule(recipeId);
        ctx.print({ recipeId, deleted: true }, () => `deleted the schedule of recipe ${recipeId}`);
      }),
    );
}

async function readRecipe(file: string): Promise<unknown> {
  let text: string;
  try {
    text = await fsp.readFile(file, 'utf8');
  } catch (cause) {
    throw new CloudletError('BAD_INPUT', `cannot read the recipe file ${file} (${(cause as Error).message})`, { fix: 'pass the path of a JSON recipe (docs/recipes.md)', cause });
  }
  try {
    return JSON.parse(text) as unknown;
  } catch (cause) {
    throw new CloudletError('BAD_INPUT', `the recipe file ${file} is not JSON (${(cause as Error).message})`, { fix: 'write the recipe as one JSON object (docs/recipes.md)', cause });
  }
}
