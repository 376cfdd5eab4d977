// llmproxy inspector: plain JavaScript, no build step. Every value from the proxy is put in
// the page with textContent (never innerHTML): prompts and answers are untrusted text.
"use strict";

const API = "/admin/api";
const MUTATE = { "X-LLMProxy-Admin": "1", "Content-Type": "application/json" };
const state = { flows: new Map(), info: null, selected: null, source: null, tab: "flows" };

// -- small helpers -------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const $ = (id) => document.getElementById(id);
const dash = (v) => (v === null || v === undefined || v === "" ? "–" : v);
const ms = (v) => (v === null || v === undefined ? "–" : v >= 1000 ? (v / 1000).toFixed(2) + " s" : Math.round(v) + " ms");
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });
const json = (v) => (typeof v === "string" ? v : JSON.stringify(v, null, 2));

async function call(path, options) {
  const response = await fetch(API + path, { credentials: "same-origin", ...(options || {}) });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (response.status === 401) { showLogin(); throw new Error("log in first"); }
  if (!response.ok) throw new Error((body && body.error && body.error.message) || response.statusText);
  return body;
}

const post = (path, body) => call(path, { method: "POST", headers: MUTATE, body: JSON.stringify(body || {}) });

// -- login ---------------------------------------------------------------------------------------

function showLogin() {
  $("login").hidden = false;
  $("tabs").hidden = true;
  $("logout").hidden = true;
  document.querySelectorAll(".tab").forEach((t) => (t.hidden = true));
  if (state.source) { state.source.close(); state.source = null; }
  setLive(false);
}

async function login(event) {
  event.preventDefault();
  const key = $("login-key").value;
  $("login-error").textContent = "";
  const response = await fetch(API + "/login", { method: "POST", headers: MUTATE, body: JSON.stringify({ key }), credentials: "same-origin" });
  $("login-key").value = "";
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error.message; } catch (e) { /* keep the status text */ }
    $("login-error").textContent = message;
    return;
  }
  start();
}

async function logout() {
  await post("/logout").catch(() => null);
  showLogin();
}

// -- tabs ----------------------------------------------------------------------------------------

function show(tab) {
  state.tab = tab;
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === tab));
  document.querySelectorAll(".tab").forEach((t) => (t.hidden = t.id !== tab));
  if (tab === "sessions") loadSessions();
  if (tab === "backends") loadBackends();
  if (tab === "audit") loadAudit();
}

// -- flows ---------------------------------------------------------------------------------------

function statusClass(flow) {
  if (flow.active) return "active";
  if (flow.status === null || flow.status === undefined) return "";
  return flow.status < 400 ? "ok" : "err";
}

function visible(flow) {
  const text = $("flow-search").value.trim().toLowerCase();
  const frontend = $("flow-frontend").value;
  const status = $("flow-status").value;
  if (frontend && flow.frontend !== frontend) return false;
  if (status === "ok" && !(flow.status >= 200 && flow.status < 300)) return false;
  if (status === "error" && !(flow.status >= 400 || flow.error)) return false;
  if (status === "active" && !flow.active) return false;
  if (text && !JSON.stringify(flow).toLowerCase().includes(text)) return false;
  return true;
}

function flowRow(flow) {
  const used = flow.backend ? `${flow.backend}:${dash(flow.upstream_model)}` : "–";
  const who = [flow.client, flow.session].filter(Boolean).join(" · ");
  const tokens = flow.tokens_in === null && flow.tokens_out === null ? "–" : `${dash(flow.tokens_in)} / ${dash(flow.tokens_out)}`;
  const row = el("tr", { "data-id": flow.id, "data-testid": "flow-row", class: flow.id === state.selected ? "selected" : "", onclick: () => openFlow(flow.id) },
    el("td", {}, clock(flow.started)),
    el("td", { class: "who", title: flow.user_agent || "" }, dash(who)),
    el("td", {}, flow.frontend),
    el("td", {}, dash(flow.model)),
    el("td", { "data-testid": "flow-backend" }, used),
    el("td", {}, flow.attempts),
    el("td", { class: "status " + statusClass(flow) }, flow.active ? "…" : dash(flow.status)),
    el("td", {}, tokens),
    el("td", {}, ms(flow.latency_ms)),
    el("td", {}, ms(flow.ttft_ms)));
  if (flow.error) row.title = flow.error;
  return row;
}

