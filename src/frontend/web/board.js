// fedgate status board: polls v1/status every two seconds and runs SQL queries
// (v1/query) or published services (v1/services/NAME) from the console.
//
// Every piece of text is put in the page with createElement/textContent, never
// with innerHTML, because member names, errors and query results come from other
// organisations and must not be able to inject markup into the page.
// URLs are relative so that the board also works behind a path prefix.
"use strict";

const REFRESH_MS = 2000;

// Badge colours. Breaker states, member call states and query outcomes share one
// table because "cancelled" means the same thing in both places.
const TONES = {
  closed: "green", open: "red", probing: "amber", local: "blue", none: "grey",
  ok: "green", cached: "teal", stale: "amber", pruned: "grey", unavailable: "red",
  timed_out: "red", denied: "purple", busy: "amber", error: "red", cancelled: "grey",
  answered: "green", failed: "red", refused: "purple",
};

const $ = (id) => document.getElementById(id);

// Builds an element. Strings among the children become text nodes, so callers can
// pass untrusted values directly; null and false children are skipped so that
// optional parts can be written inline.
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  if (props.className) node.className = props.className;
  if (props.text != null) node.textContent = String(props.text);
  if (props.title) node.title = String(props.title);
  for (const [key, value] of Object.entries(props.dataset || {})) {
    if (value != null) node.dataset[key] = String(value);
  }
  for (const [key, value] of Object.entries(props.attrs || {})) node.setAttribute(key, String(value));
  for (const child of children.flat(Infinity)) {
    if (child == null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const badge = (text, tone = TONES[text] || "grey") => el("span", { className: `badge tone-${tone}`, text });
const dim = (text = "—") => el("span", { className: "dim", text });
const num = (value, className = "") => el("td", { className: `num ${className}` }, value ?? dim());
const fmtMs = (ms) => (ms == null ? null : Number(ms).toFixed(1));
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
// Long text cut to one line with an ellipsis; the whole text is in the tooltip.
// The cut is done on a <div> because table cells ignore max-width.
const clipped = (text, className = "") => el("div", { className: `clip ${className}`, text, title: text });

// Local wall-clock time of an RFC 3339 timestamp; the full timestamp goes in a tooltip.
function fmtTime(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso ?? "";
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, "0")).join(":");
}

// Replaces the rows of a table body, or shows one muted row when there is nothing.
function fillBody(table, rows, emptyText) {
  const columns = table.tHead.rows[0]?.cells.length || 1;
  const empty = el("tr", { className: "empty" }, el("td", { text: emptyText, attrs: { colspan: columns } }));
  table.tBodies[0].replaceChildren(...(rows.length ? rows : [empty]));
}

// Re-rendering a section only when its data changed keeps open <details>, the
// selected service and typed parameters intact across the two-second refresh.
const lastRendered = new Map();
function renderIfChanged(key, data, render) {
  const json = JSON.stringify(data ?? null);
  if (lastRendered.get(key) === json) return;
  lastRendered.set(key, json);
  render(data ?? []);
}

// ---------------------------------------------------------------- status board

function memberRow(m, self) {
  return el("tr", { dataset: { member: m.name, breaker: m.breaker, lastState: m.last_state } },
    el("td", {}, el("strong", { text: m.name }), m.name === self && el("span", { className: "tag", text: "this gateway" })),
    el("td", { text: m.kind }),
    el("td", { className: "mono small" }, m.endpoint ?? dim()),
    el("td", { className: "small serves" }, (m.serves || []).join(", ") || dim()),
    el("td", {}, badge(m.breaker)),
    el("td", {}, m.last_state ? badge(m.last_state) : dim()),
    num(fmtMs(m.last_latency_ms)),
    num(m.calls),
    num(m.failures, m.failures > 0 ? "bad" : ""),
    el("td", {}, m.last_error ? clipped(m.last_error, "small err-text") : dim()),
  );
}

// One row per class of each door, after a row for the door's shared slots. The
// load bar shows the slots a class holds against what it may reach: its cap, or its
// reserved slots plus the shared ones.
const DOORS = { queries: "client queries", subqueries: "sub-queries" };
function admissionRows(admission) {
  return Object.entries(admission || {}).flatMap(([door, load]) => {
    const shared = el("tr", { dataset: { door, class: "shared" } },
      el("td", {}, el("strong", { text: DOORS[door] || door }), el("span", { className: "muted small", text: ` ${load.total} slots` })),
      el("td", { className: "muted", text: "shared" }),
      num(load.shared), num(null), num(null),
      num(load.shared_in_use),
      el("td", {}, loadBar(load.shared_in_use, load.shared)),
      num(null));
    const classes = (load.classes || []).map((c) => {
      const reach = c.max_concurrent ?? (c.reserved + load.shared);
      return el("tr", { dataset: { door, class: c.class } },
        el("td", {}),
        el("td", { text: c.class }),
        num(c.reserved), num(c.max_concurrent), num(c.max_per_origin),
        num(c.in_use),
        el("td", {}, loadBar(c.in_use, reach)),
        num(c.refused, c.refused > 0 ? "bad" : ""));
    });
    return [shared, ...classes];
  });
}

