/**
 * The pure parts of the emulated edge links (src/links/profiles.ts): profile parsing, option
 * checks (loopback targets only), tbf parameters and `tc` arguments, relay buffering, names, and
 * the checks and arithmetic of changing a running link's delay (Link.setDelay).
 */
import { CloudletError } from '../../src/core/errors';
import {
  LINK_PROFILES,
  linkIdOfNamespace,
  linkNames,
  parseLinkProfile,
  MAX_LINK_RTT_MS,
  parseOpenLinkOptions,
  parseRttMs,
  profileWithRtt,
  relayBufferBytes,
  relayDelays,
  tbfArgs,
  tbfParams,
} from '../../src/links/profiles';

function thrown(f: () => unknown): CloudletError {
  try {
    f();
  } catch (e) {
    if (e instanceof CloudletError) return e;
    throw e;
  }
  throw new Error('expected a CloudletError');
}

describe('link profiles', () => {
  it('names the three profiles of the issue', () => {
    expect(parseLinkProfile('wifi38')).toEqual({ name: 'wifi38', rateMbit: 38, rttMs: 20 });
    expect(parseLinkProfile('mbit100')).toEqual({ name: 'mbit100', rateMbit: 100, rttMs: 2 });
    expect(parseLinkProfile('gbit1')).toEqual({ name: 'gbit1', rateMbit: 1000, rttMs: 2 });
    expect(Object.keys(LINK_PROFILES)).toEqual(['wifi38', 'mbit100', 'gbit1']);
  });

  it('returns a copy, never the shared profile object', () => {
    const p = parseLinkProfile('wifi38');
    p.rttMs = 1;
    expect(LINK_PROFILES.wifi38.rttMs).toBe(20);
  });

  it('accepts a custom rate and RTT and names it', () => {
    expect(parseLinkProfile({ rateMbit: 5.5, rttMs: 80 })).toEqual({ name: 'custom-5.5mbit-80ms', rateMbit: 5.5, rttMs: 80 });
    expect(parseLinkProfile({ rateMbit: 1000, rttMs: 0 }).rttMs).toBe(0);
  });

  it('rejects unknown names, bad numbers and extra fields with the fix', () => {
    for (const bad of ['wifi', '', 42, null, { rateMbit: 0, rttMs: 1 }, { rateMbit: 10, rttMs: -1 }, { rateMbit: 10 }, { rateMbit: 10, rttMs: 1, loss: 0.1 }]) {
      const e = thrown(() => parseLinkProfile(bad));
      expect(e.code).toBe('BAD_INPUT');
      expect(e.message).toMatch(/invalid link profile/);
      expect(e.fix).toMatch(/wifi38, mbit100, gbit1/);
    }
  });
});

describe('link options', () => {
  it('defaults the target host to 127.0.0.1 and the port to any free one', () => {
    expect(parseOpenLinkOptions({ profile: 'wifi38', target: { port: 8080 } })).toEqual({
      profile: LINK_PROFILES.wifi38,
      target: { host: '127.0.0.1', port: 8080 },
      id: undefined,
      port: 0,
    });
  });

  it('only reaches loopback targets', () => {
    expect(parseOpenLinkOptions({ profile: 'gbit1', target: { host: '127.0.0.2', port: 1 } }).target.host).toBe('127.0.0.2');
    for (const host of ['10.213.0.2', '0.0.0.0', 'localhost', '::1', '128.0.0.1']) {
      const e = thrown(() => parseOpenLinkOptions({ profile: 'gbit1', target: { host, port: 80 } }));
      expect(e.code).toBe('BAD_INPUT');
      expect(e.message).toMatch(/target.host: must be a loopback address/);
    }
  });

  it('checks ports and ids (ids become namespace names)', () => {
    expect(thrown(() => parseOpenLinkOptions({ profile: 'wifi38', target: { port: 0 } })).message).toMatch(/target.port/);
    expect(thrown(() => parseOpenLinkOptions({ profile: 'wifi38', target: { port: 80 }, id: 'Bad-Id' })).message).toMatch(/id:/);
    expect(thrown(() => parseOpenLinkOptions({ profile: 'wifi38', target: { port: 80 }, id: 'a'.repeat(13) })).message).toMatch(/id:/);
    expect(parseOpenLinkOptions({ profile: 'wifi38', target: { port: 80 }, id: 'ab12', port: 9000 })).toMatchObject({ id: 'ab12', port: 9000 });
    expect(thrown(() => parseOpenLinkOptions({ profile: 'wifi39', target: { port: 80 } })).message).toMatch(/invalid link profile "wifi39"/);
  });
});

