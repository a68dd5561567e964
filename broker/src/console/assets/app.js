// fleethub console: one script, no framework, no build step. Pages are drawn from the
// management API (under /ui/api, signed in by cookie) and the live streams (/ui/live).
// Everything shown is set as text, never as HTML: device ids, twins and messages come from
// devices and must not be able to run as script here.
'use strict';

const state = {
  csrf: null,
  hubId: null,
  // Overview samples, oldest first, kept while signed in (the charts' history).
  samples: [],
  overview: null,
  // Called with each new overview sample by the page on screen.
  onSample: null,
  // Ends what the page on screen started (streams, timers).
  cleanup: [],
};
const MAX_SAMPLES = 300;
const PAGE_SIZE = 50;

// ---------------------------------------------------------------------------------------
// DOM and API helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'value') el.value = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

// Appends children (nodes, text, nested arrays; null and false skipped) to el.
function put(el, ...children) {
  return append(el, children);
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

function toast(message, bad) {
  const box = document.getElementById('toast');
  const msg = h('div', { class: bad ? 'msg bad' : 'msg' }, message);
  box.appendChild(msg);
  setTimeout(() => msg.remove(), bad ? 8000 : 4000);
}

class ApiFailure extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

// Calls the API; resolves with {ok, status, data, headers} whatever the status (a 401 signs
// the page out).
async function apiAnswer(method, path, body, extraHeaders) {
  const headers = Object.assign({ Accept: 'application/json' }, extraHeaders || {});
  const init = { method, headers, credentials: 'same-origin' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  if (method !== 'GET') headers['X-CSRF-Token'] = state.csrf || '';
  const response = await fetch('/ui/api' + path, init);
  const text = await response.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch (_) { data = { message: text }; }
  }
  if (response.status === 401) signedOut();
  return { ok: response.ok, status: response.status, data, headers: response.headers };
}

// Calls the API; resolves with {status, data, headers}, rejects with ApiFailure on 4xx/5xx.
async function api(method, path, body, extraHeaders) {
  const answer = await apiAnswer(method, path, body, extraHeaders);
  if (!answer.ok) throw new ApiFailure(answer.status, answer.data);
  return answer;
}

function enc(s) { return encodeURIComponent(s); }

function fmt(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return '–';
  if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(1) + 'M';
  if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + 'k';
  return Number.isInteger(n) ? String(n) : n.toFixed(1);
}

function ago(iso) {
  if (!iso || iso.startsWith('0001')) return '–';
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (!Number.isFinite(s)) return iso;
  if (s < 60) return Math.max(0, Math.round(s)) + ' s ago';
  if (s < 3600) return Math.round(s / 60) + ' min ago';
  if (s < 86400) return Math.round(s / 3600) + ' h ago';
  return Math.round(s / 86400) + ' d ago';
}

function json(v) { return JSON.stringify(v, null, 2); }

// A copy without the keys the hub keeps for itself ($version, $metadata).
function withoutMeta(v) {
  if (!v || typeof v !== 'object' || Array.isArray(v)) return v;
  const out = {};
  for (const [k, x] of Object.entries(v)) if (!k.startsWith('$')) out[k] = withoutMeta(x);
  return out;
}

// The JSON merge patch that turns `from` into `to` (removed keys become null).
function mergePatch(from, to) {
  const patch = {};
  for (const k of Object.keys(from)) if (!(k in to)) patch[k] = null;
  for (const [k, v] of Object.entries(to)) {
    const old = from[k];
    const bothObjects = v && old && typeof v === 'object' && typeof old === 'object'
      && !Array.isArray(v) && !Array.isArray(old);
    if (bothObjects) {
      const inner = mergePatch(old, v);
      if (Object.keys(inner).length) patch[k] = inner;
    } else if (JSON.stringify(old) !== JSON.stringify(v)) {
      patch[k] = v;
    }
  }
  return patch;
}

function badge(text, cls) { return h('span', { class: 'badge ' + (cls || '') }, text); }

function connectionBadge(c) {
  return c === 'Connected' ? badge('connected', 'ok') : badge('disconnected', 'muted');
}

function statusBadge(s) {
  return s === 'disabled' ? badge('disabled', 'bad') : badge(s || 'enabled', 'ok');
}

// A modal confirmation; resolves true when confirmed.
function confirmDialog(title, text, action) {
  return new Promise((resolve) => {
    const done = (v) => { dialog.close(); dialog.remove(); resolve(v); };
    const dialog = h('dialog', { 'aria-labelledby': 'confirm-title' },
      h('h2', { id: 'confirm-title' }, title),
      h('p', {}, text),
      h('div', { class: 'actions' },
        h('button', { type: 'button', class: 'danger', id: 'confirm-yes', onclick: () => done(true) }, action),
        h('button', { type: 'button', class: 'secondary', onclick: () => done(false) }, 'Cancel')));
    dialog.addEventListener('cancel', () => resolve(false));
    document.body.appendChild(dialog);
    dialog.showModal();
  });
}

// A line chart of several series over time. series: [{name, color, points: [[t, v]]}].
function lineChart(series, label) {
  const W = 600, H = 160, L = 44, B = 18, T = 8;
  const all = series.flatMap((s) => s.points);
  const chart = svg('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': label });
  if (all.length < 2) {
    chart.appendChild(svg('text', { x: L, y: H / 2 }, 'collecting samples…'));
    return chart;
  }
  const t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]));
  const vmax = Math.max(1, ...all.map((p) => p[1]));
  const x = (t) => L + ((t - t0) / Math.max(1, t1 - t0)) * (W - L - 6);
  const y = (v) => T + (1 - v / vmax) * (H - T - B);
  chart.appendChild(svg('line', { class: 'axis', x1: L, y1: y(0), x2: W - 6, y2: y(0) }));
  chart.appendChild(svg('line', { class: 'axis', x1: L, y1: T, x2: L, y2: y(0) }));
  chart.appendChild(svg('text', { x: 2, y: T + 10 }, fmt(vmax)));
  chart.appendChild(svg('text', { x: 2, y: y(0) }, '0'));
  chart.appendChild(svg('text', { x: L, y: H - 3 }, `${Math.round((t1 - t0) / 1000)} s`));
  for (const s of series) {
    if (s.points.length < 2) continue;
    const d = s.points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(' ');
    chart.appendChild(svg('polyline', { points: d, fill: 'none', stroke: s.color, 'stroke-width': 2 }));
  }
  return chart;
}

