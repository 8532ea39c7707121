/**
 * Overlay recipes: what an application developer would do by hand to a VM resumed from a base
 * (write some files, install and start the application), as data, so a schedule can rebuild the
 * overlay on its own. These are the host activities of the rebuildOverlay workflow: parse a
 * recipe, run it inside a guest, check the application of a synthesized VM, and keep the recipe's
 * current and previous overlay in a small JSON file under the host's data dir.
 *
 * The mechanism that runs a recipe inside the guest is the test guest's `POST /cgi-bin/exec`
 * (see docs/recipes.md and docs/test-guest.md): a shell script run by busybox sh as root.
 */
import fs from 'node:fs';
import path from 'node:path';
import { ApplicationFailure } from '@temporalio/common';
import type { Logger } from 'pino';
import { z } from 'zod';
import { HOST_ID_PATTERN } from '../common/names';
import { CloudletError } from '../core/errors';
import { Store } from '../core/store';
import { DEBIAN_PACKAGE } from '../guest/package-repo';
import type { Hypervisor } from '../hypervisor/types';
import { heartbeat } from './heartbeat';
import { runWithAgent, runWithExecEndpoint } from './recipe-in-guest';
import type { InstanceRecord } from './instances';

// ---------------------------------------------------------------------------------------------
// The recipe format (validated at every edge: the service, and again by the workflow's first step)

export const RECIPE_ID_PATTERN = /^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$/;
const MAX_FILE_BYTES = 256 * 1024;
/** The test guest's port of its application and of `POST /cgi-bin/exec` (docs/test-guest.md). */
export const GUEST_EXEC_PORT = 8080;
const MAX_FILES_BYTES = 1024 * 1024;

export const RecipeFileSchema = z.object({
  /** Absolute path inside the guest, e.g. /data/site/index.html (under /data: the disk). */
  path: z
    .string()
    .max(1024)
    .regex(/^\/[^\0]*$/, 'an absolute path')
    .refine((p) => !p.split('/').includes('..') && !p.endsWith('/'), 'no ".." segment and no trailing slash'),
  /** Text content, written as it is (no newline added). */
  content: z.string().max(MAX_FILE_BYTES, `at most ${MAX_FILE_BYTES} characters`),
  /** Octal file mode, e.g. "755" for a script (default "644"). */
  mode: z.string().regex(/^[0-7]{3,4}$/, 'an octal mode such as "644" or "755"').optional(),
});

export const RecipeCheckSchema = z.object({
  /** Path of an HTTP GET on the guest's application port, e.g. /cgi-bin/state. */
  path: z.string().regex(/^\/\S*$/, 'a path starting with "/"').max(1024),
  /** A string the answer's body must contain. */
  expect: z.string().min(1).max(4096),
  /** How long to keep asking before the check fails (default 30 s). */
  timeoutSeconds: z.number().int().min(1).max(600).default(30),
});

export const RecipeSchema = z
  .object({
    recipeId: z.string().regex(RECIPE_ID_PATTERN, 'lower-case letters, digits and dashes, at most 40'),
    /** The host whose worker builds (and verifies) the overlay; it must hold the base. */
    hostId: z.string().regex(HOST_ID_PATTERN, 'a host id such as "local" or "host-a"'),
    /** The base VM the overlay is made against (sha256). */
    baseId: z.string().regex(/^[0-9a-f]{64}$/, 'a base id: 64 lower-case hex digits'),
    /** Files written into the guest before the command runs. */
    files: z.array(RecipeFileSchema).max(64).default([]),
    /**
     * Debian packages to install before the files and the command (guests with qemu-guest-agent
     * and apt only, such as the Debian base VM): the host fetches them and whatever the guest
     * lacks of their dependencies, and serves them to the guest's apt (docs/recipes.md).
     */
    packages: z.array(z.string().regex(DEBIAN_PACKAGE, 'a Debian package name such as python3-flask')).max(200).default([]),
    /** Shell script (run as root in /: busybox sh in the test guest, dash in the Debian guest) that installs and starts the application. */
    command: z.string().min(1).max(64 * 1024),
    /** Optional check of the synthesized VM's application before the overlay becomes current. */
    check: RecipeCheckSchema.optional(),
    /** The command is killed after this many seconds (default 300). */
    timeoutSeconds: z.number().int().min(1).max(3600).default(300),
    /**
     * The guest port of the application (default 8080, the test guest's own application, which
     * also serves the exec endpoint). The verifying synthesis forwards this port; for another
     * port, give a `check` (the test guest's readiness probe only answers on 8080).
     */
    appPort: z.number().int().min(1).max(65535).default(GUEST_EXEC_PORT),
  })
  .strict()
  .refine((r) => r.appPort === GUEST_EXEC_PORT || r.check !== undefined, {
    message: `a recipe whose application is not on port ${GUEST_EXEC_PORT} needs a check, to verify it`,
    path: ['check'],
  })
  .refine((r) => r.files.reduce((n, f) => n + Buffer.byteLength(f.content), 0) <= MAX_FILES_BYTES, {
    message: `the files of a recipe hold at most ${MAX_FILES_BYTES} bytes in all`,
    path: ['files'],
  });

