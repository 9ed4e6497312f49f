// resource-plane console. A plain ES module: no framework, no bundler.
//
// Everything it shows comes from the token-protected REST API. The token is asked for
// once (on the first 401), kept in sessionStorage, and sent only as an Authorization
// header: never in a URL, never logged. Live updates come from the event stream
// (GET /api/1.0/events, read with fetch() because EventSource cannot send headers);
// when the stream is not there (404) or drops, the page polls the current view until
// the stream is back, reconnecting with Last-Event-ID.

const TOKEN_KEY = "resource-plane.token";
// Polling period while the stream is unavailable: short enough that a change shows
// within a second.
const POLL_MS = 500;
// How long to wait before trying the stream again: after a drop, and after a 404.
const RETRY_MS = [1000, 2000, 5000, 10000];
const STREAM_ABSENT_RETRY_MS = 30000;
// Paged lists: page size, and how many entries the console follows `continue` for.
const PAGE = 1000;
const LIST_CAP = 5000;

// ---------------------------------------------------------------------------------
// DOM helpers (text only: data never goes through innerHTML).

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

const $ = (sel, root = document) => root.querySelector(sel);

/// A table with a caption, column headers (`scope="col"`), and one row per item; the
/// first cell of each row is a row header (`scope="row"`).
function table(caption, columns, rows, emptyText) {
  const head = h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c))));
  const body = h("tbody");
  if (rows.length === 0) {
    body.append(h("tr", {}, h("td", { colspan: columns.length, class: "empty" }, emptyText || "none")));
  }
  for (const cells of rows) {
    const tr = h("tr");
    cells.forEach((c, i) => {
      const cell = c && typeof c === "object" && !(c instanceof Node) && "cell" in c ? c : { cell: c };
      const attrs = { class: cell.class, dataset: cell.dataset };
      if (i === 0) tr.append(h("th", { scope: "row", ...attrs }, cell.cell));
      else tr.append(h("td", attrs, cell.cell));
    });
    body.append(tr);
  }
  const label = caption.replace(/\s+/g, " ");
  return h("div", { class: "table-wrap", role: "region", "aria-label": label, tabindex: 0 },
    h("table", {}, h("caption", {}, caption), head, body));
}

function stateBadge(s) {
  return s ? h("span", { class: `state ${s}` }, s) : "";
}

function field(id, label, control) {
  control.id = id;
  return h("div", { class: "field" }, h("label", { for: id }, label), control);
}

function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function ago(iso) {
  if (!iso) return "";
  const secs = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000));
  if (!Number.isFinite(secs)) return "";
  if (secs < 60) return `${secs}s`;
  if (secs < 3600) return `${Math.floor(secs / 60)}m ${secs % 60}s`;
  if (secs < 86400) return `${Math.floor(secs / 3600)}h ${Math.floor((secs % 3600) / 60)}m`;
  return `${Math.floor(secs / 86400)}d ${Math.floor((secs % 86400) / 3600)}h`;
}

/// A relative time ("12s ago", or "12s" for a duration) that keeps itself current.
function timeCell(iso, suffix = " ago") {
  return iso ? h("time", { datetime: iso, title: fmtTime(iso), dataset: { suffix } }, `${ago(iso)}${suffix}`) : "";
}

function num(n, digits = 1) {
  if (typeof n !== "number") return "";
  return Number.isInteger(n) ? String(n) : n.toFixed(digits);
}

/// Whether `data` is what `page` shows already (then it keeps its DOM: no flicker, and
/// focus, selection and element references survive a poll).
function unchanged(page, data) {
  const key = JSON.stringify(data);
  if (page.shown === key) return true;
  page.shown = key;
  return false;
}

function countBy(items, key) {
  const out = {};
  for (const it of items) out[key(it)] = (out[key(it)] || 0) + 1;
  return out;
}

function dl(pairs) {
  return h("dl", {}, pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v === undefined || v === null || v === "" ? "—" : v)]));
}

// ---------------------------------------------------------------------------------
// The API, with the token.

class AuthNeeded extends Error {}

class ApiFailure extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function authHeaders(extra) {
  const headers = new Headers(extra || {});
  const t = token();
  if (t) headers.set("Authorization", `Bearer ${t}`);
  return headers;
}

