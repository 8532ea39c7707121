/**
 * The CLI's plumbing on a fake backend: option parsing, text vs JSON output, progress only where
 * asked for, error reporting and exit statuses, the default store. The real backend is exercised
 * end to end in test/integration/cli.test.ts.
 */
import path from 'node:path';
import type { Backend, SynthesizeRequest } from '../../src/cli/backend';
import { defaultStoreRoot, REPO_ROOT } from '../../src/cli/context';
import { sizeOption } from '../../src/cli/commands/env';
import { runCli } from '../../src/cli/main';
import type { BaseManifest } from '../../src/core/base';
import { CloudletError } from '../../src/core/errors';
import { Capture } from '../helpers/capture';

const ID = 'ab'.repeat(32);
const manifest = {
  format: 'cloudlet-base',
  formatVersion: 1,
  baseId: ID,
  chunkSize: 4096,
  disk: { size: 8192, sha256: 'c'.repeat(64), chunkCount: 2 },
  memory: { saveFileSize: 100, saveFileSha256: 'd'.repeat(64), imageSize: 4096, chunkCount: 1, mode: 'parsed', blocks: [{ name: 'pc.ram', size: 4096, imageOffset: 0 }] },
  domainXml: '<domain/>',
  cpuModel: 'qemu64',
  members: [],
} as unknown as BaseManifest;

function fakeBackend(calls: Array<[string, unknown]>, overrides: Partial<Backend> = {}): Backend {
  const notUsed = (): never => {
    throw new Error('not used in this test');
  };
  return {
    createBase: async (input, onProgress) => {
      calls.push(['createBase', input]);
      onProgress(50, 100, 'copy disk');
      onProgress(100, 100, 'copy disk');
      onProgress(10, 10, 'index disk');
      return manifest;
    },
    importBase: notUsed,
    exportBase: async (id, out) => {
      calls.push(['exportBase', { id, out }]);
      return manifest;
    },
    listBases: async () => [{ baseId: ID, addedAt: '2026-01-01T00:00:00.000Z', diskSize: 8192, memorySize: 100, cpuModel: 'qemu64', memoryMode: 'parsed' }],
    baseInfo: notUsed,
    verifyBase: async (id) => (id === ID ? { baseId: ID, ok: true, problems: [] } : { baseId: id, ok: false, problems: ['disk.raw: sha256 differs'] }),
    removeBase: async (id) => {
      calls.push(['removeBase', id]);
    },
    createOverlay: async (req) => {
      calls.push(['createOverlay', req]);
      return { path: '/x.overlay', size: 10, sha256: 'e'.repeat(64), baseId: req.baseId, seconds: 1, meta: {} };
    },
    overlayInfo: notUsed,
    listOverlays: async () => [],
    synthesize: async (req: SynthesizeRequest) => {
      calls.push(['synthesize', req]);
      return { baseId: ID, diskPath: '/o/disk.qcow2', savePath: '/o/memory.sav', seconds: 2, timings: { fetch: 5 }, meta: {} };
    },
    ...overrides,
  };
}

async function cli(argv: string[], backend: Backend, opts: { tty?: boolean; env?: NodeJS.ProcessEnv } = {}) {
  const stdout = new Capture();
  const stderr = new Capture();
  if (opts.tty) stderr.isTTY = true;
  let storeSeen: string | undefined;
  const code = await runCli(argv, { stdout, stderr, env: opts.env ?? {} }, {
    backend: (ctx) => {
      storeSeen = ctx.storeRoot;
      return backend;
    },
  });
  return { code, out: stdout.text, err: stderr.text, storeSeen };
}

test('text output by default, quiet stderr in a pipe', async () => {
  const calls: Array<[string, unknown]> = [];
  const r = await cli(['--store', '/s', 'base', 'create', '--disk', 'd.raw', '--memory', 'm.sav'], fakeBackend(calls));
  expect(r.code).toBe(0);
  expect(calls).toEqual([['createBase', { diskPath: 'd.raw', savePath: 'm.sav' }]]);
  expect(r.out).toContain(`created base ${ID}`);
  expect(r.out).toContain('block pc.ram');
  expect(r.err).toBe('');
  expect(r.storeSeen).toBe(path.resolve('/s'));
});

test('--json prints one JSON document on stdout and progress as JSON lines on stderr', async () => {
  const r = await cli(['--json', 'base', 'create', '--disk', 'd.raw', '--memory', 'm.sav'], fakeBackend([]));
  expect(r.code).toBe(0);
  expect(JSON.parse(r.out)).toEqual({ baseId: ID, manifest });
  const lines = r.err.trim().split('\n').map((l) => JSON.parse(l) as { type: string; stage: string; done: number; total: number; finished: boolean });
  expect(lines.every((l) => l.type === 'progress')).toBe(true);
  expect(lines.filter((l) => l.finished).map((l) => [l.stage, l.done, l.total])).toEqual([
    ['copy disk', 100, 100],
    ['index disk', 10, 10],
  ]);
});

test('a terminal gets a progress bar with bytes, rate and ETA', async () => {
  const r = await cli(['base', 'create', '--disk', 'd.raw', '--memory', 'm.sav'], fakeBackend([]), { tty: true });
  expect(r.code).toBe(0);
  expect(r.err).toMatch(/copy disk .*100 B \/ 100 B .*\/s \| ETA/);
});

test('lists as a table or as JSON', async () => {
  const text = await cli(['base', 'list'], fakeBackend([]));
  expect(text.out.split('\n')[0]).toMatch(/^BASE ID\s+DISK\s+MEMORY\s+CPU\s+ADDED$/);
  expect(text.out).toContain(`${ID}  8.0 KiB`);
  const json = await cli(['--json', 'base', 'list'], fakeBackend([]));
  expect((JSON.parse(json.out) as Array<{ baseId: string }>)[0]?.baseId).toBe(ID);
});