function legend(series) {
  return h('div', { class: 'legend' }, series.map((s) => {
    const dot = h('i');
    dot.style.background = s.color;
    return h('span', {}, dot, s.name);
  }));
}

const COLORS = ['#0b57d0', '#b3261e', '#146c2e', '#8a5300', '#6d28d9', '#0e7490'];

// Rates between consecutive samples: [[t, perSecond]].
function rates(key) {
  const out = [];
  for (let i = 1; i < state.samples.length; i++) {
    const a = state.samples[i - 1], b = state.samples[i];
    const dt = (b.time - a.time) / 1000;
    if (dt > 0) out.push([b.time, Math.max(0, (b[key] - a[key]) / dt)]);
  }
  return out;
}

function errorTotal(o) {
  return Object.values(o.errors).reduce((a, b) => a + b, 0);
}

// ---------------------------------------------------------------------------------------
// Session

let overviewStream = null;

function startOverview() {
  if (overviewStream) return;
  overviewStream = new EventSource('/ui/live/overview');
  overviewStream.addEventListener('overview', (e) => {
    const sample = JSON.parse(e.data);
    state.overview = sample;
    state.samples.push(sample);
    if (state.samples.length > MAX_SAMPLES) state.samples.shift();
    if (state.onSample) state.onSample(sample);
  });
}

function signedOut() {
  state.csrf = null;
  if (overviewStream) { overviewStream.close(); overviewStream = null; }
  state.samples = [];
  document.getElementById('nav').hidden = true;
  document.getElementById('signout').hidden = true;
  if (location.hash !== '#/signin') location.hash = '#/signin';
  else render();
}

function signedIn(view) {
  state.csrf = view.csrfToken;
  state.hubId = view.hubId;
  document.getElementById('nav').hidden = false;
  document.getElementById('signout').hidden = false;
  startOverview();
}

async function checkSession() {
  const r = await fetch('/ui/session', { credentials: 'same-origin' });
  const view = r.ok ? await r.json() : {};
  if (view.signedIn) { signedIn(view); return true; }
  return false;
}

function signInPage(main) {
  const token = h('input', { id: 'token', type: 'password', autocomplete: 'current-password', required: true });
  const message = h('p', { class: 'error-text', id: 'signin-error', role: 'alert' });
  const form = h('form', { class: 'panel signin', id: 'signin' },
    h('h1', {}, 'Sign in to fleethub'),
    h('p', { class: 'muted' }, 'Paste the admin token (the file admin-token in the data directory). ',
      'The console keeps a session cookie, never the token.'),
    h('label', { for: 'token' }, 'Admin token'), token,
    h('div', { class: 'actions' }, h('button', { type: 'submit', id: 'signin-submit' }, 'Sign in')),
    message);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    message.textContent = '';
    const r = await fetch('/ui/session', {
      method: 'POST', credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ token: token.value }),
    });
    if (r.ok) {
      signedIn(await r.json());
      location.hash = '#/';
    } else {
      message.textContent = r.status === 401 ? 'That token is not the admin token.' : `Sign-in failed (HTTP ${r.status}).`;
      token.select();
    }
  });
  main.appendChild(form);
  token.focus();
}

async function signOut() {
  await fetch('/ui/session', { method: 'DELETE', credentials: 'same-origin', headers: { 'X-CSRF-Token': state.csrf || '' } });
  signedOut();
}

// ---------------------------------------------------------------------------------------
// Pages

