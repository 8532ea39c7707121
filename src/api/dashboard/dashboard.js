// The cloudlet dashboard: plain browser JavaScript over the cloudlet API (docs/dashboard.md).
// Every figure comes from the API with the token the user gives; nothing is kept beyond the tab.
'use strict';
(() => {
  const KEY = 'cloudlet-api-token';
  // ?refresh=<ms> polls faster (the browser tests use it); default every 2 s.
  const REFRESH_MS = Math.max(250, Number(new URLSearchParams(window.location.search).get('refresh')) || 2000);
  const $ = (id) => document.getElementById(id);
  let config = { temporalUiUrl: '', namespace: 'default', schedules: true };
  let timer;

  /** An element with attributes and children (strings become text: nothing is parsed as HTML). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'style') el.setAttribute('style', v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat()) if (c !== undefined && c !== null) el.append(c instanceof Node ? c : String(c));
    return el;
  }
  const short = (id) => (id && id.length > 16 ? `${id.slice(0, 12)}…` : id || '');
  const mb = (b) => `${(b / 1e6).toFixed(1)} MB`;
  /** A host's warm pool (docs/warm-pool.md): ready VMs of the target, and why it is short if it is. */
  function poolCell(pool) {
    const target = pool ? Object.values(pool.targets).reduce((a, b) => a + b, 0) : 0;
    if (!pool || target === 0) return 'off';
    const text = `${pool.entries.length} of ${target}`;
    return pool.short ? h('span', { title: pool.short }, `${text} (short: ${pool.short})`) : text;
  }
  const gib = (b) => `${(b / 2 ** 30).toFixed(1)} GiB`;
  const secs = (ms) => `${(ms / 1000).toFixed(2)} s`;
  const state = (s) => h('span', { class: `state ${s}` }, s);
  const runUrl = (workflowId) => `${config.temporalUiUrl}/namespaces/${encodeURIComponent(config.namespace)}/workflows/${encodeURIComponent(workflowId)}`;
  const runLink = (workflowId, text) => (config.temporalUiUrl ? h('a', { href: runUrl(workflowId), target: '_blank', rel: 'noopener' }, text || 'run in Temporal') : '');

  function table(headers, rows, empty) {
    if (rows.length === 0) return h('p', { class: 'empty' }, empty);
    return h('table', {}, h('thead', {}, h('tr', {}, headers.map((x) => h('th', { scope: 'col' }, x)))), h('tbody', {}, rows.map((r) => h('tr', {}, r.map((c) => h('td', {}, c))))));
  }

  class Unauthorized extends Error {}
  const FORBIDDEN = Symbol('forbidden');
  async function api(path) {
    const res = await fetch(path, { headers: { authorization: `Bearer ${sessionStorage.getItem(KEY) || ''}` } });
    if (res.status === 401) throw new Unauthorized('the API refused the token (401)');
    if (res.status === 501) return undefined;
    // A section the token's role may not read (hosts and schedules are the admins'): shown as such.
    if (res.status === 403) return FORBIDDEN;
    const body = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(`${path}: ${res.status} ${(body.error && body.error.message) || ''}`);
    return body;
  }

  const STAGE_COLORS = ['#0969da', '#1a7f37', '#bf8700', '#8250df', '#cf222e', '#1b7c83', '#9a6700', '#57606a'];
  /** A synthesis's top-level stages (the other timings are steps inside them). */
  const TOP = ['preflightMs', 'fetch and apply overlayMs', 'resumeMs'];
  /** The first-response breakdown: one bar, a segment per stage, and every timing in a list. */
  function breakdown(timings) {
    const all = Object.entries(timings || {}).filter(([k, v]) => typeof v === 'number' && k !== 'firstResponseMs' && /Ms$/.test(k));
    const top = all.filter(([k]) => TOP.includes(k));
    const stages = top.length ? top : all;
    const total = timings && typeof timings.firstResponseMs === 'number' ? timings.firstResponseMs : stages.reduce((s, [, v]) => s + v, 0);
    if (!stages.length || !total) return '';
    const bar = h('div', { class: 'breakdown', role: 'img', 'aria-label': `first response ${secs(total)}: ${stages.map(([k, v]) => `${k.replace(/Ms$/, '')} ${secs(v)}`).join(', ')}` },
      stages.map(([k, v], i) => h('span', { title: `${k.replace(/Ms$/, '')}: ${secs(v)}`, style: `width:${Math.max(0.5, (100 * v) / total)}%;background:${STAGE_COLORS[i % STAGE_COLORS.length]}` })));
    const color = (k) => { const i = stages.findIndex(([s]) => s === k); return i < 0 ? '' : STAGE_COLORS[i % STAGE_COLORS.length]; };
    const list = h('details', {}, h('summary', {}, `first response ${secs(total)}`), h('ul', {}, all.map(([k, v]) => h('li', {}, color(k) ? h('span', { style: `color:${color(k)}` }, '■ ') : '  ', `${k.replace(/Ms$/, '')}: ${secs(v)}`))));
    return h('div', {}, bar, list);
  }

  function chart(instances) {
    const points = instances.filter((i) => i.timings && typeof i.timings.firstResponseMs === 'number').slice(0, 20);
    if (!points.length) return h('p', { class: 'empty' }, 'No synthesis has finished yet. Provision an instance from an overlay (POST /v1/instances) to see its time here.');
    const max = Math.max(...points.map((p) => p.timings.firstResponseMs));
    const W = 640, row = 22, left = 150;
    const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
    svg.setAttribute('viewBox', `0 0 ${W} ${points.length * row + 8}`);
    svg.setAttribute('width', String(W));
    svg.setAttribute('style', 'max-width:100%;height:auto');
    svg.setAttribute('role', 'img');
    svg.setAttribute('aria-label', `first response of the last ${points.length} syntheses: ${points.map((p) => `${p.id} ${secs(p.timings.firstResponseMs)}`).join(', ')}`);
    points.forEach((p, i) => {
      const y = i * row + 4;
      const w = Math.max(1, ((W - left - 70) * p.timings.firstResponseMs) / max);
      const label = document.createElementNS(svg.namespaceURI, 'text');
      label.setAttribute('x', '0'); label.setAttribute('y', String(y + 13)); label.textContent = p.id;
      const rect = document.createElementNS(svg.namespaceURI, 'rect');
      rect.setAttribute('x', String(left)); rect.setAttribute('y', String(y)); rect.setAttribute('width', String(w)); rect.setAttribute('height', '16'); rect.setAttribute('fill', '#0969da');
      const val = document.createElementNS(svg.namespaceURI, 'text');
      val.setAttribute('x', String(left + w + 6)); val.setAttribute('y', String(y + 13)); val.textContent = secs(p.timings.firstResponseMs);
      svg.append(label, rect, val);
    });
    return svg;
  }

  async function refresh() {
    const list = (path, key) => api(path).then((body) => (body === FORBIDDEN ? FORBIDDEN : body ? body[key] : undefined));
    const [hosts, instances, bases, overlays, schedules, me] = await Promise.all([
      list('/v1/hosts', 'hosts'), list('/v1/instances', 'instances'), list('/v1/bases', 'bases'), list('/v1/overlays', 'overlays'),
      config.schedules ? list('/v1/schedules', 'schedules').catch(() => undefined) : undefined,
      api('/v1/whoami').catch(() => undefined),
    ]);
    if (me && me !== FORBIDDEN) $('who').textContent = me.tenant ? `${me.role} of tenant ${me.tenant} ·` : `${me.role} (operators) ·`;
    const adminsOnly = (what) => h('p', { class: 'empty' }, `${what} are shown to admins only: your token is a ${me && me.role ? me.role : 'tenant'}'s.`);
    const live = instances.filter((i) => i.state === 'provisioning' || i.state === 'terminating');
    const ops = await Promise.all(live.map((i) => api(`/v1/operations/${encodeURIComponent(i.operationId)}`).catch(() => undefined)));

    $('ops').replaceChildren(ops.filter(Boolean).length
      ? h('div', {}, ops.filter(Boolean).map((op) => h('div', { class: 'op', 'data-operation': op.id },
          h('strong', {}, op.kind), ' on ', h('span', { class: 'id' }, op.hostId), ' — ', state(op.state), ' ',
          h('span', { class: 'stage' }, (op.progress && op.progress.stage) || 'starting'), ' ', runLink(op.id),
          op.progress && op.progress.done.length ? h('ol', {}, op.progress.done.map((d) => h('li', {}, d))) : '')))
      : h('p', { class: 'empty' }, 'Nothing is running. Operations (synthesis, overlay creation, handoff...) show their stages here while they run.'));

    $('instances').replaceChildren(table(['Instance', 'State', 'Host', 'Application', 'First response', 'Run'],
      instances.map((i) => [h('span', { class: 'id', 'data-instance': i.id }, i.id), state(i.state), h('span', { class: 'id' }, i.hostId), i.appEndpoint || '', breakdown(i.timings), runLink(i.operationId)]),
      'No instances yet. Provision one from an overlay (POST /v1/instances, or cloudlet instance provision), or resume a base (POST /v1/bases/{id}/instances).'));

    $('chart').replaceChildren(chart(instances));

    const running = (host) => instances.filter((i) => i.hostId === host && i.state === 'running').length;
    if (hosts === FORBIDDEN) $('hosts').replaceChildren(adminsOnly('Hosts'));
    else $('hosts').replaceChildren(table(['Host', 'Serving', 'Running instances', 'Base VMs held', 'Memory available', 'Store free', 'Warm pool (ready of target)'],
      hosts.map((x) => [h('span', { class: 'id' }, x.id), state(x.serving ? 'yes' : 'no'), String(running(x.id)), String(bases.filter((b) => b.hostIds.includes(x.id)).length),
        x.stats ? `${gib(x.stats.memAvailableBytes)} of ${gib(x.stats.memTotalBytes)}` : '–', x.stats ? gib(x.stats.storeFreeBytes) : '–', poolCell(x.pool)]),
      'This API has no hosts configured (CLOUDLET_HOSTS).'));
    if (hosts !== FORBIDDEN && hosts.some((x) => !x.serving)) $('hosts').append(h('p', { class: 'muted' }, 'A host that is not serving has no worker polling its queue: start it with npx tsx src/workers/main.ts --host <id>.'));

    $('bases').replaceChildren(table(['Base', 'Hosts', 'Disk', 'Memory image', 'CPU model', 'Imported'],
      bases.map((b) => [h('span', { class: 'id', title: b.id }, short(b.id)), b.hostIds.join(', '), mb(b.diskBytes), mb(b.memoryBytes), b.cpuModel || '', new Date(b.importedAt).toLocaleString()]),
      'No base VM imported. Import one with POST /v1/bases (or cloudlet base import).'));

    $('overlays').replaceChildren(table(['Overlay', 'Base', 'Size', 'From instance', 'Created', 'URL'],
      overlays.map((o) => [h('span', { class: 'id', title: o.id }, short(o.id)), h('span', { class: 'id', title: o.baseId }, short(o.baseId)), mb(o.bytes), o.fromInstanceId || '', new Date(o.createdAt).toLocaleString(), h('a', { href: o.url }, 'download')]),
      'No overlays yet. Create one from a customized instance (POST /v1/overlays).'));

    if (schedules === FORBIDDEN) $('schedules').replaceChildren(adminsOnly('Schedules'));
    else if (!schedules) $('schedules').replaceChildren(h('p', { class: 'empty' }, 'Schedules are not enabled on this API server.'));
    else {
      const details = await Promise.all(schedules.map((s) => api(`/v1/schedules/${encodeURIComponent(s.recipeId)}`).catch(() => s)));
      $('schedules').replaceChildren(table(['Recipe', 'Every', 'State', 'Next run', 'Last run'],
        details.map((s) => [h('span', { class: 'id' }, s.recipeId), s.every, state(s.paused ? 'paused' : 'running'), s.nextRunAt ? new Date(s.nextRunAt).toLocaleString() : '', s.lastRun ? h('span', {}, state(String(s.lastRun.status).toLowerCase()), ' ', runLink(s.lastRun.workflowId, 'run')) : 'none yet']),
        'No schedules. Create one for a recipe (POST /v1/schedules) to rebuild its overlay regularly.'));
    }
    $('updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  async function loop() {
    clearTimeout(timer);
    try {
      await refresh();
      $('alert').textContent = '';
    } catch (e) {
      if (e instanceof Unauthorized) {
        sessionStorage.removeItem(KEY);
        show();
        $('alert').textContent = `${e.message}: enter a token the API accepts.`;
        return;
      }
      $('alert').textContent = `Could not read the cloudlet API: ${e.message}. It retries every ${REFRESH_MS / 1000} s; check that the API server runs.`;
    }
    timer = setTimeout(loop, REFRESH_MS);
  }

  function show() {
    const has = Boolean(sessionStorage.getItem(KEY));
    $('login').hidden = has;
    $('session').hidden = !has;
    $('main').hidden = !has;
    if (has) void loop();
    else clearTimeout(timer);
  }

  $('login').addEventListener('submit', (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $('token').value.trim());
    $('token').value = '';
    $('alert').textContent = '';
    show();
  });
  $('logout').addEventListener('click', () => {
    sessionStorage.removeItem(KEY);
    show();
  });

  fetch('config.json').then((r) => r.json()).then((c) => {
    config = c;
    if (c.namespace) $('where').textContent = `Temporal namespace ${c.namespace}${c.temporalUiUrl ? ` (runs open in the Temporal Web UI, ${c.temporalUiUrl})` : ''}.`;
  }).catch(() => undefined).finally(show);
})();