function renderFlows() {
  const body = $("flow-table").tBodies[0];
  const rows = [...state.flows.values()].sort((a, b) => b.started - a.started).filter(visible);
  body.replaceChildren(...rows.slice(0, 1000).map(flowRow));
  $("flow-count").textContent = `${rows.length} of ${state.flows.size} flows`;
  const frontends = new Set([...state.flows.values()].map((f) => f.frontend));
  const select = $("flow-frontend");
  const known = new Set([...select.options].map((o) => o.value));
  for (const f of frontends) if (!known.has(f)) select.append(el("option", { value: f }, f));
}

let renderPending = false;
function scheduleRender() {
  // many events in one frame cost one render
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => { renderPending = false; renderFlows(); });
}

async function loadFlows() {
  const data = await call("/flows?limit=1000");
  state.flows = new Map(data.flows.map((f) => [f.id, f]));
  renderFlows();
}

function connect() {
  if (state.source) state.source.close();
  const source = new EventSource(API + "/events");
  state.source = source;
  source.addEventListener("hello", () => { setLive(true); loadFlows().catch(() => null); });
  source.addEventListener("flow", (event) => {
    const flow = JSON.parse(event.data);
    state.flows.set(flow.id, flow);
    scheduleRender();
    if (flow.id === state.selected && !flow.active) openFlow(flow.id, true);
  });
  source.addEventListener("session", () => { if (state.tab === "sessions") loadSessions(); });
  source.onerror = () => {
    setLive(false);
    // a refused stream (logged out, or the proxy restarted with a new key) is closed for good
    if (source.readyState === EventSource.CLOSED) call("/info").then(connect).catch(() => null);
  };
}

function setLive(on) {
  $("live").textContent = on ? "● live" : "● offline";
  $("live").className = on ? "on" : "off";
}

// -- one flow's detail ---------------------------------------------------------------------------

function section(title, open, ...content) {
  return el("details", open ? { open: "" } : {}, el("summary", {}, title), ...content);
}

function pre(value) {
  return el("pre", {}, json(value));
}

function changesView(changes) {
  if (!changes || !changes.length) {
    return el("p", { class: "muted" }, state.info && state.info.trace === "never"
      ? "Plugin changes are not traced (plugins.inspector.trace: never)."
      : "No plugin changed the request or response (or the flow was not traced: with trace: watched, only flows that begin while the inspector is open are).");
  }
  return el("div", {}, ...changes.map((change) => el("div", { class: "change", "data-testid": "plugin-change" },
    el("h4", {}, `${change.plugin}`, el("span", { class: "muted" }, ` in ${change.hook}`)),
    el("table", { class: "diff" },
      el("thead", {}, el("tr", {}, el("th", {}, "field"), el("th", {}, "before"), el("th", {}, "after"))),
      el("tbody", {}, ...change.changes.map((c) => el("tr", {},
        el("td", { class: "path" }, c.path),
        el("td", { class: "before" }, c.before === null || c.before === undefined ? "(none)" : json(c.before)),
        el("td", { class: "after" }, c.after === null || c.after === undefined ? "(none)" : json(c.after)))))),
    change.more ? el("p", { class: "muted" }, `… and ${change.more} more`) : null)));
}

function attemptView(attempt, index) {
  const head = `#${index + 1} ${attempt.backend}:${attempt.model} → ${dash(attempt.status)}${attempt.error ? " " + attempt.error : ""}`;
  const parts = [el("p", { class: "muted" }, `protocol ${dash(attempt.protocol)}, key ${dash(attempt.key_name)}, ${ms(attempt.start * 1000)} → ${ms(attempt.end === null ? null : attempt.end * 1000)}`)];
  if (attempt.request) parts.push(el("h4", {}, "request sent"), pre(attempt.request));
  if (attempt.response) parts.push(el("h4", {}, "response received"), pre(attempt.response));
  return el("details", {}, el("summary", {}, head), ...parts);
}

function eventText(event) {
  const data = event.data;
  if (data && typeof data === "object") {
    const choice = data.choices && data.choices[0];
    if (choice && choice.delta && typeof choice.delta.content === "string") return choice.delta.content;
    if (data.delta && typeof data.delta.text === "string") return data.delta.text;
    if (typeof data.delta === "string") return data.delta;
  }
  return "";
}

