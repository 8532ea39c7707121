/**
 * A SQLite database file that holds secrets (tokens or their digests): its directory made 0700,
 * the file made 0600 before SQLite opens it (so its -wal and -shm files, which SQLite gives the
 * database file's mode, are 0600 too), opened in WAL mode with a busy timeout so the processes of
 * one machine share it. ":memory:" opens a database of this process only.
 */
import Database from 'better-sqlite3';
import fs from 'node:fs';
import path from 'node:path';

export function openPrivateSqlite(file: string): Database.Database {
  if (file !== ':memory:') {
    fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
    fs.closeSync(fs.openSync(file, 'a', 0o600));
    for (const f of [file, `${file}-wal`, `${file}-shm`]) if (fs.existsSync(f)) fs.chmodSync(f, 0o600);
  }
  const db = new Database(file);
  db.pragma('journal_mode = WAL');
  db.pragma('busy_timeout = 5000');
  return db;
}
