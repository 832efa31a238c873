// xdpfw dashboard. Plain script, no build step: it talks to the daemon's own REST API with the
// token the person typed (kept in this tab's sessionStorage, sent as a bearer header).
// Rates come from the kernel's counters (/api/v1/stats, once a second), never from the
// sampled drop events, which are only listed.
"use strict";

const TOKEN_KEY = "xdpfw-token";
const HISTORY_S = 120;  // seconds of rates the plots keep
const POLL_MS = 1000;
const $ = (sel) => document.querySelector(sel);

// -- the API ------------------------------------------------------------------------------

class AuthError extends Error {}

function headers(extra) {
  return Object.assign({ Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) },
                       extra || {});
}

// The API's `detail`, as one line a person can act on (validation errors name the field).
function detailOf(body, status) {
  const d = body && body.detail !== undefined ? body.detail : body;
  if (Array.isArray(d) && d.length && typeof d[0] === "object") {
    const where = (d[0].loc || []).filter((p) => p !== "body").join(".");
    return where ? `${where}: ${d[0].msg}` : String(d[0].msg);
  }
  if (typeof d === "string" && d) return d;
  return `HTTP ${status}`;
}

async function api(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} :
                                          { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  if (r.status === 401) throw new AuthError("wrong token");
  const text = await r.text();
  let data = text;
  try { data = text ? JSON.parse(text) : null; } catch (e) { /* not JSON */ }
  if (!r.ok) throw new Error(detailOf(data, r.status));
  return data;
}

// -- login ----------------------------------------------------------------------------------

function showLogin(message) {
  stop();
  sessionStorage.removeItem(TOKEN_KEY);
  $("#main").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
  $("#token").value = "";
  $("#token").focus();
}

async function signIn(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await api("GET", "/healthz");
  } catch (e) {
    showLogin(e instanceof AuthError ? "That token was refused." : e.message);
    return;
  }
  $("#login").hidden = true;
  $("#main").hidden = false;
  start();
}

// Every failure goes through here: a refused token brings the login page back.
function failed(e) {
  if (e instanceof AuthError) { showLogin("The token was refused: sign in again."); return; }
  showError(e.message || String(e));
}

function showError(message) {
  const el = $("#error");
  el.textContent = message;
  el.hidden = !message;
}

// -- numbers --------------------------------------------------------------------------------

function si(n, unit) {
  const steps = ["", "k", "M", "G", "T"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < steps.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + steps[i] + (unit || "");
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  row.appendChild(td);
  return td;
}

function button(row, label, onClick) {
  const td = document.createElement("td");
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", () => onClick().catch(failed));
  td.appendChild(b);
  row.appendChild(td);
  return b;
}

function fill(tbody, items, render) {
  tbody.replaceChildren();
  for (const item of items) {
    const tr = document.createElement("tr");
    render(tr, item);
    tbody.appendChild(tr);
  }
}

function match(r) {
  return [r.proto || "any", r.dport ? "port " + r.dport : ""].filter(Boolean).join(" ");
}

// -- plots ----------------------------------------------------------------------------------

const PALETTE = ["#b3261e", "#1b7f3b", "#1f5fbf", "#8a4baf", "#c77700", "#00838f", "#5d4037",
                 "#d81b60", "#546e7a", "#7cb342", "#3949ab", "#f4511e", "#6d4c41", "#00897b",
                 "#8e24aa", "#fdd835", "#43a047", "#e53935", "#1e88e5"];

// A plot whose series are keyed by name; it is built again when the names change.
class Plot {
  constructor(el) { this.el = el; this.u = null; this.key = null; this.bold = 0; }

  draw(times, series, unit) {  // series: [[name, values]], values aligned with times
    const names = series.map((s) => s[0]);
    const key = names.join("|") + "|" + unit;
    if (!this.u || key !== this.key) {
      if (this.u) this.u.destroy();
      this.key = key;
      const width = Math.max(this.el.clientWidth, 400);
      this.u = new uPlot({
        width, height: 240,
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max, 1)] } },
        axes: [{}, { size: 70, values: (u, ticks) => ticks.map((v) => si(v)) }],
        series: [{}].concat(names.map((n, i) => ({
          label: n, stroke: PALETTE[i % PALETTE.length], width: i < this.bold ? 2.5 : 1.25,
          value: (u, v) => (v === null || v === undefined ? "-" : si(v, unit)),
        }))),
      }, [times].concat(series.map((s) => s[1])), this.el);
    } else {
      this.u.setData([times].concat(series.map((s) => s[1])));
    }
  }
}