/// Calls the API; 401 opens the token form and throws AuthNeeded; any other failure
/// throws ApiFailure with the server's `error` message, unless `allow` lists the status.
async function api(path, { method = "GET", body, allow = [] } = {}) {
  const used = token();
  const headers = authHeaders({ Accept: "application/json" });
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  if (res.status === 401) {
    // A 401 for a token already replaced says nothing about the new one.
    if (token() === used) askForToken(used ? "The token was refused. Enter it again." : "");
    throw new AuthNeeded("token needed");
  }
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (!res.ok && !allow.includes(res.status)) {
    throw new ApiFailure(res.status, (json && json.error) || `${res.status} ${res.statusText}`);
  }
  return { status: res.status, json };
}

/// A paged list, following `continue` up to LIST_CAP entries.
async function listAll(path, query = {}, page = PAGE) {
  const out = [];
  let cont = null;
  for (let pages = 0; pages < Math.ceil(LIST_CAP / page); pages++) {
    const q = new URLSearchParams({ ...query, limit: String(page) });
    if (cont) q.set("continue", cont);
    const { json } = await api(`${path}?${q}`);
    out.push(...((json && json.data) || []));
    cont = json && json.continue;
    if (!cont) return { items: out, truncated: false };
  }
  return { items: out.slice(0, LIST_CAP), truncated: true };
}

let envsCache = null;
async function envs() {
  if (!envsCache) {
    const { json } = await api("/api/1.0/environments");
    envsCache = (json && json.data) || [];
  }
  return envsCache;
}

// ---------------------------------------------------------------------------------
// Token form.

function askForToken(message) {
  const panel = $("#token-panel");
  $("#token-error").textContent = message || "";
  if (panel.hidden) {
    panel.hidden = false;
    $("#page").hidden = true;
    $("#token-input").value = "";
    $("#token-input").focus();
  }
  setLive("waiting for the API token", "offline");
}

function tokenAccepted() {
  $("#token-panel").hidden = true;
  $("#page").hidden = false;
  $("#forget-token").hidden = !token();
  envsCache = null;
  show();
  restartStream();
}

function setupToken() {
  $("#token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = $("#token-input").value.trim();
    $("#token-input").value = "";
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    tokenAccepted();
  });
  $("#forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    envsCache = null;
    $("#forget-token").hidden = true;
    refreshNow();
  });
  $("#forget-token").hidden = !token();
}

// ---------------------------------------------------------------------------------
// Pages. Each has `mount(root)` (static controls, once per visit) and `refresh()`
// (fetches and redraws its data; called on navigation, on events, and when polling).

const pages = {};

