/**
 * The CLI's `--api` mode: a session on the cloudlet HTTP API (through its typed client) and the
 * one way every command that starts an operation behaves: print the operation id and its Web UI
 * link, follow the workflow's progress (stage, bytes) until it closes, then print the outcome;
 * or, with --no-wait, print the operation and return at once.
 */
import { CloudletApiClient } from '../api/client';
import { CloudletError, isCloudletError } from '../core/errors';
import type { OperationRef, OperationStatus } from '../service/types';
import type { ApiTarget, CliContext } from './context';

export interface PollOptions {
  /** First polling interval of a wait (default 250 ms), growing to `maxIntervalMs` (default 1 s). */
  intervalMs?: number;
  maxIntervalMs?: number;
}

/** How a command asks for an operation to be followed (`--no-wait`, `--wait-timeout`). */
export interface WaitFlags {
  wait: boolean;
  waitTimeout?: number;
}

/** What a command prints once its operation succeeded: extra JSON fields and the text. */
export interface Rendered {
  data?: Record<string, unknown>;
  text: string;
}

const DIGEST = /^[0-9a-f]{64}$/;
const PREFIX = /^[0-9a-f]{6,63}$/;

export class Remote {
  readonly client: CloudletApiClient;

  constructor(
    readonly target: ApiTarget,
    private readonly poll: PollOptions = {},
  ) {
    this.client = new CloudletApiClient({ baseUrl: target.url, ...(target.token !== undefined ? { token: target.token } : {}) });
  }

  /** A full base id from an id or a unique prefix of at least 6 hex digits. */
  async resolveBaseId(ref: string): Promise<string> {
    if (DIGEST.test(ref) || !PREFIX.test(ref)) return ref;
    return uniqueMatch('base', ref, (await this.client.listBases()).map((b) => b.id), 'cloudlet --api URL base list');
  }

  /** A full overlay id from an id, a unique prefix, or the URL the overlay is published under. */
  async resolveOverlayId(ref: string): Promise<string> {
    if (DIGEST.test(ref)) return ref;
    if (/^https?:\/\//i.test(ref)) {
      const found = (await this.client.listOverlays()).find((o) => o.url === ref);
      if (!found) throw new CloudletError('NOT_FOUND', `no overlay of this cloudlet is published at ${ref}`, { fix: 'list them with `cloudlet --api URL overlay list`' });
      return found.id;
    }
    if (!PREFIX.test(ref)) return ref;
    return uniqueMatch('overlay', ref, (await this.client.listOverlays()).map((o) => o.id), 'cloudlet --api URL overlay list');
  }

  /**
   * Start an operation and follow it: the id and Web UI link go to stderr at once (a JSON line
   * with --json), progress while it runs, the outcome to stdout. With `wait: false`, print the
   * operation (and how to follow it) and return. A failed operation throws its CloudletError, its
   * message naming the operation and where to look.
   */
  async operation(ctx: CliContext, start: () => Promise<OperationRef>, flags: WaitFlags, render: (status: OperationStatus) => Promise<Rendered>): Promise<void> {
    const ref = await start();
    if (!flags.wait) {
      ctx.print({ operation: ref }, () =>
        [`started ${ref.kind} operation ${ref.id}`, `  follow  cloudlet operation wait ${ref.id}`, ...(ref.webUiUrl ? [`  web UI  ${ref.webUiUrl}`] : [])].join('\n'),
      );
      return;
    }
    announce(ctx, ref);
    const status = await this.follow(ctx, ref, flags);
    const out = await render(status);
    ctx.print({ operation: summary(status), result: status.result, ...out.data }, () => out.text);
  }

  /**
   * Wait for an operation with the progress display; resolves with its final status when it
   * succeeded, throws (with the Web UI link) when it failed, was cancelled or the wait timed out.
   */
  async follow(ctx: CliContext, ref: Pick<OperationRef, 'id' | 'webUiUrl'>, flags: Pick<WaitFlags, 'waitTimeout'> = {}): Promise<OperationStatus> {
    const display = ctx.progress();
    const shown = new Set<string>();
    let current: string | undefined;
    const stage = (name: string, done: number, total: number): void => {
      if (current !== name) shown.add(name);
      current = name;
      display.onProgress(done, total, name);
    };
    try {
      return await this.client.waitForOperation(ref.id, {
        ...(this.poll.intervalMs !== undefined ? { intervalMs: this.poll.intervalMs } : {}),
        maxIntervalMs: this.poll.maxIntervalMs ?? 1000,
        ...(flags.waitTimeout !== undefined ? { timeoutMs: flags.waitTimeout * 1000 } : {}),
        onProgress: (_status, progress) => {
          if (!progress) return;
          // Stages that began and ended between two polls still get their (finished) line.
          for (const d of progress.done) if (!shown.has(d)) stage(d, 0, 0);
          if (progress.stage !== 'done' && !progress.done.includes(progress.stage)) stage(progress.stage, progress.bytesDone ?? 0, progress.bytesTotal ?? 0);
        },
      });
    } catch (e) {
      if (!isCloudletError(e)) throw e;
      const where = ref.webUiUrl ? ` (Temporal Web UI: ${ref.webUiUrl})` : '';
      const fix = e.code === 'TIMEOUT' ? `the operation goes on in the service: follow it with \`cloudlet operation wait ${ref.id}\`` : e.fix;
      throw new CloudletError(e.code, `${e.message.replace(/\. Fix: .*$/s, '')}${where}`, { ...(fix !== undefined ? { fix } : {}), details: { ...e.details, operationId: ref.id }, cause: e });
    } finally {
      display.done();
    }
  }
}

/** Tell the user which operation runs and where to watch it, before progress starts. */
function announce(ctx: CliContext, ref: OperationRef): void {
  if (ctx.json) {
    ctx.io.stderr.write(JSON.stringify({ type: 'operation', id: ref.id, kind: ref.kind, webUiUrl: ref.webUiUrl ?? null }) + '\n');
  } else {
    ctx.io.stderr.write(`operation ${ref.id}${ref.webUiUrl ? `\n  web UI  ${ref.webUiUrl}` : ''}\n`);
  }
}

/** The operation as shown in results (without the result itself, printed apart). */
export function summary(s: OperationStatus): Omit<OperationStatus, 'result'> {
  const { result: _result, ...rest } = s;
  return rest;
}

function uniqueMatch(what: string, ref: string, ids: string[], listCommand: string): string {
  const hits = ids.filter((id) => id.startsWith(ref));
  if (hits.length === 1 && hits[0] !== undefined) return hits[0];
  if (hits.length === 0) throw new CloudletError('NOT_FOUND', `no ${what} id starts with ${ref}`, { fix: `list them with \`${listCommand}\`` });
  throw new CloudletError('BAD_INPUT', `${ref} is the start of ${hits.length} ${what} ids`, { fix: 'give more digits' });
}
