/**
 * Link profiles and the pure arithmetic of an emulated edge link (docs/links.md): which tbf
 * parameters shape a profile's rate, how long the relays hold each chunk, and how much they may
 * hold. Parsed with zod at the edge; everything here is free of I/O.
 */
import { isIPv4 } from 'node:net';
import { z } from 'zod';
import { CloudletError } from '../core/errors';

export interface LinkProfile {
  /** `wifi38`, `mbit100`, `gbit1`, or `custom-<rate>mbit-<rtt>ms`. */
  name: string;
  /** Bandwidth of each direction, in Mbit/s (10^6 bit/s). */
  rateMbit: number;
  /** Round-trip delay the relays add, in ms (half on the way up, half on the way down). */
  rttMs: number;
}

/**
 * The named profiles. `wifi38` is the WiFi of the original Elijah paper (MobiSys'13: 38 Mbit/s,
 * 20 ms RTT). `mbit100` and `gbit1` are wired links to a nearby cloudlet; their 2 ms RTT (1 ms
 * each way) is the smallest delay the relays' millisecond timers hold faithfully.
 */
export const LINK_PROFILES = {
  wifi38: { name: 'wifi38', rateMbit: 38, rttMs: 20 },
  mbit100: { name: 'mbit100', rateMbit: 100, rttMs: 2 },
  gbit1: { name: 'gbit1', rateMbit: 1000, rttMs: 2 },
} as const satisfies Record<string, LinkProfile>;

export type LinkProfileName = keyof typeof LINK_PROFILES;

const PROFILE_NAMES = Object.keys(LINK_PROFILES) as [LinkProfileName, ...LinkProfileName[]];

/** The largest round-trip delay a link takes, in ms (when opened, and in Link.setDelay). */
export const MAX_LINK_RTT_MS = 10_000;

const RttSchema = z.number().min(0).max(MAX_LINK_RTT_MS);

export const CustomProfileSchema = z
  .object({
    rateMbit: z.number().min(0.1).max(10_000),
    rttMs: RttSchema,
  })
  .strict();

const ProfileNameSchema = z.enum(PROFILE_NAMES);
export const LinkProfileInputSchema = z.union([ProfileNameSchema, CustomProfileSchema]);
export type LinkProfileInput = z.input<typeof LinkProfileInputSchema>;

/** A profile name or `{ rateMbit, rttMs }`, checked. */
export function parseLinkProfile(input: unknown): LinkProfile {
  // An object is checked field by field, so the message names the bad field.
  const schema = typeof input === 'object' && input !== null ? CustomProfileSchema : typeof input === 'string' ? ProfileNameSchema : LinkProfileInputSchema;
  const parsed = schema.safeParse(input);
  if (!parsed.success) {
    throw new CloudletError('BAD_INPUT', `invalid link profile ${JSON.stringify(input)} (${issues(parsed.error)})`, {
      fix: `use one of ${PROFILE_NAMES.join(', ')} or { rateMbit: 0.1..10000, rttMs: 0..10000 }`,
    });
  }
  const p = parsed.data;
  if (typeof p === 'string') return { ...LINK_PROFILES[p] };
  return { name: `custom-${p.rateMbit}mbit-${p.rttMs}ms`, rateMbit: p.rateMbit, rttMs: p.rttMs };
}

/** A new round-trip delay for a running link (Link.setDelay): a finite number of ms, 0..10000. */
export function parseRttMs(input: unknown): number {
  const parsed = RttSchema.safeParse(input);
  if (!parsed.success) {
    throw new CloudletError('BAD_INPUT', `invalid link round-trip delay ${String(input)} (${issues(parsed.error)})`, {
      fix: `pass a number of milliseconds from 0 to ${MAX_LINK_RTT_MS}`,
    });
  }
  return parsed.data;
}

/** What the relays hold for a round-trip delay: half of it each way, and a whole one for a new connection's handshake. */
export interface RelayDelays {
  upDelayMs: number;
  downDelayMs: number;
  handshakeMs: number;
}

export function relayDelays(rttMs: number): RelayDelays {
  return { upDelayMs: rttMs / 2, downDelayMs: rttMs / 2, handshakeMs: rttMs };
}

/**
 * The profile of a link opened with `opened` whose delay is now `rttMs`: `opened` itself (a copy)
 * when the delay is back to where it started, else `custom-<rate>mbit-<rtt>ms` at the same rate.
 */
export function profileWithRtt(opened: LinkProfile, rttMs: number): LinkProfile {
  if (rttMs === opened.rttMs) return { ...opened };
  return { name: `custom-${opened.rateMbit}mbit-${rttMs}ms`, rateMbit: opened.rateMbit, rttMs };
}

/** Link ids become part of namespace names (`cl-link-<id>-c`): short, lower-case, alphanumeric. */
export const LINK_ID_PATTERN = /^[a-z0-9]{1,12}$/;