pages.overview = {
  title: "Overview",
  mount(root) {
    this.root = h("div", { class: "cards" });
    root.append(h("h1", {}, "Overview"), this.root);
  },
  async refresh() {
    const [health, ready, ctl, workers, instances, envList] = await Promise.all([
      api("/health", { allow: [503] }),
      api("/health/ready", { allow: [503] }),
      api("/api/1.0/controller"),
      listAll("/api/1.0/workers"),
      listAll("/api/1.0/instances"),
      envs(),
    ]);
    const shadows = await Promise.all(envList.map((e) => listAll(`/api/1.0/${encodeURIComponent(e)}/shadow-deployables`)));
    if (unchanged(this, [health.status, ready, ctl, workers, instances, shadows])) return;
    const c = ctl.json || {};
    const leader = c.leader || {};
    const rec = c.last_reconcile || {};
    const r = ready.json || {};
    const cards = [];
    cards.push(h("section", { class: "card", "aria-labelledby": "ov-health" },
      h("h2", { id: "ov-health" }, "Health"),
      dl([
        ["live", stateBadge(health.status === 200 ? "ok" : "bad")],
        ["ready", h("span", { class: `state ${ready.status === 200 ? "ok" : "bad"}` }, r.status || String(ready.status))],
        ["store (etcd)", h("span", { class: `state ${r.store === "ok" ? "ok" : "bad"}` }, r.store === "ok" ? "reachable" : "unreachable")],
        ["hydrated", String(!!r.hydrated)],
      ])));
    cards.push(h("section", { class: "card wide", "aria-labelledby": "ov-leader" },
      h("h2", { id: "ov-leader" }, "Leader"),
      dl([
        ["leader", leader.leader_id],
        ["epoch", leader.epoch === null || leader.epoch === undefined ? "" : String(leader.epoch)],
        ["this replica", `${leader.instance_id || ""}${leader.is_leader ? " (leader)" : ""}`],
      ])));
    cards.push(h("section", { class: "card", "aria-labelledby": "ov-rec" },
      h("h2", { id: "ov-rec" }, "Last reconcile"),
      dl([
        ["at", rec.at ? timeCell(rec.at) : "not yet"],
        ["outcome", rec.outcome],
        ["passes", String(rec.passes ?? "")],
        ["errors", String(rec.errors ?? "")],
        ["last error", rec.last_error ? `${rec.last_error.step} ${rec.last_error.subject}: ${rec.last_error.error}` : ""],
      ])));
    const counts = (title, id, by) => h("section", { class: "card", "aria-labelledby": id },
      h("h2", { id }, title),
      Object.keys(by).length ? dl(Object.entries(by).sort().map(([k, v]) => [stateBadge(k), String(v)])) : h("p", { class: "empty" }, "none"));
    envList.forEach((e, i) => {
      cards.push(counts(`Shadow deployables: ${e}`, `ov-shadow-${i}`, countBy(shadows[i].items, (s) => s.state)));
    });
    cards.push(counts("Workers", "ov-workers", countBy(workers.items, (w) => w.state)));
    cards.push(counts("Instances", "ov-instances", countBy(instances.items, (x) => x.state)));
    const pending = (c.pending_demand && c.pending_demand.instances) || 0;
    cards.push(h("section", { class: "card", "aria-labelledby": "ov-demand" },
      h("h2", { id: "ov-demand" }, "Pending demand"),
      dl([["pending instances", String(pending)]])));
    this.root.replaceChildren(...cards);
  },
};

pages.shadow = {
  title: "Shadow deployables",
  async mount(root) {
    const envSelect = h("select", { name: "env" });
    const state = h("select", { name: "state" },
      h("option", { value: "" }, "any"), h("option", { value: "FREE" }, "FREE"), h("option", { value: "PROCURED" }, "PROCURED"));
    const pool = h("input", { name: "node_pool", type: "search", placeholder: "e.g. g2-std-16" });
    const name = h("input", { name: "name", type: "search", placeholder: "part of a name" });
    const form = h("form", { class: "filters", role: "search", "aria-label": "Filter shadow deployables" },
      field("f-env", "Environment", envSelect), field("f-state", "State", state),
      field("f-pool", "Node pool", pool), field("f-name", "Name contains", name));
    form.addEventListener("submit", (ev) => ev.preventDefault());
    this.out = h("div");
    this.controls = { envSelect, state, pool, name };
    root.append(h("h1", {}, "Shadow deployables"), form, this.out);
    const list = await envs();
    envSelect.replaceChildren(...list.map((e) => h("option", { value: e }, e)));
    if (this.env && list.includes(this.env)) envSelect.value = this.env;
    for (const c of [envSelect, state]) c.addEventListener("change", () => refreshNow());
    for (const c of [pool, name]) c.addEventListener("input", () => this.draw());
  },
  async refresh() {
    const { envSelect, state } = this.controls;
    const env = envSelect.value || (await envs())[0];
    if (!env) return;
    this.env = env;
    const query = {};
    if (state.value === "FREE") query.in_use = "false";
    if (state.value === "PROCURED") query.in_use = "true";
    this.data = await listAll(`/api/1.0/${encodeURIComponent(env)}/shadow-deployables`, query);
    if (unchanged(this, [env, this.data])) return;
    this.draw();
  },
  draw() {
    if (!this.data) return;
    const { pool, name } = this.controls;
    const p = pool.value.trim();
    const n = name.value.trim().toLowerCase();
    const rows = this.data.items
      .filter((s) => (!p || s.node_pool === p) && (!n || s.name.toLowerCase().includes(n)))
      .map((s) => [
        { cell: s.name, dataset: { name: s.name } },
        s.node_pool,
        { cell: stateBadge(s.state), dataset: { field: "state" } },
        s.owner ? s.owner.workflow_run_id : "",
        s.owner ? s.owner.workflow_plan || "" : "",
        s.owner ? timeCell(s.owner.procured_at) : "",
        { cell: String(s.min_pod_count), class: "num" },
        { cell: String(s.version), class: "num" },
      ]);
    const more = this.data.truncated ? ` (first ${LIST_CAP})` : "";
    this.out.replaceChildren(table(`Shadow deployables in ${this.env}: ${rows.length} shown${more}`,
      ["Name", "Node pool", "State", "Owner run", "Plan", "Since", "Min pods", "Version"], rows,
      "no shadow deployables match"));
  },
};

