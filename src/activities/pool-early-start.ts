/**
 * Early start into a warm pool VM (docs/warm-pool.md): a synthesis takes a ready VM of its launch
 * VM's shape as soon as the overlay's meta is read, and the apply's join streams the save file into
 * it as it rebuilds it, less the pages the VM holds already (its RAM was filled with the base's).
 * QEMU gets the file's last part only in `finish`, once the apply has checked every digest and the
 * disk is installed, so it can neither activate the disk nor run the guest before then.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { step } from '../common/tracing';
import type { OverlayMeta, SaveFileTee } from '../core/overlay';
import type { ForwardResult, Hypervisor, SaveFeed } from '../hypervisor/types';
import { withHeartbeats } from './heartbeat';
import { installPoolDisk, POOL_LOADED, releaseClaimIn, takePoolEntry, type PoolEntry } from './pool-entries';

export interface PoolEarlyStart {
  /** For applyOverlay's `onMeta`: takes a VM and returns the feed into it (undefined: none ready). */
  onMeta(meta: OverlayMeta): Promise<SaveFileTee | undefined>;
  /** The entry taken, if any. */
  readonly taken: PoolEntry | undefined;
  /**
   * After the apply succeeded: installs the disk, lets QEMU finish loading (paused), writes
   * POOL_LOADED. Returns the entry and timings, or undefined when the VM did not take it (it is
   * destroyed; the synthesis restores its VM as usual).
   */
  finish(): Promise<{ entry: PoolEntry; timings: Record<string, number> } | undefined>;
  /** The apply failed: stops feeding and destroys the VM taken. */
  abort(): Promise<void>;
}

export function poolEarlyStart(
  deps: { hostId: string; dataDir: string; hypervisor: Hypervisor; log: Logger },
  input: { instanceId: string; baseId: string; instanceDir: string; appPort: number },
): PoolEarlyStart {
  const { hypervisor: hv, log } = deps;
  const dir = input.instanceDir;
  let taken: PoolEntry | undefined;
  let feed: SaveFeed | undefined;
  let claimMs = 0;
  let forwarding: Promise<ForwardResult | undefined> | undefined;
  const release = (): Promise<void> => releaseClaimIn({ dataDir: deps.dataDir, hypervisor: hv }, dir);
  return {
    get taken() {
      return taken;
    },

    async onMeta(meta) {
      if (meta.base.id !== input.baseId) return undefined;
      const t0 = Date.now();
      taken = await takePoolEntry(deps, { baseId: input.baseId, launchXml: meta.launch.domainXml, instanceDir: dir }).catch((e: unknown) => {
        log.warn({ instanceId: input.instanceId, err: String(e) }, 'could not take a warm pool VM; the synthesis restores its VM as usual');
        return undefined;
      });
      claimMs = Date.now() - t0;
      if (!taken) return undefined;
      const entry = taken;
      const f = hv.feedIncoming(entry.domain, entry.listening ? { listening: entry.listening } : {});
      feed = f;
      // Its port forward: made while it waited when the app has the default port, else now, while
      // the apply runs (QEMU's user network takes it paused).
      const ahead = entry.forward?.guestPort === input.appPort ? entry.forward : undefined;
      // The forward made ahead for another port goes: nothing would know of its host port.
      const stale = ahead ? undefined : entry.forward;
      forwarding = ahead
        ? Promise.resolve({ hostPort: ahead.hostPort, guestPort: ahead.guestPort, hostAddress: '127.0.0.1' })
        : Promise.all([
            hv.forwardPort(entry.domain, { guestPort: input.appPort }).catch((e: unknown) => {
              log.warn({ domain: entry.domain, err: String(e) }, 'could not forward the app port of the warm pool VM ahead; it is forwarded at resume');
              return undefined;
            }),
            stale && hv.unforwardPort(entry.domain, stale.hostPort).catch((e: unknown) => {
              log.warn({ domain: entry.domain, hostPort: stale.hostPort, err: String(e) }, 'could not remove the port forward the warm pool VM was given for the default app port');
            }),
          ]).then(([fwd]) => fwd);
      // Its RAM holds the base's memory already: pages the launch VM has in common with the base
      // are left out of the stream.
      return { tee: (part, opts) => f.write(part, opts), ...(entry.prefilled ? { prefilled: entry.prefilled } : {}) };
    },

    async finish() {
      const entry = taken;
      const loading = feed;
      if (!entry || !loading) return undefined;
      const t0 = Date.now();
      try {
        const loaded = await step('load the rest into the warm pool VM', () => withHeartbeats((async () => {
          await installPoolDisk(dir, entry);
          return loading.complete();
        })(), () => ({ stage: 'load the rest into the warm pool VM' })), { 'cloudlet.domain': entry.domain });
        const timings = { poolClaim: claimMs, 'load the rest into the warm pool VMMs': Date.now() - t0, 'stream into the warm pool VMMs': loaded.ms };
        const fwd = await forwarding;
        await fs.promises.writeFile(path.join(dir, POOL_LOADED), JSON.stringify(fwd ? { hostPort: fwd.hostPort } : {}));
        return { entry, timings };
      } catch (e) {
        log.warn({ domain: entry.domain, entryId: entry.entryId, err: String(e) }, 'the warm pool VM did not take the synthesized VM; it will be restored anew');
        await loading.close();
        await release();
        return undefined;
      }
    },

    async abort() {
      await feed?.close();
      await release();
    },
  };
}