function overviewPage(main) {
  main.appendChild(h('h1', {}, 'Fleet overview'));
  const cards = h('div', { class: 'cards', id: 'overview-cards' });
  const traffic = h('section', {}, h('h2', {}, 'Messages per second'));
  const queues = h('section', {}, h('h2', {}, 'Queue depth'));
  const errors = h('section', {}, h('h2', {}, 'Errors since start'));
  put(main, cards, h('div', { class: 'grid' }, traffic, queues), errors);
  const card = (id, label, value, cls) =>
    h('div', { class: 'card' }, h('div', { class: 'label' }, label), h('div', { class: 'value ' + (cls || ''), id }, value));
  const draw = () => {
    const o = state.overview;
    if (!o) return;
    const r = (k) => { const x = rates(k); return x.length ? x[x.length - 1][1] : null; };
    const depth = o.queues.reduce((a, q) => a + q.depth, 0);
    const errs = errorTotal(o);
    put(clear(cards), 
      card('stat-devices', 'Devices', fmt(o.devices)),
      card('stat-connected', 'Connected', fmt(o.connected)),
      card('stat-in', 'Messages in /s', fmt(r('messagesIn'))),
      card('stat-out', 'Messages out /s', fmt(r('messagesOut'))),
      card('stat-queued', 'Queued', fmt(depth)),
      card('stat-errors', 'Errors', fmt(errs), errs ? 'bad' : ''));
    const ts = [
      { name: 'in', color: COLORS[0], points: rates('messagesIn') },
      { name: 'out', color: COLORS[2], points: rates('messagesOut') },
    ];
    put(clear(traffic), h('h2', {}, 'Messages per second'), lineChart(ts, 'messages per second'), legend(ts));
    const qs = queueSeries('depth');
    put(clear(queues), h('h2', {}, 'Queue depth'), lineChart(qs, 'queue depth'), legend(qs));
    put(clear(errors), h('h2', {}, 'Errors since start'), h('table', {},
      h('tbody', {}, Object.entries(o.errors).map(([k, v]) =>
        h('tr', {}, h('th', { scope: 'row' }, k.replace(/([A-Z])/g, ' $1').toLowerCase()),
          h('td', { class: 'num' + (v ? ' bad' : '') }, fmt(v)))))));
  };
  state.onSample = draw;
  draw();
  if (!state.overview) cards.appendChild(h('p', { class: 'muted' }, 'Waiting for the first sample…'));
}

function queueSeries(field) {
  const sinks = new Set();
  for (const s of state.samples) for (const q of s.queues) sinks.add(q.sink);
  return [...sinks].map((sink, i) => ({
    name: sink,
    color: COLORS[i % COLORS.length],
    points: state.samples.map((s) => {
      const q = s.queues.find((x) => x.sink === sink);
      return [s.time, q ? (q[field] || 0) : 0];
    }),
  }));
}

function devicesPage(main, params) {
  const query = params.get('q') || 'SELECT * FROM devices';
  main.appendChild(h('h1', {}, 'Devices'));
  const q = h('input', { id: 'device-query', value: query, 'aria-describedby': 'query-help', class: 'mono' });
  const search = h('form', { class: 'panel', id: 'device-search' },
    h('label', { for: 'device-query' }, 'Twin query'),
    h('div', { class: 'row' }, q, h('button', { type: 'submit' }, 'Search')),
    h('p', { class: 'muted', id: 'query-help' }, 'IoT Hub query language, e.g. ',
      h('code', {}, "SELECT * FROM devices WHERE tags.site = 'a' AND connectionState = 'Connected'")));
  search.addEventListener('submit', (e) => {
    e.preventDefault();
    location.hash = '#/devices?q=' + enc(q.value);
  });
  const newId = h('input', { id: 'new-device-id', placeholder: 'device id', autocomplete: 'off' });
  const create = h('form', { class: 'panel', id: 'create-device' },
    h('label', { for: 'new-device-id' }, 'New device'),
    h('div', { class: 'row' }, newId, h('button', { type: 'submit' }, 'Create')));
  create.addEventListener('submit', async (e) => {
    e.preventDefault();
    try {
      await api('POST', '/devices', { deviceId: newId.value.trim() });
      toast(`Device ${newId.value.trim()} created`);
      location.hash = '#/devices/' + enc(newId.value.trim());
    } catch (err) { toast(err.message, true); }
  });
  const results = h('section', { id: 'device-results' }, h('p', { class: 'muted' }, 'Loading…'));
  put(main, search, results, create);
  const pages = [null];
  const load = async (token) => {
    try {
      const body = { query, pageSize: PAGE_SIZE };
      if (token) body.continuationToken = token;
      const { data } = await api('POST', '/twins/query', body);
      clear(results);
      const rows = data.items || [];
      const table = h('table', { id: 'device-table' },
        h('thead', {}, h('tr', {}, h('th', {}, 'Device'), h('th', {}, 'Status'), h('th', {}, 'Connection'),
          h('th', { class: 'hide-narrow' }, 'Device group'), h('th', { class: 'hide-narrow' }, 'Last activity'))),
        h('tbody', {}, rows.map((t) => t.deviceId === undefined
          ? h('tr', {}, h('td', { colspan: 5 }, h('code', {}, JSON.stringify(t))))
          : h('tr', { 'data-device': t.deviceId },
            h('td', {}, h('a', { href: '#/devices/' + enc(t.deviceId) }, t.deviceId + (t.moduleId ? '/' + t.moduleId : ''))),
            h('td', {}, statusBadge(t.status)),
            h('td', {}, connectionBadge(t.connectionState)),
            h('td', { class: 'hide-narrow' }, t.deviceGroup || '–'),
            h('td', { class: 'hide-narrow' }, ago(t.lastActivityTime))))));
      const index = pages.length;
      const prev = h('button', { type: 'button', class: 'secondary', disabled: index <= 1, onclick: () => { pages.pop(); load(pages.pop()); } }, 'Previous');
      const next = h('button', { type: 'button', class: 'secondary', id: 'next-page', disabled: !data.continuationToken, onclick: () => load(data.continuationToken) }, 'Next');
      pages.push(data.continuationToken || null);
      put(results, h('div', { class: 'scroll' }, table),
        rows.length ? null : h('p', { class: 'muted' }, 'No devices match.'),
        h('div', { class: 'pager' }, prev, next, h('span', { class: 'muted' }, `page ${index}, ${rows.length} rows`)));
    } catch (err) {
      put(clear(results), h('p', { class: 'error-text', role: 'alert' }, err.message));
    }
  };
  load(null);
}