function usage(label, used, cap) {
  const max = cap > 0 ? cap : 1;
  return [
    h("span", {}, label),
    h("meter", { min: 0, max, value: Math.min(used, max), high: max * 0.85, optimum: 0, "aria-label": `${label} allocated` }),
    h("span", { class: "muted" }, `${num(used)} / ${num(cap)}`),
  ];
}

const DRAINABLE = new Set(["RUNNING", "PROVISIONING", "PENDING"]);

pages.workers = {
  title: "Workers",
  mount(root) {
    this.msg = h("p", { class: "error", role: "alert" });
    this.out = h("div");
    root.append(h("h1", {}, "Workers"), this.msg, this.out);
  },
  async refresh() {
    const { items, truncated } = await listAll("/api/1.0/workers");
    if (unchanged(this, items)) return;
    const rows = items.map((w) => [
      { cell: h("span", { class: "mono" }, w.id), dataset: { worker: w.id } },
      { cell: stateBadge(w.state), dataset: { field: "state" } },
      w.template,
      h("div", { class: "usage" }, usage("cpu", w.allocated.cpu, w.capacity.cpu), usage("mem", w.allocated.memory_gb, w.capacity.memory_gb)),
      (w.instances || []).length ? h("ul", { class: "plain" }, w.instances.map((i) => h("li", { class: "mono" }, i))) : h("span", { class: "muted" }, "none"),
      timeCell(w.state_changed_at, ""),
      DRAINABLE.has(w.state)
        ? h("button", { type: "button", class: "danger", "data-drain": w.id, "aria-label": `Drain worker ${w.id}`, onclick: () => this.drain(w.id) }, "Drain")
        : "",
    ]);
    this.out.replaceChildren(table(`${items.length} workers${truncated ? ` (first ${LIST_CAP})` : ""}`,
      ["Worker", "State", "Template", "Capacity and allocation", "Instances", "In state for", "Action"], rows, "no workers"));
  },
  async drain(id) {
    if (!window.confirm(`Drain worker ${id}? It takes no new instances and stops once its instances are done.`)) return;
    this.msg.textContent = "";
    try {
      await api(`/api/1.0/workers/${encodeURIComponent(id)}/drain`, { method: "POST", body: {} });
    } catch (e) {
      if (!(e instanceof AuthNeeded)) this.msg.textContent = `Drain of ${id} failed: ${e.message}`;
    }
    refreshNow();
  },
};

/// Why a PENDING instance waits, judged from the workers the console sees (for one the
/// autoscaler has not planned yet).
function pendingReason(inst, workers) {
  const need = inst.requirements || {};
  const fits = (w) => need.cpu <= w.capacity.cpu - w.allocated.cpu + 1e-9 && need.memory_gb <= w.capacity.memory_gb - w.allocated.memory_gb + 1e-9;
  const running = workers.filter((w) => w.state === "RUNNING");
  const coming = workers.filter((w) => ["PENDING", "PROVISIONING"].includes(w.state));
  if (running.some(fits)) return "a running worker has room: waiting for the scheduler's next pass";
  if (coming.some((w) => need.cpu <= w.capacity.cpu && need.memory_gb <= w.capacity.memory_gb)) {
    return "waiting for a worker that is starting";
  }
  const biggest = workers.reduce((m, w) => Math.max(m, w.capacity.cpu), 0);
  if (workers.length && need.cpu > biggest) {
    return `no running worker has room (needs ${num(need.cpu)} cpu, ${num(need.memory_gb)} GB); the autoscaler needs a template that fits`;
  }
  return `no running worker has room (needs ${num(need.cpu)} cpu, ${num(need.memory_gb)} GB): waiting for the autoscaler`;
}

