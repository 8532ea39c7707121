/**
 * The cluster's handoff secret: the key its API signs handoff tickets with and its host workers
 * check them with. CLOUDLET_HANDOFF_SECRET (64 hex digits) when set; otherwise a random key kept
 * in <var>/secrets/handoff-<namespace>.key (mode 0600), made on first use, so the API and the
 * workers of one cluster on one machine agree without configuration.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { CloudletError } from '../core/errors';

export function loadHandoffSecret(varDir: string, namespace: string, env: NodeJS.ProcessEnv = process.env): Buffer {
  const given = env.CLOUDLET_HANDOFF_SECRET;
  if (given !== undefined && given !== '') {
    if (!/^[0-9a-fA-F]{64,}$/.test(given)) {
      throw new CloudletError('BAD_INPUT', 'CLOUDLET_HANDOFF_SECRET must be at least 64 hex digits', { fix: 'generate one with `openssl rand -hex 32`, the same for the API and every host worker of the cluster' });
    }
    return Buffer.from(given, 'hex');
  }
  const file = path.join(varDir, 'secrets', `handoff-${namespace.replace(/[^A-Za-z0-9_.-]/g, '_')}.key`);
  fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
  try {
    fs.writeFileSync(file, randomBytes(32).toString('hex'), { flag: 'wx', mode: 0o600 });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
  }
  const hex = fs.readFileSync(file, 'utf8').trim();
  if (!/^[0-9a-f]{64}$/.test(hex)) {
    throw new CloudletError('CORRUPT', `the handoff secret in ${file} is not 64 hex digits`, { fix: `remove ${file} (a new one is made; tickets issued before stop working)` });
  }
  return Buffer.from(hex, 'hex');
}