function loadBar(used, of) {
  return el("meter", { className: "load", title: `${used} of ${of}`,
    attrs: { min: 0, max: Math.max(of, 1), value: Math.min(used, Math.max(of, 1)), high: Math.max(of, 1) * 0.8 } });
}

function datasetRow(d) {
  const fields = d.fields || [];
  // The tooltip gives a quick list; the <details> gives units and descriptions.
  const tooltip = fields.map((f) => `${f.name}: ${f.type}${f.unit ? ` (${f.unit})` : ""}`).join("\n");
  const list = el("ul", { className: "fields" }, fields.map((f) =>
    el("li", {}, el("code", { text: f.name }), " ", el("span", { className: "type", text: f.type }),
      f.unit && el("span", { className: "muted", text: ` ${f.unit}` }),
      f.description && el("span", { className: "muted", text: ` — ${f.description}` }))));
  return el("tr", { dataset: { dataset: d.name } },
    el("td", {}, el("strong", { text: d.name })),
    el("td", { className: "small" }, d.description || dim()),
    el("td", {}, (d.members || []).map((m) => el("span", { className: "chip", text: m }))),
    el("td", { className: "fields-cell", title: tooltip },
      el("details", {}, el("summary", { text: plural(fields.length, "field") }), list)),
  );
}

function serviceItem(s) {
  const params = s.params || [];
  return el("li", { dataset: { service: s.name } },
    el("div", {}, el("code", { className: "svc-name", text: s.name }),
      el("span", { className: "params" }, "(", params.map((p, i) => [
        i > 0 && ", ",
        el("span", { className: "param", title: p.description }, p.name, ": ", el("span", { className: "type", text: p.type })),
      ]), ")")),
    s.description && el("div", { className: "small muted", text: s.description }),
  );
}

// One small badge per member: "member: state (rows)", with the reason as tooltip.
function memberBadges(members) {
  return (members || []).map((m) => {
    const b = badge(`${m.member}: ${m.state} (${m.rows ?? 0})`, TONES[m.state] || "grey");
    if (m.reason) b.title = m.reason;
    return b;
  });
}

function recentRow(q) {
  const what = q.service
    ? el("td", {}, badge("service", "blue"), " ", el("code", { text: q.service }))
    : el("td", {}, clipped(q.sql ?? "", "sql mono"));
  if (q.error) what.append(clipped(q.error, "small err-text"));
  return el("tr", { dataset: { queryId: q.query_id, outcome: q.outcome } },
    el("td", { className: "mono small", text: fmtTime(q.started_at), title: q.started_at }),
    el("td", { className: "mono small", text: q.origin }),
    what,
    num(q.rows),
    num(fmtMs(q.elapsed_ms)),
    el("td", {}, q.partial ? badge("PARTIAL", "amber") : dim("no")),
    el("td", {}, badge(q.outcome)),
    el("td", {}, el("div", { className: "badges" }, memberBadges(q.members))),
  );
}

function renderStatus(s) {
  document.title = `fedgate — ${s.region} status`;
  $("region").textContent = s.region;
  $("gw-member").textContent = s.member;
  $("caller").textContent = s.caller;
  const version = $("config-version");
  version.textContent = (s.config_version || "").slice(0, 12);
  version.title = s.config_version || "";

  renderIfChanged("members", s.members, (rows) =>
    fillBody($("members"), rows.map((m) => memberRow(m, s.member)), "No members configured."));
  renderIfChanged("datasets", s.datasets, (rows) =>
    fillBody($("datasets"), rows.map(datasetRow), "No datasets configured."));
  renderIfChanged("services", s.services, (services) => {
    $("services").replaceChildren(...(services.length ? services.map(serviceItem)
      : [el("li", { className: "muted", text: "No published services." })]));
    renderServiceCaller(services);
  });
  renderIfChanged("admission", s.admission, (a) =>
    fillBody($("admission"), admissionRows(a), "No admission limits."));
  renderIfChanged("recent", s.recent, (rows) =>
    fillBody($("recent"), rows.map(recentRow), "No queries yet."));
}