const state = {
  timer: null, eventsAbort: null, prev: null, times: [], reasons: {}, ifaces: {},
  verdictOf: null, topRate: {}, events: [], plots: null,
};

// Keep HISTORY_S seconds of one rate series (null before it existed).
function push(store, name, value) {
  if (!store[name]) store[name] = new Array(state.times.length - 1).fill(null);
  store[name].push(value);
}

function trim(store) {
  for (const name of Object.keys(store)) {
    while (store[name].length > state.times.length) store[name].shift();
  }
}

function sampleRates(stats, now) {
  const prev = state.prev;
  state.prev = { stats, now };
  if (!prev) return false;
  const dt = (now - prev.now) / 1000;
  if (dt <= 0) return false;
  state.times.push(Date.now() / 1000);
  const rate = (a, b) => [Math.max(a.packets - b.packets, 0) / dt,
                          Math.max(a.bytes - b.bytes, 0) * 8 / dt];
  const verdicts = {};
  for (const [reason, c] of Object.entries(stats.actions)) {
    const before = prev.stats.actions[reason] || c;
    const r = rate(c, before);
    const verdict = state.verdictOf[reason] || "other";
    verdicts[verdict] = verdicts[verdict] || [0, 0];
    verdicts[verdict][0] += r[0];
    verdicts[verdict][1] += r[1];
    push(state.reasons, `${reason} (${verdict})`, r);
  }
  for (const v of ["drop", "pass", "tx", "redirect"]) push(state.reasons, "all " + v, verdicts[v] || [0, 0]);
  const before = {};
  for (const i of prev.stats.interfaces) before[`${i.name}|${i.netns}`] = i;
  for (const i of stats.interfaces) {
    const b = before[`${i.name}|${i.netns}`] || i;
    const where = i.netns ? `${i.name}@${i.netns}` : i.name;
    for (const v of ["passed", "dropped", "forwarded"]) {
      push(state.ifaces, `${where} ${v}`, rate(i[v], b[v]));
    }
  }
  // Every known series gets a point, so all stay aligned with state.times.
  for (const store of [state.reasons, state.ifaces]) {
    for (const vals of Object.values(store)) {
      if (vals.length < state.times.length) vals.push(null);
    }
  }
  while (state.times.length > HISTORY_S) state.times.shift();
  trim(state.reasons);
  trim(state.ifaces);
  const shown = (v) => v || [0, 0];
  const drop = shown(verdicts.drop), pass = shown(verdicts.pass);
  const fwd = [shown(verdicts.tx)[0] + shown(verdicts.redirect)[0],
               shown(verdicts.tx)[1] + shown(verdicts.redirect)[1]];
  const unit = $("#unit").value === "bps" ? 1 : 0;
  for (const [sel, v] of [["#drop-rate", drop], ["#pass-rate", pass], ["#fwd-rate", fwd]]) {
    $(sel).dataset.value = v[unit];
    $(sel).textContent = si(v[unit], unit ? "bit/s" : "pkt/s");
  }
  return true;
}

function redraw() {
  if (!state.plots) return;
  const unit = $("#unit").value === "bps" ? 1 : 0;
  const label = unit ? "bit/s" : "pkt/s";
  const pick = (store, keep) => Object.keys(store).filter(keep).sort((a, b) => {
    const ta = a.startsWith("all "), tb = b.startsWith("all ");
    return ta === tb ? a.localeCompare(b) : (ta ? -1 : 1);
  }).map((n) => [n, store[n].map((v) => (v === null ? null : v[unit]))]);
  // Verdict totals always; a reason once it has counted anything in the window.
  const reasons = pick(state.reasons, (n) => n.startsWith("all ") ||
                       state.reasons[n].some((v) => v && v[0] > 0));
  state.plots.reasons.bold = 4;
  state.plots.reasons.draw(state.times, reasons, label);
  state.plots.ifaces.draw(state.times, pick(state.ifaces, () => true), label);
  window.xdpfw.plotted = { times: state.times.slice(), reasons, unit: label };
}

// -- tables ---------------------------------------------------------------------------------

async function refreshTop() {
  const top = await api("GET", "/api/v1/stats/top-rules?limit=10");
  $("#top-window").textContent = `(${Math.round(top.window_s)} s seen)`;
  fill($("#top-rules tbody"), top.rules, (tr, r) => {
    cell(tr, r.id); cell(tr, r.prefix); cell(tr, match(r)); cell(tr, r.action);
    cell(tr, r.packets); cell(tr, si(top.window_s > 0 ? r.packets / top.window_s : 0));
  });
}