pages.instances = {
  title: "Instances",
  mount(root) {
    const state = h("select", { name: "state" }, ["", "PENDING", "SCHEDULED", "RUNNING", "COMPLETED", "FAILED"].map((s) => h("option", { value: s }, s || "any")));
    state.addEventListener("change", () => refreshNow());
    const form = h("form", { class: "filters", role: "search", "aria-label": "Filter instances" }, field("f-istate", "State", state));
    form.addEventListener("submit", (ev) => ev.preventDefault());
    this.state = state;
    this.pending = h("div");
    this.all = h("div");
    root.append(h("h1", {}, "Instances"), h("h2", {}, "Pending queue"), this.pending, h("h2", {}, "All instances"), form, this.all);
  },
  async refresh() {
    const query = this.state.value ? { state: this.state.value } : {};
    const [ctl, workers, list, pendingList] = await Promise.all([
      api("/api/1.0/controller"),
      listAll("/api/1.0/workers"),
      listAll("/api/1.0/instances", query),
      listAll("/api/1.0/instances", { state: "PENDING" }),
    ]);
    if (unchanged(this, [ctl.json && ctl.json.pending_demand, workers, list, pendingList])) return;
    const order = ((ctl.json && ctl.json.pending_demand && ctl.json.pending_demand.ids) || []);
    // The autoscaler's own reason when its last plan saw the instance; else a guess from the workers.
    const reasons = (ctl.json && ctl.json.pending_demand && ctl.json.pending_demand.reasons) || {};
    const byId = new Map(pendingList.items.map((i) => [i.id, i]));
    const queue = order.filter((id) => byId.has(id)).map((id) => byId.get(id));
    for (const i of pendingList.items) if (!order.includes(i.id)) queue.push(i);
    this.pending.replaceChildren(table(`${queue.length} pending, oldest first`,
      ["Instance", "Needs", "Waiting for", "Reason"],
      queue.map((i) => [
        { cell: h("span", { class: "mono" }, i.id), dataset: { instance: i.id } },
        `${num(i.requirements.cpu)} cpu, ${num(i.requirements.memory_gb)} GB`,
        timeCell(i.created_at, ""),
        reasons[i.id] || pendingReason(i, workers.items),
      ]), "nothing is waiting"));
    this.all.replaceChildren(table(`${list.items.length} instances${list.truncated ? ` (first ${LIST_CAP})` : ""}`,
      ["Instance", "State", "Worker", "Needs", "Do not disrupt", "Created"],
      list.items.map((i) => [
        { cell: h("span", { class: "mono" }, i.id), dataset: { instance: i.id } },
        stateBadge(i.state),
        i.worker_id ? h("span", { class: "mono" }, i.worker_id) : "",
        `${num(i.requirements.cpu)} cpu, ${num(i.requirements.memory_gb)} GB`,
        i.do_not_disrupt ? "yes" : "no",
        timeCell(i.created_at),
      ]), "no instances"));
  },
};

// Operations looked up by request id: "env/request_id" (shown besides the list).
const lookedUp = new Set();
// Operations per page of the list; "More" loads one more page.
const OPS_PAGE = 25;
const INTENT_STATUSES = ["SUBMITTING", "PENDING", "SUCCEEDED", "FAILED", "TIMED_OUT"];

/// One operation: what it waits for, where it stands, whose it is, and every callback
/// attempt.
function operationCard(op) {
  const d = op.delivery || {};
  const attempts = d.attempts || [];
  return h("section", { class: "card", "aria-label": `Operation ${op.request_id}`, dataset: { op: op.request_id } },
    h("h2", {}, `${op.operation} `, h("span", { class: "mono" }, op.request_id), " ", stateBadge(op.status)),
    dl([
      ["environment", op.env],
      ["desired condition", typeof op.desired_condition === "string" ? op.desired_condition : JSON.stringify(op.desired_condition)],
      ["resource", op.resource ? [op.resource.kind, op.resource.name].filter(Boolean).join(" ") : ""],
      ["workflow", op.workflow ? [op.workflow.run_id, op.workflow.plan, op.workflow.task_id].filter(Boolean).join(" / ") : ""],
      ["created", fmtTime(op.created_at)],
      ["deadline", fmtTime(op.deadline)],
      ["observed", fmtTime(op.observed_at)],
      ["detail", op.detail],
      ["callback", d.delivered ? "delivered" : d.gave_up ? "gave up" : d.next_attempt_at ? `next attempt ${fmtTime(d.next_attempt_at)}` : "not yet due"],
    ]),
    table(`Callback attempts of ${op.request_id}`, ["Attempt", "At", "Outcome", "HTTP status", "Error"],
      attempts.map((a, i) => [String(a.attempt ?? i + 1), fmtTime(a.at), a.outcome, a.status ? String(a.status) : "", a.error || ""]),
      "no attempt yet"));
}

