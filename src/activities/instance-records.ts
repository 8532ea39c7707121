/**
 * A host's instance records: <host data>/instances/<id>/instance.json beside the instance's
 * files, and the libvirt domain name an instance has on the host.
 */
import fs from 'node:fs';
import path from 'node:path';
import { CloudletError } from '../core/errors';

/** The app port of a VM whose request names none (the test guest's application). */
export const APP_PORT_DEFAULT = 8080;

export interface InstanceRecord {
  instanceId: string;
  hostId: string;
  domain: string;
  baseId: string;
  overlayId?: string;
  /** 127.0.0.1 port forwarded to the guest's application port. */
  hostPort?: number;
  appPort: number;
  createdAt: string;
  /** Set on an instance that arrived by handoff: the handoff's id. */
  handoffId?: string;
  /**
   * Set on an instance served by a warm pool's VM (docs/warm-pool.md): the pool entry it took.
   * Its `domain` is then that VM's name (libvirt cannot rename a running domain).
   */
  poolEntry?: string;
  /** With poolEntry: the synthesis started that VM for itself, no ready one being in the pool (early start). */
  startedOwn?: boolean;
}

/**
 * In an instance's directory, beside memory.sav: the memory image of a VM whose RAM is a shared
 * file (a handoff's x-ignore-shared cut-over), and `<name>.json` with where the RAM block is in it
 * ({block, offset, length}). restoreAsInstance loads it into the VM's RAM file, then removes both.
 */
export const SHARED_RAM_IMAGE = 'memory.ram';

const INSTANCE_ID = /^[a-z0-9][a-z0-9-]{0,62}$/;

export function instanceRecords(hostId: string, dataDir: string) {
  const instancesDir = path.join(dataDir, 'instances');
  const dir = (instanceId: string): string => {
    if (!INSTANCE_ID.test(instanceId)) {
      throw new CloudletError('BAD_INPUT', `invalid instance id "${instanceId}"`, { fix: 'use lower-case letters, digits and dashes (at most 63)' });
    }
    return path.join(instancesDir, instanceId);
  };
  return {
    dir,
    domainName: (instanceId: string): string => `cl-${hostId}-${instanceId}`,
    exists: (instanceId: string): boolean => fs.existsSync(path.join(dir(instanceId), 'instance.json')),
    /** The domain of an instance: its record's (a warm pool's VM keeps its own name), else the usual name. */
    async domainOf(instanceId: string): Promise<string> {
      try {
        return (JSON.parse(await fs.promises.readFile(path.join(dir(instanceId), 'instance.json'), 'utf8')) as InstanceRecord).domain;
      } catch {
        return `cl-${hostId}-${instanceId}`;
      }
    },
    async read(instanceId: string): Promise<InstanceRecord> {
      const file = path.join(dir(instanceId), 'instance.json');
      try {
        return JSON.parse(await fs.promises.readFile(file, 'utf8')) as InstanceRecord;
      } catch (cause) {
        throw new CloudletError('NOT_FOUND', `instance ${instanceId} does not exist on host ${hostId}`, {
          fix: 'list the instances of this host, or provision one first',
          cause,
        });
      }
    },
    async write(rec: InstanceRecord): Promise<void> {
      const file = path.join(dir(rec.instanceId), 'instance.json');
      await fs.promises.writeFile(`${file}.tmp`, JSON.stringify(rec, null, 2));
      await fs.promises.rename(`${file}.tmp`, file);
    },
  };
}