async function refreshRules() {
  const first = await api("GET", "/api/v1/rules?limit=1");
  const offset = Math.max(first.total - 25, 0);  // the newest 25
  const page = await api("GET", `/api/v1/rules?limit=25&offset=${offset}`);
  $("#rule-count").textContent = `(${page.total}; newest shown)`;
  fill($("#rules tbody"), page.items.slice().reverse(), (tr, r) => {
    tr.dataset.prefix = r.prefix;
    cell(tr, r.id); cell(tr, r.prefix); cell(tr, match(r)); cell(tr, r.action);
    cell(tr, r.packets); cell(tr, r.comment);
    button(tr, "Delete", async () => {
      await api("DELETE", `/api/v1/rules/${r.id}`);
      showError("");
      await refreshRules();
    });
  });
}

async function refreshInterfaces() {
  const list = await api("GET", "/api/v1/interfaces");
  fill($("#interfaces tbody"), list, (tr, i) => {
    cell(tr, i.name); cell(tr, i.netns || "-"); cell(tr, i.mode); cell(tr, i.mode_in_use);
    cell(tr, i.policy); cell(tr, i.unparsed_policy);
    button(tr, "Detach", async () => {
      const q = i.netns ? `?netns=${encodeURIComponent(i.netns)}` : "";
      await api("DELETE", `/api/v1/interfaces/${encodeURIComponent(i.name)}${q}`);
      showError("");
      await refreshInterfaces();
    });
  });
}

// XDP services count packets; proxy services count connections (XDP passes their packets).
function serviceSummary(s) {
  if (s.forward !== "proxy") {
    return `(${s.forward}), ${s.forwarded.packets} forwarded, ` +
           `${s.no_backend.packets} without a backend`;
  }
  const how = (s.mode_in_use || "not running") +
              (s.fallback_reason ? `: ${s.fallback_reason}` : "");
  if (!s.proxy) return `(proxy, ${how})`;
  const c = s.proxy.connections;
  return `(proxy, ${how}), ${c.active} open, ${c.accepted} accepted, ` +
         `${c.queue_resets + c.idle_resets + c.client_refusals} reset by limits, ` +
         `${c.backend_failures} backend failures, ` +
         `${si(s.proxy.bytes_to_backend, "B")} to backends, ` +
         `${si(s.proxy.bytes_to_client, "B")} to clients`;
}

async function refreshServices() {
  let list;
  try {
    list = await api("GET", "/api/v1/services");
  } catch (e) {
    if (e instanceof AuthError) throw e;
    list = [];  // no load balancer on this daemon
  }
  const root = $("#services");
  root.replaceChildren();
  if (!list.length) {
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = "none";
    root.appendChild(p);
    return;
  }
  for (const s of list) {
    const div = document.createElement("div");
    div.className = "service";
    const h = document.createElement("h3");
    h.textContent = `${s.name || "service " + s.id}: ${s.proto} ${s.vip}:${s.port} ` +
                    serviceSummary(s);
    div.appendChild(h);
    const table = document.createElement("table");
    table.innerHTML = "<thead><tr><th>backend</th><th>state</th><th>health</th><th>share</th>" +
                      "<th>weight</th><th>packets</th><th></th></tr></thead><tbody></tbody>";
    fill(table.querySelector("tbody"), s.backends, (tr, b) => {
      cell(tr, b.address); cell(tr, b.state);
      cell(tr, b.healthy ? "healthy" : "unhealthy" + (b.health_error ? `: ${b.health_error}` : ""));
      cell(tr, (b.share * 100).toFixed(1) + " %"); cell(tr, b.weight); cell(tr, b.traffic.packets);
      const drain = button(tr, "Drain", async () => {
        await api("PATCH", `/api/v1/services/${s.id}/backends/${b.id}`, { state: "draining" });
        showError("");
        await refreshServices();
      });
      drain.disabled = b.state === "draining";
    });
    div.appendChild(table);
    root.appendChild(div);
  }
}

// -- drop events (server-sent events, read with fetch so the token goes in a header) -------

// Events can come by the thousand in a flood: the table is drawn at most once a tick.
function showEvent(e) {
  state.events.unshift(e);
  state.events.length = Math.min(state.events.length, 20);
  state.eventsDirty = true;
}

function drawEvents() {
  if (!state.eventsDirty) return;
  state.eventsDirty = false;
  fill($("#events tbody"), state.events, (tr, ev) => {
    cell(tr, new Date(ev.time * 1000).toLocaleTimeString());
    cell(tr, ev.sport ? `${ev.saddr}:${ev.sport}` : ev.saddr);
    cell(tr, ev.dport ? `${ev.daddr}:${ev.dport}` : ev.daddr);
    cell(tr, ev.proto); cell(tr, ev.reason); cell(tr, ev.rule_id === null ? "-" : ev.rule_id);
    cell(tr, ev.interface ? (ev.netns ? `${ev.interface}@${ev.netns}` : ev.interface) : "");
  });
}