pages.operations = {
  title: "Operations",
  pages: 1,
  async mount(root) {
    this.pages = 1;
    const envSelect = h("select", { name: "env" });
    const status = h("select", { name: "status" }, ["", ...INTENT_STATUSES].map((s) => h("option", { value: s }, s || "any")));
    const filters = h("form", { class: "filters", role: "search", "aria-label": "Filter operations" },
      field("o-env", "Environment", envSelect), field("o-status", "Status", status));
    filters.addEventListener("submit", (ev) => ev.preventDefault());
    for (const c of [envSelect, status]) {
      c.addEventListener("change", () => {
        this.pages = 1;
        refreshNow();
      });
    }
    const rid = h("input", { name: "request_id", type: "search", required: true, placeholder: "request id" });
    const lookup = h("form", { class: "filters", "aria-label": "Look up an operation" },
      field("o-rid", "Request id", rid), h("button", { type: "submit" }, "Look up"));
    lookup.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const id = rid.value.trim();
      if (id) {
        lookedUp.add(`${envSelect.value}/${id}`);
        this.focus = id;
        refreshNow();
      }
    });
    this.controls = { envSelect, status };
    this.msg = h("p", { class: "error", role: "alert" });
    this.looked = h("div");
    this.summary = h("p", { class: "muted", "aria-live": "polite" });
    this.out = h("div");
    this.more = h("button", { type: "button", id: "o-more", hidden: true, onclick: () => {
      this.pages += 1;
      refreshNow();
    } }, "More");
    root.append(h("h1", {}, "Operations"),
      h("p", { class: "muted" }, "The environment's watch intents with their condition, status, workflow and every callback attempt, kept current from the event stream."),
      filters, lookup, this.msg, this.looked,
      h("h2", {}, "All operations"), this.summary, this.out, this.more);
    const list = await envs();
    envSelect.replaceChildren(...list.map((e) => h("option", { value: e }, e)));
    if (this.env && list.includes(this.env)) envSelect.value = this.env;
  },
  async refresh() {
    const { envSelect, status } = this.controls;
    const env = envSelect.value || (await envs())[0];
    if (!env) return;
    if (env !== this.env) this.pages = 1;
    this.env = env;
    // The pages shown so far, read again from the first: a change anywhere shows.
    const items = [];
    let cont = null;
    for (let p = 0; p < this.pages; p++) {
      const q = new URLSearchParams({ limit: String(OPS_PAGE) });
      if (status.value) q.set("status", status.value);
      if (cont) q.set("continue", cont);
      const { json } = await api(`/api/1.0/${encodeURIComponent(env)}/operations?${q}`);
      items.push(...((json && json.data) || []));
      cont = json && json.continue;
      if (!cont) break;
    }
    // Looked-up operations the list shows already are not shown twice.
    const listed = new Set(items.map((op) => `${env}/${op.request_id}`));
    const found = [];
    const missing = [];
    await Promise.all([...lookedUp].filter((k) => !listed.has(k)).slice(-20).map(async (k) => {
      const [e, ...rest] = k.split("/");
      const id = rest.join("/");
      const r = await api(`/api/1.0/${encodeURIComponent(e)}/operations/${encodeURIComponent(id)}`, { allow: [404, 400] });
      if (r.status === 200 && r.json) found.push(r.json);
      else missing.push(k);
    }));
    found.sort((a, b) => String(b.created_at).localeCompare(String(a.created_at)));
    if (!unchanged(this, [env, status.value, items, cont, found, missing])) {
      this.msg.textContent = missing.length ? `Not found: ${missing.join(", ")}` : "";
      this.looked.replaceChildren(...(found.length ? [h("h2", {}, "Looked up"), ...found.map(operationCard)] : []));
      const which = status.value ? ` with status ${status.value}` : "";
      const n = `${items.length} operation${items.length === 1 ? "" : "s"}`;
      this.summary.textContent = `${n} in ${env}${which}, by request id${cont ? "; more follow" : ""}`;
      this.out.replaceChildren(...(items.length ? items.map(operationCard) : [h("p", { class: "empty" }, `No operations in ${env}${which}.`)]));
      this.more.hidden = !cont;
    }
    if (this.focus) {
      // A looked-up operation the list holds: brought into view where it is.
      const card = [...this.out.querySelectorAll("section[data-op]")].find((el) => el.dataset.op === this.focus);
      if (card) card.scrollIntoView({ block: "start" });
      this.focus = null;
    }
  },
};