test('overlay create parses its options', async () => {
  const calls: Array<[string, unknown]> = [];
  const r = await cli(['overlay', 'create', '--base', ID, '--disk', 'l.qcow2', '--memory', 'l.sav', '--lzma-level', '9', '--no-delta', '--segment-size', '8M'], fakeBackend(calls));
  expect(r.code).toBe(0);
  expect(calls).toEqual([['createOverlay', { baseId: ID, launchDiskPath: 'l.qcow2', launchSavePath: 'l.sav', delta: false, lzmaLevel: 9, segmentSize: 8 << 20 }]]);
  const bad = await cli(['overlay', 'create', '--base', ID, '--disk', 'l', '--memory', 'm', '--lzma-level', '12'], fakeBackend([]));
  expect(bad.code).toBe(2);
  expect(bad.err).toMatch(/lzma-level/);
});

test('synthesize passes overlay, base, output directory and resume options', async () => {
  const calls: Array<[string, unknown]> = [];
  const r = await cli(['synthesize', 'http://127.0.0.1:9/o.overlay', '--base', 'abcdef', '--out', '/tmp/o', '--concurrency', '3', '--resume', '--forward', '8080'], fakeBackend(calls));
  expect(r.code).toBe(0);
  expect(calls).toEqual([['synthesize', { overlay: 'http://127.0.0.1:9/o.overlay', baseId: 'abcdef', outDir: '/tmp/o', concurrency: 3, resume: { forwardGuestPort: 8080 } }]]);
  expect(r.out).toContain('timings fetch=5ms');
});

test('a CloudletError exits 1 with its message; --json adds a JSON error; --debug adds the stack', async () => {
  const failing = fakeBackend([], {
    removeBase: async () => {
      throw new CloudletError('NOT_FOUND', `base ${ID} is not in the store /s`, { fix: 'list the bases' });
    },
  });
  const plain = await cli(['base', 'remove', ID], failing);
  expect(plain.code).toBe(1);
  expect(plain.err).toBe(`cloudlet: NOT_FOUND: base ${ID} is not in the store /s. Fix: list the bases\n`);
  const json = await cli(['--json', 'base', 'remove', ID], failing);
  expect(JSON.parse(json.out)).toEqual({ error: { code: 'NOT_FOUND', message: `base ${ID} is not in the store /s. Fix: list the bases`, fix: 'list the bases', retryable: false, details: {} } });
  const debug = await cli(['--debug', 'base', 'remove', ID], failing);
  expect(debug.err).toMatch(/\n\s+at /);
});

test('base verify: ok, or CORRUPT listing the problems', async () => {
  const ok = await cli(['base', 'verify', ID], fakeBackend([]));
  expect(ok.code).toBe(0);
  expect(ok.out).toBe(`base ${ID}: all files match the manifest\n`);
  const other = 'cd'.repeat(32);
  const bad = await cli(['--json', 'base', 'verify', other], fakeBackend([]));
  expect(bad.code).toBe(1);
  const e = (JSON.parse(bad.out) as { error: { code: string; details: { problems: string[] } } }).error;
  expect(e.code).toBe('CORRUPT');
  expect(e.details.problems).toEqual(['disk.raw: sha256 differs']);
});

test('an unexpected failure exits 70 without a stack trace unless --debug', async () => {
  const failing = fakeBackend([], {
    listBases: async () => {
      throw new TypeError('boom');
    },
  });
  const r = await cli(['base', 'list'], failing);
  expect(r.code).toBe(70);
  expect(r.err).toBe('cloudlet: unexpected failure: boom (run with --debug for the stack trace)\n');
});

test('usage errors exit 2; help exits 0', async () => {
  expect((await cli(['base', 'export'], fakeBackend([]))).code).toBe(2);
  expect((await cli(['base', 'create', '--disk', 'd'], fakeBackend([]))).code).toBe(2);
  // The output file may be positional or -o; none is a typed BAD_INPUT that says what to add.
  const noFile = await cli(['base', 'export', ID], fakeBackend([]));
  expect(noFile.code).toBe(1);
  expect(noFile.err).toMatch(/BAD_INPUT: no output file given/);
  expect((await cli(['nonsense'], fakeBackend([]))).code).toBe(2);
  const help = await cli(['--help'], fakeBackend([]));
  expect(help.code).toBe(0);
  expect(help.out).toContain('synthesize');
});

test('the default store is $CLOUDLET_STORE, else var/store of the repository', async () => {
  expect(defaultStoreRoot({ CLOUDLET_STORE: '/data/store' })).toBe('/data/store');
  expect(defaultStoreRoot({})).toBe(path.join(REPO_ROOT, 'var', 'store'));
  expect((await cli(['base', 'list'], fakeBackend([]), { env: { CLOUDLET_STORE: '/e' } })).storeSeen).toBe('/e');
  expect((await cli(['--store', 'rel', 'base', 'list'], fakeBackend([]), { env: { CLOUDLET_STORE: '/e' } })).storeSeen).toBe(path.resolve('rel'));
});

test('sizes accept suffixes', () => {
  expect(sizeOption('4M')).toBe(4 << 20);
  expect(sizeOption('512k')).toBe(512 << 10);
  expect(sizeOption('1GiB')).toBe(1 << 30);
  expect(sizeOption('65536')).toBe(65536);
  expect(() => sizeOption('lots')).toThrow();
  expect(() => sizeOption('1')).toThrow();
});