async function devicePage(main, id) {
  let identity, twin;
  try {
    [identity, twin] = await Promise.all([api('GET', '/devices/' + enc(id)), api('GET', '/twins/' + enc(id))]);
  } catch (err) {
    put(main, h('h1', {}, id), h('p', { class: 'error-text' }, err.message));
    return;
  }
  identity = identity.data;
  twin = twin.data;
  const head = h('div', { class: 'actions' });
  put(main, h('h1', {}, id), head);
  const statusBox = h('span', { id: 'device-status' });
  const drawHead = () => {
    put(clear(statusBox), statusBadge(identity.status), ' ', connectionBadge(identity.connectionState),
      identity.deviceGroup ? [' ', badge(identity.deviceGroup)] : null);
  };
  drawHead();
  const disabled = () => identity.status === 'disabled';
  const toggle = h('button', { type: 'button', class: 'secondary', id: 'toggle-status' }, disabled() ? 'Enable' : 'Disable');
  toggle.addEventListener('click', async () => {
    try {
      const { data } = await api('PATCH', '/devices/' + enc(id), { status: disabled() ? 'enabled' : 'disabled' });
      identity = data;
      toggle.textContent = disabled() ? 'Enable' : 'Disable';
      drawHead();
      toast(`Device ${id} ${identity.status}`);
    } catch (err) { toast(err.message, true); }
  });
  const del = h('button', { type: 'button', class: 'danger', id: 'delete-device' }, 'Delete');
  del.addEventListener('click', async () => {
    if (!(await confirmDialog('Delete device?', `Delete ${id} with its modules and twin? This cannot be undone.`, 'Delete'))) return;
    try {
      await api('DELETE', '/devices/' + enc(id));
      toast(`Device ${id} deleted`);
      location.hash = '#/devices';
    } catch (err) { toast(err.message, true); }
  });
  put(head, statusBox, toggle, del);

  // Twin: desired edited with its etag; a conflict is shown, never overwritten.
  const twinSection = h('section', { id: 'twin' });
  const drawTwin = () => {
    const desired = withoutMeta(twin.properties.desired);
    const editor = h('textarea', { id: 'desired-editor', class: 'mono', spellcheck: 'false', 'aria-describedby': 'twin-etag' }, json(desired));
    const result = h('div', { class: 'result', id: 'desired-result', role: 'status' });
    const save = h('button', { type: 'button', id: 'save-desired' }, 'Save desired');
    save.addEventListener('click', async () => {
      let next;
      try { next = JSON.parse(editor.value); } catch (err) {
        put(clear(result), h('span', { class: 'error-text' }, 'Not JSON: ' + err.message));
        return;
      }
      if (!next || typeof next !== 'object' || Array.isArray(next)) {
        put(clear(result), h('span', { class: 'error-text' }, 'Desired properties are a JSON object.'));
        return;
      }
      const patch = mergePatch(desired, next);
      try {
        const { data } = await api('PATCH', '/twins/' + enc(id), { properties: { desired: patch } }, { 'If-Match': twin.etag });
        twin = data;
        drawTwin();
        toast('Desired properties saved');
      } catch (err) {
        if (err.status === 412) {
          put(clear(result), h('span', { class: 'error-text', id: 'etag-conflict' },
            `Someone changed this twin after you loaded it (your etag ${twin.etag}). Nothing was written. `),
          h('button', { type: 'button', class: 'secondary', onclick: reloadTwin }, 'Load the latest'));
        } else {
          put(clear(result), h('span', { class: 'error-text' }, err.message));
        }
      }
    });
    put(clear(twinSection), h('h2', {}, 'Twin'),
      h('p', { class: 'muted', id: 'twin-etag' }, `etag ${twin.etag} · desired $version ${twin.properties.desired.$version} · reported $version ${twin.properties.reported.$version}`),
      h('div', { class: 'grid' },
        h('div', {}, h('label', { for: 'desired-editor' }, 'Desired'), editor, h('div', { class: 'actions' }, save), result),
        h('div', {}, h('label', {}, 'Reported'), h('pre', { id: 'reported' }, json(withoutMeta(twin.properties.reported))),
          h('label', {}, 'Tags'), h('pre', { id: 'tags' }, json(twin.tags || {})))));
  };
  const reloadTwin = async () => {
    try { twin = (await api('GET', '/twins/' + enc(id))).data; drawTwin(); } catch (err) { toast(err.message, true); }
  };
  drawTwin();
  const refreshReported = h('button', { type: 'button', class: 'secondary', id: 'refresh-twin', onclick: reloadTwin }, 'Reload twin');

  // Live telemetry.
  const list = h('div', { class: 'telemetry', id: 'telemetry', 'aria-live': 'polite' }, h('p', { class: 'muted' }, 'Waiting for telemetry…'));
  let seen = 0;
  const stream = new EventSource('/ui/live/devices/' + enc(id));
  stream.addEventListener('telemetry', (e) => {
    const m = JSON.parse(e.data);
    if (seen++ === 0) clear(list);
    list.prepend(h('div', {}, h('span', { class: 'muted' }, new Date().toLocaleTimeString() + (m.module ? ` ${m.module}` : '') + ' '),
      h('code', {}, m.body), m.properties ? h('span', { class: 'muted' }, ' ' + m.properties) : null,
      m.dropped ? h('span', { class: 'warn' }, ` (${m.dropped} skipped)`) : null));
    while (list.childNodes.length > 100) list.lastChild.remove();
  });
  state.cleanup.push(() => stream.close());

  // C2D.
  const c2dBody = h('textarea', { id: 'c2d-body', class: 'mono' });
  const c2dProps = h('input', { id: 'c2d-props', placeholder: 'key=value&other=value', class: 'mono' });
  const c2dResult = h('div', { class: 'result', id: 'c2d-result', role: 'status' });
  const c2d = h('form', { id: 'c2d-form' }, h('h2', {}, 'Send cloud-to-device message'),
    h('label', { for: 'c2d-body' }, 'Body'), c2dBody,
    h('label', { for: 'c2d-props' }, 'Properties'), c2dProps,
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Send')), c2dResult);
  c2d.addEventListener('submit', async (e) => {
    e.preventDefault();
    const properties = {};
    for (const pair of c2dProps.value.split('&').filter(Boolean)) {
      const [k, ...v] = pair.split('=');
      properties[k.trim()] = v.join('=');
    }
    try {
      await api('POST', `/devices/${enc(id)}/messages`, { body: c2dBody.value, properties });
      put(clear(c2dResult), h('span', { class: 'ok' }, 'Queued for the device.'));
    } catch (err) { put(clear(c2dResult), h('span', { class: 'error-text' }, err.message)); }
  });

  // Direct method.
  const mName = h('input', { id: 'method-name', placeholder: 'reboot', autocomplete: 'off' });
  const mPayload = h('textarea', { id: 'method-payload', class: 'mono' }, '{}');
  const mTimeout = h('input', { id: 'method-timeout', type: 'number', min: 5, max: 300, value: 30 });
  const mResult = h('div', { class: 'result', id: 'method-result', role: 'status' });
  const method = h('form', { id: 'method-form' }, h('h2', {}, 'Invoke direct method'),
    h('label', { for: 'method-name' }, 'Method'), mName,
    h('label', { for: 'method-payload' }, 'Payload (JSON)'), mPayload,
    h('label', { for: 'method-timeout' }, 'Response timeout (s)'), mTimeout,
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Invoke')), mResult);
  method.addEventListener('submit', async (e) => {
    e.preventDefault();
    let payload;
    try { payload = JSON.parse(mPayload.value || 'null'); } catch (err) {
      put(clear(mResult), h('span', { class: 'error-text' }, 'Payload is not JSON: ' + err.message));
      return;
    }
    put(clear(mResult), h('span', { class: 'muted' }, 'Waiting for the device…'));
    try {
      const { data } = await api('POST', `/devices/${enc(id)}/methods`,
        { methodName: mName.value.trim(), payload, responseTimeoutInSeconds: Number(mTimeout.value) || 30 });
      put(clear(mResult), h('div', {}, 'Status ', h('strong', { id: 'method-status' }, String(data.status))),
        h('pre', { id: 'method-response' }, json(data.payload)));
    } catch (err) { put(clear(mResult), h('span', { class: 'error-text' }, err.message)); }
  });

  // Modules.
  const modules = h('section', { id: 'modules' }, h('h2', {}, 'Modules'));
  api('GET', `/devices/${enc(id)}/modules`).then(({ data }) => {
    const items = data.items || data || [];
    put(modules, items.length ? h('table', {}, h('thead', {}, h('tr', {}, h('th', {}, 'Module'), h('th', {}, 'Connection'))),
      h('tbody', {}, items.map((m) => h('tr', {}, h('td', {}, m.moduleId), h('td', {}, connectionBadge(m.connectionState))))))
      : h('p', { class: 'muted' }, 'No modules.'));
  }).catch((err) => put(modules, h('p', { class: 'error-text' }, err.message)));

  put(main, twinSection, h('div', { class: 'actions' }, refreshReported),
    h('section', {}, h('h2', {}, 'Live telemetry'), list),
    h('div', { class: 'grid' }, h('section', {}, c2d), h('section', {}, method)),
    modules);
}

async function routesPage(main) {
  main.appendChild(h('h1', {}, 'Routes'));
  const input = h('input', { id: 'route-check', class: 'mono', placeholder: 'FROM /messages/* WHERE temperature > 30 INTO BrokeredEndpoint("/modules/alerts/inputs/in1")', autocomplete: 'off', spellcheck: 'false', 'aria-describedby': 'route-check-result' });
  const result = h('div', { class: 'result', id: 'route-check-result', role: 'status' });
  let timer = null, seq = 0;
  input.addEventListener('input', () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const mine = ++seq;
      const text = input.value;
      if (!text.trim()) { clear(result); return; }
      // A route with an error is answered 400 with its column: an answer, not a failure.
      const { data } = await apiAnswer('POST', '/routes/check', { route: text });
      if (mine !== seq || !data) return;
      clear(result);
      if (data.valid) {
        put(result, h('span', { class: 'ok' }, 'Valid. '), 'Source ', h('code', {}, data.source),
          data.condition ? [', condition ', h('code', {}, data.condition)] : ', no condition', ', sink ', h('code', {}, data.sink));
      } else {
        const col = Math.max(1, data.column || 1);
        put(result, h('div', { class: 'error-text', id: 'route-error' }, `Column ${col}: ${data.message}`),
          h('pre', {}, text + '\n', h('span', { class: 'caret' }, ' '.repeat(col - 1) + '^')));
      }
    }, 150);
  });
  main.appendChild(h('section', {}, h('h2', {}, 'Check a route'), h('label', { for: 'route-check' }, 'Route'), input, result));
  const table = h('section', { id: 'route-table' }, h('h2', {}, 'Routes in force'));
  main.appendChild(table);
  try {
    const { data } = await api('GET', '/routes');
    put(table, h('p', { class: 'muted' }, `Default time to live ${data.defaultTimeToLiveSecs} s · upstream `,
      data.upstream.enabled ? (data.upstream.connected ? badge('connected', 'ok') : badge('disconnected', 'bad')) : 'off'),
    h('div', { class: 'scroll' }, h('table', {},
      h('thead', {}, h('tr', {}, h('th', {}, 'Name'), h('th', {}, 'Route'), h('th', { class: 'num' }, 'Priority'),
        h('th', { class: 'num' }, 'TTL s'), h('th', {}, 'Source'))),
      h('tbody', {}, data.routes.map((r) => h('tr', {}, h('td', {}, r.name), h('td', {}, h('code', {}, r.route),
        r.undeliverable ? h('div', { class: 'warn' }, r.undeliverable) : null),
      h('td', { class: 'num' }, r.priority), h('td', { class: 'num' }, r.timeToLiveSecs), h('td', {}, r.source)))))));
    if (!data.routes.length) put(table, h('p', { class: 'muted' }, 'No routes.'));
  } catch (err) { put(table, h('p', { class: 'error-text' }, err.message)); }
}

