/**
 * What a host may fetch overlays and base packages from (docs/security.md): http(s) URLs whose
 * address an operator's allow-list permits, and local files under the import directories. This
 * module decides; `guarded-fetch` and `import-path` apply the decisions at connect and open time.
 */
import net from 'node:net';
import { CloudletError } from '../errors';

/** How an address is routed; everything but "public" is refused unless an entry lists it. */
export type AddressClass = 'public' | 'loopback' | 'private' | 'link-local' | 'unspecified' | 'multicast' | 'reserved';

const CLASS_RANGES: ReadonlyArray<[AddressClass, 'ipv4' | 'ipv6', string, number]> = [
  ['unspecified', 'ipv4', '0.0.0.0', 8],
  ['private', 'ipv4', '10.0.0.0', 8],
  ['private', 'ipv4', '100.64.0.0', 10], // carrier-grade NAT
  ['loopback', 'ipv4', '127.0.0.0', 8],
  ['link-local', 'ipv4', '169.254.0.0', 16], // cloud metadata services live here
  ['private', 'ipv4', '172.16.0.0', 12],
  ['reserved', 'ipv4', '192.0.0.0', 24],
  ['reserved', 'ipv4', '192.0.2.0', 24],
  ['private', 'ipv4', '192.168.0.0', 16],
  ['reserved', 'ipv4', '198.18.0.0', 15],
  ['reserved', 'ipv4', '198.51.100.0', 24],
  ['reserved', 'ipv4', '203.0.113.0', 24],
  ['multicast', 'ipv4', '224.0.0.0', 4],
  ['reserved', 'ipv4', '240.0.0.0', 4], // and the broadcast address
  ['unspecified', 'ipv6', '::', 128],
  ['reserved', 'ipv6', '::', 96], // IPv4-compatible (deprecated): may reach any IPv4 address
  ['reserved', 'ipv6', '::ffff:0:0:0', 96], // SIIT: likewise
  ['reserved', 'ipv6', '64:ff9b:1::', 48], // local-use NAT64
  ['reserved', 'ipv6', '100::', 64], // discard
  ['reserved', 'ipv6', '2002::', 16], // 6to4: an IPv4 address inside
  ['private', 'ipv6', 'fec0::', 10], // site-local (deprecated)
  ['loopback', 'ipv6', '::1', 128],
  ['reserved', 'ipv6', '64:ff9b::', 96], // NAT64: may reach any IPv4 address
  ['reserved', 'ipv6', '2001:db8::', 32],
  ['private', 'ipv6', 'fc00::', 7],
  ['link-local', 'ipv6', 'fe80::', 10],
  ['multicast', 'ipv6', 'ff00::', 8],
];

const classLists = new Map<AddressClass, net.BlockList>();
for (const [cls, family, prefix, bits] of CLASS_RANGES) {
  let list = classLists.get(cls);
  if (!list) classLists.set(cls, (list = new net.BlockList()));
  list.addSubnet(prefix, bits, family);
}

/** An IPv4 address written as IPv6 (::ffff:a.b.c.d) is the IPv4 address. */
export function normalizeAddress(address: string): { address: string; family: 'ipv4' | 'ipv6' } | undefined {
  const bare = address.startsWith('[') && address.endsWith(']') ? address.slice(1, -1) : address;
  const v = net.isIP(bare);
  if (v === 4) return { address: bare, family: 'ipv4' };
  if (v !== 6) return undefined;
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(bare);
  if (mapped?.[1]) return { address: mapped[1], family: 'ipv4' };
  const hexMapped = /^::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})$/i.exec(bare);
  if (hexMapped?.[1] && hexMapped[2]) {
    const hi = parseInt(hexMapped[1], 16);
    const lo = parseInt(hexMapped[2], 16);
    return { address: `${hi >> 8}.${hi & 255}.${lo >> 8}.${lo & 255}`, family: 'ipv4' };
  }
  return { address: bare.toLowerCase(), family: 'ipv6' };
}

/** Global unicast IPv6 is 2000::/3; anything else not classified above is not routed publicly. */
const GLOBAL_IPV6 = new net.BlockList();
GLOBAL_IPV6.addSubnet('2000::', 3, 'ipv6');

export function classifyAddress(address: string): AddressClass {
  const a = normalizeAddress(address);
  if (!a) throw new CloudletError('BAD_INPUT', `"${address}" is not an IP address`);
  for (const [cls, list] of classLists) if (list.check(a.address, a.family)) return cls;
  if (a.family === 'ipv6' && !GLOBAL_IPV6.check(a.address, 'ipv6')) return 'reserved';
  return 'public';
}

/** Classes refused even behind a listed host name (a name can be made to resolve anywhere). */
const NEVER_BY_NAME: ReadonlySet<AddressClass> = new Set(['link-local', 'unspecified', 'multicast', 'reserved']);

