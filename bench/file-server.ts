/** Starts bench/file-server.mjs (a Range-capable static server in its own process) on a directory. */
import { spawn } from 'node:child_process';
import path from 'node:path';
import { createInterface } from 'node:readline';

export interface FileServer {
  port: number;
  close(): Promise<void>;
}

export async function startFileServer(root: string): Promise<FileServer> {
  const child = spawn(process.execPath, [path.join(__dirname, 'file-server.mjs'), root], { stdio: ['pipe', 'pipe', 'inherit'] });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const port = await new Promise<number>((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code) => reject(new Error(`the benchmark's file server exited (code ${code}) before it listened`)));
    createInterface({ input: child.stdout }).once('line', (line) => {
      try {
        resolve((JSON.parse(line) as { port: number }).port);
      } catch (e) {
        reject(e);
      }
    });
  });
  return {
    port,
    close: async () => {
      child.stdin.end();
      await exited;
    },
  };
}