function responseView(response) {
  if (!response) return el("p", { class: "muted" }, "no response recorded");
  const events = response.events;
  if (!events) return pre(response.body !== undefined ? response.body : response);
  const out = el("pre", { class: "replay", "data-testid": "replay-text" });
  const list = el("ol", { class: "events" }, ...events.map((e) => el("li", {}, el("span", { class: "muted" }, `${ms((e.t || 0) * 1000)} `), json(e.data !== undefined ? e.data : e))));
  const button = el("button", { "data-testid": "replay", onclick: () => replay(events, out) }, "▶ replay the stream");
  return el("div", {}, el("p", {}, `status ${dash(response.status)}, ${events.length} events `, button), out, el("details", {}, el("summary", {}, "events"), list));
}

function replay(events, out) {
  // the client's stream again, at its recorded pace (capped so a long stream does not drag)
  out.textContent = "";
  const t0 = events.length ? events[0].t || 0 : 0;
  for (const event of events) {
    const delay = Math.min(((event.t || 0) - t0) * 1000, 10000);
    setTimeout(() => { out.textContent += eventText(event); }, delay);
  }
}

async function openFlow(id, quiet) {
  state.selected = id;
  const pane = $("detail");
  pane.hidden = false;
  $("detail-title").textContent = `flow ${id}`;
  if (!quiet) $("detail-body").replaceChildren(el("p", { class: "muted" }, "loading…"));
  document.querySelectorAll("#flow-table tr.selected").forEach((r) => r.classList.remove("selected"));
  const row = document.querySelector(`#flow-table tr[data-id="${CSS.escape(id)}"]`);
  if (row) row.classList.add("selected");
  let detail;
  try { detail = await call(`/flows/${encodeURIComponent(id)}`); } catch (e) {
    $("detail-body").replaceChildren(el("p", { class: "error" }, e.message));
    return;
  }
  if (state.selected !== id) return;
  const s = detail.summary || {};
  const facts = el("dl", { class: "facts" },
    ...[["status", s.active ? "in flight" : s.status], ["error", s.error], ["client", s.client], ["session", s.session], ["front-end", s.frontend],
      ["model asked", s.model], ["served by", s.backend ? `${s.backend}:${s.upstream_model}` : null], ["attempts", s.attempts],
      ["tokens in / out", `${dash(s.tokens_in)} / ${dash(s.tokens_out)}`], ["latency", ms(s.latency_ms)], ["time to first token", ms(s.ttft_ms)]]
      .filter(([, v]) => v !== null && v !== undefined && v !== "").flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const body = [section("Summary", true, facts), section("Plugin changes", true, changesView(detail.plugin_changes))];
  if (detail.changes && detail.changes.plugins && detail.changes.plugins.length) body.push(section("Plugin notes", false, pre(detail.changes.plugins)));
  if (detail.request) body.push(section("Client request", false, pre(detail.request)));
  if (detail.attempts) body.push(section(`Upstream attempts (${detail.attempts.length})`, true, ...detail.attempts.map(attemptView)));
  if (detail.response) body.push(section("Response to the client", true, responseView(detail.response)));
  if (!detail.request && s.active) body.push(el("p", { class: "muted" }, "The flow is still running: its detail appears when it ends."));
  $("detail-body").replaceChildren(...body);
}

// -- sessions ------------------------------------------------------------------------------------

function backendSelect(current) {
  const backends = (state.info && state.info.backends) || [];
  return el("select", { "data-testid": "session-backend" },
    el("option", { value: "" }, "default"),
    ...backends.map((b) => el("option", b === current ? { value: b, selected: "" } : { value: b }, b)));
}

async function loadSessions() {
  const data = await call("/sessions");
  const body = $("session-table").tBodies[0];
  body.replaceChildren(...data.sessions.map((s) => {
    const select = backendSelect(s.settings.backend || "");
    const model = el("input", { value: s.settings.model || "", placeholder: "as asked", "data-testid": "session-model" });
    const apply = el("button", { "data-testid": "session-apply", onclick: () => {
      // only what the user changed: each field runs its in-chat command
      const change = {};
      if (select.value !== (s.settings.backend || "")) change.backend = select.value;
      if (model.value !== (s.settings.model || "")) change.model = model.value;
      if (Object.keys(change).length) changeSession(s.id, change);
    } }, "Apply");
    const clear = el("button", { onclick: () => clearSession(s.id) }, "Clear");
    const settings = Object.entries(s.settings).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ") + (s.oneoff ? ` oneoff=${s.oneoff}` : "");
    return el("tr", { "data-session": s.id, "data-testid": "session-row" },
      el("td", { class: "who" }, s.id), el("td", {}, s.source), el("td", {}, s.requests), el("td", {}, clock(s.last_seen)),
      el("td", { "data-testid": "session-settings" }, dash(settings)), el("td", {}, select), el("td", {}, model), el("td", {}, apply, " ", clear));
  }));
  if (!data.sessions.length) body.replaceChildren(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "No sessions yet: they appear with the first request.")));
}