/** A recipe as a user writes it (defaults not filled in). */
export type RecipeInput = z.input<typeof RecipeSchema>;
/** A parsed recipe. */
export type Recipe = z.output<typeof RecipeSchema>;
export type RecipeCheck = z.output<typeof RecipeCheckSchema>;

/** Parse a recipe at an edge; BAD_INPUT names every problem. */
export function parseRecipe(input: unknown): Recipe {
  const r = RecipeSchema.safeParse(input);
  if (!r.success) {
    const problems = r.error.issues.map((i) => `${i.path.join('.') || '(recipe)'}: ${i.message}`).join('; ');
    throw new CloudletError('BAD_INPUT', `invalid overlay recipe (${problems})`, {
      fix: 'correct the listed fields (see docs/recipes.md for the format)',
      details: { issues: r.error.issues.map((i) => ({ path: i.path.map(String), message: i.message, code: i.code })) },
    });
  }
  return r.data;
}

export { recipeScript } from './recipe-in-guest';

// ---------------------------------------------------------------------------------------------
// The recipe's overlays on the host

export interface RecipeOverlayVersion {
  overlayId: string;
  url: string;
  bytes: number;
  /** When the overlay passed verification (a synthesis from it answered, and the check). */
  verifiedAt: string;
  /** The rebuildOverlay run that made it. */
  workflowId: string;
}

export interface RecipeState {
  recipeId: string;
  baseId: string;
  current?: RecipeOverlayVersion;
  /** The version current before `current`, kept so users can fall back. */
  previous?: RecipeOverlayVersion;
  lastFailure?: { workflowId: string; at: string; message: string; overlayId?: string };
  updatedAt: string;
}

export interface RecipeActivityDeps {
  hostId: string;
  dataDir: string;
  log: Logger;
  /** To run recipes through qemu-guest-agent in guests that have it. */
  hypervisor?: Hypervisor;
  /** Where fetched Debian packages are cached (default <dataDir>/cache/guest-packages). */
  packageCacheDir?: string;
  /** Where the Temporal server is (to trigger recipe schedules); defaults to the local dev server. */
  temporal?: { address: string; namespace: string };
}

const tail = (s: string, n = 2000): string => (s.length > n ? `…${s.slice(-n)}` : s);

export function recipeStateFile(dataDir: string, recipeId: string): string {
  if (!RECIPE_ID_PATTERN.test(recipeId)) throw new CloudletError('BAD_INPUT', `invalid recipe id "${recipeId}"`, { fix: 'use lower-case letters, digits and dashes (at most 40)' });
  return path.join(dataDir, 'recipes', `${recipeId}.json`);
}

