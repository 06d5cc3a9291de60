// llama-orch status page: renders each snapshot that /v1/status/events
// pushes. Text only: every value goes into the page through textContent,
// never as markup (pool ids, model names and log lines are untrusted).
'use strict';
(function () {
  const $ = (id) => document.getElementById(id);

  function txt(v) {
    if (v === null || v === undefined) return '\u2013';
    if (typeof v === 'number') return Number.isInteger(v) ? String(v) : v.toFixed(1);
    if (typeof v === 'string') return v;
    return JSON.stringify(v);
  }
  function ago(s) {
    if (typeof s !== 'number' || !isFinite(s) || s < 0) return '\u2013';
    s = Math.round(s);
    if (s < 60) return s + 's';
    if (s < 3600) return Math.floor(s / 60) + 'm ' + (s % 60) + 's';
    return Math.floor(s / 3600) + 'h ' + Math.floor((s % 3600) / 60) + 'm';
  }
  function clock(ms) {
    if (typeof ms !== 'number') return '\u2013';
    const s = Math.floor(ms / 1000);
    const two = (n) => String(n).padStart(2, '0');
    return two(Math.floor(s / 3600) % 24) + ':' + two(Math.floor(s / 60) % 60) + ':' + two(s % 60) + 'Z';
  }
  // The engine's sandbox as one line (as the server renders it).
  function sandbox(o) {
    if (!o || typeof o !== 'object') return 'not recorded';
    if (o.mode === 'off') return 'off';
    const parts = [];
    if (o.filesystem === true) parts.push('landlock v' + txt(o.landlock_abi));
    for (const k of ['seccomp', 'no_new_privs', 'rlimits']) if (o[k] === true) parts.push(k);
    return txt(o.mode) + ': ' + parts.join(', ');
  }
  function list(o, k) { return o && Array.isArray(o[k]) ? o[k] : []; }
  function td(tr, cls, v) {
    const c = document.createElement('td');
    c.className = cls;
    c.textContent = v;
    tr.appendChild(c);
    return c;
  }
  // A fresh, empty body for table `id` (the old one is dropped whole).
  function body(id) {
    const t = $(id);
    const nb = document.createElement('tbody');
    t.replaceChild(nb, t.tBodies[0]);
    return nb;
  }
  function row(b, attrs) {
    const tr = document.createElement('tr');
    for (const k in attrs) tr.setAttribute(k, attrs[k]);
    b.appendChild(tr);
    return tr;
  }

  function render(s) {
    $('overall').textContent = txt(s.state);
    $('overall').setAttribute('data-state', txt(s.state));
    $('seq').textContent = txt(s.seq);
    let b = body('pools');
    for (const p of list(s, 'pools')) {
      const id = txt(p.id);
      const reps = list(p, 'replicas');
      const tr = row(b, { 'data-pool': id, 'data-state': txt(p.state) });
      td(tr, 'id', id);
      td(tr, 'state', p.failed_reason ? txt(p.state) + ': ' + txt(p.failed_reason) : txt(p.state));
      td(tr, 'mode', txt(p.mode));
      td(tr, 'replicas', reps.length + ' (' + reps.map((r) => txt(r.state)).join(', ') + ')');
      td(tr, 'slots', txt(p.slots));
      td(tr, 'capacity', txt(p.capacity));
      td(tr, 'queued', txt(p.queue_depth));
      td(tr, 'running', txt(p.running));
      td(tr, 'rate', txt(p.tokens_per_s));
      td(tr, 'ready-for', ago(p.ready_for_s));
      td(tr, 'unload-in', ago(p.idle_unload_in_s));
      const c = td(tr, 'log', '');
      const btn = document.createElement('button');
      btn.type = 'button';
      btn.setAttribute('data-log', id);
      btn.textContent = 'show';
      c.appendChild(btn);
    }
    b = body('replicas');
    for (const p of list(s, 'pools')) {
      for (const r of list(p, 'replicas')) {
        const tr = row(b, { 'data-run': txt(r.run_id), 'data-state': txt(r.state) });
        td(tr, 'pool', txt(p.id));
        td(tr, 'replica', txt(r.run_id));
        td(tr, 'state', txt(r.state));
        const d = list(r, 'devices').map((x) => 'GPU ' + txt(x)).join(', ');
        td(tr, 'devices', d || 'CPU or all');
        td(tr, 'queued', txt(r.queue_depth));
        td(tr, 'running', txt(r.running));
        td(tr, 'restarts', txt(r.restarts));
        td(tr, 'tokens', txt(r.tokens_out));
      }
    }
    b = body('engines');
    for (const p of list(s, 'pools')) {
      const tr = row(b, {});
      const m = p.model || {};
      td(tr, 'pool', txt(p.id));
      td(tr, 'fingerprint', txt(p.fingerprint));
      td(tr, 'pin', txt(p.engine_version));
      td(tr, 'model', txt(m.ref));
      td(tr, 'digest', txt(m.digest));
      td(tr, 'sysfp', txt(p.system_fingerprint));
      td(tr, 'sandbox', sandbox(p.sandbox));
    }
    const g = list(s, 'gpus');
    $('gpus').textContent = g.length
      ? g.map((d) => 'GPU ' + txt(d.index) + ': ' + txt(d.used_mib) + ' of ' + txt(d.total_mib) + ' MiB used').join(' \u00b7 ')
      : 'no GPU reading (a CPU host, or no nvidia-smi)';
    b = body('requests');
    for (const r of list(s, 'requests')) {
      const tr = row(b, { class: 'request', 'data-status': txt(r.status) });
      td(tr, 'at', clock(r.at_ms));
      td(tr, 'api', txt(r.api));
      td(tr, 'pool', txt(r.pool));
      td(tr, 'replica', txt(r.replica));
      td(tr, 'status', txt(r.status));
      td(tr, 'prompt', txt(r.prompt_tokens));
      td(tr, 'tokens', txt(r.tokens_out));
      td(tr, 'wait', txt(r.queue_wait_ms));
      td(tr, 'ttft', txt(r.ttft_ms));
      td(tr, 'tps', txt(r.tokens_per_s));
    }
    b = body('events');
    for (const e of list(s, 'events')) {
      const tr = row(b, {});
      td(tr, 'at', clock(e.at_ms));
      td(tr, 'pool', txt(e.pool));
      td(tr, 'replica', txt(e.replica));
      td(tr, 'from', txt(e.from));
      td(tr, 'to', txt(e.to));
    }
  }

  function live(state) {
    const l = $('live');
    l.setAttribute('data-live', state);
    l.textContent = state === 'yes' ? 'live' : state;
  }

  function showLog(pool) {
    fetch('/v1/status/pools/' + encodeURIComponent(pool) + '/log', { credentials: 'same-origin' })
      .then((r) => r.json())
      .then((j) => {
        const out = [];
        for (const r of list(j, 'replicas')) {
          out.push('== ' + txt(r.run_id));
          for (const l of list(r, 'lines')) out.push(txt(l));
        }
        $('log-title').textContent = 'Engine log: ' + pool;
        $('log-text').textContent = out.join('\n');
        $('log').hidden = false;
      })
      .catch((e) => {
        $('log-text').textContent = 'could not read the log: ' + e;
        $('log').hidden = false;
      });
  }

  function start() {
    const form = $('login');
    if (form) {
      form.addEventListener('submit', (ev) => {
        ev.preventDefault();
        const token = form.elements.token.value;
        fetch('/status/login', {
          method: 'POST',
          credentials: 'same-origin',
          headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({ token: token }),
        }).then((r) => {
          if (r.ok) { location.reload(); return; }
          const e = $('login-error');
          e.textContent = r.status === 401 ? 'wrong token' : 'sign-in failed (' + r.status + ')';
          e.hidden = false;
        });
      });
      return;
    }
    document.addEventListener('click', (ev) => {
      const t = ev.target;
      if (t instanceof Element && t.hasAttribute('data-log')) showLog(t.getAttribute('data-log'));
    });
    const es = new EventSource('/v1/status/events');
    es.addEventListener('snapshot', (e) => {
      live('yes');
      render(JSON.parse(e.data));
    });
    es.addEventListener('error', () => live(es.readyState === EventSource.CLOSED ? 'closed' : 'reconnecting'));
  }
  start();
})();
