/**
 * How a recipe reaches the inside of a guest (docs/recipes.md §2): one shell script that writes
 * the recipe's files and runs its command, carried either through the test guest's
 * `POST /cgi-bin/exec` or, in guests with qemu-guest-agent (the Debian base VM), through the agent,
 * after the recipe's Debian packages have been fetched by the host and served to the guest's apt.
 */
import path from 'node:path';
import type { Logger } from 'pino';
import { z } from 'zod';
import { CloudletError } from '../core/errors';
import { aptInstallScript, preparePackageRepo, servePackageRepo } from '../guest/package-repo';
import type { Hypervisor } from '../hypervisor/types';
import { heartbeat, withHeartbeats } from './heartbeat';
import type { Recipe } from './recipes';

/** What running a recipe in a guest gave: the script's exit code and its output. */
export interface RecipeRun {
  exitCode: number;
  output: string;
  ms: number;
}

const quote = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;
const HEREDOC_END = 'CLOUDLET_RECIPE_EOF';

/**
 * One busybox sh script: write every file (base64 in a quoted heredoc, to a temp name, then
 * rename), then run the recipe's command; the disk is synced on exit. The script's exit code is
 * the command's.
 */
export function recipeScript(recipe: Pick<Recipe, 'recipeId' | 'files' | 'command'>): string {
  const lines = [`# cloudlet recipe ${recipe.recipeId}`, 'trap sync EXIT', 'cd /'];
  for (const f of recipe.files) {
    const tmp = `${f.path}.recipe-tmp`;
    const b64 = Buffer.from(f.content, 'utf8').toString('base64').replace(/(.{76})/g, '$1\n').replace(/\n$/, '');
    lines.push(
      `mkdir -p ${quote(path.posix.dirname(f.path))} || exit 90`,
      `base64 -d > ${quote(tmp)} <<'${HEREDOC_END}' || exit 90`,
      ...(b64 ? [b64] : []),
      HEREDOC_END,
      `chmod ${f.mode ?? '644'} ${quote(tmp)} && mv -f ${quote(tmp)} ${quote(f.path)} || exit 90`,
      `echo ${quote(`cloudlet-recipe: wrote ${f.path} (${Buffer.byteLength(f.content)} bytes)`)}`,
    );
  }
  lines.push('# the recipe command', recipe.command, '');
  return lines.join('\n');
}

const ExecAnswerSchema = z.object({ exitCode: z.number().int(), output: z.string() });

/** Through the test guest's POST /cgi-bin/exec (busybox guest, no package manager). */
export async function runWithExecEndpoint(hostPort: () => Promise<number>, instanceId: string, recipe: Recipe): Promise<RecipeRun> {
  if (recipe.packages.length > 0) {
    throw new CloudletError('BAD_INPUT', `recipe ${recipe.recipeId} names Debian packages, but the guest of instance ${instanceId} has no guest agent and no package manager (the busybox test guest)`, {
      fix: 'make the recipe on the Debian base VM (docs/workloads.md), or drop its packages',
    });
  }
  const url = `http://127.0.0.1:${await hostPort()}/cgi-bin/exec?timeout=${recipe.timeoutSeconds}`;
  const script = recipeScript(recipe);
  const t0 = Date.now();
  const call = async (): Promise<string> => {
    const res = await fetch(url, { method: 'POST', body: script, headers: { 'content-type': 'text/plain' }, signal: AbortSignal.timeout((recipe.timeoutSeconds + 30) * 1000) });
    const text = await res.text();
    if (!res.ok) throw new CloudletError('HYPERVISOR', `the guest's exec endpoint of instance ${instanceId} answered HTTP ${res.status}: ${text.slice(0, 300)}`, { fix: 'the guest must be the test guest (docs/test-guest.md) or have qemu-guest-agent' });
    return text;
  };
  const text = await withHeartbeats(call(), () => ({ stage: 'run recipe', recipeId: recipe.recipeId, seconds: Math.round((Date.now() - t0) / 1000) }), 5000);
  let answer: z.infer<typeof ExecAnswerSchema>;
  try {
    answer = ExecAnswerSchema.parse(JSON.parse(text));
  } catch (cause) {
    throw new CloudletError('CORRUPT', `the guest's exec endpoint gave an answer that is not {exitCode, output}: ${text.slice(0, 300)}`, { cause });
  }
  return { ...answer, ms: Date.now() - t0 };
}

/**
 * Through qemu-guest-agent: the packages are fetched on the host and served to the guest's apt
 * while the script runs; the script (packages, files, command) is the program's standard input.
 */
export async function runWithAgent(hv: Hypervisor, domain: string, instanceId: string, recipe: Recipe, options: { packageCacheDir: string; log: Logger }): Promise<RecipeRun> {
  const { log } = options;
  const t0 = Date.now();
  let stage = 'run recipe';
  const beat = (): void => heartbeat({ stage, recipeId: recipe.recipeId, seconds: Math.round((Date.now() - t0) / 1000) });
  await hv.waitForGuestAgent(domain, 60_000);
  let served: { port: number; close(): Promise<void> } | undefined;
  try {
    let prefix = '';
    if (recipe.packages.length > 0) {
      stage = 'fetch packages';
      const status = await hv.guestExec(domain, { path: '/bin/cat', args: ['/var/lib/dpkg/status'], timeoutMs: 60_000 });
      if (status.exitCode !== 0) {
        throw new CloudletError('BAD_INPUT', `the guest of instance ${instanceId} has no readable /var/lib/dpkg/status (${status.stderr.trim()}), so its packages cannot be resolved`, { fix: 'recipes with packages need a Debian guest (docs/workloads.md)' });
      }
      const repo = await withHeartbeats(
        preparePackageRepo({ guestStatus: status.stdout, packages: recipe.packages, cacheRoot: options.packageCacheDir, log: (m) => log.info({ recipeId: recipe.recipeId }, m) }),
        () => ({ stage, recipeId: recipe.recipeId }),
        5000,
      );
      served = await servePackageRepo(repo.dir);
      prefix = `${aptInstallScript(recipe.packages, served.port)}\n`;
    }
    stage = 'run recipe';
    const script = `${prefix}${recipeScript(recipe)}`;
    // From a file, with /dev/null as stdin: a command of the script that reads its standard
    // input (a package's maintainer script, say) must not eat the rest of the script.
    const runFile = 'f=$(mktemp /run/cloudlet-recipe.XXXXXX) && cat > "$f" && sh "$f" < /dev/null; rc=$?; rm -f "$f"; exit $rc';
    const r = await hv.guestExec(domain, { path: '/bin/sh', args: ['-c', runFile], input: script, timeoutMs: recipe.timeoutSeconds * 1000, onWait: beat });
    return { exitCode: r.exitCode, output: `${r.stdout}${r.stderr ? `\n[stderr]\n${r.stderr}` : ''}`, ms: Date.now() - t0 };
  } finally {
    await served?.close();
  }
}
