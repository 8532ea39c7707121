/**
 * Activities that drive the test guest on this host: boot, customize, save, restore, replug the
 * NIC, probe the application, destroy. Each is idempotent (a retry after a worker crash finds
 * the work done or redoes it from a clean state), heartbeats while it waits, and throws typed
 * failures.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { CloudletError } from '../core/errors';
import type { Hypervisor } from '../hypervisor/types';
import { createQcow2Overlay } from '../hypervisor/disk';
import { GuestAppClient, type GuestState } from '../guest/app-client';
import type { GuestImage } from '../guest/manifest';
import { heartbeat, withHeartbeats } from './heartbeat';

export interface GuestHandle {
  instanceId: string;
  domain: string;
  dir: string;
  diskPath: string;
  serialPath: string;
  mac: string;
  hostPort: number;
  bootId: string;
  bootToReadyMs: number;
}

export interface GuestActivityDeps {
  hostId: string;
  /** The host's data directory (instances live below it). */
  dataDir: string;
  hypervisor: Hypervisor;
  /** Loads the test guest image (throws NOT_FOUND with the fix when it is not built). */
  guestImage: () => GuestImage;
  log: Logger;
}

const INSTANCE_ID = /^[a-z0-9][a-z0-9-]{0,62}$/;
const BOOT_TIMEOUT_MS = 180_000;

export function randomMac(): string {
  const b = randomBytes(3);
  return `52:54:00:${[...b].map((x) => x.toString(16).padStart(2, '0')).join(':')}`;
}