async function queuesPage(main) {
  main.appendChild(h('h1', {}, 'Queues'));
  const charts = h('div', { class: 'grid' });
  const table = h('section', { id: 'queue-table' });
  put(main, charts, table);
  const draw = async () => {
    const depth = queueSeries('depth'), age = queueSeries('oldestAgeSeconds');
    put(clear(charts), h('section', {}, h('h2', {}, 'Depth over time'), lineChart(depth, 'queue depth'), legend(depth)),
      h('section', {}, h('h2', {}, 'Oldest entry age (s)'), lineChart(age, 'oldest age'), legend(age)));
    try {
      const { data } = await api('GET', '/queues');
      put(clear(table), h('h2', {}, 'Per sink'), h('div', { class: 'scroll' }, h('table', {},
        h('thead', {}, h('tr', {}, h('th', {}, 'Sink'), h('th', { class: 'num' }, 'Depth'), h('th', { class: 'num' }, 'Bytes'),
          h('th', { class: 'num' }, 'Oldest age s'), h('th', { class: 'num' }, 'Dropped: expired'), h('th', { class: 'num' }, 'Dropped: quota'))),
        h('tbody', {}, data.items.map((q) => h('tr', {}, h('td', {}, h('code', {}, q.sink)), h('td', { class: 'num' }, fmt(q.depth)),
          h('td', { class: 'num' }, fmt(q.bytes)), h('td', { class: 'num' }, fmt(q.oldestAgeSeconds)),
          h('td', { class: 'num' + (q.dropped.expired ? ' bad' : '') }, fmt(q.dropped.expired)),
          h('td', { class: 'num' + (q.dropped.quota ? ' bad' : '') }, fmt(q.dropped.quota))))))),
      h('p', { class: 'muted' }, `Limits: ${fmt(data.limits.maxBytes)} bytes in all, ${data.limits.maxSinkBytes ? fmt(data.limits.maxSinkBytes) + ' bytes per sink' : 'no limit per sink'}, when full: ${data.limits.whenFull}. Writes refused: ${data.refused}.`));
    } catch (err) { put(clear(table), h('p', { class: 'error-text' }, err.message)); }
  };
  await draw();
  const timer = setInterval(draw, 2000);
  state.cleanup.push(() => clearInterval(timer));
}