// ---------------------------------------------------------------- audit log

function auditRow(r) {
  const e = r.entry || {};
  const tr = el("tr", {},
    el("td", { className: "num", text: String(r.seq) }),
    el("td", { text: fmtTime(e.time) }),
    el("td", { text: e.kind || "" }),
    el("td", { text: e.origin || "" }),
    el("td", { text: (e.datasets || []).join(", ") }),
    el("td", { text: e.decision || "" }),
    el("td", { text: e.level || e.reason || "" }),
    el("td", { className: "num", text: String(e.rows ?? "") }),
    el("td", { className: "mono", text: (r.hash || "").slice(0, 12), title: r.hash || "" }));
  tr.dataset.seq = String(r.seq);
  return tr;
}

// Only this member's own identity may read its log: for anyone else the gateway
// answers 403 and the section stays hidden.
async function refreshAudit() {
  try {
    const resp = await fetch("v1/audit?limit=20", { cache: "no-store", headers: { Accept: "application/json" } });
    if (!resp.ok) {
      $("audit").hidden = true;
      return;
    }
    const page = await resp.json();
    $("audit").hidden = false;
    renderIfChanged("audit", page.records, (rows) =>
      fillBody($("audit-records"), rows.map(auditRow), "No records yet."));
  } catch (e) {
    $("audit").hidden = true;
  }
}

async function verifyAudit() {
  const verdict = $("audit-verdict");
  verdict.textContent = "verifying…";
  delete verdict.dataset.state;
  try {
    const resp = await fetch("v1/audit/verify", { cache: "no-store", headers: { Accept: "application/json" } });
    const body = await resp.json();
    if (!resp.ok) throw new Error(body.error ? body.error.message : `HTTP ${resp.status}`);
    if (body.broken) {
      verdict.dataset.state = "broken";
      verdict.textContent = `broken at record ${body.broken.seq} (line ${body.broken.line}): ${body.broken.problem}`;
    } else {
      verdict.dataset.state = "intact";
      verdict.textContent = `intact: ${body.records} records verify, head ${body.head.seq} ${body.head.hash.slice(0, 12)}`;
    }
  } catch (e) {
    verdict.dataset.state = "error";
    verdict.textContent = `could not verify: ${e.message}`;
  }
}

// ---------------------------------------------------------------- pictures

// The map and the charts are SVG that the gateway draws (it escapes every name it
// puts in them). They are parsed as XML, which runs nothing, and as a second guard
// only the elements and attributes the gateway draws with are kept: an allow-list,
// so nothing that could run, load or restyle the page can join it.
const SVG_ELEMENTS = new Set(["svg", "g", "title", "rect", "circle", "line", "path", "text", "tspan"]);
const SVG_ATTRIBUTES = new Set([
  "xmlns", "viewBox", "width", "height", "role", "x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "r", "d",
  "fill", "stroke", "stroke-width", "stroke-opacity", "stroke-dasharray", "font-family", "font-size",
  "font-weight", "text-anchor",
]);
function sanitizedSvg(text, what) {
  const doc = new DOMParser().parseFromString(text, "image/svg+xml");
  const svg = doc.documentElement;
  if (svg.nodeName !== "svg" || doc.getElementsByTagName("parsererror").length) {
    throw new Error(`${what} is not an SVG picture`);
  }
  for (const node of [...svg.querySelectorAll("*")]) {
    if (!SVG_ELEMENTS.has(node.nodeName)) node.remove();
  }
  for (const node of [svg, ...svg.querySelectorAll("*")]) {
    for (const attr of [...node.attributes]) {
      if (!SVG_ATTRIBUTES.has(attr.name) && !attr.name.startsWith("data-")) node.removeAttribute(attr.name);
    }
  }
  return document.importNode(svg, true);
}

// The charts change once a minute at most; the map whenever a member's state does.
const CHARTS_EVERY_MS = 10000;
let chartsFetchedAt = 0;
async function refreshPictures() {
  const wanted = [["map", "v1/board/map.svg"]];
  if (Date.now() - chartsFetchedAt >= CHARTS_EVERY_MS) wanted.push(["charts", "v1/board/charts.svg"]);
  for (const [id, url] of wanted) {
    const resp = await fetch(url, { cache: "no-store" });
    if (!resp.ok) throw new Error(`${url}: HTTP ${resp.status}`);
    const text = await resp.text();
    if (id === "charts") chartsFetchedAt = Date.now();
    if (lastRendered.get(url) === text) continue;
    $(id).replaceChildren(sanitizedSvg(text, url));
    lastRendered.set(url, text); // only once drawn, so a picture that fails is tried again
  }
  document.body.dataset.pictures = "drawn";
}