/**
 * The operator's allow-list: entries are "public" (any globally routed address), an IP address
 * or CIDR range ("127.0.0.1", "10.20.0.0/16", "fd00::/8"), or a host name ("overlays.example.org",
 * "*.example.org" for a domain's names).
 */
export class AllowList {
  private readonly ranges = new net.BlockList();
  private readonly names: string[] = [];
  private readonly domains: string[] = [];
  private publicAllowed = false;
  readonly entries: readonly string[];

  constructor(entries: readonly string[]) {
    this.entries = entries;
    for (const raw of entries) {
      const e = raw.trim().toLowerCase();
      if (!e) continue;
      if (e === 'public') {
        this.publicAllowed = true;
        continue;
      }
      const [addr, bits, ...rest] = e.split('/');
      const ip = addr ? normalizeAddress(addr) : undefined;
      if (ip && rest.length === 0) {
        const max = ip.family === 'ipv4' ? 32 : 128;
        const n = bits === undefined ? max : Number(bits);
        if (!Number.isInteger(n) || n < 0 || n > max || (bits !== undefined && !/^\d+$/.test(bits))) throw badEntry(raw, `the prefix length must be 0..${max}`);
        this.ranges.addSubnet(ip.address, n, ip.family);
        continue;
      }
      if (/^\*\.([a-z0-9-]+\.)*[a-z0-9-]+$/.test(e)) {
        this.domains.push(e.slice(1)); // ".example.org"
        continue;
      }
      if (/^([a-z0-9-]+\.)*[a-z0-9-]+$/.test(e) && !/^[\d.]+$/.test(e)) {
        this.names.push(e);
        continue;
      }
      throw badEntry(raw, 'an entry is "public", an IP address, a CIDR range, a host name or *.domain');
    }
  }

  /** Whether a name is listed (the URL's host as written, before resolution). */
  listsName(hostname: string): boolean {
    const h = hostname.toLowerCase().replace(/\.$/, '');
    return this.names.includes(h) || this.domains.some((d) => h.endsWith(d));
  }

  /**
   * Whether a connection to `address` is allowed; `hostname` is the name the URL gave (absent when
   * the URL named the address itself). Undefined when allowed; otherwise why not.
   */
  refusal(address: string, hostname?: string): string | undefined {
    const a = normalizeAddress(address);
    if (!a) return `"${address}" is not an IP address`;
    if (this.ranges.check(a.address, a.family)) return undefined;
    const cls = classifyAddress(a.address);
    if (hostname !== undefined && this.listsName(hostname) && !NEVER_BY_NAME.has(cls)) return undefined;
    if (cls === 'public' && this.publicAllowed) return undefined;
    return cls === 'public' ? `${a.address} is not on the allow-list` : `${a.address} is a ${cls} address and not on the allow-list`;
  }
}

function badEntry(entry: string, why: string): CloudletError {
  return new CloudletError('BAD_INPUT', `fetch allow-list entry "${entry}" is not valid: ${why}`, { fix: 'correct CLOUDLET_FETCH_ALLOW (comma-separated entries; docs/security.md)' });
}

export interface FetchLimits {
  /** An overlay larger than this (header, meta and data) is refused before its data is read. */
  maxOverlayBytes: number;
  /** A base package larger than this is refused (by its Content-Length or its size so far). */
  maxPackageBytes: number;
  /** Connecting and receiving the answer's headers, each. */
  headersTimeoutMs: number;
  /** The longest wait for the next bytes of an answer's body. */
  bodyIdleTimeoutMs: number;
  maxRedirects: number;
}

export const DEFAULT_LIMITS: FetchLimits = {
  maxOverlayBytes: 8 * 1024 ** 3,
  maxPackageBytes: 64 * 1024 ** 3,
  headersTimeoutMs: 30_000,
  bodyIdleTimeoutMs: 60_000,
  maxRedirects: 5,
};

/** Where a host may take overlays and base packages from. */
export interface FetchPolicy {
  allow: AllowList;
  /** Local files are read only from under these directories (absolute). */
  importDirs: readonly string[];
  limits: FetchLimits;
}

export function refused(what: string, source: string, why: string, fix: string): CloudletError {
  return new CloudletError('SOURCE_REFUSED', `${what} ${source} is refused: ${why}`, { fix, details: { source } });
}

export function tooLarge(what: string, source: string, bytes: number, limit: number, setting: string): CloudletError {
  return new CloudletError('SOURCE_TOO_LARGE', `${what} ${source} is ${bytes} bytes or more, past the limit of ${limit}`, {
    fix: `check the source; an operator may raise the limit with ${setting}`,
    details: { source, bytes, limit },
  });
}
