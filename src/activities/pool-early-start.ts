/**
 * Early start (docs/warm-pool.md): a synthesis gets a VM of its launch VM's shape as soon as the
 * overlay's meta is read, and the apply's join streams the save file into it as it rebuilds it,
 * less the pages the VM holds already (its RAM was filled with the base's). The VM is a warm pool's
 * ready one when there is one; else (`startOwn`) the synthesis starts one for itself, while the
 * overlay arrives, and the stream waits for it. QEMU gets the file's last part only in `finish`,
 * once the apply has checked every digest and the disk is installed, so it can neither activate
 * the disk nor run the guest before then.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { step } from '../common/tracing';
import type { OverlayMeta, SaveFileTee } from '../core/overlay';
import type { ForwardResult, Hypervisor, SaveFeed } from '../hypervisor/types';
import { withHeartbeats } from './heartbeat';
import { domainShape, installPoolDisk, moveEntryInto, POOL_LOADED, poolDir, poolLevels, releaseClaimIn, removeListening, startClaim, takePoolEntry, type PoolEntry } from './pool-entries';
import { baseDomainXml, basePrefill, startPoolEntry } from './pool-start';

/** A domain XML's shape (domainShape), or undefined when it cannot be read (it then fits nothing). */
function shapeOf(xml: string): string | undefined {
  try {
    return domainShape(xml);
  } catch {
    return undefined;
  }
}

/** The RAM block a VM started here keeps in a shared file (the libvirt adapter's memory backend). */
const SHARED_RAM_BLOCK = 'pc.ram';

export interface PoolEarlyStart {
  /**
   * Before the overlay's meta is read: with no ready VM of the base in the pool (and `startOwn`),
   * starts one now, so that its start overlaps the meta's and the first segments' download.
   * onMeta keeps it only when the launch VM has the base VM's shape.
   */
  beforeMeta(): Promise<void>;
  /** For applyOverlay's `onMeta`: takes a VM and returns the feed into it (undefined: none ready). */
  onMeta(meta: OverlayMeta): Promise<SaveFileTee | undefined>;
  /** The entry taken, if any. */
  readonly taken: PoolEntry | undefined;
  /**
   * After the apply succeeded: installs the disk, lets QEMU finish loading (paused), writes
   * POOL_LOADED. Returns the entry and timings, or undefined when the VM did not take it (it is
   * destroyed; the synthesis restores its VM as usual).
   */
  finish(): Promise<{ entry: PoolEntry; startedOwn: boolean; timings: Record<string, number> } | undefined>;
  /** The apply failed: stops feeding and destroys the VM taken. */
  abort(): Promise<void>;
}

