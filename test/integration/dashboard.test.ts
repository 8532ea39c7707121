/**
 * The cloudlet dashboard and the Temporal Web UI in a real browser (Debian's Chromium, driven by
 * playwright-core with its executable path; no browser download), during a real synthesis: the page asks for a token, then the synthesis shows as
 * a running operation whose stage moves on, the instance appears with its first-response
 * breakdown and a link to its run; that link opens the run in the Temporal Web UI, which shows its
 * per-stage timings, its summary and its search attributes. Screenshots go to var/screenshots/.
 */
import fs from 'node:fs';
import path from 'node:path';
import { chromium, type Browser, type Page } from 'playwright-core';
import { createLogger } from '../../src/common/logger';
import { startApi, type RunningApi } from '../../src/api/server';
import { CloudletApiClient } from '../../src/api/client';
import { TemporalCloudletService } from '../../src/service';
import { startTestCluster, type TestCluster } from '../helpers/cluster';
import { overlayOnFirstHost } from '../helpers/overlay-story';
import { REPO } from '../helpers/infra';
import { pollUntil } from '../helpers/poll';
import { mintToken, SqliteClusterCatalog } from '../../src/core/cluster-catalog';

jest.setTimeout(20 * 60_000);

const CHROMIUM = process.env.CLOUDLET_CHROMIUM ?? '/usr/bin/chromium';
const SHOTS = path.join(REPO, 'var', 'screenshots');

/** The little of the page's DOM the checks below read (this project compiles without the DOM types). */
interface Shown {
  innerText: string;
  textContent: string | null;
  getAttribute(name: string): string | null;
  closest(selector: string): (Shown & { querySelector(selector: string): (Shown & { href: string }) | null }) | null;
}
declare const document: { body: Shown; getElementById(id: string): Shown | null };