export function createGuestActivities(deps: GuestActivityDeps) {
  const { hypervisor: hv, log } = deps;
  const domainName = (instanceId: string): string => `cl-${deps.hostId}-${instanceId}`;
  const instanceDir = (instanceId: string): string => path.join(deps.dataDir, 'instances', instanceId);

  function checkInstanceId(instanceId: string): void {
    if (!INSTANCE_ID.test(instanceId)) {
      throw new CloudletError('BAD_INPUT', `invalid instance id "${instanceId}"`, { fix: 'use lower-case letters, digits and dashes' });
    }
  }

  return {
    async bootGuest(input: { instanceId: string; memoryMiB: number }): Promise<GuestHandle> {
      checkInstanceId(input.instanceId);
      const image = deps.guestImage();
      const domain = domainName(input.instanceId);
      const dir = instanceDir(input.instanceId);
      // Idempotency: a retried boot starts from scratch rather than trusting a half-booted VM.
      await hv.destroy(domain);
      await hv.undefine(domain);
      await fs.promises.rm(dir, { recursive: true, force: true });
      await fs.promises.mkdir(dir, { recursive: true });
      const diskPath = path.join(dir, 'disk.qcow2');
      const serialPath = path.join(dir, 'serial.log');
      await createQcow2Overlay(diskPath, image.diskPath, image.diskFormat);
      const mac = randomMac();
      const started = Date.now();
      await hv.defineDomain({
        name: domain,
        memoryMiB: input.memoryMiB,
        vcpus: 1,
        kernel: image.kernelPath,
        initrd: image.initrdPath,
        cmdline: image.cmdline,
        disk: { path: diskPath, format: 'qcow2' },
        nic: { mac },
        serialPath,
      });
      await hv.start(domain);
      log.info({ domain, memoryMiB: input.memoryMiB }, 'guest started; waiting for its ready line');
      const line = await withHeartbeats(hv.waitForSerialLine(serialPath, image.readyPattern, BOOT_TIMEOUT_MS), () => ({ stage: 'boot', domain }));
      const bootToReadyMs = Date.now() - started;
      const bootId = image.readyPattern.exec(line)?.[1];
      if (!bootId) throw new CloudletError('CORRUPT', `the guest's ready line has no bootId: "${line}"`);
      const fwd = await hv.forwardPort(domain, { guestPort: image.appPort });
      log.info({ domain, bootId, bootToReadyMs, hostPort: fwd.hostPort }, 'guest ready');
      return { instanceId: input.instanceId, domain, dir, diskPath, serialPath, mac, hostPort: fwd.hostPort, bootId, bootToReadyMs };
    },

    async customizeGuest(input: { guest: GuestHandle; token: string; message: string }): Promise<GuestState> {
      const app = new GuestAppClient(input.guest.hostPort);
      await app.waitForState(60_000, () => heartbeat({ stage: 'customize' }));
      const state = await app.set(input.token, input.message);
      if (state.token !== input.token || state.disk !== input.message) {
        throw new CloudletError('HYPERVISOR', `the guest did not take its customization: ${JSON.stringify(state)}`);
      }
      return state;
    },

    async saveGuest(input: { guest: GuestHandle }): Promise<{ savePath: string; saveMs: number; bytes: number }> {
      const savePath = path.join(input.guest.dir, 'memory.sav');
      const state = await hv.state(input.guest.domain);
      if (state === 'running' || state === 'paused') {
        const tmp = `${savePath}.partial`;
        await fs.promises.rm(tmp, { force: true });
        const { ms } = await withHeartbeats(hv.save(input.guest.domain, tmp), () => ({ stage: 'save' }));
        await fs.promises.rename(tmp, savePath);
        const bytes = (await fs.promises.stat(savePath)).size;
        log.info({ domain: input.guest.domain, savePath, ms, bytes }, 'guest saved');
        return { savePath, saveMs: ms, bytes };
      }
      // A retry after the save completed: the domain is stopped and the snapshot is in place.
      if (fs.existsSync(savePath)) return { savePath, saveMs: 0, bytes: (await fs.promises.stat(savePath)).size };
      throw new CloudletError('NOT_FOUND', `cannot save ${input.guest.domain}: it is ${state} and no snapshot exists at ${savePath}`);
    },

    async restoreGuest(input: { guest: GuestHandle; savePath: string }): Promise<{ restoreMs: number }> {
      const state = await hv.state(input.guest.domain);
      if (state === 'running') return { restoreMs: 0 }; // a retry after the restore completed
      const r = await withHeartbeats(hv.restore(input.savePath, { diskPath: input.guest.diskPath, serialPath: input.guest.serialPath }), () => ({ stage: 'restore' }));
      log.info({ domain: input.guest.domain, ms: r.ms }, 'guest restored');
      return { restoreMs: r.ms };
    },

    async replugGuestNic(input: { guest: GuestHandle }): Promise<{ mac: string; hostPort: number; unplugMs: number; plugMs: number }> {
      const mac = randomMac();
      const r = await hv.replugNic(input.guest.domain, { mac });
      const image = deps.guestImage();
      const fwd = await hv.forwardPort(input.guest.domain, { guestPort: image.appPort });
      log.info({ domain: input.guest.domain, oldMac: r.oldMac, mac, hostPort: fwd.hostPort }, 'NIC replugged');
      return { mac, hostPort: fwd.hostPort, unplugMs: r.detachMs, plugMs: r.attachMs };
    },

    async probeGuestApp(input: {
      hostPort: number;
      expect: { bootId: string; token: string; message: string };
      timeoutMs?: number;
    }): Promise<{ state: GuestState; waitedMs: number }> {
      const app = new GuestAppClient(input.hostPort);
      const answer = await app.waitForState(input.timeoutMs ?? 60_000, () => heartbeat({ stage: 'probe' }));
      const s = answer.state;
      const wrong: string[] = [];
      if (s.bootId !== input.expect.bootId) wrong.push(`bootId ${s.bootId} (expected ${input.expect.bootId}: the guest rebooted instead of resuming)`);
      if (s.token !== input.expect.token) wrong.push(`token "${s.token}" (expected "${input.expect.token}": memory state lost)`);
      if (s.disk !== input.expect.message) wrong.push(`disk message "${s.disk}" (expected "${input.expect.message}": disk state lost)`);
      if (wrong.length > 0) {
        throw new CloudletError('CORRUPT', `the guest's application answered with the wrong state: ${wrong.join('; ')}`, { details: { state: s } });
      }
      return answer;
    },

    async destroyGuest(input: { instanceId: string }): Promise<void> {
      checkInstanceId(input.instanceId);
      const domain = domainName(input.instanceId);
      await hv.destroy(domain);
      await hv.undefine(domain);
      await fs.promises.rm(instanceDir(input.instanceId), { recursive: true, force: true });
    },
  };
}

export type GuestActivities = ReturnType<typeof createGuestActivities>;
