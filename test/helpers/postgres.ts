/**
 * A real PostgreSQL server (Debian's package, installed by infra/setup.sh) for one test file: a
 * fresh cluster made by initdb in a temporary directory, listening on a free loopback port and a
 * socket in that directory, run as the `postgres` user when the tests run as root (PostgreSQL
 * refuses to run as root). Trust authentication: only this machine's loopback reaches it.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Client } from 'pg';
import { freePort } from '../../src/common/ports';
import { waitFor } from './poll';

export interface RunningPostgres {
  /** postgres://cloudlet@127.0.0.1:<port>/<database> of a fresh database. */
  url: string;
  /** Another fresh, empty database on the same server. */
  newDatabase(name: string): Promise<string>;
  stop(): Promise<void>;
}

function binDir(): string {
  const root = '/usr/lib/postgresql';
  const versions = fs.existsSync(root) ? fs.readdirSync(root).filter((v) => /^\d+$/.test(v)).sort((a, b) => Number(b) - Number(a)) : [];
  const dir = versions.map((v) => path.join(root, v, 'bin')).find((d) => fs.existsSync(path.join(d, 'postgres')));
  if (!dir) throw new Error(`no PostgreSQL server under ${root}: install Debian's postgresql package (bash infra/setup.sh does)`);
  return dir;
}

export async function startPostgres(): Promise<RunningPostgres> {
  const bin = binDir();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cloudlet-postgres-'));
  const asRoot = process.getuid?.() === 0;
  const runAs = (cmd: string, args: string[]): [string, string[]] => (asRoot ? ['runuser', ['-u', 'postgres', '--', cmd, ...args]] : [cmd, args]);
  if (asRoot) execFileSync('chown', ['postgres:postgres', dir]);
  fs.chmodSync(dir, 0o700);
  const data = path.join(dir, 'data');
  const [initdb, initArgs] = runAs(path.join(bin, 'initdb'), ['-D', data, '-U', 'cloudlet', '-A', 'trust', '--no-sync', '-E', 'UTF8']);
  execFileSync(initdb, initArgs, { stdio: 'pipe' });
  const port = await freePort();
  const logFile = path.join(dir, 'postgres.log');
  const log = fs.openSync(logFile, 'a');
  if (asRoot) execFileSync('chown', ['postgres:postgres', logFile]);
  const [postgres, args] = runAs(path.join(bin, 'postgres'), ['-D', data, '-p', String(port), '-k', dir, '-c', 'listen_addresses=127.0.0.1', '-c', 'fsync=off', '-c', 'synchronous_commit=off']);
  const proc: ChildProcess = spawn(postgres, args, { stdio: ['ignore', log, log] });
  let exited = false;
  proc.on('exit', () => (exited = true));
  const admin = `postgres://cloudlet@127.0.0.1:${port}/postgres`;
  const query = async (sql: string): Promise<void> => {
    const c = new Client({ connectionString: admin });
    await c.connect();
    try {
      await c.query(sql);
    } finally {
      await c.end();
    }
  };
  try {
    await waitFor('PostgreSQL to accept connections', async () => {
      if (exited) throw new Error(`postgres exited: ${fs.readFileSync(logFile, 'utf8').slice(-2000)}`);
      return query('SELECT 1').then(() => true, () => false);
    }, 60_000);
  } catch (e) {
    proc.kill('SIGKILL');
    throw e;
  }
  const newDatabase = async (name: string): Promise<string> => {
    await query(`CREATE DATABASE "${name.replace(/"/g, '')}"`);
    return `postgres://cloudlet@127.0.0.1:${port}/${name}`;
  };
  const url = await newDatabase('cloudlet_test');
  return {
    url,
    newDatabase,
    async stop() {
      if (!exited) {
        // pg_ctl (as the server's user): runuser does not pass every signal on to the server.
        const gone = new Promise((r) => proc.once('exit', r));
        const [pgCtl, stopArgs] = runAs(path.join(bin, 'pg_ctl'), ['stop', '-D', data, '-m', 'fast', '-w']);
        execFileSync(pgCtl, stopArgs, { stdio: 'pipe' });
        await gone;
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