pages.decisions = {
  title: "Decisions",
  mount(root) {
    this.out = h("div");
    root.append(h("h1", {}, "Decisions"), this.out);
  },
  async refresh() {
    const { json } = await api("/api/1.0/controller");
    const decisions = ((json && json.recent_decisions) || []).slice().reverse();
    if (unchanged(this, decisions)) return;
    this.out.replaceChildren(table(`The controller's journal, newest first (${decisions.length})`,
      ["At", "Action", "Subject", "Reason"],
      decisions.map((d) => [fmtTime(d.at), d.action, h("span", { class: "mono" }, d.subject), d.reason]),
      "no decisions yet"));
  },
};

pages.actors = {
  title: "Actors",
  mount(root) {
    this.out = h("div");
    root.append(h("h1", {}, "Actors"), this.out);
  },
  async refresh() {
    // The actors list pages by at most 500.
    const { items, truncated } = await listAll("/api/1.0/actors", {}, 500);
    if (unchanged(this, items)) return;
    this.out.replaceChildren(table(`${items.length} actors${truncated ? ` (first ${LIST_CAP})` : ""}`,
      ["Actor", "State", "Running", "Version", "Revision", "Mailbox", "Restarts", "Last transition"],
      items.map((a) => [
        h("span", { class: "mono" }, `${a.kind}/${a.id}`),
        stateBadge(a.state),
        a.active ? "yes" : "not yet",
        { cell: String(a.version ?? ""), class: "num" },
        { cell: String(a.mod_revision ?? ""), class: "num" },
        { cell: String(a.mailbox_depth ?? ""), class: "num" },
        { cell: String(a.restarts ?? ""), class: "num" },
        timeCell(a.last_transition_at),
      ]), "no actors"));
  },
};

// ---------------------------------------------------------------------------------
// Navigation and refresh.

let current = null;
let refreshing = null;
let again = false;