describe('tbf parameters', () => {
  it('keeps a 32 KiB bucket at WiFi and 100 Mbit/s rates, 1 ms of the rate above', () => {
    expect(tbfParams({ rateMbit: 38 })).toEqual({ rateBit: 38_000_000, burstBytes: 32_768, limitBytes: 32_768 + 95_000 });
    expect(tbfParams({ rateMbit: 100 })).toEqual({ rateBit: 100_000_000, burstBytes: 32_768, limitBytes: 32_768 + 250_000 });
    expect(tbfParams({ rateMbit: 1000 })).toEqual({ rateBit: 1_000_000_000, burstBytes: 125_000, limitBytes: 125_000 + 2_500_000 });
  });

  it('builds the tc command for one veth end, with exact units', () => {
    expect(tbfArgs('cl-link-x-c', 'cl-veth-c', tbfParams({ rateMbit: 38 }))).toEqual([
      '-n',
      'cl-link-x-c',
      'qdisc',
      'replace',
      'dev',
      'cl-veth-c',
      'root',
      'tbf',
      'rate',
      '38000000bit',
      'burst',
      '32768',
      'limit',
      '127768',
    ]);
    expect(tbfArgs('n', 'd', tbfParams({ rateMbit: 5.5 }))).toContain('5500000bit');
  });
});

describe('relay buffering', () => {
  it('holds at least 256 KiB and four times the bytes in flight during one way of the delay', () => {
    expect(relayBufferBytes(LINK_PROFILES.wifi38)).toBe(256 * 1024);
    expect(relayBufferBytes({ rateMbit: 1000, rttMs: 20 })).toBe(4 * 125_000 * 10);
  });
});

describe('changing the delay of a running link', () => {
  it('takes a finite number of ms from 0 to 10 s', () => {
    expect(parseRttMs(0)).toBe(0);
    expect(parseRttMs(2.5)).toBe(2.5);
    expect(parseRttMs(MAX_LINK_RTT_MS)).toBe(10_000);
    for (const bad of [-1, 10_001, Number.NaN, Number.POSITIVE_INFINITY, '100', null, undefined]) {
      const e = thrown(() => parseRttMs(bad));
      expect(e.code).toBe('BAD_INPUT');
      expect(e.message).toMatch(/invalid link round-trip delay/);
      expect(e.fix).toMatch(/from 0 to 10000/);
    }
  });

  it('holds half the RTT each way and a whole one for a new connection', () => {
    expect(relayDelays(100)).toEqual({ upDelayMs: 50, downDelayMs: 50, handshakeMs: 100 });
    expect(relayDelays(0)).toEqual({ upDelayMs: 0, downDelayMs: 0, handshakeMs: 0 });
  });

  it('keeps the rate and renames the profile, back to its own name at its own delay', () => {
    const wifi = parseLinkProfile('wifi38');
    expect(profileWithRtt(wifi, 100)).toEqual({ name: 'custom-38mbit-100ms', rateMbit: 38, rttMs: 100 });
    const back = profileWithRtt(wifi, 20);
    expect(back).toEqual(LINK_PROFILES.wifi38);
    expect(back).not.toBe(wifi);
    expect(profileWithRtt(parseLinkProfile({ rateMbit: 5.5, rttMs: 80 }), 0).name).toBe('custom-5.5mbit-0ms');
    // The relay buffer grows with the delay, so a longer one does not cap the rate.
    expect(relayBufferBytes(profileWithRtt(parseLinkProfile('gbit1'), 100))).toBe(4 * 125_000 * 50);
  });
});

describe('link names', () => {
  it('prefixes namespaces with cl-link- and finds the id back', () => {
    const n = linkNames('ab12');
    expect(n).toEqual({ clientNs: 'cl-link-ab12-c', serverNs: 'cl-link-ab12-s', clientDev: 'cl-veth-c', serverDev: 'cl-veth-s' });
    expect(linkIdOfNamespace(n.clientNs)).toBe('ab12');
    expect(linkIdOfNamespace(n.serverNs)).toBe('ab12');
    expect(linkIdOfNamespace('cl-link-ab12-x')).toBeUndefined();
    expect(linkIdOfNamespace('other-ns')).toBeUndefined();
  });
});