export const OpenLinkOptionsSchema = z
  .object({
    profile: z.unknown(),
    target: z
      .object({
        host: z
          .string()
          .refine((h) => isIPv4(h) && h.startsWith('127.'), 'must be a loopback address (127.0.0.0/8)')
          .default('127.0.0.1'),
        port: z.number().int().min(1).max(65_535),
      })
      .strict(),
    id: z.string().regex(LINK_ID_PATTERN, 'lower-case letters and digits, at most 12').optional(),
    /** The 127.0.0.1 port clients connect to (default: any free port). */
    port: z.number().int().min(0).max(65_535).optional(),
  })
  .strict();

export type OpenLinkOptions = z.input<typeof OpenLinkOptionsSchema> & { profile: LinkProfileInput };

export interface ParsedLinkOptions {
  profile: LinkProfile;
  target: { host: string; port: number };
  id: string | undefined;
  port: number;
}

export function parseOpenLinkOptions(input: unknown): ParsedLinkOptions {
  const parsed = OpenLinkOptionsSchema.safeParse(input);
  if (!parsed.success) {
    throw new CloudletError('BAD_INPUT', `invalid link options (${issues(parsed.error)})`, {
      fix: "pass { profile, target: { host: '127.0.0.1', port }, id?: 'abc123', port? }: links only reach loopback targets",
    });
  }
  const o = parsed.data;
  return { profile: parseLinkProfile(o.profile), target: o.target, id: o.id, port: o.port ?? 0 };
}

function issues(e: z.ZodError): string {
  return e.issues.map((i) => `${i.path.length > 0 ? `${i.path.join('.')}: ` : ''}${i.message}`).join('; ');
}

/**
 * tbf parameters of one direction. `burst` (the bucket) is 1 ms at the rate but at least 32 KiB:
 * tbf passes no packet larger than its bucket, and a veth hands it GSO packets of up to 64 KiB
 * that tbf then has to split; 32 KiB measured the full rate at 38 and 100 Mbit/s. `limit` (the
 * queue) is the bucket plus 20 ms at the rate, so a bulk transfer adds at most ~20 ms of queueing
 * to a request behind it, like a modest access-point buffer.
 */
export interface TbfParams {
  rateBit: number;
  burstBytes: number;
  limitBytes: number;
}

const MIN_BURST = 32 * 1024;
const QUEUE_MS = 20;

export function tbfParams(profile: Pick<LinkProfile, 'rateMbit'>): TbfParams {
  const rateBit = Math.round(profile.rateMbit * 1e6);
  const bytesPerMs = rateBit / 8 / 1000;
  const burstBytes = Math.max(MIN_BURST, Math.ceil(bytesPerMs));
  return { rateBit, burstBytes, limitBytes: burstBytes + Math.ceil(bytesPerMs * QUEUE_MS) };
}

/** `tc` arguments that put (or replace) the root tbf qdisc on `dev` inside namespace `ns`. */
export function tbfArgs(ns: string, dev: string, t: TbfParams): string[] {
  return ['-n', ns, 'qdisc', 'replace', 'dev', dev, 'root', 'tbf', 'rate', `${t.rateBit}bit`, 'burst', String(t.burstBytes), 'limit', String(t.limitBytes)];
}

/**
 * How much one direction of a relay may hold before it stops reading: four times what the delay
 * keeps in flight at the link's rate, at least 256 KiB, so the delay never limits the rate.
 */
export function relayBufferBytes(profile: Pick<LinkProfile, 'rateMbit' | 'rttMs'>): number {
  const inFlight = ((profile.rateMbit * 1e6) / 8) * (profile.rttMs / 2 / 1000);
  return Math.max(256 * 1024, Math.ceil(4 * inFlight));
}

/** Names of a link's namespaces and veth ends; the veth ends live only inside the namespaces. */
export interface LinkNames {
  clientNs: string;
  serverNs: string;
  clientDev: string;
  serverDev: string;
}

export const LINK_NS_PREFIX = 'cl-link-';

export function linkNames(id: string): LinkNames {
  return { clientNs: `${LINK_NS_PREFIX}${id}-c`, serverNs: `${LINK_NS_PREFIX}${id}-s`, clientDev: 'cl-veth-c', serverDev: 'cl-veth-s' };
}

/** The link id of a namespace name of ours, or undefined. */
export function linkIdOfNamespace(ns: string): string | undefined {
  const m = /^cl-link-([a-z0-9]{1,12})-[cs]$/.exec(ns);
  return m?.[1];
}

/** Addresses on the veth pair: the same /30 in every link, since each link has its own namespaces. */
export const VETH_ADDRESSES = { client: '10.213.0.1', server: '10.213.0.2', prefix: 30 } as const;
/** The port the relay in the server namespace listens on (its namespace is private to the link). */
export const SERVER_RELAY_PORT = 7000;
