/**
 * The workloads as data: their guest files are in the repository, their recipes pass the recipe
 * format, the warm-up command really waits for /health (run here by the host's python3 against a
 * server on 127.0.0.1), and each one's judge tells a right answer from a wrong one. No VM.
 *
 * The ocr, speech and face recipes carry a sample made by ImageMagick, espeak-ng and sox; they are
 * tested only where those tools exist (the test names say so), and the portrait the face inputs
 * are cut from is put in the inputs cache first, so nothing is downloaded.
 */
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { parseRecipe } from '../../src/activities/recipes';
import { askWorkload, WORKLOAD_APP_PORT, WORKLOAD_NAMES, WORKLOADS, WORKLOADS_DIR, workloadRecipe, type WorkloadName } from '../../src/workloads';
import { INPUT_CONTENT, type InputName } from '../../src/workloads/inputs';

const REPO = path.resolve(__dirname, '..', '..');
const BASE_ID = 'c0ffee'.repeat(10) + 'beef';

let tmp: string;
beforeEach(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'cloudlet-workloads-'));
});
afterEach(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

/** Stand-in input files (for request(), which only reads them). */
function fakeInputs(dir: string): Record<InputName, string> {
  const names: InputName[] = ['ocr-sample', 'ocr-request', 'speech-sample', 'speech-request', 'face-sample', 'face-request'];
  return Object.fromEntries(
    names.map((n) => {
      const f = path.join(dir, `${n}.bin`);
      fs.writeFileSync(f, `bytes of ${n}`);
      return [n, f];
    }),
  ) as Record<InputName, string>;
}

describe('the workloads', () => {
  it('are the four named ones, each under its own name', () => {
    expect([...WORKLOAD_NAMES]).toEqual(['webdb', 'ocr', 'speech', 'face']);
    expect(Object.keys(WORKLOADS).sort()).toEqual([...WORKLOAD_NAMES].sort());
    for (const name of WORKLOAD_NAMES) expect(WORKLOADS[name].name).toBe(name);
    expect(WORKLOADS_DIR).toBe(path.join(REPO, 'workloads'));
  });

  it.each(WORKLOAD_NAMES)('%s: every guest file exists in workloads/ and goes to an absolute guest path', (name) => {
    const w = WORKLOADS[name];
    expect(w.guestFiles.length).toBeGreaterThan(0);
    for (const f of w.guestFiles) {
      const file = path.join(REPO, 'workloads', f.from);
      expect([f.from, fs.statSync(file, { throwIfNoEntry: false })?.isFile() ?? false]).toEqual([f.from, true]);
      expect(f.to).toMatch(/^\/[^\s]+$/);
    }
    expect(w.guestFiles.some((f) => f.to === '/srv/app/server.py' && f.from === `${name}/server.py`)).toBe(true);
    expect(new Set(w.guestFiles.map((f) => f.to)).size).toBe(w.guestFiles.length);
  });

  it.each(WORKLOAD_NAMES)('%s: the server answers the route of its request, and reads its sample where the recipe puts it', (name) => {
    const w = WORKLOADS[name];
    const server = fs.readFileSync(path.join(REPO, 'workloads', name, 'server.py'), 'utf8');
    const req = w.request(fakeInputs(tmp));
    expect(req.method).toBe('POST');
    expect(server).toContain(`"${req.path}"`);
    if (w.sample) expect(server).toContain(`"${w.sample.to}"`);
    for (const f of w.guestFiles.filter((g) => g.from.startsWith(`${name}/`) && g.from !== `${name}/server.py`)) {
      // Other files of the workload are named by the server (or setup) where they are put.
      expect([f.to, server.includes(f.to) || w.setup.some((s) => s.includes(f.to))]).toEqual([f.to, true]);
    }
    // Every application listens on the workload port.
    const front = fs.readFileSync(path.join(REPO, 'workloads', 'common', 'cloudlet_app.py'), 'utf8');
    expect(name === 'webdb' ? server : front).toContain(`port=${WORKLOAD_APP_PORT}`);
  });

  it('sends the request bodies a user would', () => {
    const inputs = fakeInputs(tmp);
    const web = WORKLOADS.webdb.request(inputs);
    expect(web).toMatchObject({ method: 'POST', path: '/orders', contentType: 'application/json' });
    expect(JSON.parse(String(web.body))).toEqual({ sku: 'SKU000042', qty: 3 });
    expect(WORKLOADS.ocr.request(inputs)).toMatchObject({ path: '/ocr', contentType: 'image/png', body: Buffer.from('bytes of ocr-request') });
    expect(WORKLOADS.speech.request(inputs)).toMatchObject({ path: '/stt', contentType: 'audio/wav', body: Buffer.from('bytes of speech-request') });
    expect(WORKLOADS.face.request(inputs)).toMatchObject({ path: '/faces', contentType: 'image/jpeg', body: Buffer.from('bytes of face-request') });
  });
});

describe('judges', () => {
  const body = (v: unknown): string => JSON.stringify(v);

  it('webdb: an order number and a total', () => {
    const { judge } = WORKLOADS.webdb;
    expect(judge(200, body({ order: 7, total: 7 }))).toBeUndefined();
    expect(judge(200, '{"order":1,"total":12}\n')).toBeUndefined();
    for (const [status, text] of [
      [200, body({ order: '7', total: 7 })],
      [200, body({ order: 7 })],
      [200, body({ total: 7 })],
      [200, 'null'],
      [200, '[1,2]'],
      [200, 'ok'],
      [500, body({ order: 7, total: 7 })],
    ] as const) {
      const why = judge(status, text);
      expect([status, text, typeof why]).toEqual([status, text, 'string']);
      expect(why).toContain(`HTTP ${status}`);
      expect(why).toContain('"order"');
    }
  });

  it('ocr: the request\'s text contained in the answer', () => {
    const { judge } = WORKLOADS.ocr;
    expect(INPUT_CONTENT.ocrRequest).toBe('EDGE SYNTHESIS 38');
    expect(judge(200, body({ text: 'EDGE SYNTHESIS 38' }))).toBeUndefined();
    expect(judge(200, body({ text: 'noise\nEDGE SYNTHESIS 38 \n' }))).toBeUndefined();
    for (const [status, text] of [
      [200, body({ text: 'EDGE SYNTHESIS 3B' })],
      [200, body({ text: 'edge synthesis 38' })],
      [200, body({ error: 'EDGE SYNTHESIS 38' })],
      [200, 'EDGE SYNTHESIS 38'], // not JSON
      [422, body({ text: 'EDGE SYNTHESIS 38' })],
    ] as const) {
      const why = judge(status, text);
      expect([status, text, typeof why]).toEqual([status, text, 'string']);
      expect(why).toContain('EDGE SYNTHESIS 38');
    }
  });

  it('speech: the digits in order, other words allowed between', () => {
    const { judge } = WORKLOADS.speech;
    expect(INPUT_CONTENT.speechRequest).toEqual(['one', 'two', 'three', 'four']);
    expect(judge(200, body({ text: 'one two three four' }))).toBeUndefined();
    expect(judge(200, body({ text: 'oh one two oh three five four nine' }))).toBeUndefined();
    expect(judge(200, body({ text: 'ONE  Two\tthree\nfour' }))).toBeUndefined();
    for (const [status, text] of [
      [200, body({ text: 'two one three four' })],
      [200, body({ text: 'one two four three' })],
      [200, body({ text: 'one two three' })],
      [200, body({ text: 'onetwo three four' })],
      [200, body({ text: '' })],
      [200, body({})],
      [500, body({ text: 'one two three four' })],
    ] as const) {
      const why = judge(status, text);
      expect([status, text, typeof why]).toEqual([status, text, 'string']);
      expect(why).toContain('"one two three four" in order');
    }
  });

  it('face: exactly the number of faces', () => {
    const { judge } = WORKLOADS.face;
    expect(INPUT_CONTENT.faceRequest).toBe(2);
    expect(judge(200, body({ faces: 2, boxes: [[1, 2, 3, 4], [5, 6, 7, 8]] }))).toBeUndefined();
    for (const [status, text] of [
      [200, body({ faces: 1 })],
      [200, body({ faces: 3 })],
      [200, body({ faces: '2' })],
      [200, body({ boxes: [[1, 2, 3, 4], [5, 6, 7, 8]] })],
      [422, body({ faces: 2 })],
    ] as const) {
      const why = judge(status, text);
      expect([status, text, typeof why]).toEqual([status, text, 'string']);
      expect(why).toContain('expected 2 faces');
    }
  });
});

describe('workloadRecipe: webdb', () => {
  it('is a recipe parseRecipe accepts, with its packages, port and check', async () => {
    const input = await workloadRecipe('webdb', { hostId: 'local', baseId: BASE_ID, inputsDir: tmp });
    const r = parseRecipe(input);
    expect(r.recipeId).toBe('wl-webdb');
    expect(r.hostId).toBe('local');
    expect(r.baseId).toBe(BASE_ID);
    expect(r.packages).toEqual(['python3-flask']);
    expect(r.appPort).toBe(8000);
    expect(WORKLOAD_APP_PORT).toBe(8000);
    expect(r.check).toEqual({ path: '/search?q=solar%20drone', expect: '"count":', timeoutSeconds: 300 });
    expect(r.timeoutSeconds).toBe(900);
    // The files are the repository's, as they are.
    expect(r.files.map((f) => f.path)).toEqual(WORKLOADS.webdb.guestFiles.map((f) => f.to));
    for (const f of WORKLOADS.webdb.guestFiles) {
      expect(r.files.find((x) => x.path === f.to)?.content).toBe(fs.readFileSync(path.join(REPO, 'workloads', f.from), 'utf8'));
    }
    // No sample for webdb: nothing made in the inputs directory.
    expect(fs.readdirSync(tmp)).toEqual([]);
    expect(r.command).not.toContain('base64 -d');
  });

  it('takes another recipe id', async () => {
    expect(parseRecipe(await workloadRecipe('webdb', { hostId: 'host-a', baseId: BASE_ID, recipeId: 'shop-2', inputsDir: tmp })).recipeId).toBe('shop-2');
  });

  it('loads the data, (re)starts the service, waits for /health, prints the health line, warms up and syncs', async () => {
    const { command } = parseRecipe(await workloadRecipe('webdb', { hostId: 'local', baseId: BASE_ID, inputsDir: tmp }));
    const lines = command.split('\n');
    expect(lines[0]).toBe('set -e');
    const at = (s: string): number => {
      const i = lines.findIndex((l) => l.includes(s));
      expect([s, i >= 0]).toEqual([s, true]);
      return i;
    };
    const order = ['python3 /srv/app/load.py', 'systemctl daemon-reload', 'systemctl enable cloudlet-app.service', 'systemctl restart cloudlet-app.service', "python3 - <<'EOF'"].map(at);
    expect([...order].sort((a, b) => a - b)).toEqual(order);
    expect(command).toContain('urllib.request.urlopen("http://127.0.0.1:8000/health"');
    expect(command).toContain('print("health:", health)');
    expect(command).toContain('http://127.0.0.1:8000/search?q=solar%20drone');
    expect(lines[lines.length - 1]).toBe('sync');
    expect(() => execFileSync('/bin/sh', ['-n', '-c', command])).not.toThrow();
  });

  it('its warm-up waits for the application to listen, then prints the health line and the warm-up answer', async () => {
    const { command } = parseRecipe(await workloadRecipe('webdb', { hostId: 'local', baseId: BASE_ID, inputsDir: tmp }));
    const m = /python3 - <<'EOF'\n([\s\S]*?)\nEOF\n/.exec(command);
    expect(m).not.toBeNull();
    // The application comes up late, on a free port of 127.0.0.1 instead of 8000.
    const probe = http.createServer();
    await new Promise<void>((r) => probe.listen(0, '127.0.0.1', r));
    const port = (probe.address() as AddressInfo).port;
    await new Promise<void>((r) => probe.close(() => r()));
    const program = (m?.[1] ?? '').replaceAll('127.0.0.1:8000', `127.0.0.1:${port}`);
    expect(program).not.toContain(':8000');
    const asked: string[] = [];
    const app = http.createServer((req, res) => {
      asked.push(req.url ?? '');
      if (req.url === '/health') res.end('ok boot=1234-abcd\n');
      else res.end('{"count":3,"items":[]}');
    });
    const py = spawn('python3', ['-'], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    py.stdout.on('data', (c: Buffer) => (out += c.toString()));
    py.stderr.on('data', (c: Buffer) => (err += c.toString()));
    const exited = new Promise<number | null>((r) => py.on('close', r));
    py.stdin.end(program);
    try {
      await new Promise((r) => setTimeout(r, 700));
      await new Promise<void>((r) => app.listen(port, '127.0.0.1', r));
      expect([await exited, err]).toEqual([0, '']);
    } finally {
      py.kill();
      await new Promise<void>((r) => app.close(() => r()));
    }
    expect(out).toBe('health: ok boot=1234-abcd\nwarm-up: {"count":3,"items":[]}\n');
    expect(asked).toEqual(['/health', '/search?q=solar%20drone']);
  });
});

describe('askWorkload', () => {
  it('sends the real request to the given URL and judges the answer', async () => {
    const seen: { method?: string; url?: string; type?: string; body: string }[] = [];
    let answer = '{"order": 5, "total": 5}';
    const app = http.createServer((req, res) => {
      let b = '';
      req.on('data', (c: Buffer) => (b += c.toString()));
      req.on('end', () => {
        seen.push({ method: req.method, url: req.url, type: req.headers['content-type'], body: b });
        res.setHeader('content-type', 'application/json');
        res.end(answer);
      });
    });
    await new Promise<void>((r) => app.listen(0, '127.0.0.1', r));
    try {
      const base = `http://127.0.0.1:${(app.address() as AddressInfo).port}`;
      const ok = await askWorkload('webdb', base, fakeInputs(tmp));
      expect(ok).toMatchObject({ ok: true, status: 200, body: answer });
      expect(ok.why).toBeUndefined();
      expect(seen).toEqual([{ method: 'POST', url: '/orders', type: 'application/json', body: '{"sku":"SKU000042","qty":3}' }]);
      answer = '{"error": "no such sku"}';
      const bad = await askWorkload('webdb', base, fakeInputs(tmp));
      expect(bad.ok).toBe(false);
      expect(bad.why).toMatch(/expected \{"order": n, "total": n\}, got HTTP 200/);
    } finally {
      await new Promise<void>((r) => app.close(() => r()));
    }
  });
});

/** Which of the input-making tools are missing on this machine. */
function missingTools(): string[] {
  return ['convert', 'espeak-ng', 'sox'].filter((t) => {
    try {
      execFileSync('which', [t], { stdio: 'ignore' });
      return false;
    } catch {
      return true;
    }
  });
}

const missing = missingTools();
const withTools = missing.length === 0 ? it : it.skip;
const toolNote = missing.length === 0 ? 'convert, espeak-ng and sox are installed' : `SKIPPED: ${missing.join(', ')} not installed`;

describe(`workloadRecipe: ocr, speech, face (inputs made by ImageMagick, espeak-ng, sox; ${toolNote})`, () => {
  /** A stand-in portrait in the inputs cache, so workloadInputs does not download python3-skimage. */
  function seedPortrait(dir: string): void {
    execFileSync('convert', ['-size', '96x64', 'xc:gray', path.join(dir, 'astronaut.png')]);
  }

  const samples: Record<Exclude<WorkloadName, 'webdb'>, { file: string; to: string; magic: string }> = {
    ocr: { file: 'ocr-sample.png', to: '/srv/app/sample.png', magic: '89504e47' },
    speech: { file: 'speech-sample.wav', to: '/srv/app/sample.wav', magic: '52494646' },
    face: { file: 'face-sample.jpg', to: '/srv/app/sample.jpg', magic: 'ffd8ff' },
  };

  for (const name of ['ocr', 'speech', 'face'] as const) {
    withTools(`${name}: a recipe parseRecipe accepts, carrying its sample as base64 decoded by the command`, async () => {
      seedPortrait(tmp);
      const r = parseRecipe(await workloadRecipe(name, { hostId: 'local', baseId: BASE_ID, inputsDir: tmp }));
      const w = WORKLOADS[name];
      const s = samples[name];
      expect(r.recipeId).toBe(`wl-${name}`);
      expect(r.packages).toEqual(w.packages);
      expect(r.appPort).toBe(8000);
      expect(r.check).toEqual({ path: '/selftest', expect: w.check.expect, timeoutSeconds: 300 });
      const b64 = r.files.find((f) => f.path === `${s.to}.b64`);
      expect(b64).toBeDefined();
      const sample = fs.readFileSync(path.join(tmp, s.file));
      expect(Buffer.from(b64?.content ?? '', 'base64').equals(sample)).toBe(true);
      expect(sample.subarray(0, s.magic.length / 2).toString('hex')).toBe(s.magic);
      expect(r.command.split('\n')[1]).toBe(`base64 -d ${s.to}.b64 > ${s.to} && rm -f ${s.to}.b64`);
      expect(r.command).toContain('print("health:", health)');
      expect(() => execFileSync('/bin/sh', ['-n', '-c', r.command])).not.toThrow();
    });
  }

  it('the checks expect what the samples show or say, as the application writes it', () => {
    expect(WORKLOADS.ocr.check.expect).toBe(INPUT_CONTENT.ocrSample);
    expect(INPUT_CONTENT.speechSample).toContain(WORKLOADS.speech.check.expect);
    expect(WORKLOADS.face.check.expect).toBe(`"faces": ${INPUT_CONTENT.faceSample}`);
    // cloudlet_app.py answers json.dumps(body) + "\n": the face check must match Python's spacing.
    const front = fs.readFileSync(path.join(REPO, 'workloads', 'common', 'cloudlet_app.py'), 'utf8');
    expect(front).toContain('json.dumps(body) + "\\n"');
    const py = execFileSync('python3', ['-c', `import json; print(json.dumps({"faces": ${INPUT_CONTENT.faceSample}, "boxes": [[1, 2, 3, 4]]}))`], { encoding: 'utf8' });
    expect(py).toContain(WORKLOADS.face.check.expect);
  });
});
