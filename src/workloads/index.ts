/**
 * The workloads: applications like the original system's (face detection, speech recognition,
 * OCR, a web application with a database), each installed inside a VM resumed from the Debian
 * base VM by an overlay recipe (Debian packages served by the host, the application's files,
 * a command that starts it and serves a first request), each with a real request and a check of
 * its answer. The guest-side files live in workloads/<name>/ of the repository (docs/workloads.md).
 */
import fs from 'node:fs';
import path from 'node:path';
import type { RecipeFileSchema, RecipeInput } from '../activities/recipes';
import type { z } from 'zod';
import { INPUT_CONTENT, workloadInputs, type InputName } from './inputs';

export const WORKLOAD_NAMES = ['webdb', 'ocr', 'speech', 'face'] as const;
export type WorkloadName = (typeof WORKLOAD_NAMES)[number];

/** The guest port every workload's application listens on. */
export const WORKLOAD_APP_PORT = 8000;

export interface WorkloadRequest {
  method: 'GET' | 'POST';
  path: string;
  body?: Buffer;
  contentType?: string;
}

export interface Workload {
  name: WorkloadName;
  description: string;
  /** Debian packages the recipe installs in the guest. */
  packages: string[];
  /** The recipe's command must finish within this (installing under emulation is slow). */
  timeoutSeconds: number;
  /** Files of workloads/<name>/ and where they go in the guest. */
  guestFiles: { from: string; to: string; mode?: string }[];
  /** The host-made input shipped with the recipe as the application's sample (/selftest). */
  sample?: { input: InputName; to: string };
  /** Shell lines run after the files are in place, before the service starts. */
  setup: string[];
  /** The recipe's check (on the verifying synthesis) and its expected text. */
  check: { path: string; expect: string };
  /** The real request a user sends, and whether its answer is right (undefined) or why not. */
  request(inputs: Record<InputName, string>): WorkloadRequest;
  judge(status: number, body: string): string | undefined;
}

const REPO = path.resolve(__dirname, '..', '..');
export const WORKLOADS_DIR = path.join(REPO, 'workloads');

const common = [
  { from: 'common/cloudlet_app.py', to: '/usr/lib/cloudlet/cloudlet_app.py' },
  { from: 'common/app.service', to: '/etc/systemd/system/cloudlet-app.service' },
];

/** `words` appear in `text` in this order (other words may stand between). */
function inOrder(text: string, words: readonly string[]): boolean {
  const got = text.toLowerCase().split(/\s+/);
  let i = 0;
  for (const w of got) if (w === words[i]) i++;
  return i === words.length;
}

