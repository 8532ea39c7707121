/**
 * Host workers as their own processes (src/workers/main.ts, as in production), for the benchmarks:
 * the hosts' event loops are not shared with each other nor with the benchmark's client. And the
 * way the service runs an operation: its workflow on its host's queue.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import type { Client } from '@temporalio/client';
import { hostTaskQueue } from '../src/common/names';
import type { Config } from '../src/config';
import { waitForHostsServing, workerCommand } from '../test/helpers/infra';

export interface WorkerProcesses {
  /** SIGTERM to every worker; resolves once they have exited. */
  stop(): Promise<void>;
}

/** Starts one worker process per host (`env`: more CLOUDLET_* settings) and waits until each serves. */
export async function startWorkerProcesses(client: Client, config: Config, hosts: string[], env: Record<string, string> = {}): Promise<WorkerProcesses> {
  const workers: ChildProcess[] = [];
  const exited: Promise<void>[] = [];
  const stop = async (): Promise<void> => {
    for (const w of workers) w.kill('SIGTERM');
    await Promise.allSettled(exited);
  };
  for (const h of hosts) {
    const { command, args } = workerCommand(h);
    const child = spawn(command, args, {
      env: { ...process.env, CLOUDLET_WORKFLOW_QUEUE: config.workflowTaskQueue, CLOUDLET_VAR: config.varDir, CLOUDLET_LOG_LEVEL: 'warn', ...env },
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    workers.push(child);
    exited.push(new Promise((resolve) => child.once('exit', () => resolve())));
  }
  try {
    await waitForHostsServing(client, hosts, 120_000);
  } catch (e) {
    await stop();
    throw e;
  }
  return { stop };
}

/** Runs an operation's workflow to its end on its host's queue, as the service starts them. */
export function hostExec(client: Client) {
  return <A extends { hostId: string }, T>(wf: (a: A) => Promise<T>, id: string, arg: A): Promise<T> =>
    client.workflow.execute(wf as (a: A) => Promise<T>, { taskQueue: hostTaskQueue(arg.hostId), workflowId: id, args: [{ ...arg, onHostQueue: true }] });
}