async function fleetPage(main) {
  main.appendChild(h('h1', {}, 'Products, device groups, images'));
  const products = h('section', { id: 'products' }, h('h2', {}, 'Products'));
  const groups = h('section', { id: 'groups' }, h('h2', {}, 'Device groups'));
  const images = h('section', { id: 'images' }, h('h2', {}, 'Images'));
  put(main, products, groups, images);
  const table = (heads, rows) => h('div', { class: 'scroll' }, h('table', {},
    h('thead', {}, h('tr', {}, heads.map((x) => h('th', {}, x)))),
    h('tbody', {}, rows.map((r) => h('tr', {}, r.map((c) => h('td', {}, c)))))));
  const name = h('input', { id: 'new-product', placeholder: 'product name', autocomplete: 'off' });
  const form = h('form', { class: 'row' }, name, h('button', { type: 'submit' }, 'Create product'));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    try { await api('POST', '/products', { name: name.value.trim() }); toast('Product created'); render(); } catch (err) { toast(err.message, true); }
  });
  try {
    const [p, g, i] = await Promise.all([api('GET', '/products'), api('GET', '/device-groups'), api('GET', '/images')]);
    put(products, table(['Name', 'Description', 'Id'], (p.data.items || []).map((x) => [x.name, x.description || '', h('code', {}, x.id)])), form);
    put(groups, table(['Group', 'Application updates', 'OS feed', 'Devices'], (g.data.items || []).map((x) =>
      [`${x.productName || x.product || ''}/${x.name}`, String(x.applicationUpdates ?? ''), x.osFeed || '', fmt(x.devices)])));
    put(images, table(['Name', 'Version', 'Kind', 'Size', 'Digest'], (i.data.items || []).map((x) =>
      [x.name, x.version, x.kind, fmt(x.size), h('code', {}, (x.digest || x.id || '').slice(0, 19))])));
  } catch (err) { put(main, h('p', { class: 'error-text' }, err.message)); }
}