describe('the dashboard and the Temporal Web UI in Chromium', () => {
  let cluster: TestCluster;
  let api: RunningApi;
  let cloud: CloudletApiClient;
  let browser: Browser;
  let page: Page;
  let catalog: SqliteClusterCatalog;
  const token = `dash-token-${Date.now()}-0123456789`;

  beforeAll(async () => {
    cluster = await startTestCluster('dash', ['da', 'db']);
    const service = new TemporalCloudletService(cluster.client, cluster.config, { hosts: cluster.hosts });
    catalog = new SqliteClusterCatalog(':memory:');
    api = await startApi(service, { tokens: [token], catalog, port: 0, logger: createLogger('api', 'warn'), temporalUi: { url: cluster.config.webUiUrl, namespace: cluster.config.namespace } });
    cloud = new CloudletApiClient({ baseUrl: api.url, token });
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox', '--disable-dev-shm-usage'] });
    page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
    fs.mkdirSync(SHOTS, { recursive: true });
  });

  afterAll(async () => {
    await browser?.close();
    await api?.close();
    await catalog?.close();
    await cluster?.stop();
  });

  const text = (selector: string): Promise<string> => page.$eval(selector, (el) => (el as unknown as Shown).innerText);
  const texts = (selector: string): Promise<string[]> => page.$$eval(selector, (els) => els.map((e) => (e as unknown as Shown).innerText));
  const rowOf = (instanceId: string): Promise<string[]> => page.$$eval(`[data-instance="${instanceId}"]`, (els) => els.map((e) => (e as unknown as Shown).closest('tr')?.innerText ?? ''));

  it('shows a synthesis as it runs, the instance with its breakdown, and its run in the Temporal Web UI', async () => {
    const [da = '', db = ''] = cluster.hosts;
    const { overlayUrl, done } = await overlayOnFirstHost(cloud, [da, db]);

    // Without a token the page asks for one, and says so when the API refuses it.
    await page.goto(`${api.url}/dashboard/?refresh=300`, { waitUntil: 'domcontentloaded' });
    await page.waitForSelector('#login:not([hidden])');
    await page.fill('#token', 'wrong-token-0123456789');
    await page.click('#login button[type=submit]');
    await page.waitForFunction(() => /refused the token/.test(document.getElementById('alert')?.textContent ?? ''));
    await page.fill('#token', token);
    await page.click('#login button[type=submit]');
    await page.waitForSelector('#main:not([hidden])');
    await page.waitForFunction((h: string) => document.getElementById('hosts')?.innerText.includes(h) === true || (document.getElementById('alert')?.textContent ?? '') !== '', db);
    expect(await text('#alert')).toBe('');
    expect(await text('#hosts')).toContain(db);
    // Each host's memory and store, from its hostMonitor run (read every 5 s).
    await pollUntil("the hosts' stats", 30_000, async () => ((await text('#hosts')).match(/[0-9.]+ GiB of [0-9.]+ GiB/g)?.length === 2 ? true : undefined), 250);
    // No base has a warm pool here: each host's pool column says so.
    expect(await text('#hosts')).toContain('Warm pool (ready of target)');
    expect((await text('#hosts')).match(/\boff\b/g)?.length).toBe(2);
    expect(await text('#ops')).toMatch(/Nothing is running/);

    // A synthesis on db: the page shows it running, and its stage moves on.
    const op = await cloud.provisionInstance({ hostId: db, overlayUrl });
    const stages = new Set<string>();
    await pollUntil('the synthesis to show as a running operation', 120_000, async () => {
      const s = await texts('[data-operation] .stage');
      s.forEach((x) => stages.add(x));
      return s.length > 0 ? true : undefined;
    }, 50);
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-running.png'), fullPage: true });
    const instanceId = String((await done(op.id)).instanceId);
    await pollUntil('the instance to show as running with its breakdown', 60_000, async () => {
      (await texts('[data-operation] .stage')).forEach((x) => stages.add(x));
      const row = await rowOf(instanceId);
      return row[0] && /running/.test(row[0]) && /first response [0-9.]+ s/.test(row[0]) ? row[0] : undefined;
    }, 50);
    // The page showed the run in one of its stages while it ran, then no longer running (its progress moved on).
    // ("done": the run has finished and the list was read before the visibility store said so.)
    expect([...stages].filter((x) => !/^(starting|preflight|fetch and apply overlay|resume.*|done)$/.test(x))).toEqual([]);
    await pollUntil('the operation to leave the running list', 30_000, async () => ((await texts('[data-operation] .stage')).length === 0 ? true : undefined), 100);
    expect(await text('#ops')).toMatch(/Nothing is running/);
    // The chart has the synthesis; the breakdown names its stages; the run links to the Temporal UI.
    expect(await page.$eval('#chart svg', (el) => el.getAttribute('aria-label') ?? '')).toContain(instanceId);
    const cell = `[data-instance="${instanceId}"]`;
    const breakdownLabel = await page.$eval(cell, (el) => (el as unknown as Shown).closest('tr')?.querySelector('.breakdown')?.getAttribute('aria-label') ?? '');
    expect(breakdownLabel).toMatch(/^first response [0-9.]+ s: preflight [0-9.]+ s, fetch and apply overlay [0-9.]+ s, resume [0-9.]+ s$/);
    // Every timing is in the breakdown's list, the steps inside the stages too.
    expect(await page.$eval(cell, (el) => (el as unknown as Shown).closest('tr')?.textContent ?? '')).toMatch(/wait for app: [0-9.]+ s/);
    const href = await page.$eval(cell, (el) => (el as unknown as Shown).closest('tr')?.querySelector('a')?.href ?? '');
    expect(href).toBe(`${cluster.config.webUiUrl}/namespaces/${cluster.config.namespace}/workflows/${encodeURIComponent(op.id)}`);
    await page.screenshot({ path: path.join(SHOTS, 'dashboard.png'), fullPage: true });

    // The run in the Temporal Web UI: its result's per-stage timings, its summary, its search attributes.
    await page.goto(href, { waitUntil: 'networkidle', timeout: 60_000 });
    await page.waitForFunction(() => document.body.innerText.includes('firstResponseMs'), undefined, { timeout: 60_000 });
    const history = await page.evaluate(() => document.body.innerText);
    expect(history).toContain('synthesizeVm');
    expect(history).toMatch(/"wait for appMs": \d+/);
    await page.screenshot({ path: path.join(SHOTS, 'temporal-run.png'), fullPage: true });
    // The run's summary (the UI renders user metadata in a frame of its own).
    await page.getByText('User Metadata', { exact: true }).first().click();
    await pollUntil('the run\'s summary in the Temporal Web UI', 30_000, async () => {
      for (const f of page.frames()) {
        if ((await f.evaluate(() => document.body?.innerText ?? '').catch(() => '')).includes(`Synthesize instance ${instanceId} on host ${db}`)) return true;
      }
      return undefined;
    }, 250);
    await page.getByText('Search Attributes', { exact: true }).first().click();
    await page.waitForFunction(() => document.body.innerText.includes('CloudletOperation'), undefined, { timeout: 30_000 });
    const attrs = await page.evaluate(() => document.body.innerText);
    expect(attrs).toContain(`"CloudletHost": "${db}"`);
    expect(attrs).toContain('"CloudletOperation": "synthesizeVm"');
    expect(attrs).toContain('"CloudletStatus": "succeeded"');
    await page.screenshot({ path: path.join(SHOTS, 'temporal-search-attributes.png'), fullPage: true });
  });

  it('shows a tenant\'s member its own tenant only: no hosts, no schedules, not the operators\' instances', async () => {
    const minted = mintToken('acme', 'member', 'dashboard test');
    await catalog.addToken(minted.record);
    await page.goto(`${api.url}/dashboard/`, { waitUntil: 'networkidle' });
    if (await page.isVisible('#logout')) await page.click('#logout');
    await page.fill('#token', minted.token);
    await page.click('#login button[type="submit"]');
    await page.waitForFunction(() => /member of tenant acme/.test(document.getElementById('who')?.textContent ?? ''), undefined, { timeout: 30_000 });
    await page.waitForFunction(() => /shown to admins only/.test(document.getElementById('hosts')?.textContent ?? ''), undefined, { timeout: 30_000 });
    expect(await text('#instances')).toMatch(/No instances yet/);
    // The operators' instance from the test before is there for the admin token, not for acme.
    expect((await cloud.listInstances()).length).toBeGreaterThan(0);
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-member.png'), fullPage: true });
  });
});