function pageName() {
  const name = location.hash.replace(/^#/, "");
  return Object.hasOwn(pages, name) ? name : "overview";
}

async function show() {
  const name = pageName();
  const page = pages[name];
  current = page;
  document.title = `${page.title} · resource-plane`;
  for (const a of document.querySelectorAll("nav a[data-page]")) {
    if (a.dataset.page === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const root = $("#page");
  root.replaceChildren();
  page.shown = null;
  try {
    await page.mount(root);
  } catch (e) {
    report(e);
  }
  if (current === page) refreshNow();
}

function report(e) {
  // The token form is open; accepting a token shows the page again.
  if (e instanceof AuthNeeded) return;
  const root = $("#page");
  let box = $("#page-error");
  if (!box) {
    box = h("p", { id: "page-error", class: "error", role: "alert" });
    root.prepend(box);
  }
  box.textContent = e instanceof ApiFailure ? `The API answered ${e.status}: ${e.message}` : `Could not load: ${e.message}`;
  if (!(e instanceof ApiFailure) && !(e instanceof TypeError)) console.error(e);
}

/// Refreshes the current page now; calls that arrive meanwhile coalesce into one more.
function refreshNow() {
  if (refreshing) {
    again = true;
    return refreshing;
  }
  const run = (async () => {
    do {
      again = false;
      const page = current;
      if (!page || !$("#token-panel").hidden) break;
      try {
        await page.refresh();
        const box = $("#page-error");
        if (box) box.remove();
      } catch (e) {
        report(e);
      }
    } while (again);
  })();
  // Cleared in a later microtask, so even a run that ends at once cannot leave it set.
  refreshing = run.finally(() => {
    refreshing = null;
  });
  return refreshing;
}

// ---------------------------------------------------------------------------------
// Live updates: the event stream, or polling while it is not there.

let pollTimer = null;
let streamAbort = null;
let lastEventId = null;
let streamRetry = null;

function setLive(text, mode) {
  const el = $("#live");
  el.textContent = text;
  el.className = `live ${mode || ""}`;
}

function startPolling(why) {
  setLive(`polling every ${POLL_MS / 1000}s (${why})`, "polling");
  if (!pollTimer) pollTimer = setInterval(() => refreshNow(), POLL_MS);
}

function stopPolling() {
  if (pollTimer) clearInterval(pollTimer);
  pollTimer = null;
}

function restartStream() {
  if (streamAbort) streamAbort.abort();
  if (streamRetry) clearTimeout(streamRetry);
  streamRetry = null;
  stream(0);
}

function retryStream(attempt, delay) {
  if (streamRetry) clearTimeout(streamRetry);
  streamRetry = setTimeout(() => stream(attempt), delay);
}

async function stream(attempt) {
  const ctl = new AbortController();
  streamAbort = ctl;
  const used = token();
  const headers = authHeaders({ Accept: "text/event-stream" });
  if (lastEventId) headers.set("Last-Event-ID", lastEventId);
  let res;
  try {
    res = await fetch("/api/1.0/events", { headers, cache: "no-store", credentials: "omit", signal: ctl.signal });
  } catch (e) {
    if (ctl.signal.aborted) return;
    startPolling("event stream unreachable");
    retryStream(attempt + 1, RETRY_MS[Math.min(attempt, RETRY_MS.length - 1)]);
    return;
  }
  if (res.status === 401) {
    // Accepting a token restarts the stream.
    if (token() === used && !ctl.signal.aborted) askForToken(used ? "The token was refused. Enter it again." : "");
    return;
  }
  if (!res.ok || !res.body) {
    startPolling(res.status === 404 ? "no event stream on this server" : `event stream answered ${res.status}`);
    retryStream(0, res.status === 404 ? STREAM_ABSENT_RETRY_MS : RETRY_MS[Math.min(attempt, RETRY_MS.length - 1)]);
    return;
  }
  stopPolling();
  setLive("live: event stream", "streaming");
  refreshNow();
  try {
    await readEvents(res.body, onEvent);
  } catch (e) {
    if (ctl.signal.aborted) return;
  }
  if (ctl.signal.aborted) return;
  startPolling("event stream dropped; reconnecting");
  retryStream(1, RETRY_MS[0]);
}

/// Reads Server-Sent Events from a byte stream and calls `on(event, data, id)` per
/// dispatched event (comments such as `: keep-alive` are skipped).
async function readEvents(body, on) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  let event = "";
  let data = [];
  let id = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let nl;
    while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + (buf.startsWith("\r\n", nl) ? 2 : 1));
      if (line === "") {
        if (data.length || event) on(event || "message", data.join("\n"), id);
        event = "";
        data = [];
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const name = colon < 0 ? line : line.slice(0, colon);
      let value2 = colon < 0 ? "" : line.slice(colon + 1);
      if (value2.startsWith(" ")) value2 = value2.slice(1);
      if (name === "event") event = value2;
      else if (name === "data") data.push(value2);
      else if (name === "id") id = value2;
    }
  }
}

function onEvent(event, data, id) {
  if (id) lastEventId = id;
  // change, reset and overflow all mean: re-read the current page.
  refreshNow();
}

// ---------------------------------------------------------------------------------

function main() {
  setupToken();
  window.addEventListener("hashchange", show);
  // Keep "time in state" columns current even without events.
  setInterval(() => {
    for (const t of document.querySelectorAll("time[datetime]")) {
      t.textContent = `${ago(t.getAttribute("datetime"))}${t.dataset.suffix ?? " ago"}`;
    }
  }, 1000);
  show();
  stream(0);
}

main();