function deploymentCard(d) {
  const m = d.systemMetrics || { targetedCount: 0, appliedCount: 0, reportedSuccessfulCount: 0, reportedFailedCount: 0 };
  const total = Math.max(1, m.targetedCount);
  const pct = (n) => (100 * n / total).toFixed(2) + '%';
  const appliedOnly = Math.max(0, m.appliedCount - m.reportedSuccessfulCount - m.reportedFailedCount);
  const seg = (cls, n, label) => {
    const s = h('span', { class: cls, title: `${label}: ${n}` });
    s.style.width = pct(n);
    return s;
  };
  const bar = h('div', { class: 'bar', role: 'img', 'aria-label': `${m.reportedSuccessfulCount} succeeded, ${m.reportedFailedCount} failed, ${appliedOnly} applied and waiting, of ${m.targetedCount} targeted` },
    seg('s', m.reportedSuccessfulCount, 'succeeded'), seg('f', m.reportedFailedCount, 'failed'), seg('a', appliedOnly, 'applied'));
  const card = h('section', { class: 'deployment', 'data-deployment': d.id },
    h('h2', {}, d.id, ' ', h('span', { class: 'muted' }, `priority ${d.priority}`)),
    h('p', { class: 'muted' }, 'Target ', h('code', {}, d.targetCondition)),
    bar,
    h('div', { class: 'legend' },
      h('span', {}, h('i', { class: 's' }), 'succeeded ', h('strong', { class: 'm-success' }, m.reportedSuccessfulCount)),
      h('span', {}, h('i', { class: 'f' }), 'failed ', h('strong', { class: 'm-failed' }, m.reportedFailedCount)),
      h('span', {}, h('i', { class: 'a' }), 'applied ', h('strong', { class: 'm-applied' }, m.appliedCount)),
      h('span', {}, h('i', { class: 'p' }), 'targeted ', h('strong', { class: 'm-targeted' }, m.targetedCount))));
  if (d.rollout && d.rolloutState) {
    const r = d.rolloutState;
    const phases = d.rollout.phases.map((p, i) => h('span', { class: i === r.phase ? 'badge' : 'muted' }, `${p}%`));
    const status = { running: 'ok', paused: 'warn', aborted: 'bad', completed: 'ok' }[r.status] || '';
    const control = async (action) => {
      if (action === 'abort' && !(await confirmDialog('Abort rollout?', `Stop ${d.id} and return this phase's devices to what they had?`, 'Abort'))) return;
      try { await api('POST', `/deployments/${enc(d.id)}/${action}`); toast(`${d.id}: ${action}`); refreshDeployments(); } catch (err) { toast(err.message, true); }
    };
    put(card, h('p', {}, 'Rollout ', h('span', { class: 'badge ' + status + ' rollout-status' }, r.status),
      ` phase ${r.phase + 1} of ${d.rollout.phases.length} `, phases.flatMap((p) => [p, ' ']),
      r.reason ? h('div', { class: 'bad' }, r.reason) : null),
    h('div', { class: 'actions' },
      h('button', { type: 'button', class: 'secondary', 'data-action': 'pause', disabled: r.status !== 'running', onclick: () => control('pause') }, 'Pause'),
      h('button', { type: 'button', class: 'secondary', 'data-action': 'resume', disabled: r.status !== 'paused', onclick: () => control('resume') }, 'Resume'),
      h('button', { type: 'button', class: 'danger', 'data-action': 'abort', disabled: r.status === 'aborted' || r.status === 'completed', onclick: () => control('abort') }, 'Abort')));
  }
  return card;
}

let refreshDeployments = () => {};