async function changeSession(id, change) {
  const message = $("session-message");
  try {
    const result = await post(`/sessions/${encodeURIComponent(id)}`, change);
    message.textContent = result.replies.join("; ") || "changed";
    message.className = "muted";
  } catch (e) {
    message.textContent = e.message;
    message.className = "error";
  }
  loadSessions();
}

async function clearSession(id) {
  await post(`/sessions/${encodeURIComponent(id)}/clear`).catch((e) => ($("session-message").textContent = e.message));
  loadSessions();
}

// -- backends ------------------------------------------------------------------------------------

function valueView(value) {
  // whatever keys backend_status() has, shown as nested tables
  if (value === null || value === undefined) return "–";
  if (Array.isArray(value)) {
    if (value.every((v) => v === null || typeof v !== "object")) return value.join(", ") || "–";
    return el("div", {}, ...value.map(valueView));
  }
  if (typeof value === "object") {
    const rows = Object.entries(value);
    if (!rows.length) return "–";
    return el("table", { class: "kv" }, el("tbody", {}, ...rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, valueView(v))))));
  }
  return String(value);
}

async function loadBackends() {
  const data = await call("/backends");
  $("backend-cards").replaceChildren(...Object.entries(data.backends).map(([name, status]) =>
    el("div", { class: "card", "data-testid": "backend-card" }, el("h3", {}, name), valueView(status))));
}

async function reloadConfig() {
  try {
    await post("/reload");
    $("reload-message").textContent = "reloaded";
    loadBackends();
  } catch (e) {
    $("reload-message").textContent = e.message;
  }
}

// -- try it and audit ----------------------------------------------------------------------------

async function tryIt(event) {
  event.preventDefault();
  const out = $("try-result");
  out.textContent = "sending…";
  try {
    const result = await post("/try", { model: $("try-model").value, message: $("try-message").value, session: $("try-session").value || null });
    const lines = [`HTTP ${result.status}`, ...Object.entries(result.headers).map(([k, v]) => `${k}: ${v}`), "", result.text !== null ? result.text : json(result.body)];
    out.textContent = lines.join("\n");
  } catch (e) {
    out.textContent = e.message;
  }
}

async function loadAudit() {
  const data = await call("/audit");
  $("audit-table").tBodies[0].replaceChildren(...data.entries.map((a) => el("tr", {},
    el("td", {}, clock(a.ts)), el("td", {}, `${a.who.address} (${a.who.auth})`), el("td", {}, a.action), el("td", {}, dash(a.target)),
    el("td", {}, a.status), el("td", {}, a.details ? JSON.stringify(a.details) : "–"))));
}

// -- start ---------------------------------------------------------------------------------------

async function start() {
  try { state.info = await call("/info"); } catch (e) { return; }
  $("login").hidden = true;
  $("tabs").hidden = false;
  $("logout").hidden = false;
  $("try-models").replaceChildren(...[...state.info.models, ...state.info.backends.map((b) => b + ":")].map((m) => el("option", { value: m })));
  $("reload").disabled = !state.info.reload;
  show(state.tab);
  await loadFlows();
  connect();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("detail-close").addEventListener("click", () => { $("detail").hidden = true; state.selected = null; renderFlows(); });
  document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => show(b.dataset.tab)));
  for (const id of ["flow-search", "flow-frontend", "flow-status"]) $(id).addEventListener("input", renderFlows);
  $("try-form").addEventListener("submit", tryIt);
  $("reload").addEventListener("click", reloadConfig);
  start();
});