export function poolEarlyStart(
  deps: { hostId: string; dataDir: string; hypervisor: Hypervisor; log: Logger },
  input: { instanceId: string; baseId: string; instanceDir: string; appPort: number; startOwn?: boolean },
): PoolEarlyStart {
  const { hypervisor: hv, log } = deps;
  const dir = input.instanceDir;
  let taken: PoolEntry | undefined;
  let feed: SaveFeed | undefined;
  let claimMs = 0;
  /** The VM this synthesis starts for itself (no ready one in the pool): resolves to its feed. */
  let starting: Promise<SaveFeed> | undefined;
  let startedOwn = false;
  let ownPrefill: Awaited<ReturnType<typeof basePrefill>>;
  /** The VM started ahead being removed (dropOwn). */
  let dropping: Promise<void> | undefined;
  /** The domain shape of the base's VM, known once a start was planned. */
  let baseShape: string | undefined;
  let forwarding: Promise<ForwardResult | undefined> | undefined;
  const release = (): Promise<void> => releaseClaimIn({ hostId: deps.hostId, dataDir: deps.dataDir, hypervisor: hv }, dir);

  /** Connects to the VM taken (or started) and forwards the app port (see onMeta). */
  function attach(entry: PoolEntry): SaveFeed {
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
    return f;
  }

  /**
   * No ready VM: start one of the base for this synthesis. The stream waits for it (the join holds
   * its parts until the VM listens); the overlay keeps arriving meanwhile. Its RAM gets the base's
   * memory before any part reaches it. planOwn first: false when no start can be planned.
   */
  async function planOwn(): Promise<boolean> {
    try {
      baseShape = domainShape(await baseDomainXml(deps.dataDir, input.baseId));
      ownPrefill = await basePrefill(deps.dataDir, input.baseId, SHARED_RAM_BLOCK);
      return true;
    } catch (e) {
      log.warn({ instanceId: input.instanceId, err: String(e) }, 'could not plan an early start; the synthesis restores its VM as usual');
      return false;
    }
  }

  function startOwnVm(): void {
    const prefill = ownPrefill;
    const t0 = Date.now();
    startedOwn = true;
    starting = startPoolEntry(deps, input.baseId, { claimFor: startClaim(path.basename(dir)), ...(prefill ? { expectPrefill: prefill } : {}) })
      .then((entry) => moveEntryInto(deps, entry, dir).catch(async (e: unknown) => {
        // Claimed for us and not moved (or moved half-way): nobody else would remove it soon.
        // If its VM cannot be destroyed now, the entry stays for the pool's step (stale claim).
        if (await hv.destroy(entry.domain).then(() => true, () => false)) {
          await removeListening(entry);
          await fs.promises.rm(path.join(poolDir(deps.dataDir), entry.entryId), { recursive: true, force: true });
        }
        throw e;
      }))
      .then((entry) => {
        claimMs = Date.now() - t0;
        taken = entry;
        return attach(entry);
      });
    starting.catch((e: unknown) => log.warn({ instanceId: input.instanceId, err: String(e) }, 'could not start a VM for early start; the synthesis restores its VM as usual'));
  }

  /** The feed into the VM this synthesis started (or is starting) for itself. */
  function ownTee(): SaveFileTee {
    const wait = starting as Promise<SaveFeed>;
    // A part is dropped when the VM could not be started: finish() then finds no VM taken.
    return { tee: (part, opts) => wait.then((f) => f.write(part, opts), () => undefined), ...(ownPrefill ? { prefilled: ownPrefill } : {}) };
  }

  /**
   * Stops and removes the VM started ahead, when the overlay turned out to need another one. In
   * the background: the download goes on meanwhile; finish() and abort() wait for it.
   */
  function dropOwn(why: string): void {
    log.info({ instanceId: input.instanceId }, `${why}: the VM started ahead goes, the synthesis restores its VM`);
    const wasStarting = starting;
    starting = undefined;
    startedOwn = false;
    dropping = (async () => {
      await wasStarting?.catch(() => undefined);
      await feed?.close();
      feed = undefined;
      taken = undefined;
      await release().catch((e: unknown) => log.warn({ instanceId: input.instanceId, err: String(e) }, 'could not remove the VM started ahead now; the instance\'s removal does'));
    })();
  }

  return {
    get taken() {
      return taken;
    },

    async beforeMeta() {
      if (!input.startOwn || starting) return;
      // A ready VM of the pool is taken once the meta says which shape is needed; with none, one
      // is started now, while the overlay's first bytes are on their way (its start is seconds).
      const ready = await poolLevels(deps.dataDir).then((l) => l.ready.get(input.baseId) ?? 0, () => 0);
      if (ready === 0 && (await planOwn())) startOwnVm();
    },

    async onMeta(meta) {
      if (starting) {
        // Started ahead: keep it when the overlay is of this base and its launch VM has the base VM's shape.
        if (meta.base.id === input.baseId && shapeOf(meta.launch.domainXml) === baseShape) return ownTee();
        dropOwn(meta.base.id === input.baseId ? 'the launch VM has other devices than its base VM' : `the overlay is of base ${meta.base.id}`);
        return undefined;
      }
      if (meta.base.id !== input.baseId) return undefined;
      const t0 = Date.now();
      taken = await takePoolEntry(deps, { baseId: input.baseId, launchXml: meta.launch.domainXml, instanceDir: dir }).catch((e: unknown) => {
        log.warn({ instanceId: input.instanceId, err: String(e) }, 'could not take a warm pool VM; the synthesis restores its VM as usual');
        return undefined;
      });
      claimMs = Date.now() - t0;
      if (!taken) {
        if (!input.startOwn) return undefined;
        if (!(await planOwn())) return undefined;
        if (shapeOf(meta.launch.domainXml) !== baseShape) {
          log.info({ instanceId: input.instanceId }, 'the launch VM has other devices than its base VM: no early start, the synthesis restores its VM');
          return undefined;
        }
        startOwnVm();
        return ownTee();
      }
      const f = attach(taken);
      // Its RAM holds the base's memory already: pages the launch VM has in common with the base
      // are left out of the stream.
      return { tee: (part, opts) => f.write(part, opts), ...(taken.prefilled ? { prefilled: taken.prefilled } : {}) };
    },

    async finish() {
      await dropping;
      await starting?.catch(() => undefined);
      const entry = taken;
      const loading = feed;
      if (!entry || !loading) {
        // A start that failed half-way through its move left a claim here: undo it now.
        if (startedOwn) await release().catch((e: unknown) => log.warn({ instanceId: input.instanceId, err: String(e) }, 'could not remove what a failed early start left; the instance\'s removal does'));
        return undefined;
      }
      const what = startedOwn ? 'the started VM' : 'the warm pool VM';
      const t0 = Date.now();
      try {
        const loaded = await step(`load the rest into ${what}`, () => withHeartbeats((async () => {
          await installPoolDisk(dir, entry);
          return loading.complete();
        })(), () => ({ stage: `load the rest into ${what}` })), { 'cloudlet.domain': entry.domain });
        const timings: Record<string, number> = startedOwn
          ? { 'start a VM for early startMs': claimMs, 'load the rest into the started VMMs': Date.now() - t0, 'stream into the started VMMs': loaded.ms }
          : { poolClaim: claimMs, 'load the rest into the warm pool VMMs': Date.now() - t0, 'stream into the warm pool VMMs': loaded.ms };
        const fwd = await forwarding;
        await fs.promises.writeFile(path.join(dir, POOL_LOADED), JSON.stringify(fwd ? { hostPort: fwd.hostPort } : {}));
        return { entry, startedOwn, timings };
      } catch (e) {
        log.warn({ domain: entry.domain, entryId: entry.entryId, err: String(e) }, `${what} did not take the synthesized VM; it will be restored anew`);
        await loading.close();
        // Not thrown: the restore goes on; what is left here goes with the instance's removal.
        await release().catch((err: unknown) => log.warn({ domain: entry.domain, err: String(err) }, `could not remove ${what} now`));
        return undefined;
      }
    },

    async abort() {
      // Never thrown: the apply's own failure (corrupt overlay, cancellation) is what the caller reports.
      await dropping;
      await starting?.catch(() => undefined);
      await feed?.close();
      await release().catch((e: unknown) => log.warn({ instanceId: input.instanceId, err: String(e) }, 'could not remove the early-started VM now; a retry or the instance\'s removal does'));
    },
  };
}