// The poll is a chain of timeouts rather than setInterval so that a slow gateway
// never has two status requests in flight; refresh() may also be called early
// (after a console run) to show the new query in the recent list at once.
let refreshTimer = null;
let refreshing = false;
async function refresh() {
  clearTimeout(refreshTimer);
  if (refreshing) return;
  refreshing = true;
  const live = $("live");
  try {
    const resp = await fetch("v1/status", { cache: "no-store", headers: { Accept: "application/json" } });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    renderStatus(await resp.json());
    await refreshPictures();
    await refreshAudit();
    live.dataset.state = "ok";
    live.textContent = `live · ${fmtTime(new Date().toISOString())}`;
    document.body.dataset.board = "live";
  } catch (e) {
    live.dataset.state = "error";
    live.textContent = `unreachable · ${e.message}`;
    document.body.dataset.board = "offline";
  } finally {
    refreshing = false;
    refreshTimer = setTimeout(refresh, REFRESH_MS);
  }
}

// ---------------------------------------------------------------- console

function clearOutput() {
  $("output").hidden = true;
  $("output").classList.remove("partial");
  $("error").hidden = true;
  $("error").replaceChildren();
  $("summary-line").replaceChildren();
  $("summary-line").className = "summary-line";
  $("result").tHead.replaceChildren();
  $("result").tBodies[0].replaceChildren();
  $("result-wrap").hidden = true;
  $("summary").tBodies[0].replaceChildren();
  $("summary-wrap").hidden = true;
}

const isNumericType = (type) => /^(u?int|float|double|decimal)/i.test(type || "");

// A result cell: NULL is dimmed, numbers are right-aligned, booleans read true/false.
function valueCell(value, type) {
  if (value == null) return el("td", { className: "null", text: "NULL" });
  if (typeof value === "number") return el("td", { className: "num", text: String(value) });
  if (typeof value === "boolean") return el("td", { className: "bool", text: String(value) });
  if (typeof value === "object") return el("td", { className: "mono", text: JSON.stringify(value) });
  // Decimals and very large integers may arrive as strings; align them as numbers.
  return el("td", { className: isNumericType(type) ? "num" : "", text: value });
}

function renderResult(body) {
  const columns = body.columns;
  const has = Object.prototype.hasOwnProperty;
  $("result").tHead.replaceChildren(el("tr", {}, columns.map((c) =>
    el("th", { text: c.name, title: c.type, className: isNumericType(c.type) ? "num" : "" }))));
  // Rows are arrow_json objects keyed by column name, which leave out null values,
  // so a missing key is a NULL; arrays are accepted too, in column order.
  $("result").tBodies[0].replaceChildren(...(body.rows || []).map((row) =>
    el("tr", {}, columns.map((c, i) => {
      const value = Array.isArray(row) ? row[i] : has.call(row, c.name) ? row[c.name] : null;
      return valueCell(value, c.type);
    }))));
  $("result-wrap").hidden = false;
}

function renderSummary(s, failed) {
  fillBody($("summary"), (s.members || []).map((m) =>
    el("tr", { dataset: { member: m.member, state: m.state } },
      el("td", { text: m.member }),
      el("td", { title: m.age_ms ? `answer ${m.age_ms} ms old` : "" }, badge(m.state)),
      num(m.rows),
      num(fmtMs(m.elapsed_ms)),
      el("td", { className: "small", text: m.reason || "" }))), "No members consulted.");
  $("summary-wrap").hidden = false;

  const line = $("summary-line");
  line.dataset.queryId = s.query_id || "";
  line.title = `query ${s.query_id || "?"} · config ${s.config_version || "?"}`;
  const elapsed = `${fmtMs(s.elapsed_ms) ?? "?"} ms`;
  if (failed) {
    line.append(`failed after ${elapsed}`);
  } else {
    line.append(`${plural(s.rows ?? 0, "row")} in ${elapsed} · `);
    line.append(s.partial ? el("strong", { className: "partial-flag", text: "PARTIAL" }) : "complete");
  }
  // A partial answer is easy to mistake for a whole one, so the output box is marked too.
  line.classList.toggle("is-partial", !!s.partial);
  $("output").classList.toggle("partial", !!s.partial);
}

function showError(code, message) {
  $("error").replaceChildren(el("strong", { className: "code", text: code }), " ", message || "");
  $("error").hidden = false;
}