function json(body: string): Record<string, unknown> | undefined {
  try {
    return JSON.parse(body) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

export const WORKLOADS: Record<WorkloadName, Workload> = {
  webdb: {
    name: 'webdb',
    description: 'a Flask shop over SQLite: 20,000 products, search and orders',
    packages: ['python3-flask'],
    timeoutSeconds: 900,
    guestFiles: [...common, { from: 'webdb/server.py', to: '/srv/app/server.py' }, { from: 'webdb/load.py', to: '/srv/app/load.py' }],
    setup: ['python3 /srv/app/load.py'],
    check: { path: '/search?q=solar%20drone', expect: '"count":' },
    request: () => ({ method: 'POST', path: '/orders', body: Buffer.from(JSON.stringify({ sku: 'SKU000042', qty: 3 })), contentType: 'application/json' }),
    judge: (status, body) => {
      const j = json(body);
      return status === 200 && typeof j?.order === 'number' && typeof j.total === 'number' ? undefined : `expected {"order": n, "total": n}, got HTTP ${status}: ${body.slice(0, 200)}`;
    },
  },
  ocr: {
    name: 'ocr',
    description: 'Tesseract OCR of an uploaded image',
    packages: ['tesseract-ocr', 'tesseract-ocr-eng'],
    timeoutSeconds: 1800,
    guestFiles: [...common, { from: 'ocr/server.py', to: '/srv/app/server.py' }],
    sample: { input: 'ocr-sample', to: '/srv/app/sample.png' },
    setup: [],
    check: { path: '/selftest', expect: INPUT_CONTENT.ocrSample },
    request: (inputs) => ({ method: 'POST', path: '/ocr', body: fs.readFileSync(inputs['ocr-request']), contentType: 'image/png' }),
    judge: (status, body) => (status === 200 && String(json(body)?.text ?? '').includes(INPUT_CONTENT.ocrRequest) ? undefined : `expected the text "${INPUT_CONTENT.ocrRequest}", got HTTP ${status}: ${body.slice(0, 200)}`),
  },
  speech: {
    name: 'speech',
    description: 'PocketSphinx speech recognition of spoken digits',
    packages: ['pocketsphinx', 'pocketsphinx-en-us'],
    timeoutSeconds: 1800,
    guestFiles: [...common, { from: 'speech/server.py', to: '/srv/app/server.py' }, { from: 'speech/digits.gram', to: '/srv/app/digits.gram' }],
    sample: { input: 'speech-sample', to: '/srv/app/sample.wav' },
    setup: [],
    check: { path: '/selftest', expect: 'three' },
    request: (inputs) => ({ method: 'POST', path: '/stt', body: fs.readFileSync(inputs['speech-request']), contentType: 'audio/wav' }),
    judge: (status, body) => (status === 200 && inOrder(String(json(body)?.text ?? ''), INPUT_CONTENT.speechRequest) ? undefined : `expected the words "${INPUT_CONTENT.speechRequest.join(' ')}" in order, got HTTP ${status}: ${body.slice(0, 200)}`),
  },
  face: {
    name: 'face',
    description: 'OpenCV Haar-cascade face detection in an uploaded photograph',
    packages: ['python3-opencv', 'opencv-data', 'python3-numpy'],
    timeoutSeconds: 3600,
    guestFiles: [...common, { from: 'face/server.py', to: '/srv/app/server.py' }],
    sample: { input: 'face-sample', to: '/srv/app/sample.jpg' },
    setup: [],
    check: { path: '/selftest', expect: `"faces": ${INPUT_CONTENT.faceSample}` },
    request: (inputs) => ({ method: 'POST', path: '/faces', body: fs.readFileSync(inputs['face-request']), contentType: 'image/jpeg' }),
    judge: (status, body) => (status === 200 && json(body)?.faces === INPUT_CONTENT.faceRequest ? undefined : `expected ${INPUT_CONTENT.faceRequest} faces, got HTTP ${status}: ${body.slice(0, 200)}`),
  },
};

type RecipeFile = z.input<typeof RecipeFileSchema>;

/**
 * The overlay recipe of a workload on a base: its packages, its files (the sample input as base64
 * text, decoded by the command), and a command that starts the service and serves one request so
 * the application is warm when the overlay is taken.
 */
export async function workloadRecipe(name: WorkloadName, where: { hostId: string; baseId: string; recipeId?: string; inputsDir: string }): Promise<RecipeInput> {
  const w = WORKLOADS[name];
  const files: RecipeFile[] = w.guestFiles.map((f) => ({ path: f.to, content: fs.readFileSync(path.join(WORKLOADS_DIR, f.from), 'utf8'), ...(f.mode ? { mode: f.mode } : {}) }));
  const decode: string[] = [];
  if (w.sample) {
    const inputs = await workloadInputs(where.inputsDir);
    files.push({ path: `${w.sample.to}.b64`, content: fs.readFileSync(inputs[w.sample.input]).toString('base64') });
    decode.push(`base64 -d ${w.sample.to}.b64 > ${w.sample.to} && rm -f ${w.sample.to}.b64`);
  }
  const warm = `http://127.0.0.1:${WORKLOAD_APP_PORT}`;
  const command = [
    'set -e',
    ...decode,
    ...w.setup,
    'systemctl daemon-reload',
    'systemctl enable cloudlet-app.service',
    'systemctl restart cloudlet-app.service',
    // Wait for the port (a started unit can precede its listening socket), then warm up.
    `python3 - <<'EOF'
import time, urllib.request
deadline = time.time() + 300
while True:
    try:
        health = urllib.request.urlopen("${warm}/health", timeout=5).read().decode().strip()
        break
    except OSError:
        if time.time() > deadline:
            raise SystemExit("the application did not answer on port ${WORKLOAD_APP_PORT} within 300 s")
        time.sleep(0.2)
print("health:", health)
print("warm-up:", urllib.request.urlopen("${warm}${w.check.path}", timeout=600).read().decode()[:300])
EOF`,
    'sync',
  ].join('\n');
  return {
    recipeId: where.recipeId ?? `wl-${name}`,
    hostId: where.hostId,
    baseId: where.baseId,
    packages: w.packages,
    files,
    command,
    check: { path: w.check.path, expect: w.check.expect, timeoutSeconds: 300 },
    timeoutSeconds: w.timeoutSeconds,
    appPort: WORKLOAD_APP_PORT,
  };
}

/** Sends the workload's real request to 127.0.0.1:<hostPort> and judges the answer. */
export async function askWorkload(name: WorkloadName, baseUrl: string, inputs: Record<InputName, string>, timeoutMs = 120_000): Promise<{ ok: boolean; status: number; body: string; ms: number; why?: string }> {
  const w = WORKLOADS[name];
  const req = w.request(inputs);
  const t0 = performance.now();
  const res = await fetch(`${baseUrl}${req.path}`, {
    method: req.method,
    ...(req.body ? { body: req.body } : {}),
    headers: req.contentType ? { 'content-type': req.contentType } : {},
    signal: AbortSignal.timeout(timeoutMs),
  });
  const body = await res.text();
  const ms = performance.now() - t0;
  const why = w.judge(res.status, body);
  return { ok: why === undefined, status: res.status, body, ms, ...(why ? { why } : {}) };
}
