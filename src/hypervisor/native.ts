/**
 * The native addon of @unraid/libvirt, loaded directly: the package itself is ESM-only while this
 * project is CommonJS, but its N-API addon (build/Release/libvirt.node) is a plain CommonJS
 * module. Every method returns a promise (the work runs on libuv's thread pool); failures reject
 * with a bare string holding libvirt's message (not an Error).
 *
 * The addon's workers keep only raw pointers to the hypervisor and domain objects they were given.
 * If the garbage collector frees such an object while its call waits for a pool thread, the call
 * reads freed memory: libvirt then says "invalid domain pointer", or the process dies of SIGSEGV
 * (it did, in CI, with 20 syntheses at once). `openHypervisor` therefore holds every argument of a
 * call, and the hypervisor itself, until the call settles (docs/hypervisor.md).
 */
import fs from 'node:fs';
import path from 'node:path';

/** An opaque native domain handle (virDomainPtr wrapper). */
export interface NativeDomain {
  readonly __nativeDomain: unique symbol;
}

export interface NativeDomainInfo {
  /** virDomainState: 0 nostate, 1 running, 2 blocked, 3 paused, 4 shutdown, 5 shutoff, 6 crashed, 7 pmsuspended. */
  state: number;
  maxMem: number;
  memory: number;
  nrVirtCpu: number;
  cpuTime: number;
}

export interface NativeHypervisor {
  connectOpen(): Promise<void>;
  connectClose(): Promise<void>;
  connectListDefinedDomains(): Promise<string[]>;
  connectListDomains(): Promise<number[]>;
  domainDefineXML(xml: string): Promise<NativeDomain>;
  domainCreate(domain: NativeDomain): Promise<void>;
  domainLookupByName(name: string): Promise<NativeDomain>;
  domainLookupByID(id: number): Promise<NativeDomain>;
  domainGetInfo(domain: NativeDomain): Promise<NativeDomainInfo>;
  domainGetName(domain: NativeDomain): Promise<string>;
  domainGetUUIDString(domain: NativeDomain): Promise<string>;
  /** flags: virDomainXMLFlags (1 secure, 2 inactive, 4 update-cpu, 8 migratable). */
  domainGetXMLDesc(domain: NativeDomain, flags?: number): Promise<string>;
  domainSave(domain: NativeDomain, file: string): Promise<void>;
  domainRestore(file: string): Promise<void>;
  domainDestroy(domain: NativeDomain): Promise<void>;
  domainUndefine(domain: NativeDomain): Promise<void>;
  domainSuspend(domain: NativeDomain): Promise<void>;
  domainResume(domain: NativeDomain): Promise<void>;
}

interface NativeModule {
  Hypervisor: new (options: { uri: string }) => NativeHypervisor;
}

const ADDON = path.join('node_modules', '@unraid', 'libvirt', 'build', 'Release', 'libvirt.node');

/** Walks up from `from` to the first node_modules holding the addon. */
export function findAddon(from: string = __dirname): string | undefined {
  let dir = path.resolve(from);
  for (;;) {
    const candidate = path.join(dir, ADDON);
    if (fs.existsSync(candidate)) return candidate;
    const parent = path.dirname(dir);
    if (parent === dir) return undefined;
    dir = parent;
  }
}

let loaded: NativeModule | undefined;

/** Loads the addon once; throws a plain Error with the path tried when it is missing. */
function loadNative(): NativeModule {
  if (loaded) return loaded;
  const file = findAddon();
  if (!file) {
    throw new Error(`the libvirt addon (${ADDON}) was not found above ${__dirname}`);
  }
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  loaded = require(file) as NativeModule;
  return loaded;
}

/** The objects of calls still running; a call's entry goes when its promise settles. */
const inFlight = new Set<readonly unknown[]>();

/** How many native calls are running (for tests). */
export function nativeCallsInFlight(): number {
  return inFlight.size;
}

/**
 * A connection object for `uri` (not yet open: call connectOpen) whose calls each keep the
 * hypervisor and their arguments reachable until they settle. Throws a plain Error when the addon
 * cannot be loaded.
 */
export function openHypervisor(uri: string): NativeHypervisor {
  const target = new (loadNative().Hypervisor)({ uri });
  return new Proxy(target, {
    get(obj, prop): unknown {
      const value: unknown = Reflect.get(obj, prop, obj);
      if (typeof value !== 'function') return value;
      return (...args: unknown[]): Promise<unknown> => {
        const held: readonly unknown[] = [obj, ...args];
        inFlight.add(held);
        let call: Promise<unknown>;
        try {
          call = Promise.resolve(Reflect.apply(value, obj, args) as unknown);
        } catch (e) {
          inFlight.delete(held);
          throw e;
        }
        return call.finally(() => inFlight.delete(held));
      };
    },
  });
}

/** libvirt's message from a rejected native call. */
export function nativeMessage(e: unknown): string {
  if (typeof e === 'string') return e;
  if (e instanceof Error) return e.message;
  return String(e);
}