// Posts one request (a query or a service call) and shows its answer or error.
// body.dataset.lastRun is removed at the start and set at the very end, after
// rendering, so that a test waiting on it sees the finished output.
async function run(url, bodyText) {
  const buttons = [$("run"), $("svc-run")];
  clearOutput();
  delete document.body.dataset.lastRun;
  buttons.forEach((b) => { b.disabled = true; });
  $("status").textContent = "running…";
  const started = performance.now();
  let outcome = "error";
  let failure = "";
  try {
    const resp = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: bodyText,
    });
    const text = await resp.text();
    let body = null;
    try { body = JSON.parse(text); } catch { /* not JSON: shown as plain text below */ }
    if (resp.ok && body && Array.isArray(body.columns)) {
      renderResult(body);
      if (body.summary) renderSummary(body.summary, false);
      outcome = "ok";
    } else {
      const err = body?.error || {
        code: resp.ok ? "bad_response" : `http_${resp.status}`,
        message: text.trim() || resp.statusText,
      };
      showError(err.code, err.message);
      failure = err.code;
      if (body?.summary) renderSummary(body.summary, true);
    }
  } catch (e) {
    showError("network", e.message);
    failure = "network";
  } finally {
    $("output").hidden = false;
    const ms = Math.round(performance.now() - started);
    $("status").textContent = outcome === "ok" ? `done · ${ms} ms round trip` : `failed · ${failure}`;
    buttons.forEach((b) => { b.disabled = false; });
    document.body.dataset.lastRun = outcome;
    document.body.dataset.runs = String(Number(document.body.dataset.runs || 0) + 1);
    chartsFetchedAt = 0; // the run is in the charts now
    refresh();
  }
}

function runQuery() {
  const sql = $("sql").value.trim();
  if (!sql || $("run").disabled) return;
  run("v1/query", JSON.stringify({ sql, allow_partial: $("allow-partial").checked }));
}

// ---------------------------------------------------------------- service caller

let services = [];

function renderServiceCaller(list) {
  services = list;
  const select = $("svc-name");
  const previous = select.value;
  select.replaceChildren(...list.map((s) => el("option", { text: s.name, attrs: { value: s.name } })));
  if (list.some((s) => s.name === previous)) select.value = previous;
  $("svc-caller").hidden = list.length === 0;
  renderServiceParams();
}

function renderServiceParams() {
  const service = services.find((s) => s.name === $("svc-name").value);
  $("svc-description").textContent = service?.description || "";
  $("svc-params").replaceChildren(...(service?.params || []).map((p) => {
    const boolean = /^bool/i.test(p.type);
    // Numbers use text inputs: a number input would silently drop what it cannot
    // parse, whereas the server's message names the parameter and the expected type.
    const input = el("input", {
      attrs: { id: `svc-param-${p.name}`, type: boolean ? "checkbox" : "text", placeholder: p.type },
      dataset: { param: p.name, type: p.type },
      title: p.description,
    });
    return el("label", { className: "svc-param" }, el("span", { text: p.name }), input);
  }));
}

// JSON text of one parameter, or undefined to leave an empty optional number out
// (the server then answers "missing parameter …").
function paramJson(input) {
  const type = (input.dataset.type || "").toLowerCase();
  if (input.type === "checkbox") return String(input.checked);
  const raw = input.value.trim();
  if (/^u?int/.test(type)) {
    if (!raw) return undefined;
    // Integers are copied digit for digit so int64 values above 2^53 are not rounded.
    return /^-?\d+$/.test(raw) ? raw : JSON.stringify(raw);
  }
  if (/^(float|double|decimal)/.test(type)) {
    if (!raw) return undefined;
    return Number.isFinite(Number(raw)) ? String(Number(raw)) : JSON.stringify(raw);
  }
  return JSON.stringify(input.value);
}

function callService() {
  const name = $("svc-name").value;
  if (!name || $("svc-run").disabled) return;
  const parts = [];
  for (const input of $("svc-params").querySelectorAll("input")) {
    const json = paramJson(input);
    if (json !== undefined) parts.push(`${JSON.stringify(input.dataset.param)}:${json}`);
  }
  run(`v1/services/${encodeURIComponent(name)}`, `{${parts.join(",")}}`);
}

// ---------------------------------------------------------------- wiring

$("run").addEventListener("click", runQuery);
$("sql").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    runQuery();
  }
});
$("svc-run").addEventListener("click", callService);
$("audit-verify").addEventListener("click", verifyAudit);
$("svc-name").addEventListener("change", renderServiceParams);
$("svc-params").addEventListener("keydown", (e) => {
  if (e.key === "Enter") {
    e.preventDefault();
    callService();
  }
});
refresh();
