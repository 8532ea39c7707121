/** `cloudlet --api URL operation status|wait <id>`: the workflows behind long commands. */
import type { Command } from 'commander';
import { CloudletError } from '../../core/errors';
import { summary } from '../remote';
import { operationText } from '../remote-format';
import type { CommandEnv } from './env';

export function registerOperationCommands(program: Command, env: CommandEnv): void {
  const operation = program.command('operation').description('operations (Temporal workflows) started through the cloudlet behind --api');

  operation
    .command('status')
    .description('show an operation: state, current stage and bytes, result or failure, Web UI link')
    .argument('<operationId>', 'the operation id a command printed, e.g. synthesizeVm/host-b/inst-1a2b')
    .action(
      env.api(async (ctx, remote, id: string) => {
        const s = await remote.client.getOperation(id);
        if (!s) throw new CloudletError('NOT_FOUND', `operation ${id} does not exist`, { fix: 'use the id a command printed (its workflow id)' });
        ctx.print(s, () => operationText(s));
      }),
    );

  operation
    .command('cancel')
    .description('cancel a running operation: it stops and removes what it made (a deployment cancels all its syntheses)')
    .argument('<operationId>', 'operation id')
    .action(
      env.api(async (ctx, remote, id: string) => {
        await remote.client.cancelOperation(id);
        ctx.print({ cancelling: id }, () => `cancelling ${id}; follow it with: cloudlet operation wait ${id}`);
      }),
    );

  operation
    .command('wait')
    .description('follow a running operation with progress until it ends (exit 1 if it failed)')
    .argument('<operationId>', 'operation id')
    .option('--wait-timeout <seconds>', 'stop waiting after this long (the operation goes on)', Number)
    .action(
      env.api(async (ctx, remote, id: string, opts: { waitTimeout?: number }) => {
        const first = await remote.client.getOperation(id);
        if (!first) throw new CloudletError('NOT_FOUND', `operation ${id} does not exist`, { fix: 'use the id a command printed (its workflow id)' });
        const s = await remote.follow(ctx, first, opts.waitTimeout !== undefined ? { waitTimeout: opts.waitTimeout } : {});
        ctx.print({ operation: summary(s), result: s.result }, () => operationText(s));
      }),
    );
}
