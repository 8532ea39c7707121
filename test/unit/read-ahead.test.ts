import { readAhead } from '../../src/core/read-ahead';

/** A source whose pieces are released one by one by the test, recording how far it was read. */
function gatedSource(pieces: Buffer[], opts: { failAt?: number } = {}) {
  let read = 0;
  let returned = false;
  async function* gen(): AsyncGenerator<Buffer> {
    try {
      for (let i = 0; i < pieces.length; i++) {
        if (opts.failAt === i) throw new Error(`piece ${i} broke`);
        read = i + 1;
        yield pieces[i] as Buffer;
      }
    } finally {
      returned = true;
    }
  }
  return { source: gen(), read: () => read, returned: () => returned };
}

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));
const until = async (what: () => boolean): Promise<void> => {
  for (let i = 0; i < 1000 && !what(); i++) await tick();
  if (!what()) throw new Error('condition never held');
};

describe('readAhead', () => {
  it('yields every piece in order', async () => {
    const pieces = [Buffer.from('ab'), Buffer.from('cde'), Buffer.from('f')];
    const got: string[] = [];
    for await (const p of readAhead(gatedSource(pieces).source, 1024)) got.push(p.toString());
    expect(got).toEqual(['ab', 'cde', 'f']);
  });

  it('reads ahead of a slow consumer up to its byte limit, and no further', async () => {
    const s = gatedSource(Array.from({ length: 10 }, () => Buffer.alloc(100)));
    const it = readAhead(s.source, 300)[Symbol.asyncIterator]();
    await it.next(); // the consumer took one piece and now waits
    await until(() => s.read() >= 4);
    for (let i = 0; i < 20; i++) await tick();
    // one taken + 300 bytes queued
    expect(s.read()).toBe(4);
    await it.next();
    await until(() => s.read() === 5);
    await it.return(undefined);
  });

  it('passes the pieces before an error, then the error', async () => {
    const s = gatedSource([Buffer.from('a'), Buffer.from('b'), Buffer.from('c')], { failAt: 2 });
    const got: string[] = [];
    await expect((async () => {
      for await (const p of readAhead(s.source, 1024)) got.push(p.toString());
    })()).rejects.toThrow('piece 2 broke');
    expect(got).toEqual(['a', 'b']);
  });

  it('stops reading the source when the consumer stops early', async () => {
    const s = gatedSource(Array.from({ length: 100 }, () => Buffer.alloc(10)));
    for await (const p of readAhead(s.source, 50)) {
      expect(p.length).toBe(10);
      break;
    }
    await until(() => s.returned());
    expect(s.read()).toBeLessThan(100);
  });
});

describe('readAhead onStop', () => {
  it('is called when the consumer stops before the end, not after a full read', async () => {
    let stops = 0;
    // Five pieces, one byte of read-ahead: the source is not read to its end when the consumer stops.
    for await (const p of readAhead(gatedSource(Array.from({ length: 5 }, () => Buffer.from('a'))).source, 1, () => (stops += 1))) {
      expect(p.toString()).toBe('a');
      break;
    }
    expect(stops).toBe(1);
    const all: string[] = [];
    for await (const p of readAhead(gatedSource([Buffer.from('a'), Buffer.from('b')]).source, 10, () => (stops += 1))) all.push(p.toString());
    expect(all).toEqual(['a', 'b']);
    expect(stops).toBe(1);
  });

  it('lets a source that waits forever end once told to stop', async () => {
    const stop = new AbortController();
    let ended = false;
    async function* stalled(): AsyncGenerator<Buffer> {
      try {
        yield Buffer.from('x');
        await new Promise<void>((resolve) => stop.signal.addEventListener('abort', () => resolve()));
      } finally {
        ended = true;
      }
    }
    for await (const p of readAhead(stalled(), 10, () => stop.abort())) {
      expect(p.toString()).toBe('x');
      break;
    }
    await until(() => ended);
    expect(ended).toBe(true);
  });
});