async function deploymentsPage(main) {
  main.appendChild(h('h1', {}, 'Deployments'));
  const list = h('div', { id: 'deployment-list' });
  const id = h('input', { id: 'dep-id', autocomplete: 'off' });
  const target = h('input', { id: 'dep-target', class: 'mono', value: "tags.environment = 'test'" });
  const priority = h('input', { id: 'dep-priority', type: 'number', value: 10 });
  const content = h('textarea', { id: 'dep-content', class: 'mono' }, json({ deviceContent: { 'properties.desired.firmware': { version: '1.0.0' } } }));
  const rollout = h('input', { id: 'dep-rollout', class: 'mono', value: '', placeholder: '{"phases": [10, 100], "successThreshold": 95, "failureThreshold": 5, "observeSecs": 30}' });
  const form = h('form', { class: 'panel', id: 'create-deployment' }, h('h2', {}, 'New deployment'),
    h('div', { class: 'row' }, h('div', {}, h('label', { for: 'dep-id' }, 'Id'), id),
      h('div', {}, h('label', { for: 'dep-priority' }, 'Priority'), priority)),
    h('label', { for: 'dep-target' }, 'Target condition'), target,
    h('label', { for: 'dep-content' }, 'Content (JSON)'), content,
    h('label', { for: 'dep-rollout' }, 'Phased rollout (JSON, optional)'), rollout,
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Create')));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    try {
      const body = { id: id.value.trim(), targetCondition: target.value, priority: Number(priority.value) || 0, content: JSON.parse(content.value) };
      if (rollout.value.trim()) body.rollout = JSON.parse(rollout.value);
      await api('POST', '/deployments', body);
      toast(`Deployment ${body.id} created`);
      refreshDeployments();
    } catch (err) { toast(err.message, true); }
  });
  put(main, list, form);
  // Cards are replaced only when what they show changed, so focus and clicks survive the
  // refresh.
  const shown = new Map();
  const empty = h('p', { class: 'muted panel' }, 'No deployments.');
  const problem = h('p', { class: 'error-text', role: 'alert' });
  put(list, empty, problem);
  refreshDeployments = async () => {
    try {
      const { data } = await api('GET', '/deployments?summary=true');
      problem.textContent = '';
      empty.hidden = data.items.length > 0;
      const ids = new Set(data.items.map((d) => d.id));
      for (const [id, s] of shown) if (!ids.has(id)) { s.node.remove(); shown.delete(id); }
      for (const d of data.items) {
        const r = d.rolloutState;
        const key = JSON.stringify([d.systemMetrics, d.priority, d.targetCondition, r && [r.phase, r.status, r.reason]]);
        const s = shown.get(d.id);
        if (s && s.key === key) continue;
        const node = deploymentCard(d);
        if (s) s.node.replaceWith(node); else list.insertBefore(node, empty);
        shown.set(d.id, { key, node });
      }
    } catch (err) { problem.textContent = err.message; }
  };
  await refreshDeployments();
  const timer = setInterval(refreshDeployments, 1000);
  state.cleanup.push(() => clearInterval(timer));
}

// ---------------------------------------------------------------------------------------
// Navigation

const PAGES = [
  [/^#\/?$/, overviewPage, '#/'],
  [/^#\/devices$/, devicesPage, '#/devices'],
  [/^#\/devices\/(.+)$/, devicePage, '#/devices'],
  [/^#\/routes$/, routesPage, '#/routes'],
  [/^#\/queues$/, queuesPage, '#/queues'],
  [/^#\/fleet$/, fleetPage, '#/fleet'],
  [/^#\/deployments$/, deploymentsPage, '#/deployments'],
];

async function render() {
  for (const stop of state.cleanup.splice(0)) stop();
  state.onSample = null;
  const main = clear(document.getElementById('main'));
  const hash = location.hash || '#/';
  if (hash === '#/signin' || !state.csrf) {
    if (state.csrf) { location.hash = '#/'; return; }
    signInPage(main);
    return;
  }
  const [path, query] = hash.split('?');
  const params = new URLSearchParams(query || '');
  for (const [pattern, page, nav] of PAGES) {
    const m = path.match(pattern);
    if (!m) continue;
    for (const a of document.querySelectorAll('#nav a')) {
      if (a.getAttribute('href') === nav) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    try {
      await (m[1] !== undefined ? page(main, decodeURIComponent(m[1])) : page(main, params));
    } catch (err) {
      if (!(err instanceof ApiFailure && err.status === 401)) put(main, h('p', { class: 'error-text' }, err.message));
    }
    return;
  }
  put(main, h('h1', {}, 'Not found'), h('p', {}, h('a', { href: '#/' }, 'Back to the overview')));
}

window.addEventListener('hashchange', render);
// Leaving the page closes its streams at once: otherwise the browser may keep their
// connections (each holds one of its six per host) for a minute, and a few reloads leave the
// next page waiting for a connection.
window.addEventListener('pagehide', () => {
  for (const stop of state.cleanup.splice(0)) stop();
  if (overviewStream) { overviewStream.close(); overviewStream = null; }
});
window.addEventListener('pageshow', (e) => {
  if (e.persisted && state.csrf) { startOverview(); render(); }
});
document.addEventListener('DOMContentLoaded', async () => {
  document.getElementById('signout').addEventListener('click', signOut);
  await checkSession();
  render();
});