async function followEvents(signal) {
  while (!signal.aborted) {
    try {
      const r = await fetch("/api/v1/events", { headers: headers(), signal });
      if (r.status === 401) throw new AuthError("wrong token");
      if (!r.ok) throw new Error(`drop events: HTTP ${r.status}`);
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let end;
        while ((end = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          for (const line of block.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const ev = JSON.parse(line.slice(5));
            if (ev.type === "drop") showEvent(ev);
          }
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof AuthError) { failed(e); return; }
    }
    await new Promise((ok) => setTimeout(ok, 2000));  // the daemon restarted: follow again
  }
}

// -- the loop -------------------------------------------------------------------------------

let ticks = 0;

async function tick() {
  try {
    const stats = await api("GET", "/api/v1/stats");
    const now = performance.now();
    if (sampleRates(stats, now)) redraw();
    drawEvents();
    // The slower reads every few seconds; the first tick does them all.
    if (ticks % 5 === 0) {
      await Promise.all([refreshTop(), refreshRules(), refreshInterfaces(), refreshServices()]);
    } else {
      await refreshTop();
    }
    ticks++;
    $("#status").textContent = "live";
    $("#status").className = "status live";
  } catch (e) {
    if (e instanceof AuthError) { failed(e); return; }
    $("#status").textContent = "no answer: " + e.message;
    $("#status").className = "status down";
  }
  if (state.timer !== null) state.timer = setTimeout(tick, POLL_MS);
}

async function start() {
  try {
    state.verdictOf = await api("GET", "/api/v1/stats/reasons");
    const prog = await api("GET", "/api/v1/program");
    $("#program").textContent = `program ${prog.id} (${prog.tag})`;
    await detectSets();
  } catch (e) {
    failed(e);
    if (e instanceof AuthError) return;
  }
  state.plots = { reasons: new Plot($("#chart-reasons")), ifaces: new Plot($("#chart-ifaces")) };
  state.timer = 0;
  const abort = new AbortController();
  state.eventsAbort = abort;
  followEvents(abort.signal);
  tick();
}

function stop() {
  if (state.timer) clearTimeout(state.timer);
  state.timer = null;
  if (state.eventsAbort) state.eventsAbort.abort();
  state.eventsAbort = null;
  state.prev = null;
}

// "Replace a set" only where the daemon has named sets (PUT /api/v1/sets/{name}).
async function detectSets() {
  const spec = await api("GET", "/openapi.json");
  const path = spec.paths && spec.paths["/api/v1/sets/{name}"];
  $("#set-form").hidden = !(path && path.put);
}

// -- forms ----------------------------------------------------------------------------------

function onSubmit(sel, handler) {
  $(sel).addEventListener("submit", (ev) => {
    ev.preventDefault();
    handler().then(() => showError("")).catch(failed);
  });
}

function wire() {
  window.xdpfw = { plotted: null };
  $("#login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn($("#token").value);
  });
  $("#logout").addEventListener("click", () => showLogin(""));
  $("#unit").addEventListener("change", redraw);
  onSubmit("#rule-form", async () => {
    const body = { prefix: $("#rule-prefix").value.trim(), action: $("#rule-action").value,
                   comment: $("#rule-comment").value };
    if ($("#rule-proto").value) body.proto = $("#rule-proto").value;
    if ($("#rule-dport").value) body.dport = Number($("#rule-dport").value);
    await api("POST", "/api/v1/rules", body);
    $("#rule-prefix").value = "";
    await refreshRules();
  });
  onSubmit("#attach-form", async () => {
    await api("POST", "/api/v1/interfaces", {
      name: $("#attach-name").value.trim(), netns: $("#attach-netns").value.trim() || null,
      mode: $("#attach-mode").value, policy: $("#attach-policy").value });
    await refreshInterfaces();
  });
  onSubmit("#set-form", async () => {
    const prefixes = $("#set-list").value.split("\n").map((l) => l.split("#")[0].trim())
      .filter(Boolean);
    await api("PUT", `/api/v1/sets/${encodeURIComponent($("#set-name").value.trim())}`,
              { prefixes });
    await refreshRules();
  });
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) signIn(token); else showLogin("");
}

document.addEventListener("DOMContentLoaded", wire);