/** The recipe's overlays as recorded on a host (undefined before its first verified rebuild or failure). */
export async function readRecipeState(dataDir: string, recipeId: string): Promise<RecipeState | undefined> {
  try {
    return JSON.parse(await fs.promises.readFile(recipeStateFile(dataDir, recipeId), 'utf8')) as RecipeState;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
}

async function writeRecipeState(dataDir: string, state: RecipeState): Promise<void> {
  const file = recipeStateFile(dataDir, state.recipeId);
  await fs.promises.mkdir(path.dirname(file), { recursive: true });
  await fs.promises.writeFile(`${file}.tmp`, `${JSON.stringify(state, null, 2)}\n`);
  await fs.promises.rename(`${file}.tmp`, file);
}

export function createRecipeActivities(deps: RecipeActivityDeps) {
  const { log } = deps;
  const storeRoot = path.join(deps.dataDir, 'store');

  async function recordOf(instanceId: string): Promise<InstanceRecord> {
    try {
      return JSON.parse(await fs.promises.readFile(path.join(deps.dataDir, 'instances', instanceId, 'instance.json'), 'utf8')) as InstanceRecord;
    } catch (cause) {
      throw new CloudletError('NOT_FOUND', `instance ${instanceId} does not exist on host ${deps.hostId}`, { fix: 'resume a base VM as this instance first', cause });
    }
  }

  async function hostPortOf(instanceId: string): Promise<number> {
    const rec = await recordOf(instanceId);
    if (rec.hostPort === undefined) throw new CloudletError('CONFLICT', `instance ${instanceId} has no forwarded application port`, { fix: 'resume it first' });
    return rec.hostPort;
  }

  /** The instance's domain when it has qemu-guest-agent (recipes then run through it), else undefined. */
  async function agentDomainOf(instanceId: string): Promise<string | undefined> {
    if (!deps.hypervisor) return undefined;
    const rec = await recordOf(instanceId);
    return (await deps.hypervisor.hasGuestAgent(rec.domain)) ? rec.domain : undefined;
  }

  /** Serializes read-modify-write of the recipe files within this worker. */
  let stateLock: Promise<unknown> = Promise.resolve();
  function locked<T>(f: () => Promise<T>): Promise<T> {
    const next = stateLock.then(f, f);
    stateLock = next.catch(() => undefined);
    return next;
  }

  async function referencedOverlays(): Promise<Set<string>> {
    const dir = path.join(deps.dataDir, 'recipes');
    const ids = new Set<string>();
    const files = await fs.promises.readdir(dir).catch(() => [] as string[]);
    for (const f of files.filter((n) => n.endsWith('.json'))) {
      const s = await readRecipeState(deps.dataDir, f.slice(0, -'.json'.length)).catch(() => undefined);
      if (s?.current) ids.add(s.current.overlayId);
      if (s?.previous) ids.add(s.previous.overlayId);
    }
    return ids;
  }

  return {
    /**
     * A base was (re-)imported on this host: trigger the schedules of this host's recipes made on
     * it (see RecipeSchedules.onBaseReimported). For importBaseVm to call after its import.
     */
    async rebuildRecipesOfBase(input: { baseId: string }): Promise<{ triggered: string[]; skippedPaused: string[] }> {
      // Loaded here: the schedule service imports this module's recipe format.
      const [{ Client, Connection }, { RecipeSchedules }] = await Promise.all([import('@temporalio/client'), import('../service/schedules')]);
      const t = deps.temporal ?? { address: '127.0.0.1:7233', namespace: 'default' };
      const connection = await Connection.connect({ address: t.address, connectTimeout: '10s' });
      let r: { triggered: string[]; skippedPaused: string[] };
      try {
        const schedules = new RecipeSchedules(new Client({ connection, namespace: t.namespace }), { workflowTaskQueue: '', checkHost: false });
        r = await schedules.onBaseReimported(input.baseId, { hostId: deps.hostId });
      } finally {
        await connection.close();
      }
      log.info({ baseId: input.baseId, ...r }, 'recipe rebuilds triggered by a base import');
      return r;
    },

    /** Validate a recipe (e.g. the arguments a schedule was created with) for this host. */
    async parseRecipe(input: unknown): Promise<Recipe> {
      const recipe = parseRecipe(input);
      if (recipe.hostId !== deps.hostId) {
        throw new CloudletError('BAD_INPUT', `recipe ${recipe.recipeId} is for host ${recipe.hostId}, not ${deps.hostId}`, { fix: 'start the rebuild on the recipe\'s host' });
      }
      return recipe;
    },

    /**
     * Run a recipe inside an instance's guest through the test guest's exec endpoint: its files
     * are written, then its command runs. A non-zero exit fails non-retryably (RECIPE_FAILED)
     * with the end of the output.
     */
    async runRecipeInGuest(input: { instanceId: string; recipe: Recipe }): Promise<{ exitCode: number; output: string; ms: number }> {
      const { recipe } = input;
      const domain = await agentDomainOf(input.instanceId);
      const answer = domain !== undefined && deps.hypervisor
        ? await runWithAgent(deps.hypervisor, domain, input.instanceId, recipe, { packageCacheDir: deps.packageCacheDir ?? path.join(deps.dataDir, 'cache', 'guest-packages'), log })
        : await runWithExecEndpoint(() => hostPortOf(input.instanceId), input.instanceId, recipe);
      const { ms } = answer;
      log.info({ recipeId: recipe.recipeId, instanceId: input.instanceId, exitCode: answer.exitCode, ms, via: domain !== undefined ? 'guest agent' : 'exec endpoint' }, 'recipe ran in the guest');
      if (answer.exitCode !== 0) {
        const why = answer.exitCode === 143 ? `it was killed after its timeout of ${recipe.timeoutSeconds} s`
          : answer.exitCode === 90 ? 'a file could not be written'
          : answer.exitCode === 91 ? 'the guest had no network route to fetch its packages'
          : answer.exitCode === 92 ? "the guest's apt could not read the host's package list"
          : answer.exitCode === 93 ? "the guest's apt could not install the packages"
          : `exit code ${answer.exitCode}`;
        const how = domain !== undefined ? 'run it by hand in a resumed base through the guest agent (virsh qemu-agent-command)' : 'run it by hand through POST /cgi-bin/exec on a resumed base';
        throw ApplicationFailure.create({
          type: 'RECIPE_FAILED',
          nonRetryable: true,
          message: `recipe ${recipe.recipeId} failed inside the guest of instance ${input.instanceId} (${why}); output: ${tail(answer.output, 1500)}. Fix: correct the recipe (${how})`,
          details: [{ recipeId: recipe.recipeId, exitCode: answer.exitCode, output: tail(answer.output) }],
        });
      }
      return { exitCode: answer.exitCode, output: tail(answer.output), ms };
    },
    /** GET the check's path on the instance's application until the body contains `expect`. */
    async checkRecipeApp(input: { instanceId: string; recipeId: string; check: RecipeCheck }): Promise<{ status: number; waitedMs: number }> {
      const hostPort = await hostPortOf(input.instanceId);
      const url = `http://127.0.0.1:${hostPort}${input.check.path}`;
      const t0 = Date.now();
      let last = 'no answer yet';
      while (Date.now() - t0 < input.check.timeoutSeconds * 1000) {
        try {
          const res = await fetch(url, { signal: AbortSignal.timeout(5000) });
          const body = await res.text();
          if (res.ok && body.includes(input.check.expect)) return { status: res.status, waitedMs: Date.now() - t0 };
          last = `HTTP ${res.status}: ${body.slice(0, 300)}`;
        } catch (e) {
          last = (e as Error).message;
        }
        heartbeat({ stage: 'check', recipeId: input.recipeId });
        await new Promise((r) => setTimeout(r, 500));
      }
      throw ApplicationFailure.create({
        type: 'RECIPE_CHECK_FAILED',
        nonRetryable: true,
        message: `the check of recipe ${input.recipeId} failed on the synthesized instance ${input.instanceId}: GET ${input.check.path} did not contain ${JSON.stringify(input.check.expect)} within ${input.check.timeoutSeconds} s (last answer: ${last}). Fix: correct the recipe's command or its check`,
        details: [{ recipeId: input.recipeId, path: input.check.path, expect: input.check.expect, last }],
      });
    },

    async getRecipeState(input: { recipeId: string }): Promise<RecipeState | null> {
      return (await readRecipeState(deps.dataDir, input.recipeId)) ?? null;
    },

    /**
     * Make a verified overlay the recipe's current one; the current one becomes the previous.
     * Idempotent: recording the current overlay again changes nothing.
     */
    recordRecipeOverlay(input: { recipeId: string; baseId: string; overlay: Omit<RecipeOverlayVersion, 'verifiedAt'> }): Promise<{ current: RecipeOverlayVersion; previous?: RecipeOverlayVersion }> {
      return locked(async () => {
        const old = await readRecipeState(deps.dataDir, input.recipeId);
        if (old?.current?.overlayId === input.overlay.overlayId) return { current: old.current, ...(old.previous ? { previous: old.previous } : {}) };
        const current: RecipeOverlayVersion = { ...input.overlay, verifiedAt: new Date().toISOString() };
        const state: RecipeState = {
          recipeId: input.recipeId,
          baseId: input.baseId,
          current,
          ...(old?.current ? { previous: old.current } : {}),
          ...(old?.lastFailure ? { lastFailure: old.lastFailure } : {}),
          updatedAt: current.verifiedAt,
        };
        await writeRecipeState(deps.dataDir, state);
        log.info({ recipeId: input.recipeId, overlayId: current.overlayId, previousOverlayId: old?.current?.overlayId }, 'recipe overlay is now current');
        return { current, ...(state.previous ? { previous: state.previous } : {}) };
      });
    },

    /**
     * A rebuild failed: record why, and remove the overlay it made (never verified) from the
     * store unless a recipe of this host uses it. The current and previous versions stay.
     */
    discardRecipeRun(input: { recipeId: string; baseId: string; workflowId: string; message: string; overlayId?: string }): Promise<{ removedOverlay: boolean }> {
      return locked(async () => {
        const old = await readRecipeState(deps.dataDir, input.recipeId);
        const at = new Date().toISOString();
        await writeRecipeState(deps.dataDir, {
          ...(old ?? { recipeId: input.recipeId, baseId: input.baseId }),
          lastFailure: { workflowId: input.workflowId, at, message: input.message.slice(0, 2000), ...(input.overlayId ? { overlayId: input.overlayId } : {}) },
          updatedAt: at,
        });
        let removedOverlay = false;
        if (input.overlayId && !(await referencedOverlays()).has(input.overlayId)) {
          const store = await Store.open(storeRoot);
          try {
            if (store.getOverlay(input.overlayId)) {
              await store.removeOverlay(input.overlayId);
              removedOverlay = true;
            }
          } finally {
            store.close();
          }
        }
        log.warn({ recipeId: input.recipeId, workflowId: input.workflowId, overlayId: input.overlayId, removedOverlay }, 'recipe rebuild failed; previous overlay kept');
        return { removedOverlay };
      });
    },
  };
}

export type RecipeActivities = ReturnType<typeof createRecipeActivities>;
